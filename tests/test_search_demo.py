"""The search demo with real skills (recipes/examples/skills-search.toml over recipes/examples/skills/).

The fine-tunes' skills are scored here by hand, as lm-eval's multiple-choice `acc` scores them (the sum of the
answer tokens' log-probabilities after the question, the best of the four choices), which takes seconds; the
searches run lm-eval itself, offline, from the repository root (the tasks' data files are relative to it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support.checkpoints import REPO
from support.evaluation import lm_eval_offline

from hubmerge.search.run import search

SKILLS = REPO / "recipes" / "examples" / "skills"
RECIPE = REPO / "recipes" / "examples" / "skills-search.toml"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lm_eval_offline(monkeypatch, tmp_path / "hf_home")


def accuracy(model_name: str, task: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = SKILLS / model_name
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    docs = [json.loads(line) for line in (SKILLS / "tasks" / f"{task}.jsonl").read_text().splitlines()]
    rows = [
        (tok(d["question"])["input_ids"], tok(f"{d['question']} {c}")["input_ids"])
        for d in docs
        for c in d["choices"]
    ]
    width = max(len(ids) for _, ids in rows)
    batch = torch.tensor(
        [ids + [0] * (width - len(ids)) for _, ids in rows]
    )  # right-padded: causal, so harmless
    with torch.no_grad():
        picked = model(batch).logits.log_softmax(-1)[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]
    # Token i is scored by the logits at i - 1: the answer's tokens are context..len(ids) - 1.
    scores = [
        float(picked[r, len(context) - 1 : len(ids) - 1].sum()) for r, (context, ids) in enumerate(rows)
    ]
    right = 0
    for n, doc in enumerate(docs):
        mine = scores[4 * n : 4 * n + 4]
        right += mine.index(max(mine)) == doc["answer"]
    return right / len(docs)


@pytest.mark.slow
def test_each_fine_tune_has_its_own_skill_and_the_base_has_neither() -> None:
    scores = {
        (m, t): accuracy(m, t) for m in ("base", "adder", "reverser") for t in ("skills_add", "skills_rev")
    }
    # Four choices: chance is 0.25. Measured: base 0.10 / 0.15, adder 0.94 / 0.25, reverser 0.27 / 1.00.
    assert scores["adder", "skills_add"] >= 0.9 and scores["reverser", "skills_rev"] >= 0.9
    assert scores["base", "skills_add"] <= 0.35 and scores["base", "skills_rev"] <= 0.35
    assert (
        scores["reverser", "skills_add"] <= 0.35 and scores["adder", "skills_rev"] <= 0.35
    )  # distinct skills


def _check(result_dir: Path, trials: int) -> dict[str, Any]:
    saved: dict[str, Any] = json.loads((result_dir / "search_results.json").read_text())
    assert len(saved["trials"]) == trials and all(t["state"] == "complete" for t in saved["trials"])
    written = saved["as_written"]
    assert written["number"] == 0 and written["params"]["parameters.scaling_factor"] == 0.3
    assert saved["best"]["score"] > written["score"]  # strictly better on the combined objective
    for t in saved["trials"]:
        terms = t["terms"]
        assert t["score"] == pytest.approx(0.5 * terms["skills_add"] + 0.5 * terms["skills_rev"])
    return saved


@pytest.mark.slow
def test_two_trials_of_the_demo_search_beat_the_recipe_as_written(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    result = search(RECIPE, output_dir=tmp_path / "s", trials=2, log=lambda _: None)
    saved = _check(tmp_path / "s", 2)
    assert result.best is not None and result.best["number"] == 1
    assert saved["best"]["params"] == {"parameters.scaling_factor": 1.0, "models[0].weight": 1.25}


@pytest.mark.slow  # eight trials of lm-eval: ~1 to 2 min
def test_the_demo_search_as_documented_finds_a_recipe_much_better_than_the_one_as_written(
    tmp_path: Path,
) -> None:
    pytest.importorskip("lm_eval")
    search(RECIPE, output_dir=tmp_path / "s", log=lambda _: None)
    saved = _check(tmp_path / "s", 8)
    best, written = saved["best"], saved["as_written"]
    assert isinstance(best, dict) and isinstance(written, dict)
    # docs/search.md quotes these numbers.
    assert written["score"] == pytest.approx(0.375)
    assert best["score"] >= 0.6 and best["params"]["parameters.scaling_factor"] == 0.8


@pytest.mark.slow  # trains three models: ~1 min
def test_the_training_script_writes_the_committed_skills_byte_for_byte(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes" / "examples" / "make_skill_models.py"),
            str(tmp_path / "skills"),
        ],
        check=True,
        capture_output=True,
    )
    committed = sorted(p.relative_to(SKILLS) for p in SKILLS.rglob("*") if p.is_file())
    assert (
        sorted(p.relative_to(tmp_path / "skills") for p in (tmp_path / "skills").rglob("*") if p.is_file())
        == committed
    )
    assert len(committed) == 3 * 7 + 4
    for name in committed:
        assert (tmp_path / "skills" / name).read_bytes() == (SKILLS / name).read_bytes(), name
