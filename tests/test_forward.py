"""The layer-by-layer Qwen2 forward pass (forward.py) against transformers' `Qwen2ForCausalLM`, and its memory.

The tiny checkpoints get attention weights ten times the fixtures' scale, so that attention, the rotary
embedding and the causal mask move the loss by far more than the tolerance (a wrong `rope_theta` is shown
to fail it). Tolerance: 1e-5 nats per token, absolute, on losses of ~6 (float32 rounding measured ~5e-7).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.checkpoints import HIDDEN, random_state_dict, write_checkpoint

from hubmerge.quality import forward
from hubmerge.quality.forward import Checkpoint, Unrunnable, token_losses
from hubmerge.sources.checkpoint import TensorReader

TOLERANCE = 1e-5
# Three sequences of 7, 2 and 40 tokens (a two-token one predicts a single token).
SEQUENCES = [
    torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 2, 40)
]


def _sharp_state_dict(seed: int, head: bool) -> dict[str, torch.Tensor]:
    state = random_state_dict(seed, head=head)
    for name in state:
        if "self_attn" in name:
            state[name] = state[name] * 10
    return state


def _transformers_losses(folder: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            torch.nn.functional.cross_entropy(
                model(input_ids=torch.tensor([s])).logits[0, :-1].float(),
                torch.tensor(s[1:]),
                reduction="none",
            )
            for s in sequences
        ]


def _largest_difference(ours: tuple[torch.Tensor, ...], reference: list[torch.Tensor]) -> float:
    assert [len(t) for t in ours] == [len(t) for t in reference] == [len(s) - 1 for s in SEQUENCES]
    return max(float((a - b).abs().max()) for a, b in zip(ours, reference))


@pytest.mark.parametrize(
    ("head", "dtype", "shards", "config"),
    [
        (False, torch.float32, 1, {}),  # tied: the head is the embedding, read in vocabulary chunks
        (True, torch.float32, 3, {}),  # untied lm_head, sharded checkpoint
        (False, torch.bfloat16, 2, {}),
        (True, torch.bfloat16, 1, {}),
        (False, torch.float32, 1, {"rope_scaling": {"type": "linear", "factor": 4.0}}),
        (True, torch.float32, 1, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
        (False, torch.float32, 1, {"rope_theta": 10000.0, "head_dim": 8}),
    ],
    ids=[
        "tied",
        "untied-sharded",
        "bf16-tied-sharded",
        "bf16-untied",
        "rope-linear",
        "rope-dynamic",
        "theta-1e4",
    ],
)
def test_loss_per_token_equals_transformers_float32_forward_pass(
    tmp_path: Path, head: bool, dtype: torch.dtype, shards: int, config: dict[str, Any]
) -> None:
    folder = write_checkpoint(
        tmp_path / "m", _sharp_state_dict(1, head), dtype=dtype, shards=shards, **config
    )
    ours = token_losses(Checkpoint.local("m", folder), SEQUENCES).per_sequence
    assert _largest_difference(ours, _transformers_losses(folder, SEQUENCES)) < TOLERANCE


def test_the_parity_tolerance_catches_a_wrong_rotary_embedding(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "m", _sharp_state_dict(2, head=False), dtype=torch.float32)
    reference = _transformers_losses(folder, SEQUENCES)
    checkpoint = Checkpoint.local("m", folder)
    wrong = Checkpoint("m", folder, {**checkpoint.config, "rope_theta": 100.0}, checkpoint.tensors)
    assert _largest_difference(token_losses(wrong, SEQUENCES).per_sequence, reference) > 100 * TOLERANCE


@pytest.fixture
def live_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Instruments the checkpoint reader: bytes of tensors read and still alive, their peak, the largest read,
    and the bytes read of each tensor."""
    stats: dict[str, Any] = {"live": 0, "peak": 0, "largest": 0, "read": {}}
    real = TensorReader.read

    def tracked(self: TensorReader, info: Any, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = real(self, info, rows)
        size = tensor.numel() * tensor.element_size()
        stats["live"] += size
        stats["read"][info.name] = stats["read"].get(info.name, 0) + size
        stats["peak"] = max(stats["peak"], stats["live"])
        stats["largest"] = max(stats["largest"], size)
        weakref.finalize(tensor, _release, stats, size)
        return tensor

    monkeypatch.setattr(TensorReader, "read", tracked)
    yield stats


def _release(stats: dict[str, Any], size: int) -> None:
    stats["live"] -= size


@pytest.mark.slow
def test_weights_are_held_a_chunk_at_a_time_never_a_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live_reads: dict[str, Any]
) -> None:
    # float32 weights: the tensors read are the ones computed with (no conversion copy to hide behind).
    folder = write_checkpoint(tmp_path / "m", _sharp_state_dict(3, head=True), dtype=torch.float32, shards=2)
    checkpoint = Checkpoint.local("m", folder)
    whole = token_losses(checkpoint, SEQUENCES).per_sequence  # default chunks: every matrix here is one chunk
    live_reads.update(live=0, peak=0, largest=0, read={})
    chunk = 1024  # bytes: 8 rows of the 32-wide matrices, 4 rows of down_proj
    monkeypatch.setattr(forward, "CHUNK_BYTES", chunk)
    chunked = token_losses(checkpoint, SEQUENCES).per_sequence

    layer = sum(i.nbytes for n, i in checkpoint.tensors.items() if n.startswith("model.layers.0."))
    assert live_reads["largest"] <= chunk
    assert live_reads["peak"] <= chunk < layer / 10
    # Every weight is read once, the embedding only in spans around the tokens' rows (the head is lm_head).
    embedding = "model.embed_tokens.weight"
    read = live_reads["read"]
    assert {n: b for n, b in read.items() if n != embedding} == {
        n: i.nbytes for n, i in checkpoint.tensors.items() if n != embedding
    }
    assert (
        len({t for s in SEQUENCES for t in s}) * HIDDEN * 4
        <= read[embedding]
        < checkpoint.tensors[embedding].nbytes / 4
    )
    assert _largest_difference(chunked, list(whole)) < TOLERANCE  # only the summation order differs


def test_check_finite_finds_an_inf_in_an_embedding_row_no_text_uses(tmp_path: Path) -> None:
    state = random_state_dict(4, head=True)
    unused = next(i for i in range(512) if all(i not in s for s in SEQUENCES))
    state["model.embed_tokens.weight"][unused, 3] = float("inf")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    folder = write_checkpoint(tmp_path / "m", state, dtype=torch.bfloat16)
    result = token_losses(Checkpoint.local("m", folder), SEQUENCES, check_finite=True)
    assert result.nonfinite == ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight")
    assert token_losses(Checkpoint.local("m", folder), SEQUENCES).nonfinite == ()


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "llama"}, "model_type 'llama': the check runs Qwen2 models only"),
        (
            {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
            "rotary scaling 'yarn' is not implemented (none, linear and dynamic are)",
        ),
        (
            {"use_sliding_window": True, "sliding_window": 16},
            "a text of 40 tokens is longer than the 16 this pass computes exactly",
        ),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not implemented (only silu)"),
        ({"num_hidden_layers": 3}, "m has no tensor model.layers.2.input_layernorm.weight"),
        ({"vocab_size": 500}, "m: model.embed_tokens.weight has shape [512, 32], its config says [500, 32]"),
    ],
)
def test_what_the_pass_does_not_implement_is_refused_in_one_line(
    tmp_path: Path, config: dict[str, Any], reason: str
) -> None:
    folder = write_checkpoint(tmp_path / "m", random_state_dict(5), dtype=torch.bfloat16)
    checkpoint = Checkpoint.local("m", folder)
    with pytest.raises(Unrunnable) as refused:
        token_losses(Checkpoint("m", folder, {**checkpoint.config, **config}, checkpoint.tensors), SEQUENCES)
    assert str(refused.value) == reason


def test_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "m", random_state_dict(6), dtype=torch.bfloat16)
    with pytest.raises(Unrunnable, match="ids outside the model's vocabulary of 512"):
        token_losses(Checkpoint.local("m", folder), [[1, 2, 512]])
