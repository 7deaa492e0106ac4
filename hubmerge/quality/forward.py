"""A Qwen2 causal LM's loss per token, computed layer by layer straight from its safetensors files.

transformers' `Qwen2ForCausalLM` holds the whole model in memory (4.6 GB at 1.5B, too much at 7B and up).
This pass holds only the activations of the tokens (tokens × intermediate size) and one weight chunk:
the embedding rows of the tokens, then each decoder layer (RMSNorm, q/k/v with their biases, rotary
position embedding, grouped-query causal attention, o_proj, SiLU-gated MLP, residuals) with every weight
read in row chunks of at most `CHUNK_BYTES` (as float32), then the final norm and the head (`lm_head`, or
the embedding when tied) in vocabulary chunks, keeping a running log-sum-exp so that the logits of the
whole vocabulary are never held at once. A 72B model is checked in the same few hundred MB as a 0.5B one.

Everything is computed in float32 whatever the stored dtype, so the loss equals transformers' float32
forward pass to float rounding (tests/test_forward.py). Configs this pass does not implement (another
architecture, a rotary scaling other than none, linear or dynamic, a sliding window shorter than a text)
raise `Unrunnable` with the reason in one line.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..publish.files import CONFIG_FILE
from ..sources.checkpoint import Folder, TensorInfo, TensorReader, index_folder

__all__ = ["CHUNK_BYTES", "Checkpoint", "Losses", "Qwen2Shape", "Unrunnable", "token_losses"]

CHUNK_BYTES = 64 * 2**20  # float32 bytes of one weight chunk (and of one chunk of logits' weights)
_GAP_BYTES = 2**20  # embedding rows closer than this (stored bytes) are read in one span


class Unrunnable(Exception):
    """This pass cannot compute the loss of this checkpoint; `str(error)` says why in one line. The sanity
    check catches it and records the check as skipped (it never reaches the CLI)."""


@dataclass(frozen=True)
class Checkpoint:
    """A model to run: its name for messages, where its weight files are read, its config and tensors."""

    label: str
    folder: Folder  # a local folder, or a Hub source read by range (remote.RemoteFolder)
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    # What the weights are, as a string that changes whenever they do (the Hub's sha256 of each weight file,
    # or each local file's stamp); None when unknown. The sanity check keys its cache of losses on it.
    identity: str | None = None

    @classmethod
    def local(cls, label: str, folder: Path) -> Checkpoint:
        """A checkpoint folder on disk (config.json and safetensors weights); raises `SourceError`."""
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        return cls(label, folder, config, index_folder(folder, label))


@dataclass(frozen=True)
class Qwen2Shape:
    """What the forward pass needs from a Qwen2 config."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    position_scale: float  # positions are divided by it (linear rotary scaling); 1.0 otherwise
    max_length: int  # the longest sequence this pass computes exactly like transformers
    tied: bool  # the head is the embedding

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Qwen2Shape:
        """The shape a qwen2 `config.json` describes; raises `Unrunnable` for what this pass does not implement."""
        if config.get("model_type") != "qwen2":
            raise Unrunnable(f"model_type {config.get('model_type')!r}: the check runs Qwen2 models only")
        if config.get("hidden_act", "silu") != "silu":
            raise Unrunnable(f"hidden_act {config.get('hidden_act')!r} is not implemented (only silu)")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            shape = cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=kv_heads,
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tied=bool(config.get("tie_word_embeddings", False)),
                **_rope(config),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Unrunnable(
                f"config.json is not a complete Qwen2 config ({type(exc).__name__}: {exc})"
            ) from None
        if heads % kv_heads or shape.head_dim % 2:
            raise Unrunnable(
                f"{heads} attention heads over {kv_heads} key-value heads of {shape.head_dim} dims"
            )
        return shape

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the pass reads, with its shape."""
        h, q, kv = self.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (self.intermediate_size, h),
                p + "mlp.up_proj.weight": (self.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, self.intermediate_size),
            }
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """rope_theta, position_scale and max_length from either config format: transformers 5's
    `rope_parameters`, or the older `rope_theta` with `rope_scaling`."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    longest = int(config.get("max_position_embeddings") or 32768)
    if window:
        longest = min(longest, int(window))  # within the window, sliding attention is full causal attention
    parameters = config.get("rope_parameters")
    if isinstance(parameters, Mapping):
        theta, scaling = parameters.get("rope_theta", 10000.0), parameters
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling") or {}
    if not isinstance(scaling, Mapping):
        raise Unrunnable(f"rope_scaling {scaling!r} is not a table")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scale = 1.0
    if kind == "linear":
        scale = float(scaling["factor"])
    elif kind == "dynamic":
        # Dynamic NTK scaling changes the frequencies only past the trained length: below it, the default.
        longest = min(longest, int(scaling.get("original_max_position_embeddings") or longest))
    elif kind != "default":
        raise Unrunnable(f"rotary scaling {kind!r} is not implemented (none, linear and dynamic are)")
    return {"rope_theta": float(theta), "position_scale": scale, "max_length": longest}


@dataclass(frozen=True)
class Losses:
    """What `token_losses` computed: the loss (nats) of each token after the first, per sequence, and the
    tensors with non-finite values (in checkpoint order) when asked to look for them."""

    per_sequence: tuple[torch.Tensor, ...]
    nonfinite: tuple[str, ...] = ()


class _Weights:
    """A checkpoint's tensors, read a row chunk at a time as float32 on `device`, each checked against its
    expected shape; with `check_finite`, every chunk read is also checked for inf and NaN."""

    def __init__(
        self, checkpoint: Checkpoint, shape: Qwen2Shape, device: torch.device, check_finite: bool
    ) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.check_finite = check_finite
        self.nonfinite: set[str] = set()
        self.read_whole: set[str] = set()
        for name, expected in shape.expected().items():
            info = checkpoint.tensors.get(name)
            if info is None:
                raise Unrunnable(f"{checkpoint.label} has no tensor {name}")
            if info.shape != expected:
                raise Unrunnable(
                    f"{checkpoint.label}: {name} has shape {list(info.shape)}, its config says {list(expected)}"
                )
        self.reader = TensorReader(checkpoint.folder)

    def _read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.reader.read(info, rows).to(self.device, torch.float32)
        if self.check_finite and not bool(tensor.isfinite().all()):
            self.nonfinite.add(info.name)
        return tensor

    def chunks(self, name: str) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first row, end row, rows) of the tensor, in chunks of at most `CHUNK_BYTES` as float32."""
        info = self.checkpoint.tensors[name]
        row = math.prod(info.shape[1:]) * 4
        step = max(1, CHUNK_BYTES // row)
        for a in range(0, info.shape[0], step):
            b = min(a + step, info.shape[0])
            yield a, b, self._read(info, (a, b))
        self.read_whole.add(name)

    def whole(self, name: str) -> torch.Tensor:
        """A small tensor (a norm's weight, a bias), read whole."""
        self.read_whole.add(name)
        return self._read(self.checkpoint.tensors[name])

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """The rows `ids` of a tensor (the embedding of tokens). Distinct rows closer than `_GAP_BYTES` are
        read together, in spans of at most `CHUNK_BYTES` as float32: one request each for a streamed source."""
        info = self.checkpoint.tensors[name]
        stored_row, row = info.nbytes // info.shape[0], math.prod(info.shape[1:]) * 4
        distinct, where = torch.unique(ids, return_inverse=True)
        spans: list[list[int]] = []
        for i in distinct.tolist():
            if (
                spans
                and (i - spans[-1][-1]) * stored_row <= _GAP_BYTES
                and (i + 1 - spans[-1][0]) * row <= CHUNK_BYTES
            ):
                spans[-1].append(i)
            else:
                spans.append([i])
        parts = []
        for span in spans:
            read = self._read(info, (span[0], span[-1] + 1))
            parts.append(read[torch.tensor(span, device=self.device) - span[0]])
            del read
        return torch.cat(parts)[where.to(self.device)]

    def linear(self, x: torch.Tensor, name: str, bias: bool = False) -> torch.Tensor:
        """x @ W.T (+ b), W read a chunk of output features at a time."""
        out = torch.empty(x.shape[0], self.checkpoint.tensors[name + ".weight"].shape[0], device=self.device)
        for a, b, w in self.chunks(name + ".weight"):
            torch.mm(x, w.T, out=out[:, a:b])
            del w  # before the next chunk is read: one chunk alive at a time
        return out + self.whole(name + ".bias") if bias else out

    def scan_rest(self) -> None:
        """Check for non-finite values every tensor the pass did not read whole."""
        for name in self.checkpoint.tensors:
            info = self.checkpoint.tensors[name]
            if name in self.read_whole or not info.shape or info.dtype not in ("BF16", "F16", "F32", "F64"):
                continue
            for _ in self.chunks(name):
                pass

    def close(self) -> None:
        self.reader.close()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def token_losses(
    checkpoint: Checkpoint,
    sequences: Sequence[Sequence[int]],
    device: torch.device | None = None,
    check_finite: bool = False,
) -> Losses:
    """The loss (nats, float32) of each token after the first of each sequence under the model in
    `checkpoint`, each sequence on its own (positions from 0, attention within it). With `check_finite`,
    every tensor of the checkpoint is also checked for inf and NaN. Raises `Unrunnable`; every sequence
    needs at least two tokens."""
    shape = Qwen2Shape.from_config(checkpoint.config)
    if not sequences:
        return Losses(())
    device = device or torch.device("cpu")
    longest = max((len(s) for s in sequences), default=0)
    if longest > shape.max_length:
        raise Unrunnable(
            f"a text of {longest} tokens is longer than the {shape.max_length} this pass computes exactly"
        )
    if any(len(s) < 2 for s in sequences):
        raise ValueError("every sequence needs at least two tokens (one to predict)")
    weights = _Weights(checkpoint, shape, device, check_finite)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    if not 0 <= int(ids.min()) <= int(ids.max()) < shape.vocab_size:
        raise Unrunnable(f"the tokenizer gives ids outside the model's vocabulary of {shape.vocab_size}")
    bounds = [0]
    for s in sequences:
        bounds.append(bounds[-1] + len(s))
    segments = list(itertools.pairwise(bounds))
    try:
        nll = _forward(weights, shape, ids.to(device), segments)
        if check_finite:
            weights.scan_rest()
    finally:
        weights.close()
    per_sequence = tuple(nll[a - i : b - i - 1].cpu() for i, (a, b) in enumerate(segments))
    nonfinite = tuple(name for name in checkpoint.tensors if name in weights.nonfinite)
    return Losses(per_sequence, nonfinite)


def _forward(
    w: _Weights, shape: Qwen2Shape, ids: torch.Tensor, segments: list[tuple[int, int]]
) -> torch.Tensor:
    """The loss of every token but the first of each segment, in order."""
    device, eps, hd = ids.device, shape.rms_norm_eps, shape.head_dim
    positions = torch.cat([torch.arange(b - a, device=device) for a, b in segments]).float()
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    freqs = (positions / shape.position_scale)[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # tokens × 1 × head_dim
    cos, sin = angles.cos(), angles.sin()
    groups = shape.heads // shape.kv_heads

    h = w.rows("model.embed_tokens.weight", ids)
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        x = _rms_norm(h, w.whole(p + "input_layernorm.weight"), eps)
        q = w.linear(x, p + "self_attn.q_proj", bias=True).view(len(ids), shape.heads, hd)
        k = w.linear(x, p + "self_attn.k_proj", bias=True).view(len(ids), shape.kv_heads, hd)
        v = w.linear(x, p + "self_attn.v_proj", bias=True).view(len(ids), shape.kv_heads, hd)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        attention = torch.empty_like(q)
        for a, b in segments:
            attention[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1).repeat_interleave(groups, dim=0),
                v[a:b].transpose(0, 1).repeat_interleave(groups, dim=0),
                is_causal=True,
            ).transpose(0, 1)
        h = h + w.linear(attention.reshape(len(ids), -1), p + "self_attn.o_proj")
        x = _rms_norm(h, w.whole(p + "post_attention_layernorm.weight"), eps)
        gated = F.silu(w.linear(x, p + "mlp.gate_proj")) * w.linear(x, p + "mlp.up_proj")
        h = h + w.linear(gated, p + "mlp.down_proj")
    h = _rms_norm(h, w.whole("model.norm.weight"), eps)

    # Only positions followed by a token predict something; the head is applied a vocabulary chunk at a time.
    predicting = torch.cat([torch.arange(a, b - 1, device=device) for a, b in segments])
    h, targets = h[predicting], ids[predicting + 1]
    log_total = torch.full((len(targets),), -math.inf, device=device)
    target_logit = torch.empty(len(targets), device=device)
    for a, b, rows in w.chunks("model.embed_tokens.weight" if shape.tied else "lm_head.weight"):
        logits = h @ rows.T
        log_total = torch.logaddexp(log_total, logits.logsumexp(dim=-1))
        here = (targets >= a) & (targets < b)
        target_logit[here] = logits[here, targets[here] - a]
        del rows, logits  # before the next chunk is read
    return log_total - target_logit
