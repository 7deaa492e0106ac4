"""The command line as a user meets it: the demo recipes, loading the result, and every bad input
answered with one line on stderr, a documented exit code, and no output folder left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.checkpoints import REPO, random_state_dict, write_checkpoint
from support.cli import invoke_cli


@pytest.mark.slow
def test_demo_recipe_merges_offline_and_transformers_generates(tmp_path: Path) -> None:
    result = invoke_cli(REPO / "recipes" / "examples" / "tiny-ties.toml", "--output", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "hubmerge.toml",
        "hubmerge.lock.json",
    ):
        assert (out / name).is_file(), name
    assert "max_position_embeddings" in result.stderr  # the config-difference warning names the field

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


@pytest.mark.slow
def test_lock_reproduces_byte_identical_weights(tmp_path: Path) -> None:
    recipe = REPO / "recipes" / "examples" / "tiny-task_arithmetic.toml"
    assert invoke_cli(recipe, "--output", tmp_path / "a", "-q").returncode == 0
    lock = json.loads((tmp_path / "a" / "hubmerge.lock.json").read_text())
    assert lock["recipe"]["sha256"] and len(lock["sources"]) == 4
    assert all(len(f["sha256"]) == 64 for s in lock["sources"] for f in s["files"].values())
    again = invoke_cli(
        recipe, "--output", tmp_path / "b", "-q", "--lock", tmp_path / "a" / "hubmerge.lock.json"
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    result = invoke_cli(
        REPO / "recipes" / "examples" / "tiny-ties.toml", "--output", tmp_path / "out", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "26 tensors, 107,072 parameters, bfloat16" in result.stdout
    assert not (tmp_path / "out").exists()
    as_json = json.loads(
        invoke_cli("plan", REPO / "recipes" / "examples" / "tiny-ties.toml", "--json").stdout
    )
    assert as_json["method"] == "ties" and as_json["parameters"]["threshold"] == 20.0
    assert as_json["output"]["tie_word_embeddings"] is True


def test_validate_accepts_all_shipped_recipes() -> None:
    recipes = sorted((REPO / "recipes").rglob("*.toml"))
    result = invoke_cli("validate", *recipes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(recipes)


def _pool(tmp_path: Path) -> None:
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / name, random_state_dict(seed))


BAD_RECIPES = [
    ('method = "ties"\nbase = "./base"\nmodels = ["./a"]\nscaling = 1\n', 2, "scaling: unknown key"),
    (
        'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nscaling_fator = 0.8\n',
        2,
        "parameters.scaling_fator: unknown key; did you mean 'scaling_factor'?",
    ),
    (
        'method = "ties"\nbase = "./base"\nmodels = ["./a"\n',
        2,
        "recipe.toml:3:16: TOML syntax error: Unclosed array",
    ),
    (
        'method = ties\nbase = "./base"\nmodels = ["./a"]\n',
        2,
        "recipe.toml:1:10: TOML syntax error: Invalid value",
    ),
    ('method = "tie"\nbase = "./base"\nmodels = ["./a"]\n', 2, "did you mean 'ties'?"),
    ('method = "ties"\nmodels = ["./a"]\n', 2, "base: is required by method 'ties'"),
    (
        'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nthreshold = 120\n',
        2,
        "parameters.threshold: must be <= 100.0",
    ),
    (
        'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nmerge_func = "avg"\n',
        2,
        "parameters.merge_func: must be one of 'sum', 'mean', 'max'",
    ),
    (
        'method = "task_arithmetic"\nbase = "./base"\n[[models]]\nsource = "./a"\nwieght = 2\n',
        2,
        "models[0].wieght: unknown key; did you mean 'weight'?",
    ),
    (
        'method = "ties"\nbase = "./base"\nmodels = ["./a"]\ndtype = "bf16"\n',
        2,
        "dtype: unknown dtype 'bf16'",
    ),
    ('method = "ties"\nbase = "./base"\nmodels = ["./missing"]\n', 3, "no such folder"),
    ('method = "ties"\nbase = "./base"\nmodels = ["not a hub id!"]\n', 2, "neither an existing folder"),
    (
        'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[output]\nmax_shard_size = "lots"\n',
        2,
        "output.max_shard_size: must be a size",
    ),
]


@pytest.mark.parametrize(("text", "code", "message"), BAD_RECIPES)
def test_bad_recipe_gets_one_line_and_exit_code(tmp_path: Path, text: str, code: int, message: str) -> None:
    _pool(tmp_path)
    (tmp_path / "recipe.toml").write_text(text)
    result = invoke_cli(tmp_path / "recipe.toml", "--output", tmp_path / "out")
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def _merge_error(tmp_path: Path) -> tuple[int, str]:
    (tmp_path / "recipe.toml").write_text('method = "ties"\nbase = "./base"\nmodels = ["./a", "./b"]\n')
    result = invoke_cli(tmp_path / "recipe.toml", "--output", tmp_path / "out")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*")), "a partial folder was left behind"
    return result.returncode, result.stderr


def test_vocabulary_mismatch_names_the_tensor_and_models(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "base", random_state_dict(0, vocab=512))
    write_checkpoint(tmp_path / "a", random_state_dict(1, vocab=512))
    write_checkpoint(tmp_path / "b", random_state_dict(2, vocab=483))  # like 151936 vs 151665
    code, err = _merge_error(tmp_path)
    assert code == 4
    assert "model.embed_tokens.weight has shape [512, 32] in base" in err and "[483, 32] in models[1]" in err


def test_missing_tensor_is_an_architecture_error(tmp_path: Path) -> None:
    _pool(tmp_path)
    sd = random_state_dict(2)
    del sd["model.layers.1.mlp.up_proj.weight"]
    shutil.rmtree(tmp_path / "b")
    write_checkpoint(tmp_path / "b", sd)
    code, err = _merge_error(tmp_path)
    assert code == 4 and "model.layers.1.mlp.up_proj.weight is in base" in err


def test_pickle_only_weights_are_refused(tmp_path: Path) -> None:
    _pool(tmp_path)
    (tmp_path / "b" / "model.safetensors").unlink()
    (tmp_path / "b" / "pytorch_model.bin").write_bytes(b"not loaded")
    code, err = _merge_error(tmp_path)
    assert code == 3 and "only pickle weights (pytorch_model.bin)" in err


def test_truncated_weights_fail_mid_merge_without_leaving_output(tmp_path: Path) -> None:
    _pool(tmp_path)
    weights = tmp_path / "b" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, err = _merge_error(tmp_path)
    assert code == 3 and "truncated" in err


@pytest.mark.slow
def test_failed_rerun_keeps_the_previous_output(tmp_path: Path) -> None:
    _pool(tmp_path)
    (tmp_path / "recipe.toml").write_text('method = "ties"\nbase = "./base"\nmodels = ["./a", "./b"]\n')
    assert invoke_cli(tmp_path / "recipe.toml", "--output", tmp_path / "out", "-q").returncode == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    weights = tmp_path / "b" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert invoke_cli(tmp_path / "recipe.toml", "--output", tmp_path / "out").returncode == 3
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before


def test_output_dir_that_is_not_ours_is_never_overwritten(tmp_path: Path) -> None:
    _pool(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    (tmp_path / "recipe.toml").write_text('method = "ties"\nbase = "./base"\nmodels = ["./a"]\n')
    result = invoke_cli(tmp_path / "recipe.toml", "--output", tmp_path / "out")
    assert result.returncode == 1 and "is not a hubmerge output" in result.stderr
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_untied_source_with_head_loads_untied(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "base", random_state_dict(0))
    write_checkpoint(tmp_path / "a", random_state_dict(1, head=True))
    (tmp_path / "recipe.toml").write_text('method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n')
    assert invoke_cli(tmp_path / "recipe.toml", "--output", tmp_path / "out", "-q").returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(model.lm_head.weight.data, saved["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight.data, model.model.embed_tokens.weight.data)


def test_non_float_tensor_is_refused(tmp_path: Path) -> None:
    _pool(tmp_path)
    extra = {"model.rotary.inv_freq_index": torch.arange(4)}
    for name in ("base", "a", "b"):
        sd = load_file(tmp_path / name / "model.safetensors") | extra
        save_file(sd, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    code, err = _merge_error(tmp_path)
    assert code == 4 and "dtype I64" in err


def test_help_and_version() -> None:
    assert "hubmerge validate RECIPE" in invoke_cli("--help").stdout
    assert invoke_cli("--version").stdout.startswith("hubmerge ")


def test_cuda_device_merges_like_cpu_or_says_it_is_missing(tmp_path: Path) -> None:
    recipe = REPO / "recipes" / "examples" / "tiny-ties.toml"
    result = invoke_cli(recipe, "--output", tmp_path / "gpu", "--device", "cuda", "-q")
    if not torch.cuda.is_available():
        assert result.returncode == 1
        assert result.stderr.strip().endswith("no CUDA device is available to torch here; use --device cpu")
        assert not (tmp_path / "gpu").exists()
        return
    assert result.returncode == 0, result.stderr
    assert invoke_cli(recipe, "--output", tmp_path / "cpu", "-q").returncode == 0
    gpu, cpu = (
        load_file(tmp_path / "gpu" / "model.safetensors"),
        load_file(tmp_path / "cpu" / "model.safetensors"),
    )
    assert all(torch.allclose(gpu[k].float(), cpu[k].float(), atol=1e-2, rtol=0) for k in cpu)


def test_validate_reports_a_missing_local_folder_fast(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text('method = "simple_average"\nmodels = ["./nowhere"]\n')
    result = invoke_cli("validate", tmp_path / "r.toml")
    assert result.returncode == 3 and "'./nowhere' is not a folder" in result.stderr


def test_head_count_mismatch_is_caught_although_shapes_agree(tmp_path: Path) -> None:
    _pool(tmp_path)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["num_attention_heads"] = 2  # q_proj stays hidden × hidden: only the config tells
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    code, err = _merge_error(tmp_path)
    assert code == 4 and "models[1] (./b) has num_attention_heads = 2 but base (./base) has 4" in err
