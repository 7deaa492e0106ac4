"""Property-based tests: whatever recipe or safetensors header arrives, the answer is a clean error or a plan.

Recipes are TOML text built from random mixes of valid and invalid keys, types, methods, parameters,
model references, sizes and dtypes, sometimes cut short or mixed with garbage. Headers start from a real
tiny checkpoint's and are mutated (bad lengths, offsets out of range or overlapping, wrong dtypes,
shapes that disagree with byte sizes, non-dict JSON, huge header lengths, truncated files). The parser,
the `validate` command and the planner must answer each with a `HubmergeError` whose message is one
line, or with a valid result, never with another exception. Runs are derandomized, so CI is repeatable.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.checkpoints import random_state_dict, write_checkpoint
from support.toml_text import toml_key, toml_value

import hubmerge
from hubmerge import cli
from hubmerge.errors import HubmergeError
from hubmerge.merging.methods import METHODS
from hubmerge.recipe.load import Recipe, load_recipe
from hubmerge.sources.checkpoint import TensorReader, index_folder, read_header

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tiny checkpoints under models/ that generated recipes refer to."""
    root = tmp_path_factory.mktemp("fuzz")
    write_checkpoint(root / "models" / "base", random_state_dict(0))
    write_checkpoint(root / "models" / "math", random_state_dict(1))
    write_checkpoint(root / "models" / "code", random_state_dict(2), shards=2)
    write_checkpoint(root / "models" / "head", random_state_dict(3, head=True))
    write_checkpoint(root / "models" / "small-vocab", random_state_dict(4, vocab=256))
    (root / "models" / "empty").mkdir()
    (root / "card.j2").write_text("# {{ title }}\n")
    return root


def one_line_error(exc: HubmergeError) -> None:
    message = str(exc)
    assert len(message.splitlines()) == 1, repr(message)


# --- generated recipes --------------------------------------------------------------------------------------

LOCAL_REFS = ["models/base", "models/math", "./models/code", "models/head", "models/empty", "models"]
BAD_REFS = [
    "models/missing",
    "./models/missing",
    "models/empty",
    "./models/empty",
    "./models/base/config.json",
    "./nope",
    "",
    "   ",
    "bad id!!",
    "a--b/c",
    "../..",
    "~",
    "~no-such-user-hubmerge/x",
    "models/base\x00",
    "\x00",
    "a" * 300,
    "./" + "a" * 300,
    "models/base@main",
    "/",
    "models/base/config.json",
    "card.j2",
]
HUB_REFS = ["Qwen/Qwen2.5-1.5B", "org/name@v1.0", "org/name"]
STRINGS = [
    *LOCAL_REFS,
    *BAD_REFS,
    "bfloat16",
    "float32",
    "float16",
    "int8",
    "fp32",
    "5GB",
    "100KB",
    "1.5MiB",
    "0B",
    "0.1B",
    "-1GB",
    "1e3",
    "global",
    "tensor",
    "sum",
    "mean",
    "max",
    "apache-2.0",
    "other",
    "me/merged",
    "main",
    "out",
    "{{ 7 * 7 }}",
    "é\u200b\U0001f600",
]
KEYS = [
    "method",
    "base",
    "models",
    "dtype",
    "parameters",
    "tokenizer",
    "output",
    "card",
    "source",
    "revision",
    "weight",
    "scaling_factor",
    "threshold",
    "merge_func",
    "trim",
    "mehtod",
    "model",
    "weights",
    "lambda",
    "density",
    "dir",
    "repo",
]

safe_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 100, 101, 10**18]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 1e-300, 1e300]),
    st.booleans(),
    safe_text,
    st.sampled_from(STRINGS),
)
keys = st.one_of(st.sampled_from(KEYS), safe_text.filter(bool))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)


def table(name: str, entries: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in entries.items())


def bad_refs(hub: bool) -> st.SearchStrategy[str]:
    # Refs that parse but cannot be merged come often, so the planner sees them, not only the parser.
    unmergeable = ["models/empty", "./models/missing", "../..", "models/small-vocab"]
    anything = safe_text if hub else st.nothing()
    return st.sampled_from(BAD_REFS + unmergeable * 4 + (HUB_REFS if hub else [])) | anything


def param_values(name: str) -> st.SearchStrategy[Any]:
    """A declared parameter's valid values and its boundaries (inside and just outside)."""
    declared = [p for m in METHODS.values() for p in (*m.params, *m.model_params) if p.name == name]
    near: list[Any] = []
    for p in declared:
        near += [*([] if p.default is None else [p.default]), *p.choices]  # None: a required parameter
        for bound in (p.minimum, p.maximum):
            if bound is not None:
                near += [bound, bound - 1e-9, bound + 1e-9, int(bound)]
    return st.sampled_from(near) if near else values


def valid_param(p: Any) -> st.SearchStrategy[Any]:
    if p.choices:
        return st.sampled_from(p.choices)
    if p.type is bool:
        return st.booleans()
    low = -4.0 if p.minimum is None else p.minimum
    high = 4.0 if p.maximum is None else p.maximum
    integers = st.integers(int(low), int(high))
    numbers = integers if p.type is int else st.floats(low, high, allow_nan=False) | integers
    return numbers if p.default is None else numbers | st.just(p.default)


@st.composite
def valid_parts(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    """A recipe that should plan, as tables: "" holds the top-level keys, "[[models]]" the model tables."""
    method = METHODS[draw(st.sampled_from(sorted(METHODS)))]
    local = st.sampled_from(["models/base", "models/math", "./models/code", "models/head"])
    parts: dict[str, dict[str, Any]] = {"": {"method": method.name}}
    if method.needs_base or draw(st.booleans()):
        parts[""]["base"] = draw(local | st.fixed_dictionaries({"source": local}))
    models = []
    contract = method.contract
    for _ in range(draw(st.integers(contract.min_models, min(3, contract.max_models or 3)))):
        entry = {"source": draw(local)}
        for p in method.model_params:
            if p.default is None or draw(st.booleans()):
                entry[p.name] = draw(st.floats(0.1, 2.0) | st.integers(1, 3))
        models.append(entry)
    if draw(st.booleans()):
        parts["[[models]]"] = {str(i): m for i, m in enumerate(models)}
    else:
        parts[""]["models"] = [m["source"] if len(m) == 1 and draw(st.booleans()) else m for m in models]
    if draw(st.booleans()):
        parts[""]["dtype"] = draw(st.sampled_from(["bfloat16", "float32", "float16"]))
    parts["parameters"] = {
        p.name: draw(valid_param(p)) for p in method.params if p.default is None or draw(st.booleans())
    }
    if draw(st.integers(0, 3)) == 0:
        parts["tokenizer"] = {"source": draw(local | st.just("base"))}
    parts["output"] = {"dir": "out"}
    if draw(st.booleans()):
        parts["output"]["max_shard_size"] = draw(st.sampled_from(["100KB", "5GB", "1.5MiB", 40_000]))
    if draw(st.booleans()):
        parts["card"] = {"template": "card.j2", "title": draw(safe_text), "tags": ["merge"], "language": "en"}
    return parts


MUTATIONS = [
    "value",
    "value",
    "unknown_key",
    "bad_ref",
    "bad_ref",
    "bad_ref",
    "param",
    "param",
    "drop",
    "table_type",
    "text",
]
TABLE_KEYS = {
    "": ["method", "base", "models", "dtype"],
    "parameters": ["scaling_factor", "threshold", "merge_func", "trim", "weight", "density"],
    "tokenizer": ["source", "revision"],
    "output": ["dir", "repo", "private", "branch", "create_pr", "max_shard_size"],
    "card": ["template", "title", "description", "tags", "language", "license", "license_name"],
}


def render(parts: dict[str, Any]) -> str:
    text = "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in parts.get("", {}).items())
    for name, entries in parts.items():
        if name in ("", "[[models]]"):
            continue
        if isinstance(entries, dict):
            text += f"[{name}]\n" + "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in entries.items())
        else:  # a table replaced by some other value: written as a top-level key after the fact
            text = f"{toml_key(name)} = {toml_value(entries)}\n" + text
    for entry in parts.get("[[models]]", {}).values():
        if isinstance(entry, dict):
            text += "[[models]]\n" + "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in entry.items())
    return text


@st.composite
def recipe_texts(draw: st.DrawFn, hub: bool = True) -> str:
    """A valid recipe, then none to four mutations: wrong values and types, unknown keys, bad references,
    parameters out of range or foreign to the method, missing keys, tables of the wrong type, damaged text."""
    parts = draw(valid_parts())
    text_damage = None
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=4)):
        name = draw(st.sampled_from(sorted(TABLE_KEYS)))
        table = parts.setdefault(name, {})
        if not isinstance(table, dict):
            continue
        key = draw(st.sampled_from(TABLE_KEYS[name]))
        if mutation == "value":
            table[key] = draw(values)
        elif mutation == "unknown_key":
            table[draw(keys)] = draw(values)
        elif mutation == "bad_ref":
            ref = draw(bad_refs(hub))
            where = draw(st.sampled_from(["base", "model", "model_table", "tokenizer"]))
            if where == "base":
                parts[""]["base"] = ref
            elif where == "tokenizer":
                parts["tokenizer"] = {"source": ref}
            elif where == "model" and isinstance(parts[""].get("models"), list) and parts[""]["models"]:
                parts[""]["models"][0] = ref
            elif isinstance(parts.get("[[models]]"), dict) and parts["[[models]]"]:
                parts["[[models]]"]["0"]["source"] = ref
            else:
                parts[""]["models"] = [ref]
        elif mutation == "param":
            param = draw(st.sampled_from(["scaling_factor", "threshold", "merge_func", "trim", "weight"]))
            target = draw(st.sampled_from(["parameters", "model"]))
            value = draw(param_values(param) | values)
            if target == "model" and isinstance(parts.get("[[models]]"), dict) and parts["[[models]]"]:
                parts["[[models]]"]["0"][param] = value
            elif isinstance(parts.setdefault("parameters", {}), dict):
                parts["parameters"][param] = value
        elif mutation == "drop":
            table.pop(key, None)
        elif mutation == "table_type":
            parts[draw(st.sampled_from(["parameters", "output", "card", "tokenizer"]))] = draw(values)
        else:
            text_damage = draw(st.sampled_from(["cut", "insert", "replace", "repeat", "both_model_forms"]))
    text = render(parts)
    if text_damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif text_damage == "insert":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from(["[", "]]", "=", '"', "\n[models]\n", "\x00"]) | safe_text)
            + text[at:]
        )
    elif text_damage == "replace":
        text = draw(safe_text | st.sampled_from(["models:\n  - model: a\n", "\ufeff", "method = 'ties'\n"]))
    elif text_damage == "repeat":
        text += text
    elif text_damage == "both_model_forms":
        text = 'models = ["models/math"]\n' + text + '[[models]]\nsource = "models/code"\n'
    return text


@contextlib.contextmanager
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def check_cli(argv: list[str]) -> int:
    """Run the CLI in-process: an exit code it documents, and on failure exactly one line on stderr."""
    with captured() as (_, err):
        code = cli.main(argv)
    assert code != 70, err.getvalue()  # 70: an exception that is not a HubmergeError escaped
    if code == 0:
        assert err.getvalue() == "" or err.getvalue().startswith("warning"), err.getvalue()
    else:
        assert code in (1, 2, 3, 4, 5, 6), (code, err.getvalue())
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hubmerge: error: "), err.getvalue()
    return code


def load_or_error(path: Path) -> Recipe | None:
    try:
        return load_recipe(path)
    except HubmergeError as exc:
        one_line_error(exc)
        return None


@pytest.mark.slow
@FUZZ
@given(text=recipe_texts(hub=True))
def test_generated_recipes_parse_and_validate_to_a_recipe_or_one_clean_line(workspace, text):
    path = workspace / "generated.toml"
    path.write_text(text, encoding="utf-8")
    recipe = load_or_error(path)
    code = check_cli(["validate", str(path)])
    if recipe is None:
        assert code != 0
    else:
        assert recipe.method.name in METHODS and recipe.models
        assert code in (0, 3)  # valid, or a local folder it names does not exist


def is_local(recipe: Recipe) -> bool:
    return all(
        ref.repo_id is None for ref in (recipe.base, *recipe.models, recipe.tokenizer) if ref is not None
    )


@pytest.mark.slow
@FUZZ
@given(text=recipe_texts(hub=False))
def test_generated_recipes_plan_to_a_valid_plan_or_one_clean_line(workspace, text):
    path = workspace / "planned.toml"
    path.write_text(text, encoding="utf-8")
    recipe = load_or_error(path)
    if recipe is None or not is_local(recipe):  # a bad recipe is covered above; Hub ids would need a network
        return
    try:
        plan = hubmerge.load_plan(path)
    except HubmergeError as exc:
        one_line_error(exc)
        assert check_cli(["plan", str(path), "--json"]) != 0
        return
    assert plan.tensors and plan.shards and plan.output_bytes > 0
    assert {name for s in plan.shards for name, _ in s.tensors} == {t.name for t in plan.tensors}
    assert check_cli(["plan", str(path), "--json"]) == 0


@pytest.mark.slow
def test_the_recipe_generator_reaches_valid_plans_and_each_kind_of_error(workspace):
    """The fuzzers above are only as good as their inputs: they must produce both outcomes, often."""
    outcomes: dict[str, int] = {}

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(text=recipe_texts(hub=False))
    def sample(text: str) -> None:
        path = workspace / "sampled.toml"
        path.write_text(text, encoding="utf-8")
        try:
            recipe = load_recipe(path)
            kind = "plan" if is_local(recipe) and hubmerge.load_plan(path) else "hub"
        except HubmergeError as exc:
            kind = type(exc).__name__
        outcomes[kind] = outcomes.get(kind, 0) + 1

    sample()
    assert outcomes.get("plan", 0) >= 20, outcomes
    assert outcomes.get("RecipeError", 0) >= 20, outcomes
    assert outcomes.get("SourceError", 0) + outcomes.get("IncompatibleSourcesError", 0) >= 3, outcomes


# --- generated safetensors headers --------------------------------------------------------------------------

DTYPE_NAMES = ["BF16", "F16", "F32", "F64", "I64", "U8", "BOOL", "F8_E4M3", "bf16", "", "Q4"]


def original(workspace: Path) -> tuple[dict[str, Any], bytes]:
    path = workspace / "models" / "math" / "model.safetensors"
    header, start = read_header(path)
    return header, path.read_bytes()[start:]


@st.composite
def safetensors_files(draw: st.DrawFn, header: dict[str, Any], data: bytes) -> bytes:
    names = sorted(n for n in header if n != "__metadata__")
    spec: Any = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(names))
        entry, pristine = spec.get(name), header[name]
        mutation = draw(
            st.sampled_from(
                [
                    "dtype",
                    "shape",
                    "offsets",
                    "swap",
                    "overlap",
                    "drop_key",
                    "entry",
                    "delete",
                    "extra",
                    "metadata",
                ]
            )
        )
        if not isinstance(entry, dict) and mutation not in ("entry", "delete", "extra", "metadata"):
            continue
        if mutation == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES) | values)
        elif mutation == "shape":
            entry["shape"] = draw(
                st.lists(st.integers(-2, 2**40), max_size=3)
                | st.just(list(reversed(pristine["shape"])))
                | st.just([*pristine["shape"], 1])
                | values
            )
        elif mutation == "offsets":
            end, (begin, stop) = len(data), pristine["data_offsets"]
            entry["data_offsets"] = draw(
                st.lists(st.integers(-1, end + 10), min_size=2, max_size=2)
                | st.just([end, end + stop - begin])
                | st.just([stop, begin])
                | st.just([2**64, 2**64 + 8])
                | values
            )
        elif mutation == "swap":  # two entries exchange their bytes: consistent if the sizes agree
            other = spec.get(draw(st.sampled_from(names)))
            if isinstance(other, dict) and "data_offsets" in other and "data_offsets" in entry:
                entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        elif mutation == "overlap":
            begin, end = pristine["data_offsets"]
            shift = draw(st.integers(1, max(1, end - begin)))
            entry["data_offsets"] = (
                [begin - shift, end - shift] if begin >= shift else [begin + shift, end + shift]
            )
        elif mutation == "drop_key":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif mutation == "entry":
            spec[name] = draw(values)
        elif mutation == "delete":
            spec.pop(name, None)
        elif mutation == "extra":
            spec[draw(safe_text)] = draw(
                values | st.just({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})
            )
        else:
            spec["__metadata__"] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        spec = draw(values)  # a header that is not an object at all
    raw = json.dumps(spec, ensure_ascii=False).encode()
    replacement = draw(st.sampled_from(["keep"] * 4 + ["short", "deep", "utf16", "nul", "binary"]))
    if replacement == "short":
        raw = raw[:-1]
    elif replacement == "deep":  # nested deeper than Python's recursion limit
        raw = b"[" * 100_000
    elif replacement == "utf16":
        raw = b"\xff\xfe{}"
    elif replacement == "nul":
        raw = b"{}" + b"\x00" * 6
    elif replacement == "binary":
        raw = draw(st.binary(max_size=40))
    length = draw(
        st.sampled_from(
            [len(raw)] * 6 + [0, len(raw) + 1, max(0, len(raw) - 1), 2**63, 2**64 - 1, 100 * 2**20 + 1]
        )
        | st.integers(0, 2**64 - 1)
    )
    body = struct.pack("<Q", length) + raw + data
    cut = draw(st.sampled_from(["none"] * 6 + ["data", "header", "prefix"]))
    if cut == "data":
        body = body[: 8 + len(raw) + draw(st.integers(0, max(0, len(data) - 1)))]
    elif cut == "header":
        body = body[: draw(st.integers(8, 8 + len(raw)))]
    elif cut == "prefix":
        body = body[: draw(st.integers(0, 7))]
    return body


def consistent(tensors: Any, data_size: int) -> None:
    """What a valid plan promises about a source's tensors: byte ranges that fit, match and never overlap."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
    spans = []
    for info in tensors.values():
        begin, end = info.offsets
        assert info.dtype in sizes, info
        assert 0 <= begin <= end <= data_size, info
        assert end - begin == info.numel * sizes[info.dtype], info
        spans.append((begin, end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans


@pytest.fixture(scope="module")
def fuzzed_folder(workspace: Path) -> Path:
    folder = workspace / "models" / "fuzzed"
    shutil.copytree(workspace / "models" / "math", folder)
    (workspace / "headers.toml").write_text(
        'method = "task_arithmetic"\nbase = "models/base"\nmodels = ["models/fuzzed", "models/code"]\n'
    )
    return folder


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_generated_safetensors_headers_plan_to_a_valid_plan_or_one_clean_line(workspace, fuzzed_folder, data):
    header, tensor_bytes = original(workspace)
    body = data.draw(safetensors_files(header, tensor_bytes))
    (fuzzed_folder / "model.safetensors").write_bytes(body)
    recipe = workspace / "headers.toml"
    try:
        plan = hubmerge.load_plan(recipe)
    except HubmergeError as exc:
        one_line_error(exc)
        assert check_cli(["plan", str(recipe)]) != 0
        return
    source = plan.models[0]
    _, start = read_header(fuzzed_folder / "model.safetensors")
    consistent(source.tensors, len(body) - start)
    reader = TensorReader(fuzzed_folder)
    try:
        for info in source.tensors.values():
            assert reader.read(info).numel() == info.numel
    finally:
        reader.close()
    assert check_cli(["plan", str(recipe)]) == 0


@pytest.mark.slow
def test_the_header_generator_reaches_valid_plans_and_errors(workspace, fuzzed_folder):
    header, tensor_bytes = original(workspace)
    outcomes: dict[str, int] = {}

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(data=st.data())
    def sample(data: st.DataObject) -> None:
        (fuzzed_folder / "model.safetensors").write_bytes(data.draw(safetensors_files(header, tensor_bytes)))
        try:
            hubmerge.load_plan(workspace / "headers.toml")
            kind = "plan"
        except HubmergeError as exc:
            kind = type(exc).__name__
        outcomes[kind] = outcomes.get(kind, 0) + 1

    sample()
    assert outcomes.get("plan", 0) >= 5, outcomes
    assert {"SourceError", "IncompatibleSourcesError"} <= set(outcomes), outcomes


@st.composite
def index_texts(draw: st.DrawFn, index: dict[str, Any]) -> bytes:
    """A shard index with its weight map damaged: names outside the folder, wrong types, not JSON at all."""
    spec: Any = json.loads(json.dumps(index))
    weight_map = spec["weight_map"]
    names = sorted(weight_map)
    shard_names = [
        "../base/model.safetensors",
        "/etc/hostname",
        "model.safetensors.index.json",
        "config.json",
        "missing.safetensors",
        ".hidden.safetensors",
        "",
        *sorted(set(weight_map.values())),
    ]
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.sampled_from(["value", "value", "drop", "map", "root", "extra"]))
        if not isinstance(spec, dict):
            break
        if mutation == "value" and isinstance(spec.get("weight_map"), dict):
            spec["weight_map"][draw(st.sampled_from(names))] = draw(st.sampled_from(shard_names) | values)
        elif mutation == "drop" and isinstance(spec.get("weight_map"), dict):
            spec["weight_map"].pop(draw(st.sampled_from(names)), None)
        elif mutation == "map":
            spec["weight_map"] = draw(values)
        elif mutation == "root":
            spec = draw(values)
        elif mutation == "extra":
            spec[draw(keys)] = draw(values)
    raw = json.dumps(spec, ensure_ascii=False).encode()
    return draw(st.sampled_from([raw] * 6 + [raw[: len(raw) // 2], b"[" * 100_000, b"\xff\xfe"]))


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_generated_shard_indexes_plan_to_a_valid_plan_or_one_clean_line(workspace, data):
    folder = workspace / "models" / "fuzzed-index"
    if not folder.exists():
        shutil.copytree(workspace / "models" / "code", folder)
        (workspace / "index.toml").write_text(
            'method = "task_arithmetic"\nbase = "models/base"\nmodels = ["models/fuzzed-index"]\n'
        )
    index = json.loads((workspace / "models" / "code" / "model.safetensors.index.json").read_text())
    (folder / "model.safetensors.index.json").write_bytes(data.draw(index_texts(index)))
    recipe = workspace / "index.toml"
    try:
        plan = hubmerge.load_plan(recipe)
    except HubmergeError as exc:
        one_line_error(exc)
        assert check_cli(["plan", str(recipe)]) != 0
        return
    source = plan.models[0]
    assert set(source.tensors) == set(index["weight_map"])
    assert {info.file for info in source.tensors.values()} <= {p.name for p in folder.glob("*.safetensors")}


# --- the bugs the generators found, pinned as plain examples ------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('base = "~no-such-user-hubmerge/x"', "base: '~no-such-user-hubmerge/x' is not a usable path"),
        ('base = "./models/base\\u0000"', "base: './models/base\\x00' is not a usable path"),
        ('base = "' + "a" * 300 + '"', "is not a usable path ([Errno 36]"),
        # The key as TOML would need it written (quoted), as the [search] table's dotted keys are named.
        ('"\\r" = 1', "'\"\\r\"': unknown key"),
    ],
)
def test_paths_the_system_refuses_and_unprintable_keys_are_one_line_recipe_errors(workspace, line, fragment):
    path = workspace / "regression.toml"
    path.write_text(f'method = "ties"\nmodels = ["models/math"]\n{line}\n')
    with pytest.raises(hubmerge.RecipeError) as caught:
        load_recipe(path)
    one_line_error(caught.value)
    assert fragment in str(caught.value)


def entry(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"[1, 2]", "corrupt safetensors header"),
        (b"[" * 100_000, "corrupt safetensors header"),
        (json.dumps({"t": [1]}).encode(), "tensor t"),
        (json.dumps({"t": {"dtype": "F32"}}).encode(), "tensor t"),
        (json.dumps({"t": entry("Q4")}).encode(), "tensor t"),
        (json.dumps({"t": entry(shape=(3,))}).encode(), "tensor t"),
        (
            json.dumps({"t": entry(shape=(-2, -1))}).encode(),
            "tensor t",
        ),
        (
            json.dumps({"t": entry(offsets=(8, 0))}).encode(),
            "tensor t",
        ),
        (json.dumps({"t": entry(offsets=(12, 20))}).encode(), "tensor t"),
        (json.dumps({"t": entry(), "u": entry(offsets=(4, 12))}).encode(), "tensor "),
    ],
)
def test_headers_the_parser_used_to_trust_are_source_errors(tmp_path, header, fragment):
    folder = write_checkpoint(tmp_path / "model", random_state_dict(0), tokenizer=False)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(hubmerge.SourceError) as caught:
        index_folder(folder, "models[0]")
    one_line_error(caught.value)
    assert fragment in str(caught.value) and "model.safetensors" in str(caught.value)


def test_a_header_length_past_the_end_of_the_file_is_a_source_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(hubmerge.SourceError, match="is truncated"):
        read_header(path)


@pytest.mark.parametrize("shard", ["../base/model.safetensors", "/etc/hostname", 7])
def test_an_index_naming_files_outside_its_folder_is_a_source_error(workspace, tmp_path, shard):
    folder = tmp_path / "code"
    shutil.copytree(workspace / "models" / "code", folder)
    shutil.copytree(workspace / "models" / "base", tmp_path / "base")  # so ../base/model.safetensors exists
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hubmerge.SourceError, match=re.escape("model.safetensors.index.json")):
        index_folder(folder, "models[0]")
