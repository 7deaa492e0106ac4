"""The model card: golden renderings, Hub-valid front matter, the license matrix, template safety.

Golden files live in tests/golden/. After an intended change to the card, regenerate them with

    HUBMERGE_UPDATE_GOLDEN=1 python -m pytest tests/test_card.py

read the diff, and commit them. They hold no absolute path (local sources are named relative to the
recipe, Hub sources come from an offline cache in tmp_path) and "hubmerge <version>" for the version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from support.checkpoints import REPO, TINY

import hubmerge
from hubmerge import api
from hubmerge.cli import main
from hubmerge.errors import CardError
from hubmerge.merging.plan import MergePlan
from hubmerge.publish.card import License, combine_licenses, license_file, render_card, source_license
from hubmerge.sources.qwen import QWEN25_SIZES

GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = REPO / "recipes" / "examples"

APACHE = "license: apache-2.0"
QWEN_RESEARCH = "license: other\nlicense_name: qwen-research\nlicense_link: https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE"
QWEN = "license: other\nlicense_name: qwen\nlicense_link: https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/LICENSE"

# FusionBench's Qwen2.5-1.5B three_models pool: Hub id -> (tiny stand-in, max_position_embeddings of the real repo).
POOL = {
    "Qwen/Qwen2.5-1.5B": ("base", 131072),
    "Qwen/Qwen2.5-Math-1.5B": ("math", 4096),
    "Qwen/Qwen2.5-Coder-1.5B": ("coder", 32768),
    "Qwen/Qwen2.5-1.5B-Instruct": ("instruct", 32768),
}
QWEN25_1_5B_CONFIG = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
}
FUSIONBENCH_TIES = """\
# FusionBench's Qwen2.5-1.5B "three_models" pool merged with ties, as its documentation runs it.
# (In hubmerge's tests the four sources are tiny stand-ins in an offline Hugging Face cache.)
method = "ties"
base = "Qwen/Qwen2.5-1.5B"
models = ["Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Coder-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"]
dtype = "bfloat16"

[parameters]
scaling_factor = 0.8

[output]
repo = "hubmerge-demo/Qwen2.5-1.5B-three_models-ties"

[card]
tags = ["math", "code"]
"""


def sha_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache with tiny stand-ins for the pool, resolved as Hub repos at fixed shas."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    for repo_id, (tiny, context) in POOL.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / sha_of(repo_id)
        shutil.copytree(TINY / tiny, snapshot)
        config = json.loads((snapshot / "config.json").read_text())
        config.update(QWEN25_1_5B_CONFIG, max_position_embeddings=context)
        (snapshot / "config.json").write_text(json.dumps(config, indent=2))
        (snapshot / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(sha_of(repo_id))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def set_readme(folder: Path, front_matter: str | None) -> Path:
    """Give a model folder a README.md with this YAML front matter, or none at all."""
    readme = folder / "README.md"
    if front_matter is None:
        readme.unlink(missing_ok=True)
    else:
        readme.write_text(f"---\n{front_matter}\n---\n\n# test model\n")
    return folder


@pytest.fixture
def plan_with(
    make_model: Callable[..., Path], write_recipe: Callable[[str], Path]
) -> Callable[..., MergePlan]:
    """`plan_with({"base": front matter, "math": ...}, card="...")`: a task_arithmetic plan over fresh local
    models (the first is the base) whose READMEs carry that front matter (None: no README)."""

    def build(front_matters: dict[str, str | None], card: str = "") -> MergePlan:
        for seed, (name, yaml) in enumerate(front_matters.items()):
            set_readme(make_model(name, seed), yaml)
        base, *models = (f'"./models/{name}"' for name in front_matters)
        recipe = f'method = "task_arithmetic"\nbase = {base}\nmodels = [{", ".join(models)}]\n'
        return api.load_plan(write_recipe(recipe + (f"\n[card]\n{card}\n" if card else "")))

    return build


def front_matter(card: str) -> dict[str, object]:
    return dict(ModelCard(card).data.to_dict())


def normalise(card: str) -> str:
    return card.replace(f"hubmerge {hubmerge.__version__}", "hubmerge <version>")


# --- golden cards ------------------------------------------------------------------------------------------


def golden_plan(name: str, tmp_path: Path) -> MergePlan:
    if name.startswith("tiny-"):
        return api.load_plan(EXAMPLES / f"{name}.toml")
    recipe = tmp_path / "three_models-ties.toml"
    recipe.write_text(FUSIONBENCH_TIES)
    return api.load_plan(recipe)


GOLDENS = ["tiny-simple_average", "tiny-task_arithmetic", "tiny-ties", "fusionbench-three_models-ties"]


@pytest.mark.parametrize("name", GOLDENS)
def test_card_matches_its_golden_file(name: str, tmp_path: Path, hub_cache: Path) -> None:
    card = normalise(render_card(golden_plan(name, tmp_path)))
    golden = GOLDEN / f"{name}.md"
    if os.environ.get("HUBMERGE_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(card)
    assert card == golden.read_text(), f"card differs from {golden}; see the module docstring to regenerate"
    assert str(tmp_path) not in card and str(REPO) not in card


@pytest.mark.parametrize("name", GOLDENS)
def test_front_matter_parses_with_modelcard_and_round_trips(
    name: str, tmp_path: Path, hub_cache: Path
) -> None:
    card = render_card(golden_plan(name, tmp_path))
    parsed = ModelCard(card)
    assert str(parsed) == card
    assert parsed.text.startswith("\n# ")
    assert parsed.data.library_name == "transformers" and parsed.data.pipeline_tag == "text-generation"


def test_hub_sources_give_base_model_relation_merge_and_the_full_metadata(
    tmp_path: Path, hub_cache: Path
) -> None:
    card = render_card(golden_plan("fusionbench-three_models-ties", tmp_path))
    assert front_matter(card) == {
        "base_model": list(POOL),
        "language": ["en"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["merge", "hubmerge", "ties", "qwen2.5", "math", "code"],
        "base_model_relation": "merge",
    }


def test_fusionbench_configuration_is_recognised_and_cited(tmp_path: Path, hub_cache: Path) -> None:
    card = render_card(golden_plan("fusionbench-three_models-ties", tmp_path))
    assert (
        "fusion_bench method=linear/ties_merging_for_causallm method.scaling_factor=0.8 "
        "modelpool=CausalLMPool/Qwen2.5-1.5B_three_models" in card
    )
    assert "eprint={2406.03280}" in card and "eprint={2306.01708}" in card and "eprint={2412.15115}" in card
    assert "| 1.5B | 28 | 12 / 2 | Yes | 32K / 8K |" in card
    assert f"[`{sha_of('Qwen/Qwen2.5-1.5B')[:12]}`](https://huggingface.co/Qwen/Qwen2.5-1.5B/tree/" in card


@pytest.mark.parametrize(
    ("method", "models", "parameters", "command"),
    [
        (
            "task_arithmetic",
            POOL_TWO := '["Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Coder-1.5B"]',
            "scaling_factor = 0.8",
            "fusion_bench method=linear/task_arithmetic_for_causallm method.scaling_factor=0.8 "
            "modelpool=CausalLMPool/Qwen2.5-1.5B_math_and_code",
        ),
        (
            "simple_average",
            POOL_TWO,
            "",
            "fusion_bench method=linear/simple_average_for_causallm "
            "modelpool=CausalLMPool/Qwen2.5-1.5B_math_and_code",
        ),
        ("task_arithmetic", POOL_TWO, "scaling_factor = 0.5", None),
        ("ties", POOL_TWO, 'scaling_factor = 0.8\nmerge_func = "mean"', None),
        ("ties", '["Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"]', "scaling_factor = 0.8", None),
    ],
)
def test_fusionbench_reference_only_where_the_recipe_reproduces_one(
    method: str, models: str, parameters: str, command: str | None, tmp_path: Path, hub_cache: Path
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'method = "{method}"\nbase = "Qwen/Qwen2.5-1.5B"\nmodels = {models}\n[parameters]\n{parameters}\n'
    )
    card = render_card(api.load_plan(recipe))
    if command is None:
        assert "FusionBench configuration" not in card and "2406.03280" not in card
    else:
        assert command in card and "eprint={2406.03280}" in card


def test_base_model_lists_hub_ids_and_leaves_local_folders_out(
    tmp_path: Path, hub_cache: Path, write_recipe: Callable[[str], Path]
) -> None:
    shutil.copytree(TINY / "math", tmp_path / "my-math")
    config = json.loads((tmp_path / "my-math" / "config.json").read_text())  # shaped like the cached Hub copies
    (tmp_path / "my-math" / "config.json").write_text(json.dumps(config | QWEN25_1_5B_CONFIG))
    card = render_card(
        api.load_plan(
            write_recipe(
                'method = "task_arithmetic"\nbase = "Qwen/Qwen2.5-1.5B"\nmodels = ["Qwen/Qwen2.5-Coder-1.5B", "./my-math"]\n'
            )
        )
    )
    assert front_matter(card)["base_model"] == ["Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-Coder-1.5B"]
    assert front_matter(card)["base_model_relation"] == "merge"
    assert "| model | `my-math` | local folder | apache-2.0 |" in card


@pytest.mark.slow
def test_base_model_lists_only_the_models_whose_weights_were_merged(
    tmp_path: Path, hub_cache: Path, write_recipe: Callable[[str], Path]
) -> None:
    # simple_average: the base gives config.json alone; the tokenizer source gives no weight.
    card = render_card(
        api.load_plan(
            write_recipe(
                'method = "simple_average"\nbase = "Qwen/Qwen2.5-1.5B"\n'
                'models = ["Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Coder-1.5B"]\n'
                '[tokenizer]\nsource = "Qwen/Qwen2.5-1.5B-Instruct"\n'
            )
        )
    )
    metadata = front_matter(card)
    assert metadata["base_model"] == ["Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Coder-1.5B"]
    assert metadata["tags"] == ["merge", "hubmerge", "simple_average", "qwen2.5"]  # it has the 1.5B shape
    assert "| tokenizer | [Qwen/Qwen2.5-1.5B-Instruct](" in card
    assert "come from the tokenizer source, the tokenizer ([Qwen/Qwen2.5-1.5B-Instruct](" in card


def test_local_sources_only_give_no_base_model() -> None:
    metadata = front_matter(render_card(api.load_plan(EXAMPLES / "tiny-ties.toml")))
    assert "base_model" not in metadata and "base_model_relation" not in metadata
    assert metadata["tags"] == ["merge", "hubmerge", "ties"]  # tiny models have no Qwen2.5 shape


# --- licenses ----------------------------------------------------------------------------------------------


def test_all_apache_sources_give_apache_without_name_or_link(plan_with: Callable[..., MergePlan]) -> None:
    card = render_card(plan_with({"base": APACHE, "math": APACHE, "coder": APACHE}))
    metadata = front_matter(card)
    assert metadata["license"] == "apache-2.0"
    assert "license_name" not in metadata and "license_link" not in metadata


def test_a_qwen25_3b_source_makes_the_merge_qwen_research(plan_with: Callable[..., MergePlan]) -> None:
    card = render_card(plan_with({"base": APACHE, "math": QWEN_RESEARCH, "coder": APACHE}))
    metadata = front_matter(card)
    assert (metadata["license"], metadata["license_name"], metadata["license_link"]) == (
        "other",
        "qwen-research",
        "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE",
    )
    assert "| model | `models/math` | local folder | other (qwen-research) | weight = 1.0 |" in card
    assert "| base | `models/base` | local folder | apache-2.0 | — |" in card
    assert "non-commercial use only" in card


def test_a_qwen25_72b_source_makes_the_merge_qwen(plan_with: Callable[..., MergePlan]) -> None:
    metadata = front_matter(render_card(plan_with({"base": QWEN, "math": APACHE})))
    assert (metadata["license"], metadata["license_name"], metadata["license_link"]) == (
        "other",
        "qwen",
        "https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/LICENSE",
    )


def test_tongyi_qianwen_is_counted_as_qwen_research_and_said_so(plan_with: Callable[..., MergePlan]) -> None:
    old_3b = "license: other\nlicense_name: tongyi-qianwen\nlicense_link: https://huggingface.co/Qwen/Qwen2.5-3B/blob/695e1e4/LICENSE"
    card = render_card(plan_with({"base": old_3b, "math": QWEN}))
    assert front_matter(card)["license_name"] == "qwen-research"
    assert "| base | `models/base` | local folder | other (tongyi-qianwen) | — |" in card
    assert "`tongyi-qianwen` (`models/base`) is counted as qwen-research" in card


@pytest.mark.parametrize(
    ("readme", "reason"),
    [
        (None, "no README.md with YAML front matter"),
        ("library_name: transformers", "no `license`"),
        (
            "license: other\nlicense_link: https://example.com/terms",
            "`license: other` without a `license_name`",
        ),
    ],
)
def test_a_source_without_a_license_stops_the_run(
    plan_with: Callable[..., MergePlan], readme: str | None, reason: str
) -> None:
    plan = plan_with({"base": APACHE, "math": readme})
    with pytest.raises(CardError, match=r"^models\[0\] \(.*models/math\): no license: ") as caught:
        render_card(plan)
    assert reason in str(caught.value) and "set [card] license in " in str(caught.value)
    with pytest.raises(CardError):
        license_file(plan)


def test_recipe_license_overrides_the_sources(plan_with: Callable[..., MergePlan]) -> None:
    card = render_card(
        plan_with(
            {"base": APACHE, "math": None},
            card='license = "other"\nlicense_name = "my-license"\nlicense_link = "https://example.com/terms"',
        )
    )
    metadata = front_matter(card)
    assert (metadata["license"], metadata["license_name"], metadata["license_link"]) == (
        "other",
        "my-license",
        "https://example.com/terms",
    )
    assert "| model | `models/math` | local folder | unknown | weight = 1.0 |" in card
    assert "as the recipe states" in card


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ('license = "mit"', ("mit", None, None)),
        (
            'license = "qwen-research"\nlicense_link = "https://example.com/terms"',
            ("other", "qwen-research", "https://example.com/terms"),
        ),
        ('license_link = "https://example.com/mirror"', ("other", "qwen", "https://example.com/mirror")),
    ],
)
def test_recipe_license_keys_override_the_derived_ones(
    plan_with: Callable[..., MergePlan], card: str, expected: tuple[str, str | None, str | None]
) -> None:
    metadata = front_matter(render_card(plan_with({"base": APACHE, "math": QWEN}, card=card)))
    assert (metadata["license"], metadata.get("license_name"), metadata.get("license_link")) == expected


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ('license = "other"', r'card\.license: "other" needs license_name'),
        ('license_name = "qwen"', r'card\.license_name: also set license = "other"'),
        ('license = "other"\nlicense_name = "custom"', r"set \[card\] license_link"),
    ],
)
def test_incomplete_recipe_license_is_refused(
    plan_with: Callable[..., MergePlan], card: str, message: str
) -> None:
    with pytest.raises(CardError, match=message):
        render_card(plan_with({"base": APACHE, "math": APACHE}, card=card))


def test_licenses_that_cannot_be_ranked_stop_the_run(plan_with: Callable[..., MergePlan]) -> None:
    with pytest.raises(
        CardError, match=r"cannot combine the sources' licenses \(base .*: apache-2.0; models\[0\] .*: mit\)"
    ):
        render_card(plan_with({"base": APACHE, "math": "license: mit"}))


@pytest.mark.parametrize(
    ("card_data", "expected"),
    [
        (
            {"license": "apache-2.0", "license_link": "https://x/LICENSE"},
            License("apache-2.0", None, "https://x/LICENSE"),
        ),
        ({"license": "Apache-2.0"}, License("apache-2.0")),
        ({"license": "qwen-research"}, License("other", "qwen-research")),
        (
            {"license": "other", "license_name": "qwen-research", "license_link": "L"},
            License("other", "qwen-research", "L"),
        ),
        ({"license": "other", "license_name": "tongyi-qianwen"}, License("other", "qwen-research")),
        ({"license": "qwen"}, License("other", "qwen")),
        ({"license": "other", "license_name": "yi-license"}, License("other", "yi-license")),
        ({"license": "mit"}, License("mit")),
        ({"license": "other"}, None),
        ({"license": "  "}, None),
        ({"license": ["mit"]}, None),
        ({"language": ["en"]}, None),
        (None, None),
    ],
)
def test_source_license_normalises_how_cards_spell_licenses(
    card_data: dict[str, object] | None, expected: License | None
) -> None:
    assert source_license(card_data) == expected


@pytest.mark.parametrize(
    ("licenses", "expected"),
    [
        ([License("apache-2.0"), License("apache-2.0")], License("apache-2.0")),
        ([License("apache-2.0"), License("other", "qwen", "Q")], License("other", "qwen", "Q")),
        (
            [License("other", "qwen", "Q"), License("other", "qwen-research", "R"), License("apache-2.0")],
            License("other", "qwen-research", "R"),
        ),
        (
            [License("other", "qwen-research", "first"), License("other", "qwen-research", "second")],
            License("other", "qwen-research", "first"),
        ),
        ([License("mit"), License("mit")], License("mit")),
        ([License("mit"), License("apache-2.0")], None),
        ([License("other", "yi-license"), License("other", "qwen")], None),
    ],
)
def test_combine_licenses_takes_the_most_restrictive(
    licenses: list[License], expected: License | None
) -> None:
    assert combine_licenses(licenses) == expected


def test_license_file_comes_from_a_source_under_the_governing_license(
    plan_with: Callable[..., MergePlan],
) -> None:
    plan = plan_with({"base": APACHE, "math": APACHE, "coder": QWEN_RESEARCH})
    (plan.base.ref.path / "LICENSE").write_text("Apache")  # type: ignore[union-attr]
    (plan.models[1].ref.path / "LICENSE.md").write_text("Qwen RESEARCH LICENSE AGREEMENT")  # type: ignore[operator]
    plan = api.load_plan(plan.recipe.path)
    source, name = license_file(plan) or (None, None)
    assert (source, name) == (plan.models[1], "LICENSE.md")
    card = render_card(plan)
    assert front_matter(card)["license_link"] == "LICENSE.md"
    assert "This repository includes the `LICENSE.md` file of the model (`models/coder`)." in card


def test_license_file_for_apache_sources_and_none_without_one(plan_with: Callable[..., MergePlan]) -> None:
    plan = plan_with({"base": APACHE, "math": APACHE})
    assert license_file(plan) is None
    (plan.models[0].ref.path / "LICENSE").write_text("Apache")  # type: ignore[operator]
    plan = api.load_plan(plan.recipe.path)
    assert license_file(plan) == (plan.models[0], "LICENSE")
    assert "license_link" not in front_matter(render_card(plan))


# --- templates and card keys -------------------------------------------------------------------------------


@pytest.fixture
def template_plan(plan_with: Callable[..., MergePlan], tmp_path: Path) -> Callable[[str], MergePlan]:
    """`template_plan(text)`: a plan whose recipe names the card template `text`, next to the recipe."""

    def build(template: str) -> MergePlan:
        (tmp_path / "my_card.md.j2").write_text(template)
        return plan_with({"base": APACHE, "math": APACHE}, card='template = "my_card.md.j2"')

    return build


def test_custom_template_relative_to_the_recipe_replaces_the_default(
    template_plan: Callable[[str], MergePlan],
) -> None:
    plan = template_plan(
        "---\n{{ front_matter }}\n---\n# {{ title }}\n\n{% for s in sources %}{{ s.role }}: {{ s.name }}\n{% endfor %}",
    )
    assert render_card(plan) == (
        "---\nlibrary_name: transformers\nlicense: apache-2.0\npipeline_tag: text-generation\n"
        "tags:\n- merge\n- hubmerge\n- task_arithmetic\n---\n# recipe\n\nbase: models/base\n"
        "model: models/math\n"
    )


def test_a_template_edited_between_two_cards_renders_as_edited(
    template_plan: Callable[[str], MergePlan], tmp_path: Path
) -> None:
    """The compiled templates are kept between cards (`card._environment`); an edited file is compiled again."""
    head = "---\n{{ front_matter }}\n---\n"
    assert render_card(template_plan(head + "first {{ title }}\n")).endswith("first recipe\n")
    edited = template_plan(head + "second {{ title }}\n")
    template = tmp_path / "my_card.md.j2"  # its modification time moves on, on a coarse clock too
    os.utime(template, ns=(template.stat().st_atime_ns, template.stat().st_mtime_ns + 10**9))
    assert render_card(edited).endswith("second recipe\n")


def test_undefined_template_variable_is_a_card_error_naming_it_and_its_line(
    template_plan: Callable[[str], MergePlan],
) -> None:
    plan = template_plan("---\n{{ front_matter }}\n---\n# {{ title }}\n{{ licence.text }}\n")
    with pytest.raises(
        CardError,
        match=r"my_card\.md\.j2:5: 'licence' is undefined; the template can use: architecture, citations, "
        "description, diagnostics, evaluation, front_matter, fusionbench, gguf, hubmerge_version, license, metadata, "
        "method, notes, parameters, provenance, qwen25, recipe, sanity, search, sources, title, usage$",
    ):
        render_card(plan)


def test_undefined_attribute_is_a_card_error(template_plan: Callable[[str], MergePlan]) -> None:
    plan = template_plan("---\n{{ front_matter }}\n---\n{{ method.formulae }}\n")
    with pytest.raises(CardError, match=r"my_card\.md\.j2:4: 'dict object' has no attribute 'formulae'"):
        render_card(plan)


@pytest.mark.parametrize(
    "expression", ["''.__class__.__mro__", "sources.__class__.__subclasses__()", "metadata.clear()"]
)
def test_template_reaching_python_internals_is_refused_by_the_sandbox(
    template_plan: Callable[[str], MergePlan], expression: str
) -> None:
    plan = template_plan(f"---\n{{{{ front_matter }}}}\n---\n{{{{ {expression} }}}}\n")
    with pytest.raises(
        CardError, match=r"my_card\.md\.j2:4: refused by the sandbox: access to attribute .* is unsafe"
    ):
        render_card(plan)


def test_template_syntax_error_names_the_line(template_plan: Callable[[str], MergePlan]) -> None:
    plan = template_plan("---\n{{ front_matter }}\n---\n{% for s in sources %}\n")
    with pytest.raises(
        CardError, match=r"my_card\.md\.j2:4: template syntax error: Unexpected end of template"
    ):
        render_card(plan)


@pytest.mark.parametrize(
    "template",
    [
        "# {{ title }}\n",
        "---\n{{ front_matter | replace('apache-2.0', 'mit') }}\n---\n",
        "---\nlicense: [unclosed\n---\n",
    ],
)
def test_template_must_keep_the_computed_front_matter(
    template_plan: Callable[[str], MergePlan], template: str
) -> None:
    with pytest.raises(
        CardError, match=r"my_card\.md\.j2: the card('s front matter is not valid YAML| must start with)"
    ):
        render_card(template_plan(template))


def test_card_keys_override_title_and_description_and_add_tags_and_language(
    plan_with: Callable[..., MergePlan],
) -> None:
    card = render_card(
        plan_with(
            {"base": APACHE + "\nlanguage: [en]", "math": APACHE + "\nlanguage: [en, zh]"},
            card='title = "Math merge"\ndescription = "A test merge."\ntags = ["math"]\nlanguage = ["fr"]',
        )
    )
    assert "\n# Math merge\n\nA test merge.\n\n## Merge method\n" in card
    metadata = front_matter(card)
    assert metadata["tags"] == ["merge", "hubmerge", "task_arithmetic", "math"]
    assert metadata["language"] == ["en", "zh", "fr"]


def test_qwen25_size_row_comes_from_the_qwen_table(plan_with: Callable[..., MergePlan]) -> None:
    plan = plan_with({"base": APACHE, "math": APACHE})
    card = render_card(dataclasses.replace(plan, qwen25=next(s for s in QWEN25_SIZES if s.name == "7B")))
    assert "The merged model has the shape of Qwen2.5-7B:" in card
    assert "| 7B | 28 | 28 / 4 | No | 128K / 8K |" in card
    assert "matches no Qwen2.5 size" in render_card(plan)


@pytest.mark.parametrize("chat", ["chat_template.jinja", "tokenizer_config.json", None])
def test_usage_uses_the_chat_template_when_the_tokenizer_has_one(
    plan_with: Callable[..., MergePlan], chat: str | None
) -> None:
    plan = plan_with({"base": APACHE, "math": APACHE})
    folder = plan.tokenizer.ref.path
    assert folder is not None
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    if chat == "chat_template.jinja":
        (folder / chat).write_text(template)
    elif chat == "tokenizer_config.json":
        config = json.loads((folder / chat).read_text())
        (folder / chat).write_text(json.dumps({**config, "chat_template": template}))
    card = render_card(api.load_plan(plan.recipe.path))
    assert ("tokenizer.apply_chat_template(" in card) is (chat is not None)


def usage_snippet(card: str) -> str:
    match = re.search(r"^```python\n(.*?)^```$", card, re.S | re.M)
    assert match is not None
    return match.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("chat", [True, False])
def test_usage_snippet_runs_with_transformers(
    tmp_path: Path, chat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = shutil.copytree(TINY / "instruct", tmp_path / "model")
    if not chat:
        (model / "chat_template.jinja").unlink()
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "simple_average"\nmodels = ["./model"]\n')
    # A local output's snippet loads the folder it was written to, as it stands (here: the model itself).
    code = usage_snippet(render_card(api.load_plan(recipe, model)))
    assert 'model_id = "./model"\n' in code and ("apply_chat_template" in code) is chat
    # A tiny random model never says its end token: 256 new tokens are 256 steps of `generate` for nothing.
    assert "max_new_tokens=256" in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("max_new_tokens=256", "max_new_tokens=8"), "usage", "exec"), {})
    assert out.getvalue().strip()


def test_cli_card_command_writes_the_card_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "README.md"
    assert main(["card", str(EXAMPLES / "tiny-ties.toml"), "--file", str(out)]) == 0
    assert out.read_text() == render_card(api.load_plan(EXAMPLES / "tiny-ties.toml"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_cli_card_command_reports_a_missing_license_with_exit_code_5(
    plan_with: Callable[..., MergePlan], capsys: pytest.CaptureFixture[str]
) -> None:
    plan = plan_with({"base": APACHE, "math": None})
    assert main(["card", str(plan.recipe.path)]) == 5
    assert "hubmerge: error: models[0] (" in capsys.readouterr().err


QWEN25_BIBTEX = """\
@misc{qwen2025qwen25technicalreport,
      title={Qwen2.5 Technical Report},
      author={Qwen and : and An Yang and Baosong Yang and Beichen Zhang and Binyuan Hui and Bo Zheng and Bowen Yu and Chengyuan Li and Dayiheng Liu and Fei Huang and Haoran Wei and Huan Lin and Jian Yang and Jianhong Tu and Jianwei Zhang and Jianxin Yang and Jiaxi Yang and Jingren Zhou and Junyang Lin and Kai Dang and Keming Lu and Keqin Bao and Kexin Yang and Le Yu and Mei Li and Mingfeng Xue and Pei Zhang and Qin Zhu and Rui Men and Runji Lin and Tianhao Li and Tianyi Tang and Tingyu Xia and Xingzhang Ren and Xuancheng Ren and Yang Fan and Yang Su and Yichang Zhang and Yu Wan and Yuqiong Liu and Zeyu Cui and Zhenru Zhang and Zihan Qiu},
      year={2025},
      eprint={2412.15115},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2412.15115},
}
"""


def test_citation_section_has_the_qwen25_report_verbatim_then_the_method_paper() -> None:
    card = render_card(api.load_plan(EXAMPLES / "tiny-task_arithmetic.toml"))
    citation = card[card.index("## Citation\n") :]
    assert citation.startswith("## Citation\n\n```bibtex\n" + QWEN25_BIBTEX + "\n@misc{ilharco2023editing,\n")
    assert "      eprint={2212.04089},\n" in citation and citation.endswith("}\n```\n")


def test_card_code_and_template_name_no_method() -> None:
    """What the card says of a method comes from its `Method` definition: card.py and the default template
    hold no method name, so a new method's card needs nothing outside its own file."""
    from hubmerge.merging.methods import METHODS

    sources = [REPO / "hubmerge" / "publish" / "card.py", REPO / "hubmerge" / "publish" / "templates" / "model_card.md.j2"]
    for path in sources:
        text = path.read_text()
        for name in METHODS:
            assert f'"{name}"' not in text and f"'{name}'" not in text, f"{path.name} names {name}"
