"""The recipe's JSON Schema (`hubmerge schema`): generated from the same pydantic models and method registry
as `load_recipe`, committed as `hubmerge/data/recipe.schema.json` for editors (Taplo / Even Better TOML,
Tombi), and as strict as the validator on what a schema can say."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from support.checkpoints import REPO

from hubmerge import cli
from hubmerge.errors import RecipeError
from hubmerge.merging.methods import METHODS
from hubmerge.recipe.load import load_recipe
from hubmerge.recipe.schema import json_schema

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMITTED = REPO / "hubmerge" / "data" / "recipe.schema.json"
RECIPES = sorted((REPO / "recipes").rglob("*.toml"))


def printed_schema() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["schema"]) == 0
    return out.getvalue()


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(COMMITTED.read_text()))


def test_the_committed_schema_is_what_hubmerge_schema_prints() -> None:
    assert COMMITTED.read_text() == printed_schema(), (
        "the recipe schema changed (a method or a key was added): run "
        "`hubmerge schema > hubmerge/data/recipe.schema.json` and commit it"
    )


@pytest.mark.slow
def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json.loads(COMMITTED.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_is_valid_against_the_schema(recipe: Path) -> None:
    errors = list(validator().iter_errors(tomllib.loads(recipe.read_text())))
    assert not errors, [e.message for e in errors]


@pytest.mark.slow
def test_check_jsonschema_accepts_the_shipped_recipes_as_the_readme_says() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [tool, "--schemafile", COMMITTED, *RECIPES], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_registered_parameter_is_in_the_schema_with_its_help_and_default() -> None:
    defs = json_schema()["$defs"]
    for method in METHODS.values():
        recipe = next(
            d for d in defs.values() if d["properties"].get("method", {}).get("const") == method.name
        )
        parameters = defs[recipe["properties"]["parameters"]["$ref"].rsplit("/", 1)[1]]["properties"]
        model_ref = recipe["properties"]["models"]["items"]["oneOf"][1]["$ref"]
        per_model = defs[model_ref.rsplit("/", 1)[1]]["properties"]
        assert set(parameters) == {p.name for p in method.params + method.model_params}, method.name
        assert set(per_model) == {"source", "revision"} | {p.name for p in method.model_params}
        for p in method.params + method.model_params:
            entry = parameters[p.name]
            assert entry["description"].startswith(p.help)
            assert entry.get("default") == p.default
            forms = entry.get("oneOf", [entry])
            assert len(forms) == (3 if p.per_tensor else 1), (
                method.name,
                p.name,
            )  # scalar, gradient, filters
            scalar = forms[0]
            if p.choices:
                assert scalar["enum"] == list(p.choices)
            if p.minimum is not None:
                assert scalar["minimum"] == p.minimum
            if p.maximum is not None:
                assert scalar["maximum"] == p.maximum
        required = {p.name for p in method.params if p.default is None}
        assert (
            set(defs[recipe["properties"]["parameters"]["$ref"].rsplit("/", 1)[1]].get("required", []))
            == required
        )


BAD = [
    ('method = "fisher_merging"\nbase = "./base"\nmodels = ["./a"]\n', "unknown method"),
    ('method = "ties"\nmodels = ["./a"]\n', "base: is required"),
    ('method = "ties"\nbase = "./base"\nmodels = []\n', "models: must be a non-empty list"),
    ('method = "ties"\nbase = "./base"\nmodels = ["./a"]\nscaling = 1\n', "scaling: unknown key"),
    ('method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nthreshold = 120\n', "<= 100.0"),
    ('method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nthreshold = [1, 2]\n', "one value"),
    ('method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nmerge_func = "avg"\n', "one of"),
    (
        'method = "linear"\nmodels = ["./a"]\n[parameters]\nweight = [{filter = "mlp"}]\n',
        "value: is required",
    ),
    ('method = "linear"\n[[models]]\nsource = "./a"\nweight = "heavy"\n', "must be a number"),
    ('method = "linear"\n[[models]]\nsource = "./a"\nwieght = 2\n', "did you mean 'weight'"),
    ('method = "linear"\nmodels = ["./a"]\n[output]\nmax_shard_size = "lots"\n', "must be a size"),
    ('method = "linear"\nmodels = ["./a"]\n[eval]\ntasks = ["gsm8k"]\ndevice = "tpu"\n', "eval.device"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_the_schema_refuses_what_the_validator_refuses(tmp_path: Path, text: str, message: str) -> None:
    for name in ("base", "a"):
        (tmp_path / name).mkdir()
    (tmp_path / "recipe.toml").write_text(text)
    with pytest.raises(RecipeError, match=r"recipe\.toml: ") as caught:
        load_recipe(tmp_path / "recipe.toml")
    assert message in str(caught.value)
    assert list(validator().iter_errors(tomllib.loads(text))), "the schema accepts it"


def test_gradients_and_filter_rules_are_valid_where_a_parameter_is_per_tensor() -> None:
    text = (
        'method = "task_arithmetic"\nbase = "b"\n[parameters]\nscaling_factor = [0.2, 0.5]\n'
        '[[models]]\nsource = "m"\nweight = [{filter = "mlp", value = [1, 2]}, {value = 0.5}]\n'
    )
    assert not list(validator().iter_errors(tomllib.loads(text)))


def test_example_recipes_name_the_committed_schema_on_their_first_line() -> None:
    for recipe in sorted((REPO / "recipes" / "examples").glob("*.toml")):
        first = recipe.read_text().splitlines()[0]
        assert first.startswith("#:schema "), recipe
        assert (recipe.parent / first.removeprefix("#:schema ")).resolve() == COMMITTED.resolve()


@pytest.mark.slow
def test_validate_and_schema_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from hubmerge import cli\n"
        f"assert cli.main(['validate', {str(RECIPES[0])!r}]) == 0\n"
        "assert cli.main(['schema']) == 0\n"
        "loaded = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr


LINEAR = 'method = "linear"\n[[models]]\nsource = "./a"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LINEAR + 'weight = [1, "x"]\n', "models[0].weight[1]: must be a number, got 'x'"),
        (LINEAR + "weight = []\n", "models[0].weight: is an empty list; give a value, a gradient"),
        (
            LINEAR + "weight = [1, [2]]\n",
            "models[0].weight: must be a value, a gradient [a, b, ...] or a list",
        ),
        (LINEAR + 'weight = [{filter = "mlp"}]\n', "models[0].weight[0].value: is required"),
        (
            LINEAR + 'weight = [{fliter = "mlp", value = 1}]\n',
            "models[0].weight[0].fliter: unknown key; did you mean 'filter'?",
        ),
        (
            LINEAR + "weight = [{value = [1, {}]}]\n",
            "models[0].weight[0].value: must be a value or a gradient [a, b, ...]",
        ),
        (
            LINEAR + "weight = [{value = [1, inf]}]\n",
            "models[0].weight[0].value[1]: must be a finite number, got inf",
        ),
        (
            'method = "ties"\nbase = "./a"\nmodels = ["./a"]\n[parameters]\ntrim = [{value = "tensor"}]\n',
            "parameters.trim: is one value for the whole model",
        ),
        (LINEAR + '[output]\nmax_disk = "lots"\n', 'output.max_disk: must be a size such as "5GB"'),
    ],
)
def test_per_tensor_and_new_key_mistakes_name_the_exact_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "recipe.toml").write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "recipe.toml")
    assert str(caught.value).startswith(f"{tmp_path / 'recipe.toml'}: ")
    assert message in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_gradients_and_filters_become_schedule_values_with_integers_read_as_floats(tmp_path: Path) -> None:
    from hubmerge.merging.schedule import Filter, Gradient

    (tmp_path / "a").mkdir()
    (tmp_path / "recipe.toml").write_text(
        'method = "task_arithmetic"\nbase = "./a"\n[parameters]\nscaling_factor = [0, 1]\n'
        'weight = [{filter = "mlp", value = [1, 2]}, {value = 3}]\n[[models]]\nsource = "./a"\nweight = 2\n'
        '[output]\nmax_disk = "20GB"\n'
    )
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert recipe.parameters == {
        "scaling_factor": Gradient((0.0, 1.0)),
        "normalize": False,  # task_arithmetic's defaults, filled in
        "rescale": False,
        "weight": (Filter(Gradient((1.0, 2.0)), "mlp"), Filter(3.0)),
    }
    assert isinstance(recipe.parameters["scaling_factor"].values[0], float)  # type: ignore[union-attr]
    assert dict(recipe.models[0].params) == {"weight": 2.0}
    assert recipe.output.max_disk == 20 * 10**9


def test_output_card_and_eval_are_the_validated_tables_with_paths_and_defaults_resolved_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge.recipe.schema import CardTable, EvalTable, OutputTable, Requirement

    (tmp_path / "a").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "card.md.j2").write_text("{{ title }}")
    (tmp_path / "recipe.toml").write_text(
        'method = "task_arithmetic"\nbase = "./a"\nmodels = ["./a"]\n'
        '[output]\ndir = "out"\nrepo = "me/merged"\ngguf = ["q8_0", "f16", "q8_0"]\n'
        '[card]\ntemplate = "card.md.j2"\ntags = ["merge"]\nlanguage = "en"\n'
        '[eval]\ntasks = [" gsm8k", "arc_easy", "gsm8k"]\ninclude_path = "tasks"\n'
        'require = { gsm8k = 0.4, arc_easy = "base - 0.02" }\n'
    )
    monkeypatch.chdir(tmp_path / "tasks")
    recipe = load_recipe(tmp_path / "recipe.toml")
    out, card, spec = recipe.output, recipe.card, recipe.eval
    assert isinstance(out, OutputTable) and isinstance(card, CardTable) and isinstance(spec, EvalTable)
    assert out.dir == tmp_path.resolve() / "out"  # relative to the recipe, not the working directory
    assert (out.max_shard_size, out.gguf, out.gguf_repo) == (5 * 10**9, ("q8_0", "f16"), "me/merged-GGUF")
    assert out.gguf_dir == tmp_path.resolve() / "out-GGUF"
    assert (card.template, card.tags, card.language) == (
        tmp_path.resolve() / "card.md.j2",
        ("merge",),
        ("en",),
    )
    assert (spec.tasks, spec.include_path) == (("gsm8k", "arc_easy"), tmp_path.resolve() / "tasks")
    assert spec.require == (
        Requirement("gsm8k", "0.4", threshold=0.4),
        Requirement("arc_easy", "base - 0.02", reference="base", offset=-0.02),
    )
    assert (
        load_recipe(tmp_path / "recipe.toml", "elsewhere").output.dir
        == tmp_path.resolve() / "tasks" / "elsewhere"
    )
    (tmp_path / "recipe.toml").write_text('method = "task_arithmetic"\nbase = "./a"\nmodels = ["./a"]\n')
    bare = load_recipe(tmp_path / "recipe.toml")
    assert bare.output.dir == tmp_path.resolve() / "tasks" / "outputs" / "recipe"  # the working directory's
    assert (bare.output.gguf_repo, bare.card.template, bare.eval, bare.sanity) == (None, None, None, True)
