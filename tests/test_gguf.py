"""GGUF export: files transformers loads with the safetensors model's logits and tokenizer, llama.cpp's
metadata and per-tensor types, and quantizer blocks equal to llama.cpp's reference quantizer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from support.checkpoints import REPO, TINY, random_state_dict, write_checkpoint
from support.cli import invoke_cli
from support.hub import hub_env, local_hub
from support.hubserver import LocalHub

from hubmerge.cli import main
from hubmerge.gguf import writer
from hubmerge.gguf.quants import quantize
from hubmerge.gguf.writer import gguf_tensor_types, write_gguf

FIXTURES = Path(__file__).parent / "gguf_fixtures"
PROMPTS = torch.tensor([[1, 2, 3, 50, 100, 481, 200, 482, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1]])
WIDE = {"hidden_size": 256, "intermediate_size": 512}  # rows of 256: the K-quants apply without fallback


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {
        "tied": write_checkpoint(root / "tied", random_state_dict(1)),
        "untied": write_checkpoint(root / "untied", random_state_dict(2, head=True), shards=2),
        "wide": write_checkpoint(root / "wide", random_state_dict(3, hidden=256, intermediate=512), **WIDE),
        "wide-untied": write_checkpoint(
            root / "wide-untied", random_state_dict(4, hidden=256, intermediate=512, head=True), **WIDE
        ),
    }


def logits(folder: Path, gguf_file: str | None = None, round_to: torch.dtype | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    if (
        round_to is not None
    ):  # what a file of that dtype stores: its matrices rounded, norms and biases in F32
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.data = parameter.data.to(round_to).float()
    with torch.no_grad():
        return model(PROMPTS).logits


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_f32_file_gives_exactly_the_safetensors_logits(models: dict[str, Path], kind: str) -> None:
    folder = models[kind]
    write_gguf(folder, folder / "m-F32.gguf", "f32")
    assert torch.equal(logits(folder, "m-F32.gguf"), logits(folder))
    assert ("output.weight" in tensor_types(folder / "m-F32.gguf")) == (kind == "untied")


@pytest.mark.slow
@pytest.mark.parametrize(("gguf_type", "dtype"), [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_f16_and_bf16_files_give_the_logits_of_the_model_rounded_to_that_dtype(
    models: dict[str, Path], gguf_type: str, dtype: torch.dtype
) -> None:
    folder = models["untied"]
    write_gguf(folder, folder / f"m-{gguf_type}.gguf", gguf_type)
    assert torch.equal(logits(folder, f"m-{gguf_type}.gguf"), logits(folder, round_to=dtype))


# The largest logit error of each type relative to the largest logit, on these random (unstructured, so
# hard to quantize) models: measured 0.5 % and 1.2 % (Q8_0), 4.5 % (Q6_K), 7.7 % (Q5_K_M), 12.4 % (Q4_K_M).
BOUNDS = {"q8_0": 0.02, "q6_k": 0.07, "q5_k_m": 0.12, "q4_k_m": 0.2}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "gguf_type"),
    [("tied", "q8_0"), ("wide", "q8_0"), ("wide", "q6_k"), ("wide", "q5_k_m"), ("wide-untied", "q4_k_m")],
)
def test_quantized_file_logits_stay_within_the_stated_bound(
    models: dict[str, Path], kind: str, gguf_type: str
) -> None:
    folder = models[kind]
    written = write_gguf(folder, folder / f"m-{gguf_type}.gguf", gguf_type)
    expected, got = logits(folder), logits(folder, written.path.name)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert 0 < error < BOUNDS[gguf_type]


@pytest.mark.slow
def test_q4_k_m_gives_each_tensor_the_type_llama_quantize_chooses(models: dict[str, Path]) -> None:
    tied = write_gguf(models["wide"], models["wide"] / "t-Q4_K_M.gguf", "q4_k_m")
    untied = write_gguf(models["wide-untied"], models["wide-untied"] / "u-Q4_K_M.gguf", "q4_k_m")
    # two layers: use_more_bits(i, 2) holds for layer 1 (i >= 7*2/8), not for layer 0
    layer = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K"}
    expected = {
        "token_embd.weight": "Q6_K",  # tied: quantized as the output, with more bits
        "output_norm.weight": "F32",
        **{f"blk.{i}.{t}.weight": q for i in (0, 1) for t, q in layer.items()},
        **{f"blk.{i}.{t}_norm.weight": "F32" for i in (0, 1) for t in ("attn", "ffn")},
        **{f"blk.{i}.attn_{t}.bias": "F32" for i in (0, 1) for t in "qkv"},
        "blk.0.attn_v.weight": "Q4_K",
        "blk.1.attn_v.weight": "Q6_K",
        "blk.0.ffn_down.weight": "Q4_K",
        "blk.1.ffn_down.weight": "Q6_K",
    }
    assert tensor_types(tied.path) == expected
    assert tensor_types(untied.path) == expected | {"token_embd.weight": "Q4_K", "output.weight": "Q6_K"}


def test_q4_k_m_mix_over_28_layers_and_fallbacks_for_rows_of_32(tmp_path: Path) -> None:
    """Qwen2.5-1.5B's depth: llama-quantize gives attn_v and ffn_down of layers 0-2, 5, 8, ..., 23 and 24-27
    more bits. Rows of 32 values take its fallbacks: Q4_K -> Q5_0, Q6_K -> Q8_0."""
    folder = write_checkpoint(tmp_path / "deep", random_state_dict(5, layers=28), num_hidden_layers=28)
    types = gguf_tensor_types(folder, "q4_k_m")
    more_bits = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27}
    for i in range(28):
        want = GGMLQuantizationType.Q8_0 if i in more_bits else GGMLQuantizationType.Q5_0
        assert types[f"blk.{i}.attn_v.weight"][1] == want, i
        assert types[f"blk.{i}.ffn_down.weight"][1] == want, i
        assert types[f"blk.{i}.attn_q.weight"][1] == GGMLQuantizationType.Q5_0
    assert types["token_embd.weight"][1] == GGMLQuantizationType.Q8_0


@pytest.mark.slow
def test_metadata_and_tokenizer_are_those_llama_cpp_reads_for_qwen2(models: dict[str, Path]) -> None:
    folder = models["tied"]
    path = write_gguf(folder, folder / "meta-Q8_0.gguf", "q8_0").path
    fields = {name: field.contents() for name, field in GGUFReader(path).fields.items()}
    assert fields["general.architecture"] == "qwen2"
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    assert fields["qwen2.block_count"] == 2
    assert fields["qwen2.context_length"] == 4096
    assert fields["qwen2.embedding_length"] == 32
    assert fields["qwen2.feed_forward_length"] == 64
    assert fields["qwen2.attention.head_count"] == 4
    assert fields["qwen2.attention.head_count_kv"] == 2
    assert fields["qwen2.rope.freq_base"] == 1e6
    assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    tokens, token_types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(token_types) == 512  # the model's vocab_size, past the tokenizer's 483
    assert (tokens[480], token_types[480]) == ("<|endoftext|>", 3)  # CONTROL
    assert (tokens[482], token_types[482]) == ("<|im_end|>", 3)
    assert (tokens[500], token_types[500]) == ("[PAD500]", 5)  # UNUSED
    assert token_types[100] == 1  # NORMAL
    assert len(fields["tokenizer.ggml.merges"]) == 224
    assert fields["tokenizer.ggml.eos_token_id"] == 480
    assert fields["tokenizer.ggml.padding_token_id"] == 480
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == (folder / "chat_template.jinja").read_text()
    types = tensor_types(path)
    assert {f"blk.{i}.attn_{t}.bias" for i in (0, 1) for t in "qkv"} <= types.keys()
    assert "output.weight" not in types


def test_tokenizer_built_from_the_file_encodes_like_the_folders(models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    folder = models["tied"]
    write_gguf(folder, folder / "tok-F16.gguf", "f16")
    ours, theirs = (
        AutoTokenizer.from_pretrained(folder, gguf_file="tok-F16.gguf"),
        AutoTokenizer.from_pretrained(folder),
    )
    chat = theirs.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    texts = [
        "Hello, world! It's 2024; the quick brown fox.",
        "你好，世界。日本語のテキスト、한국어",
        "def f(x):\n\treturn {'a': x ** 2}  # comment\n",
        chat,
        "<|im_start|>user\n<|endoftext|>hi<|im_end|>",
        "   leading spaces and trailing   \n\n",
    ]
    for text in texts:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.chat_template == theirs.chat_template
    assert ours.eos_token == theirs.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_reading_a_few_rows_at_a_time_writes_the_same_file(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = models["wide-untied"]
    whole = write_gguf(folder, folder / "whole.gguf", "q4_k_m").path.read_bytes()
    monkeypatch.setattr(writer, "_ROWS_AT_ONCE", 48 * 256 + 100)  # 48 rows of 256 values a read
    assert write_gguf(folder, folder / "sliced.gguf", "q4_k_m").path.read_bytes() == whole


@pytest.mark.parametrize("name", ["q8_0", "q5_0", "q5_1", "q4_K", "q5_K", "q6_K"])
def test_quantizer_blocks_equal_llama_cpp_reference_blocks(name: str) -> None:
    """blocks.npz: llama.cpp's quantize_row_*_ref on these rows (tests/gguf_fixtures/generate.py)."""
    fixtures = np.load(FIXTURES / "blocks.npz")
    rows = torch.from_numpy(fixtures["rows"])
    ours = quantize(rows, GGMLQuantizationType[name.upper()]).numpy()
    assert ours.tobytes() == fixtures[name].tobytes()


def test_cli_writes_the_file_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = REPO / "recipes" / "examples" / "tiny" / "base"
    out = tmp_path / "base-Q8_0.gguf"
    assert main(["gguf", str(folder), "--type", "q8_0", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert tensor_types(out)["blk.0.attn_q.weight"] == "Q8_0"
    assert main(["gguf", str(folder), "--type", "q8_0", "-o", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["gguf", str(tmp_path), "-o", str(tmp_path / "x.gguf")]) == 3
    assert "config.json" in capsys.readouterr().err


# ---------------------------------------------------------------- [output] gguf in a merge, pushed


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub() as server:
        yield server


def _hub_env(hub: LocalHub, tmp_path: Path) -> dict[str, str]:
    return hub_env(hub, tmp_path, token="hf_test_user_token")


def _gguf_recipe(tmp_path: Path, output: str) -> Path:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'method = "task_arithmetic"\nbase = "{TINY / "base"}"\nmodels = ["{TINY / "math"}"]\n'
        f'[output]\ndir = "out"\n{output}\n'
    )
    return recipe


def test_merge_pushes_gguf_files_to_a_companion_repo_with_its_card_in_one_commit(
    hub: LocalHub, tmp_path: Path
) -> None:
    recipe = _gguf_recipe(tmp_path, 'repo = "user/merged"\ngguf = ["q4_k_m", "q8_0"]')
    result = invoke_cli(recipe, "-q", env=_hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    companion = hub.files("user/merged-GGUF")
    names = {"merged-Q4_K_M.gguf", "merged-Q8_0.gguf"}
    assert names | {"README.md", "hubmerge.lock.json"} <= companion.keys()
    assert len(hub.commits("user/merged-GGUF")) == 1 + 1  # the repo's creation, then the one push
    local = tmp_path / "out-GGUF"
    for name in names:
        assert companion[name] == (local / name).read_bytes()
    assert tensor_types(local / "merged-Q8_0.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    card = companion["README.md"].decode()
    assert "base_model: user/merged\nbase_model_relation: quantized\nlicense: apache-2.0" in card
    assert "| [merged-Q4_K_M.gguf](" in card and "| Q4_K_M |" in card
    assert (
        "llama-cli -hf user/merged-GGUF:Q4_K_M" in card and "ollama run hf.co/user/merged-GGUF:Q4_K_M" in card
    )
    merged = hub.files("user/merged")
    assert not any(name.endswith(".gguf") for name in merged)
    assert "[user/merged-GGUF](https://huggingface.co/user/merged-GGUF)" in merged["README.md"].decode()


def test_gguf_repo_same_puts_the_files_beside_the_weights_in_their_commit(
    hub: LocalHub, tmp_path: Path
) -> None:
    recipe = _gguf_recipe(tmp_path, 'repo = "user/beside"\ngguf = ["q8_0"]\ngguf_repo = "same"')
    result = invoke_cli(recipe, "-q", env=_hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    files = hub.files("user/beside")
    assert {"beside-Q8_0.gguf", "model.safetensors"} <= files.keys()
    assert len(hub.commits("user/beside")) == 2
    assert "beside-Q8_0.gguf" in json.loads(files["hubmerge.lock.json"])["output"]["files"]
    assert "`beside-Q8_0.gguf` (Q8_0)" in files["README.md"].decode()
    assert not (tmp_path / "out-GGUF").exists()


def test_plan_counts_the_gguf_files_in_the_disk_estimate(tmp_path: Path) -> None:
    from hubmerge.api import load_plan

    without = load_plan(_gguf_recipe(tmp_path, ""))
    with_gguf = load_plan(_gguf_recipe(tmp_path, 'gguf = ["q8_0", "f16"]'))
    written = [write_gguf(TINY / "base", tmp_path / f"{t}.gguf", t).size for t in ("q8_0", "f16")]
    extra = with_gguf.disk.peak_disk - without.disk.peak_disk
    assert sum(written) <= extra <= sum(written) + 2 * (2**20 + 2 * 10**6)


def test_companion_repo_takes_the_branch_of_the_weights(hub: LocalHub, tmp_path: Path) -> None:
    recipe = _gguf_recipe(tmp_path, 'repo = "user/branchy"\nbranch = "v2"\ngguf = ["q8_0"]')
    result = invoke_cli(recipe, "-q", env=_hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    on_branch = hub.files("user/branchy-GGUF", "v2")
    assert {"branchy-Q8_0.gguf", "README.md", "hubmerge.lock.json"} <= on_branch.keys()
    assert "/blob/v2/branchy-Q8_0.gguf" in on_branch["README.md"].decode()
    assert not any(name.endswith(".gguf") or name == "README.md" for name in hub.files("user/branchy-GGUF"))
    assert "model.safetensors" in hub.files("user/branchy", "v2")


def test_companion_repo_gets_a_pull_request_when_the_weights_do(hub: LocalHub, tmp_path: Path) -> None:
    for repo in ("user/reviewed", "user/reviewed-GGUF"):
        hub.create_repo(repo)
    main = hub.head("user/reviewed-GGUF")
    recipe = _gguf_recipe(tmp_path, 'repo = "user/reviewed"\ncreate_pr = true\ngguf = ["q8_0"]')
    result = invoke_cli(recipe, env=_hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"GGUF files: {hub.url}/user/reviewed-GGUF/discussions/1" in result.stderr
    assert hub.head("user/reviewed-GGUF") == main
    assert [pr.num for pr in hub.pull_requests("user/reviewed-GGUF")] == [1]
    assert "reviewed-Q8_0.gguf" in hub.files("user/reviewed-GGUF", "refs/pr/1")
    assert [pr.num for pr in hub.pull_requests("user/reviewed")] == [1]


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(path).tensors}


def _small_disk(recipe: Path) -> str:
    """A disk budget that holds the side files, the GGUF files and a few shards, not the whole merge: the
    run uploads each shard as written and deletes it."""
    from hubmerge.api import load_plan

    plan = load_plan(recipe)
    assert not plan.disk.upload_while_merging
    return str(plan.disk.output_disk - plan.output_bytes // 4)


@pytest.mark.slow
@pytest.mark.parametrize("beside", [False, True])
def test_with_shards_deleted_as_uploaded_gguf_files_are_written_while_merging_then_uploaded_and_deleted(
    hub: LocalHub, tmp_path: Path, beside: bool
) -> None:
    repo = f"user/small-disk-{beside}"
    same = '\ngguf_repo = "same"' if beside else ""
    recipe = _gguf_recipe(tmp_path, f'repo = "{repo}"\nmax_shard_size = "16KB"\ngguf = ["q8_0", "f16"]{same}')
    args = (recipe, "-q", "--no-stats", "--max-disk", _small_disk(recipe))
    result = invoke_cli(*args, env=_hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    gguf_repo = repo if beside else f"{repo}-GGUF"
    pushed, weights = hub.files(gguf_repo), hub.files(repo)
    assert len(hub.commits(gguf_repo)) == 2  # the repo's creation, then one commit
    assert sum(name.endswith(".safetensors") for name in weights) > 2  # the merge was sharded
    # Each file holds the tensors (types and bytes) and metadata of the file written afterwards from the
    # pushed weights; only their order differs (the shards' order).
    merged = tmp_path / "pushed"
    merged.mkdir()
    for name, content in weights.items():
        (merged / name).write_bytes(content)
    name = repo.split("/")[-1]
    local = tmp_path / "out" if beside else tmp_path / "out-GGUF"
    lock = json.loads((local / "hubmerge.lock.json").read_text())["output"]["files"]
    for kind in ("q8_0", "f16"):
        file = f"{name}-{kind.upper()}.gguf"
        (tmp_path / file).write_bytes(pushed[file])
        after = write_gguf(merged, tmp_path / f"after-{file}", kind, name)
        assert _tensors(tmp_path / file) == _tensors(after.path)
        assert {f.name: f.contents() for f in GGUFReader(tmp_path / file).fields.values()} == {
            f.name: f.contents() for f in GGUFReader(after.path).fields.values()
        }
        # Deleted once uploaded; the lock records it as the output's lock records deleted shards.
        assert not (local / file).exists()
        assert lock[file] == {"size": len(pushed[file]), "sha256": hashlib.sha256(pushed[file]).hexdigest()}
    assert not list((tmp_path / "out").glob("*.safetensors"))
    if not beside:
        assert "| Q8_0 |" in pushed["README.md"].decode()
        assert pushed["hubmerge.lock.json"] == (local / "hubmerge.lock.json").read_bytes()
    # A rerun takes both folders for its own output, and identical files make no new commit.
    again = invoke_cli(*args, env=_hub_env(hub, tmp_path))
    assert again.returncode == 0, again.stderr
    assert len(hub.commits(gguf_repo)) == 2 and len(hub.commits(repo)) == 2
