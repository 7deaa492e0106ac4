"""The quick sanity check (sanity.py) end to end: what it cannot measure is skipped with a one-line note in
the terminal, the card and eval_results.json, and the merge succeeds; streamed sources are compared too;
its domain losses are transformers' (float32) as the check always measured them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.checkpoints import REPO, TINY, random_state_dict, write_checkpoint
from support.cli import invoke_cli
from support.hub import hub_env, local_hub

from hubmerge import api
from hubmerge.cli import main
from hubmerge.publish import markdown
from hubmerge.quality.evaluate import RESULTS_FILE
from hubmerge.quality.forward import Checkpoint
from hubmerge.quality.sanity import check, sanity_texts


@pytest.fixture(autouse=True)
def sanity_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUBMERGE_NO_SANITY", raising=False)


def _recipe(folder: Path, models: list[Path]) -> Path:
    path = folder / "recipe.toml"
    names = ", ".join(f'"{m}"' for m in models[1:])
    path.write_text(
        f'method = "task_arithmetic"\nbase = "{models[0]}"\nmodels = [{names}]\n'
        f'[parameters]\nscaling_factor = 0.5\n[output]\ndir = "{folder / "out"}"\n'
    )
    return path


def _merge_with_cli(recipe: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str, dict[str, object]]:
    """Exit code 0 asserted; the terminal's stderr, the card, and the sanity record of eval_results.json."""
    assert main([str(recipe)]) == 0
    out = recipe.parent / "out"
    record = json.loads((out / RESULTS_FILE).read_text())["sanity"]
    return capsys.readouterr().err, (out / "README.md").read_text(), record


def _tokenizer(folder: Path, predicts_nothing: str) -> None:
    """Replace the tokenizer in `folder` by one that encodes every text to no token, or to one token (a BOS)."""
    from tokenizers import AddedToken, Tokenizer, models, processors

    tokenizer = Tokenizer(models.BPE(vocab={}, merges=[]))  # nothing matches: no token at all
    if predicts_nothing == "one token":
        tokenizer.add_special_tokens([AddedToken("<s>", special=True)])
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def _assert_skipped(stderr: str, card: str, record: dict[str, object], reason: str) -> None:
    assert f"sanity check skipped: {reason}" in stderr.splitlines()
    # The card prints the reason as inert Markdown text (markdown.text escapes brackets, parentheses, ...).
    assert f"The quick sanity check did not run: {markdown.text(reason)}." in card.splitlines()
    assert record["skipped"] == reason and record["passed"] is False and record["losses"] == {}


@pytest.mark.slow
def test_sources_without_tokenizer_files_merge_and_the_check_says_why_it_was_skipped(
    tmp_path: Path, make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    models = [make_model(name, seed, tokenizer=False) for seed, name in enumerate(("base", "math", "code"))]
    stderr, card, record = _merge_with_cli(_recipe(tmp_path, models), capsys)
    _assert_skipped(
        stderr,
        card,
        record,
        "the merged folder has no tokenizer files (its tokenizer source ships none); set [tokenizer] source in "
        "the recipe to a model that has them",
    )


@pytest.mark.slow
@pytest.mark.parametrize("predicts_nothing", ["zero tokens", "one token"])
def test_texts_that_tokenize_to_fewer_than_two_tokens_skip_the_check_and_the_merge_succeeds(
    tmp_path: Path, make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str], predicts_nothing: str
) -> None:
    models = [make_model(name, seed) for seed, name in enumerate(("base", "math", "code"))]
    _tokenizer(models[0], predicts_nothing)  # the tokenizer source: the base
    stderr, card, record = _merge_with_cli(_recipe(tmp_path, models), capsys)
    reason = "the output's tokenizer encodes every math text to fewer than two tokens: no token to predict"
    _assert_skipped(stderr, card, record, reason)


def test_a_config_the_forward_pass_does_not_implement_skips_the_check_and_the_merge_succeeds(
    tmp_path: Path, make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    models = [make_model(name, seed, rope_scaling=yarn) for seed, name in enumerate(("base", "math", "code"))]
    stderr, card, record = _merge_with_cli(_recipe(tmp_path, models), capsys)
    _assert_skipped(
        stderr, card, record, "rotary scaling 'yarn' is not implemented (none, linear and dynamic are)"
    )


def test_an_unexpected_error_in_the_check_is_a_skip_with_the_error_not_a_failed_merge(
    tmp_path: Path,
    make_model: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hubmerge.quality import forward

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot reshape tensor of 0 elements")

    monkeypatch.setattr(forward, "token_losses", broken)
    models = [make_model(name, seed) for seed, name in enumerate(("base", "math", "code"))]
    stderr, card, record = _merge_with_cli(_recipe(tmp_path, models), capsys)
    reason = (
        "the check stopped on an unexpected error (RuntimeError: cannot reshape tensor of 0 elements); please "
        "report it"
    )
    _assert_skipped(stderr, card, record, reason)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_rerun_remembers_the_sources_losses_until_a_source_is_rewritten(
    tmp_path: Path,
    make_model: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hubmerge.quality import forward

    measured: list[str] = []
    real = forward.token_losses

    def counting(checkpoint: Checkpoint, *args: object, **kwargs: object) -> object:
        measured.append(checkpoint.label)
        return real(checkpoint, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(forward, "token_losses", counting)
    models = [make_model(name, seed) for seed, name in enumerate(("base", "math", "code"))]
    recipe = _recipe(tmp_path, models)

    def merge() -> tuple[list[str], dict[str, object]]:
        measured.clear()
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        record = _merge_with_cli(recipe, capsys)[2]
        return list(measured), record

    first, record = merge()
    assert first[0] == "the merged model" and len(first) == 4 and record["passed"]
    again, same = merge()
    assert again == ["the merged model"] and same["losses"] == record["losses"]
    weights = models[1] / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # the same bytes, but a new file: nothing proves that, so measured again
    rewritten, _ = merge()
    assert rewritten == ["the merged model", first[2]]
    monkeypatch.setenv("HUBMERGE_CACHE", "off")
    assert len(merge()[0]) == 4


@pytest.mark.slow
def test_domain_losses_equal_transformers_float32_loss_as_the_check_always_measured_it(
    tmp_path: Path,
) -> None:
    """The quantity of the transformers-based check it replaces: per text `model(ids, labels=ids).loss`, a
    domain's texts weighted by their predicted tokens; here with the model in float32."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    result = api.merge(
        REPO / "recipes/examples/tiny-ties.toml", output_dir=tmp_path / "o", log=lambda _: None
    )
    report = result.sanity
    assert report is not None and report.passed, report
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "o")
    for name, folder in [("merged", tmp_path / "o"), ("./tiny/math", TINY / "math")]:
        model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for domain, texts in sanity_texts().items():
            total, tokens = 0.0, 0
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids
                with torch.no_grad():
                    total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                tokens += ids.shape[1] - 1
            assert report.losses[name][domain] == pytest.approx(total / tokens, abs=1e-5)


@pytest.mark.slow
def test_streamed_sources_are_read_by_range_and_compared(tmp_path: Path) -> None:
    """A merge whose sources are all streamed (a disk budget smaller than one source) compares the merge with
    each of them, with the losses the same sources give from a local folder."""
    vocab = 32768
    folders = {
        f"Qwen/tiny-{name}": write_checkpoint(
            tmp_path / "models" / name,
            random_state_dict(seed, vocab=vocab),
            dtype=torch.float32,
            shards=2,
            vocab_size=vocab,
        )
        for seed, name in enumerate(("base", "math", "coder"), start=1)
    }
    with local_hub(folders) as hub:
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(
            'method = "task_arithmetic"\nbase = "Qwen/tiny-base"\nmodels = ["Qwen/tiny-math", "Qwen/tiny-coder"]\n'
            'dtype = "bfloat16"\n[parameters]\nscaling_factor = 0.7\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "HUBMERGE_NO_SANITY"} | hub_env(hub, tmp_path)
        run = invoke_cli(recipe, "--output", tmp_path / "out", "--max-disk", "4000000", env=env)
    assert run.returncode == 0, run.stderr
    assert "sanity check: read the streamed sources again by range from the Hub (" in run.stderr
    recorded = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())["sanity"]
    assert recorded["passed"] is True and set(recorded["losses"]) == {"merged", *folders}
    local = check(tmp_path / "out", [Checkpoint.local(name, folder) for name, folder in folders.items()])
    assert recorded["losses"] == {name: dict(losses) for name, losses in local.losses.items()}


def test_a_source_that_fails_to_read_during_the_check_is_a_skip_with_its_own_one_line_error(
    tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    output = make_model("merged", 1)
    source = make_model("source", 2)
    checkpoint = Checkpoint.local("source", source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # changed on the disk after its header was read
    report = check(output, [checkpoint])
    assert report.skipped is not None and report.skipped.startswith(f"{weights} is truncated at byte ")
    assert report.skipped.endswith("; re-download it") and report.losses == {}
