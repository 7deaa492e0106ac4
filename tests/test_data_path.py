"""The recipe → plan → merge data path: per-mention roles, the tokenizer source, tied heads, non-finite
values, weight-file selection, and what `validate`, `plan` and `--help` say."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.checkpoints import TINY, random_state_dict, write_checkpoint
from support.cli import invoke_cli

from hubmerge import api
from hubmerge.merging.report import plan_text
from hubmerge.sources.checkpoint import TensorReader


def _pool(folder: Path) -> None:
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(folder / name, random_state_dict(seed))


def _recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


def test_tokenizer_source_gives_tokenizer_chat_template_generation_config_and_token_ids(
    tmp_path: Path,
) -> None:
    recipe = _recipe(
        tmp_path,
        f'method = "task_arithmetic"\nbase = "{TINY / "base"}"\nmodels = ["{TINY / "math"}", "{TINY / "instruct"}"]\n'
        f'[tokenizer]\nsource = "{TINY / "instruct"}"\n',
    )
    result = invoke_cli(recipe, "--output", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for name in ("generation_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (TINY / "instruct" / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 482 and config["bos_token_id"] == 480  # the instruct model's <|im_end|>
    assert config["max_position_embeddings"] == 32768  # the rest of config.json is still the base's
    card = (out / "README.md").read_text()
    assert "come from the tokenizer source, the model (`instruct`)" in card
    lock = json.loads((out / "hubmerge.lock.json").read_text())
    assert [s["role"] for s in lock["sources"]] == ["base", "models[0]", "models[1]", "tokenizer"]


def test_a_source_listed_twice_keeps_each_mentions_weight_and_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pool(tmp_path)
    recipe = _recipe(
        tmp_path,
        'method = "task_arithmetic"\nbase = "./base"\n[parameters]\nscaling_factor = 1.0\n'
        '[[models]]\nsource = "./a"\nweight = 0.25\n[[models]]\nsource = "./a"\nweight = 0.5\n',
    )
    plan = api.load_plan(recipe, tmp_path / "out")
    assert plan.models[0] is plan.models[1] and len(plan.downloads) == 2
    assert [(r.name, r.params["weight"]) for r in plan.model_roles] == [
        ("models[0]", 0.25),
        ("models[1]", 0.5),
    ]

    reads: list[str] = []
    original = TensorReader.read

    def counting(self: TensorReader, info: object, rows: tuple[int, int] | None = None) -> torch.Tensor:
        reads.append(str(self.folder))
        return original(self, info, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(TensorReader, "read", counting)
    # The merge's reads alone: the sanity check reads each source again for its own forward pass.
    api.merge(recipe, output_dir=tmp_path / "out", push=False, quiet=True, sanity=False, log=lambda _: None)
    assert reads.count(str(tmp_path / "a")) == reads.count(str(tmp_path / "base")) == len(plan.tensors)

    merged = load_file(tmp_path / "out" / "model.safetensors")
    base, a = (
        load_file(tmp_path / "base" / "model.safetensors"),
        load_file(tmp_path / "a" / "model.safetensors"),
    )
    for name, tensor in merged.items():
        b, m = base[name].float(), a[name].float()
        expected = b + 1.0 * ((m - b) * 0.25 + (m - b) * 0.5)
        assert torch.equal(tensor, expected.to(torch.bfloat16)), name


def test_a_stored_lm_head_under_a_tied_config_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "base", random_state_dict(0))
    write_checkpoint(tmp_path / "a", random_state_dict(1, head=True), tie_word_embeddings=True)
    recipe = _recipe(
        tmp_path,
        'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nscaling_factor = 1.0\n',
    )
    plan = api.load_plan(recipe, tmp_path / "out")
    assert any("stores lm_head.weight although its config.json ties it" in w for w in plan.warnings)
    api.merge(recipe, output_dir=tmp_path / "out", push=False, quiet=True, log=lambda _: None)

    from transformers import AutoModelForCausalLM

    def head(folder: Path) -> torch.Tensor:
        return AutoModelForCausalLM.from_pretrained(folder).lm_head.weight.detach().float()

    # Whatever head transformers reads from each source is the head the merge used.
    base, a = head(tmp_path / "base"), head(tmp_path / "a")
    assert torch.equal(head(tmp_path / "out"), (base + (a - base)).to(torch.bfloat16).float())


def test_a_stored_lm_head_of_integer_dtype_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "base", random_state_dict(0))
    sd = random_state_dict(1, head=True)
    write_checkpoint(tmp_path / "a", sd)
    from safetensors.torch import save_file

    weights = load_file(tmp_path / "a" / "model.safetensors")
    weights["lm_head.weight"] = torch.zeros(sd["lm_head.weight"].shape, dtype=torch.int16)
    save_file(weights, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    recipe = _recipe(tmp_path, 'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n')
    result = invoke_cli(recipe, "--output", tmp_path / "out")
    assert result.returncode == 4 and "tensor lm_head.weight has dtype I16" in result.stderr


def test_allow_non_finite_merges_a_source_holding_nan(tmp_path: Path) -> None:
    _pool(tmp_path)
    sd = random_state_dict(2)
    sd["model.norm.weight"][3] = float("nan")
    write_checkpoint(tmp_path / "b", sd)
    recipe = _recipe(
        tmp_path, 'allow_non_finite = true\nmethod = "simple_average"\nmodels = ["./a", "./b"]\n'
    )
    result = invoke_cli(recipe, "--output", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    norm = load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"]
    assert torch.isnan(norm[3]) and torch.isfinite(torch.cat([norm[:3], norm[4:]])).all()


def test_model_safetensors_wins_over_an_index_beside_it_as_in_transformers(tmp_path: Path) -> None:
    _pool(tmp_path)
    # A stale index naming a shard that is not there: transformers reads model.safetensors and so do we.
    (tmp_path / "a" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    plan = api.load_plan(
        _recipe(tmp_path, 'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n'), tmp_path / "out"
    )
    assert plan.models[0].weight_files == ("model.safetensors",)


def test_validate_checks_every_recipe_and_warns_on_threshold_one(
    tmp_path: Path, write_recipe: Callable[..., Path]
) -> None:
    _pool(tmp_path)
    good = write_recipe(
        'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nthreshold = 1\n', "good.toml"
    )
    bad = write_recipe('method = "ties"\nmodels = ["./a"]\n', "bad.toml")
    missing = write_recipe('method = "ties"\nbase = "./base"\nmodels = ["./gone"]\n', "missing.toml")
    result = invoke_cli("validate", bad, good, missing)
    assert result.returncode == 2  # the first failure's code
    assert result.stdout.splitlines() == [f"ok  {good}  (ties, 1 model)"]
    err = result.stderr.splitlines()
    assert len(err) == 3 and "Traceback" not in result.stderr
    assert err[0].startswith("hubmerge: error: ") and "bad.toml: base: is required" in err[0]
    assert err[1].startswith("warning: ") and "threshold = 1 is read as the fraction 1.0" in err[1]
    assert "'./gone' is not a folder" in err[2]
    single = invoke_cli("validate", good)
    assert single.returncode == 0 and "threshold = 1 is read as the fraction 1.0" in single.stderr


def test_plan_text_says_local_for_local_folders_and_keeps_roles_apart(tmp_path: Path) -> None:
    _pool(tmp_path)
    text = plan_text(
        api.load_plan(
            _recipe(tmp_path, 'method = "ties"\nbase = "./base"\nmodels = ["./a", "./b"]\n'), tmp_path / "out"
        )
    )
    assert f"\nmodels[0] {tmp_path / 'a'}\n" in text
    assert "\nlocal    base (./base): " in text and "download" not in text


@pytest.mark.parametrize("command", ["validate", "plan", "card"])
def test_subcommand_help_describes_the_command(command: str) -> None:
    result = invoke_cli(command, "--help")
    assert result.returncode == 0
    description = result.stdout.split("\n\n")[1]
    assert len(description.split()) > 8  # a sentence, not just the usage line
    if command == "card":
        assert "--file FILE" in result.stdout and "--out " not in result.stdout and "-o " not in result.stdout


def test_validate_warns_when_a_hub_id_looks_like_a_mistyped_local_folder(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "tiny" / "math", random_state_dict(3))
    recipe = _recipe(tmp_path, 'method = "simple_average"\nmodels = ["./tiny/math", "tiny/mathh"]\n')
    result = invoke_cli("validate", recipe)  # validate reads no network: a warning, not an error
    assert result.returncode == 0
    assert result.stderr.strip() == (
        f"warning: {recipe}: models[1]: 'tiny/mathh' is read as a Hub id although tiny/ is a folder next to the "
        "recipe; prefix local folders with ./"
    )


def test_an_average_of_one_model_is_allowed_with_a_warning(tmp_path: Path) -> None:
    _pool(tmp_path)
    result = invoke_cli("validate", _recipe(tmp_path, 'method = "linear"\nmodels = ["./a"]\n'))
    assert result.returncode == 0 and "models: linear of one model writes a copy of it" in result.stderr
