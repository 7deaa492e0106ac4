"""A Qwen2-architecture safetensors folder → one GGUF file, a tensor at a time.

What goes in follows llama.cpp's `convert_hf_to_gguf.py` (Qwen2 path) and, for the K-quant mixes, the
per-tensor choices of `llama-quantize` (`src/llama-quant.cpp`): the qwen2 hyperparameters, the tokenizer
as llama.cpp reads a byte-level BPE (`gpt2` model, `qwen2` pre-tokenizer, tokens with their types,
merges, special ids, `add_bos_token`, chat template), every tensor under its GGUF name, 1-D tensors and
norms in F32, and no `output.weight` when the embeddings are tied. Written with the `gguf` package's
`GGUFWriter`: tensor infos first (sizes are known from the safetensors headers), then each tensor's data,
read from the shards and quantized a slice of rows at a time, so memory holds a slice, not a model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    SpecialVocab,
    TokenType,
    get_tensor_name_map,
)

from ..errors import SourceError
from ..sources.checkpoint import TensorInfo, TensorReader, index_folder
from .card import file_name
from .quants import quantize

__all__ = [
    "GGUF_TYPES",
    "GgufFile",
    "GgufStream",
    "GgufType",
    "estimate_size",
    "file_name",
    "gguf_tensor_types",
    "write_gguf",
]

Q = GGMLQuantizationType


@dataclass(frozen=True)
class GgufType:
    """One file type a user can ask for: its llama.cpp file type and the tensor type most weights get."""

    name: str  # "q4_k_m", as in the recipe and the file name
    file_type: LlamaFileType
    base: GGMLQuantizationType
    mix: bool = False  # a `_M` mix: a few tensors get more bits, as llama-quantize chooses


GGUF_TYPES: dict[str, GgufType] = {
    t.name: t
    for t in (
        GgufType("f32", LlamaFileType.ALL_F32, Q.F32),
        GgufType("f16", LlamaFileType.MOSTLY_F16, Q.F16),
        GgufType("bf16", LlamaFileType.MOSTLY_BF16, Q.BF16),
        GgufType("q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
        GgufType("q6_k", LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
        GgufType("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K, mix=True),
        GgufType("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K, mix=True),
    )
}

# llama-quantize's fallback when a row's length is not a multiple of 256 (Qwen2.5-0.5B's 896).
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_ROWS_AT_ONCE = 1 << 22  # values read, converted and written at a time


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file written: where, which type, its size and its bits per weight."""

    path: Path
    type: str
    size: int
    parameters: int

    @property
    def bits_per_weight(self) -> float:
        return self.size * 8 / self.parameters


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SourceError(
            f"{folder}: no readable config.json; GGUF export needs the model's config"
        ) from None
    _check_architecture(config, str(folder))
    return config


def _check_architecture(config: Mapping[str, Any], where: str) -> None:
    if config.get("model_type") != "qwen2":
        raise SourceError(
            f"{where}: model_type is {config.get('model_type')!r}; GGUF export supports the qwen2 architecture"
        )


def _tied(config: Mapping[str, Any], tensors: Collection[str]) -> bool:
    # transformers' Qwen2Config unties by default; a checkpoint without lm_head.weight is tied whatever it says
    return bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's choice of the layers whose attn_v and ffn_down get more bits in a `_M` mix."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _tensor_type(name: str, shape: tuple[int, ...], kind: GgufType, layers: int, tied: bool) -> Q:
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    columns = shape[-1]
    if kind.base in (Q.F32, Q.F16, Q.BF16):
        return kind.base
    if kind.base == Q.Q8_0:  # the converter's own Q8_0; rows it cannot block stay F16
        return Q.Q8_0 if columns % 32 == 0 else Q.F16
    qtype: Q = kind.base
    layer = int(match.group(1)) if (match := re.match(r"blk\.(\d+)\.", name)) else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = Q.Q6_K if columns % 256 == 0 else Q.Q8_0
    elif kind.mix and name.endswith(("attn_v.weight", "ffn_down.weight")) and _use_more_bits(layer, layers):
        qtype = Q.Q6_K
    if columns % GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK.get(qtype, qtype)
        if columns % GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.F16
    return qtype


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's loader order (and so llama-quantize's): tensors outside blocks, then block by block."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def gguf_tensor_types(folder: Path, gguf_type: str) -> dict[str, tuple[tuple[int, ...], Q]]:
    """GGUF name → (shape, tensor type) of every tensor the file for `folder` gets, in file order."""
    config = _config(folder)
    return {name: (info.shape, qtype) for name, (info, qtype) in _layout(folder, config, gguf_type).items()}


def _types(
    shapes: Mapping[str, tuple[int, ...]], layers: int, tied: bool, gguf_type: str, where: str
) -> dict[str, tuple[str, Q]]:
    """GGUF name → (safetensors name, tensor type), in llama.cpp's order, for tensors of these shapes."""
    kind = GGUF_TYPES[gguf_type]
    names = get_tensor_name_map(MODEL_ARCH.QWEN2, layers)
    types: dict[str, tuple[str, Q]] = {}
    for hf_name, shape in shapes.items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SourceError(f"{where}: tensor {hf_name} has no GGUF name in the qwen2 architecture")
        types[name] = (hf_name, _tensor_type(name, shape, kind, layers, tied))
    return dict(sorted(types.items(), key=lambda item: _llama_order(item[0])))


def _layout(folder: Path, config: Mapping[str, Any], gguf_type: str) -> dict[str, tuple[TensorInfo, Q]]:
    tensors = index_folder(folder, str(folder))
    shapes = {name: info.shape for name, info in tensors.items()}
    types = _types(shapes, int(config["num_hidden_layers"]), _tied(config, tensors), gguf_type, str(folder))
    return {name: (tensors[hf_name], qtype) for name, (hf_name, qtype) in types.items()}


def estimate_size(shapes: Mapping[str, tuple[int, ...]], gguf_type: str, tokenizer_bytes: int) -> int:
    """The size of the GGUF file of a qwen2 model with these (safetensors name → shape) tensors, before it
    exists: its tensors' bytes, their alignment, and the tokenizer's size as metadata (the token and merge
    lists take about what tokenizer.json does) plus a MiB for the rest."""
    layers = 1 + max(
        (int(m.group(1)) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n))), default=-1
    )
    tied = "lm_head.weight" not in shapes
    types = _types(shapes, layers, tied, gguf_type, "the merged model")
    data = sum(_nbytes(shapes[hf_name], qtype) + 31 for hf_name, qtype in types.values())
    return data + tokenizer_bytes + 2**20


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    count = 1
    for n in shape:
        count *= n
    return count // block * size


def _add_hyperparameters(writer: GGUFWriter, config: Mapping[str, Any], kind: GgufType, name: str) -> None:
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(kind.file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _add_tokenizer(writer: GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's converter writes a byte-level BPE: every id below the model's
    vocab size, unused ids as `[PADn]`, added tokens CONTROL (special, or spelled `<|...|>`) or
    USER_DEFINED, the rest NORMAL; then the merges, special ids and chat template (`gguf.SpecialVocab`)."""
    try:
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SourceError(f"{folder}: no readable tokenizer.json; GGUF export needs the tokenizer") from None
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise SourceError(
            f"{folder}: the tokenizer is {model.get('type')!r}, not the byte-level BPE of qwen2"
        )
    by_id: dict[int, str] = {i: token for token, i in model["vocab"].items()}
    added = {}
    for entry in tokenizer.get("added_tokens", []):
        by_id[entry["id"]] = entry["content"]
        added[entry["id"]] = entry
    if max(by_id) >= vocab_size:
        raise SourceError(f"{folder}: the tokenizer has ids beyond the model's vocab_size {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if i in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(
                TokenType.CONTROL if added[i].get("special") or looks_special else TokenType.USER_DEFINED
            )
        else:
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:  # a Qwen2 tokenizer adds no BOS; say so, or llama.cpp may
        writer.add_add_bos_token(False)


def _tensor_bytes(rows: torch.Tensor, qtype: Q) -> np.ndarray[Any, Any]:
    values = rows.to(torch.float32)
    if qtype == Q.F32:
        out = values
    elif qtype == Q.F16:
        out = values.to(torch.float16)
    elif qtype == Q.BF16:
        out = values.to(torch.bfloat16)
    else:
        out = quantize(values.reshape(values.shape[0], -1), qtype)
    return out.contiguous().view(torch.uint8).numpy()


def _start(
    path: Path,
    config: Mapping[str, Any],
    tokenizer: Path,
    kind: GgufType,
    name: str,
    tensors: Iterable[tuple[str, tuple[int, ...], Q]],
) -> GGUFWriter:
    """A GGUF file at `path` with its metadata and tensor infos written: the tensors' data come next, in
    the order of `tensors` (GGUF name, shape, type), each through `_write_tensor`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "qwen2")
    try:
        _add_hyperparameters(writer, config, kind, name)
        _add_tokenizer(writer, tokenizer, int(config["vocab_size"]))
        for gguf_name, shape, qtype in tensors:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    return writer


def _file(writer: GGUFWriter) -> BinaryIO:
    assert writer.fout is not None
    out: BinaryIO = writer.fout[0]
    return out


def _write_tensor(writer: GGUFWriter, chunks: Iterable[torch.Tensor], qtype: Q) -> None:
    """One tensor's data, given as consecutive slices of its rows, at the next aligned offset."""
    out = _file(writer)
    writer.write_padding(out, out.tell())
    for chunk in chunks:
        out.write(_tensor_bytes(chunk, qtype).tobytes())


def _finish(writer: GGUFWriter) -> None:
    out = _file(writer)
    writer.write_padding(out, out.tell())
    writer.close()


def _row_steps(shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """The slices of rows a tensor of this shape is read in: about `_ROWS_AT_ONCE` values each."""
    if not shape:
        return [None]
    rows = shape[0]
    row_values = max(1, math.prod(shape) // max(rows, 1))
    step = max(1, _ROWS_AT_ONCE // row_values)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def write_gguf(folder: Path, path: Path, gguf_type: str, name: str | None = None) -> GgufFile:
    """Write the GGUF file of type `gguf_type` (a key of `GGUF_TYPES`) for the model in `folder`."""
    if gguf_type not in GGUF_TYPES:
        raise SourceError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    config = _config(folder)
    kind = GGUF_TYPES[gguf_type]
    layout = _layout(folder, config, gguf_type)
    partial = path.with_name(path.name + ".partial")
    tensors = [(gguf_name, info.shape, qtype) for gguf_name, (info, qtype) in layout.items()]
    writer = _start(partial, config, folder, kind, name or folder.name, tensors)
    reader = TensorReader(folder)
    try:
        for info, qtype in layout.values():
            _write_tensor(writer, (reader.read(info, rows) for rows in _row_steps(info.shape)), qtype)
        _finish(writer)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    partial.replace(path)
    parameters = sum(info.numel for info, _ in layout.values())
    return GgufFile(path, gguf_type, path.stat().st_size, parameters)


class GgufStream:
    """The GGUF files of a merge written while the merge writes its shards, for a run that deletes each shard
    once uploaded (the merged model is never whole on the disk). Each file's tensors are in the shards'
    order; `add_shard` appends the tensors of the next finished shard to every file, reading each slice
    of rows once for all of them; `finish` completes the files."""

    def __init__(
        self,
        config: Mapping[str, Any],
        tokenizer: Path,
        shards: Iterable[tuple[str, Iterable[tuple[str, tuple[int, ...]]]]],
        files: Mapping[str, Path],
        name: str,
    ) -> None:
        """`shards`: each shard's file name and its tensors (safetensors name, shape) in the order they are
        written; `files`: GGUF type -> the path of its file."""
        _check_architecture(config, "the merged model")
        order = [(shard, hf_name, shape) for shard, tensors in shards for hf_name, shape in tensors]
        shapes = {hf_name: shape for _, hf_name, shape in order}
        layers = int(config["num_hidden_layers"])
        tied = _tied(config, shapes)
        self._partial = {t: p.with_name(p.name + ".partial") for t, p in files.items()}
        self._paths = dict(files)
        # per type: safetensors name -> (GGUF name, type), for the tensors the file holds
        self._types = {
            t: {hf: (g, q) for g, (hf, q) in _types(shapes, layers, tied, t, "the merged model").items()}
            for t in files
        }
        self._order = order
        self._next = 0  # index in `order` of the next tensor to write
        self._parameters = {t: sum(math.prod(shapes[hf]) for hf in types) for t, types in self._types.items()}
        self._writers: dict[str, GGUFWriter] = {}
        try:
            for t, partial in self._partial.items():
                tensors = [(*self._types[t][hf], shape) for _, hf, shape in order if hf in self._types[t]]
                self._writers[t] = _start(
                    partial, config, tokenizer, GGUF_TYPES[t], name, [(g, s, q) for g, q, s in tensors]
                )
        except BaseException:
            self.abort()
            raise

    def add_shard(self, path: Path) -> None:
        """Append the tensors of the finished shard `path` (the next one in the merge's order) to every file."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as shard:
            while self._next < len(self._order) and self._order[self._next][0] == path.name:
                _, hf_name, shape = self._order[self._next]
                targets = [(t, types[hf_name]) for t, types in self._types.items() if hf_name in types]
                if targets:
                    values = shard.get_slice(hf_name)
                    for t, (_, qtype) in targets:
                        _write_tensor(self._writers[t], [], qtype)  # the padding before its data
                    for rows in _row_steps(shape):
                        chunk = values[rows[0] : rows[1]] if rows is not None else shard.get_tensor(hf_name)
                        for t, (_, qtype) in targets:
                            _file(self._writers[t]).write(_tensor_bytes(chunk, qtype).tobytes())
                self._next += 1

    def finish(self) -> list[GgufFile]:
        """Complete every file (all shards added) and give them their final names."""
        if self._next != len(self._order):
            raise RuntimeError(f"GGUF stream finished with {len(self._order) - self._next} tensors missing")
        written = []
        for t, writer in self._writers.items():
            _finish(writer)
            self._partial[t].replace(self._paths[t])
            size = self._paths[t].stat().st_size
            written.append(GgufFile(self._paths[t], t, size, self._parameters[t]))
        self._writers = {}
        return written

    def abort(self) -> None:
        """Close and remove the unfinished files."""
        for t, writer in self._writers.items():
            writer.close()
            self._partial[t].unlink(missing_ok=True)
        self._writers = {}
