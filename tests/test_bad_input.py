"""Every bad input of the recipe → plan → merge path, through the real CLI, in one table.

Each row: a recipe (and what is done to the source folders first), the exit code, and a fragment of the
one line on stderr. A failing row must leave one stderr line, no traceback, no output folder and no
staging folder next to it. Rows with exit code 0 are inputs that used to fail (`[tokenizer] source` naming
the base, a source listed twice): they must merge and leave exactly the output folder.

Hub-side failures are in tests/test_hub.py, against the local test Hub: repository, revision or file not
found, private or gated without access, a pickle-only repo, 401/403 on push.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.cli import invoke_cli

TIES = 'method = "ties"\nbase = "./base"\n'
Setup = Callable[[Path], None]


def _nothing(folder: Path) -> None:
    return None


def _rewrite_b(**config: object) -> Setup:
    """Model b rewritten with config.json overrides."""

    def setup(folder: Path) -> None:
        path = folder / "b" / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))

    return setup


def _b_state(change: Callable[[dict[str, torch.Tensor]], None], **options: Any) -> Setup:
    def setup(folder: Path) -> None:
        sd = random_state_dict(2)
        change(sd)
        write_checkpoint(folder / "b", sd, **options)

    return setup


def _nan(sd: dict[str, torch.Tensor]) -> None:
    sd["model.norm.weight"][3] = float("nan")


def _base_inf(folder: Path) -> None:
    sd = random_state_dict(0)
    sd["model.layers.1.mlp.up_proj.weight"][5, 7] = float("-inf")
    write_checkpoint(folder / "base", sd)


def _wider_norm(sd: dict[str, torch.Tensor]) -> None:
    sd["model.norm.weight"] = torch.ones(33)


def _edit_header(change: Callable[[dict[str, Any]], None]) -> Setup:
    """Rewrite b's safetensors header in place (same length, padded), leaving the data alone."""

    def setup(folder: Path) -> None:
        path = folder / "b" / "model.safetensors"
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        change(header)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        assert len(encoded) <= length
        path.write_bytes(raw[:8] + encoded.ljust(length) + raw[8 + length :])

    return setup


def _overlap(header: dict[str, Any]) -> None:
    # Two tensors of the same byte size: the later one is pointed at the earlier one's bytes.
    first, second = sorted(
        (n for n in header if n.endswith("layernorm.weight")), key=lambda n: header[n]["data_offsets"]
    )[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]


def _wrong_size(header: dict[str, Any]) -> None:
    header["model.norm.weight"]["shape"] = [33]


def _truncate(folder: Path) -> None:
    path = folder / "b" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _stray_files(folder: Path) -> None:
    (folder / "b" / "model.safetensors").rename(folder / "b" / "weights.safetensors")


def _tensor_in_two_shards(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    (folder / "b" / "model.safetensors").unlink()
    write_checkpoint(folder / "b", random_state_dict(2), shards=2)
    first, second = (folder / "b" / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    extra = {"model.embed_tokens.weight": load_file(first)["model.embed_tokens.weight"]}  # in both shards
    save_file(load_file(second) | extra, second, metadata={"format": "pt"})


def _mistyped_folder(folder: Path) -> None:
    write_checkpoint(folder / "tiny" / "math", random_state_dict(3))


# (id, recipe file name, recipe text, setup, extra environment, exit code, message fragment)
ROWS: list[tuple[str, str, str, Setup, dict[str, str], int, str]] = [
    (
        "malformed TOML",
        "recipe.toml",
        TIES + 'models = ["./a"\n',
        _nothing,
        {},
        2,
        "recipe.toml:3:16: TOML syntax error: Unclosed array",
    ),
    (
        "unknown key",
        "recipe.toml",
        TIES + 'models = ["./a"]\n[parameters]\nscaling_fator = 0.8\n',
        _nothing,
        {},
        2,
        "parameters.scaling_fator: unknown key; did you mean 'scaling_factor'?",
    ),
    (
        "wrong type",
        "recipe.toml",
        TIES + 'models = ["./a"]\n[parameters]\nscaling_factor = "high"\n',
        _nothing,
        {},
        2,
        "parameters.scaling_factor: must be a number, got 'high'",
    ),
    (
        "out of range",
        "recipe.toml",
        TIES + 'models = ["./a"]\n[parameters]\nthreshold = 120\n',
        _nothing,
        {},
        2,
        "parameters.threshold: must be <= 100.0, got 120",
    ),
    (
        "unknown method",
        "recipe.toml",
        'method = "fisher_merging"\nbase = "./base"\nmodels = ["./a", "./b"]\n',
        _nothing,
        {},
        2,
        "unknown method 'fisher_merging'; known methods: simple_average, linear, task_arithmetic, ties, ",
    ),
    (
        "parameter the method does not take",
        "recipe.toml",
        'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nthreshold = 20\n',
        _nothing,
        {},
        2,
        "parameters.threshold: unknown key; known keys: scaling_factor, normalize, rescale, weight, density",
    ),
    (
        "parameters for a method without any",
        "recipe.toml",
        'method = "simple_average"\nmodels = ["./a", "./b"]\n[parameters]\nscaling_factor = 0.5\n',
        _nothing,
        {},
        2,
        "parameters.scaling_factor: simple_average takes no parameters",
    ),
    (
        "missing base",
        "recipe.toml",
        'method = "ties"\nmodels = ["./a"]\n',
        _nothing,
        {},
        2,
        "base: is required by method 'ties'",
    ),
    (
        "too few models",
        "recipe.toml",
        TIES + "models = []\n",
        _nothing,
        {},
        2,
        "models: must be a non-empty list",
    ),
    (
        "missing local path",
        "recipe.toml",
        TIES + 'models = ["./missing"]\n',
        _nothing,
        {},
        3,
        "models[0] (./missing): no such folder",
    ),
    (
        "invalid Hub id",
        "recipe.toml",
        TIES + 'models = ["not a hub id!"]\n',
        _nothing,
        {},
        2,
        "'not a hub id!' is neither an existing folder",
    ),
    (
        "mistyped local folder without ./",
        "recipe.toml",
        TIES + 'models = ["./tiny/math", "tiny/mathh"]\n',
        _mistyped_folder,
        {"HF_HUB_OFFLINE": "1"},
        3,
        "models[1] (tiny/mathh): no such folder",
    ),
    (
        "incompatible architectures",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _rewrite_b(model_type="llama", architectures=["LlamaForCausalLM"]),
        {},
        4,
        "models[1] (./b) is model_type 'llama' but base (./base) is 'qwen2'",
    ),
    (
        "shapes",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _b_state(_wider_norm),
        {},
        4,
        "tensor model.norm.weight has shape [32] in base (./base) but [33] in models[1] (./b)",
    ),
    (
        "vocabulary sizes",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _rewrite_b(vocab_size=151665),
        {},
        4,
        "models[1] (./b) has vocab_size = 151665 but base (./base) has 512",
    ),
    (
        "NaN in a source tensor",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _b_state(_nan),
        {},
        3,
        "models[1] (./b): tensor model.norm.weight holds NaN or Inf values",
    ),
    (
        "Inf in the base",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _base_inf,
        {},
        3,
        "base (./base): tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf values",
    ),
    (
        "truncated safetensors",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _truncate,
        {},
        3,
        "the file is corrupt or truncated",
    ),
    (
        "header with overlapping offsets",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _edit_header(_overlap),
        {},
        3,
        "overlaps the previous tensor",
    ),
    (
        "header size mismatch",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _edit_header(_wrong_size),
        {},
        3,
        "tensor model.norm.weight: 64 bytes for shape [33] of BF16 (66 expected)",
    ),
    (
        "stray safetensors without model.safetensors or index",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _stray_files,
        {},
        3,
        "weights.safetensors but no model.safetensors or model.safetensors.index.json",
    ),
    (
        "one tensor in two shards",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n',
        _tensor_in_two_shards,
        {},
        3,
        "tensor model.embed_tokens.weight is stored in both model-00001-of-00002.safetensors and model-00002",
    ),
    (
        "zero-sum linear weights",
        "recipe.toml",
        'method = "linear"\n[[models]]\nsource = "./a"\nweight = 1.0\n[[models]]\nsource = "./b"\nweight = -1.0\n',
        _nothing,
        {},
        2,
        "models: the weights sum to 0 (1.0 + -1.0); linear divides by their sum",
    ),
    (
        "a NaN parameter",
        "recipe.toml",
        TIES + 'models = ["./a"]\n[parameters]\nscaling_factor = nan\n',
        _nothing,
        {},
        2,
        "parameters.scaling_factor: must be a finite number, got nan",
    ),
    (
        "an infinite per-model weight",
        "recipe.toml",
        'method = "linear"\n[[models]]\nsource = "./a"\nweight = inf\n',
        _nothing,
        {},
        2,
        "models[0].weight: must be a finite number, got inf",
    ),
    (
        "a merge that overflows its dtype",
        "recipe.toml",
        'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\ndtype = "float16"\n'
        "[parameters]\nscaling_factor = 1e30\n",
        _nothing,
        {},
        1,
        "has NaN or Inf values although its inputs are finite",
    ),
    (
        "YAML file",
        "merge.yaml",
        "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n",
        _nothing,
        {},
        2,
        "merge.yaml: this looks like a YAML file (a mergekit config?); hubmerge recipes are TOML",
    ),
    (
        "YAML content in a .toml file",
        "recipe.toml",
        "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n",
        _nothing,
        {},
        2,
        "recipe.toml:1:13: TOML syntax error: Expected '=' after a key in a key/value pair; this looks like a YAML",
    ),
    (
        "models list and [[models]] tables",
        "recipe.toml",
        TIES + 'models = ["./a"]\n[[models]]\nsource = "./b"\n',
        _nothing,
        {},
        2,
        "`models = [...]` and [[models]] tables cannot be mixed",
    ),
    # Inputs that used to fail with an internal error and must now merge.
    (
        "tokenizer source names the base",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n[tokenizer]\nsource = "./base"\n',
        _nothing,
        {},
        0,
        "wrote ",
    ),
    (
        "tokenizer source names a model",
        "recipe.toml",
        TIES + 'models = ["./a", "./b"]\n[tokenizer]\nsource = "./b"\n',
        _nothing,
        {},
        0,
        "wrote ",
    ),
    (
        "duplicate source",
        "recipe.toml",
        'method = "task_arithmetic"\nbase = "./base"\n[[models]]\nsource = "./a"\nweight = 0.3\n'
        '[[models]]\nsource = "./a"\nweight = 0.7\n',
        _nothing,
        {},
        0,
        "wrote ",
    ),
    (
        "base also among the models",
        "recipe.toml",
        'method = "simple_average"\nbase = "./base"\nmodels = ["./base", "./a"]\n',
        _nothing,
        {},
        0,
        "wrote ",
    ),
]


@pytest.mark.parametrize(
    ("file", "text", "setup", "env", "code", "message"),
    [pytest.param(*row[1:], id=row[0]) for row in ROWS],
)
def test_bad_input_gets_one_line_an_exit_code_and_leaves_nothing(
    tmp_path: Path, file: str, text: str, setup: Setup, env: dict[str, str], code: int, message: str
) -> None:
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / name, random_state_dict(seed))
    setup(tmp_path)
    (tmp_path / file).write_text(text)
    result = invoke_cli(
        tmp_path / file, "--output", tmp_path / "out", env={"HF_HOME": str(tmp_path / "hf"), **env}
    )
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out"))
    assert not leftovers, f"staging left behind: {leftovers}"
    if code == 0:
        assert message in result.stdout
        assert "error" not in result.stderr
        assert (tmp_path / "out" / "model.safetensors").is_file()
        return
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
