"""Strings from sources and recipes render inert in the model card and the job summaries.

A hostile corpus (raw HTML, a closing table tag, pipes, a heading after a blank line, backticks, links to a
phishing site or `javascript:`, a very long string, bidirectional overrides, Jinja braces) goes through
every field the card and the summaries show: local folder names, the sources' card metadata (license,
license_name, license_link, language), config.json values, the recipe's file name, card keys, parameters
and evaluation tasks, and the diagnostics, evaluation and sanity results. The rendered Markdown is then
parsed by a CommonMark parser with GFM tables (markdown-it-py): no tag, link, image, heading or table cell
may come out of a hostile string.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from support.checkpoints import random_state_dict, write_checkpoint
from support.toml_text import toml_value

from hubmerge import api
from hubmerge.errors import CardError
from hubmerge.merging.report import summary_markdown
from hubmerge.publish.card import render_card
from hubmerge.publish.markdown import code, literal, safe_url, text
from hubmerge.quality.evaluate import Check, Evaluation, ModelResult, Score
from hubmerge.quality.evaluate import summary_markdown as eval_summary
from hubmerge.quality.sanity import SanityReport
from hubmerge.recipe.schema import Requirement

RTL = "\u202e"
HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "</table><script>alert(1)</script>",
    "a | b | c",
    "x\n\n## heading\n\n- item",
    "```\ncode\n```",
    "`x` ``y``",
    "[phish](http://evil.example)",
    "[click](javascript:alert(1))",
    "![img](http://evil.example/x.png)",
    "<a href='http://evil.example'>x</a>",
    "&lt;b&gt; &#60;img src=x&#62; &#x202e;",
    "x" * 5000,
    f"{RTL}gpj.exe",
    "{{ front_matter }} {% if true %}jinja{% endif %}",
    "1. ordered\n> quote\n---",
    "# heading",
    "*emph* __strong__ ~~strike~~",
    "[ref]: http://evil.example",
]
ONE = " ".join(s[:60] for s in HOSTILE)  # every trick in one string, for fields that hold one value
# A folder name cannot hold "/": the tricks that need none.
FOLDER = "m`<img src=x onerror=alert(1)>|[x](javascript:evil)" + RTL + "\n\n## folder"

PARSER = MarkdownIt("commonmark", {"html": True}).enable("table")  # raw HTML on: a tag that survives shows
SECTIONS = {
    "Merge method",
    "Parameters",
    "Sources",
    "Sanity check",
    "Evaluation",
    "Merge diagnostics",
    "License",
    "Architecture",
    "Usage",
    "Recipe",
    "Provenance",
    "Citation",
}
TRUSTED_LINK = re.compile(
    r"https://(huggingface\.co|arxiv\.org|github\.com)/|LICENSE$|merge_stats_\w+\.png$|eval_\w+\.png$"
)


def html_of(markdown: str) -> str:
    return PARSER.render(markdown)


def assert_inert(markdown: str) -> str:
    """Parse `markdown` as a Hub card renderer would and check that nothing hostile became markup."""
    body = html_of(markdown)
    tags = set(re.findall(r"<\s*([a-zA-Z]+)", body))
    assert not tags & {"img", "script", "iframe", "style", "b"} or all(
        TRUSTED_LINK.search(src) for src in re.findall(r'<img src="([^"]*)"', body)
    ), tags
    assert "<script" not in body and "onerror" not in re.sub(r"&[a-z]+;|[^<]*", "", body)
    for href in re.findall(r'href="([^"]*)"', body):
        assert TRUSTED_LINK.search(href), href
    assert "evil.example" not in "".join(re.findall(r'(?:href|src)="([^"]*)"', body))
    for heading in re.findall(r"<h\d>(.*?)</h\d>", body):  # a heading a hostile string opened
        assert not heading.startswith(("heading", "folder")), heading
    assert "<li>item" not in body and "<p>quote" not in body and "<ol>" not in body and "<hr" not in body
    assert RTL not in body
    for table in re.findall(r"<table>.*?</table>", body, flags=re.S):
        widths = {len(re.findall(r"<t[hd]", row)) for row in re.findall(r"<tr>.*?</tr>", table, flags=re.S)}
        assert len(widths) == 1, widths
    return body


def rows_keep_their_columns(markdown: str) -> None:
    """Every Markdown table row has as many cells as its header (GFM silently drops extra cells)."""
    width = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line)) - 1
        width = width or cells
        assert cells == width, line


@pytest.mark.parametrize("hostile", HOSTILE)
def test_each_escape_is_inert_where_it_lands(hostile: str) -> None:
    markdown = "\n".join(
        [
            text(hostile),
            "",
            f"- {text(hostile)}",
            "",
            "| a | b | c |",
            "|---|---|---|",
            f"| {text(hostile)} | {code(hostile)} | [{code(hostile)}](https://huggingface.co/x) |",
            "",
            f"**{text(hostile)}** [{text(hostile)}](https://huggingface.co/x)",
            "",
            f"```python\nmodel_id = {literal(hostile)}\n```",
            "",
            "end",
        ]
    )
    body = assert_inert(markdown)
    rows_keep_their_columns(markdown)
    assert body.count("<h") == 0 and body.rstrip().endswith("<p>end</p>")
    assert eval(literal(hostile)) == hostile.replace(RTL, "")  # still the same Python string
    visible = " ".join(hostile.replace(RTL, "").split())
    if "&" not in visible:  # the characters a reader sees are the string's own
        shown = re.sub(r"<[^>]+>", "", html_of(text(hostile)))
        assert (
            shown.strip()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", '"')
            .replace("&amp;", "&")
            == visible
        )


def test_safe_url_refuses_scripts_and_markup() -> None:
    assert safe_url("https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE") is not None
    assert safe_url("LICENSE") == "LICENSE"
    for bad in [
        "javascript:alert(1)",
        "http://x/a)b",
        "http://x/<img>",
        " http://x",
        "data:text/html,x",
        "a b",
    ]:
        assert safe_url(bad) is None, bad


def hostile_plan(tmp_path: Path, card: dict[str, Any]) -> Any:
    root = tmp_path / "pool"
    readme = {
        "license": "other",
        "license_name": ONE,
        "license_link": "javascript:alert(1)",
        "language": [ONE],
    }
    for seed, name in enumerate(["base", FOLDER, "second"]):
        folder = write_checkpoint(root / name, random_state_dict(seed), license=None)
        (folder / "README.md").write_text(f"---\n{yaml.safe_dump(readme)}---\n# model\n")
        if seed == 0:
            config = json.loads((folder / "config.json").read_text()) | {"rope_theta": ONE}
            (folder / "config.json").write_text(json.dumps(config))
    (root / "base" / "LICENSE").write_text("terms\n")
    lines = [
        'method = "task_arithmetic"',
        'base = "./base"',
        f'models = [{{ source = {toml_value("./" + FOLDER)}, weight = 0.5 }}, "./second"]',
        "[parameters]",
        f"scaling_factor = [{{ filter = {toml_value(ONE)}, value = 0.5 }}, {{ value = 1.0 }}]",
        "[output]",
        f"dir = {toml_value('out ' + FOLDER)}",
        "[card]",
        *(f"{key} = {toml_value(value)}" for key, value in card.items()),
    ]
    recipe = root / f"r`<b>|{RTL}.toml"
    recipe.write_text("\n".join(lines) + "\n")
    return api.load_plan(recipe)


def hostile_results(plan: Any) -> tuple[dict[str, Any], Evaluation, SanityReport]:
    stats = {
        "reference": "base",
        "models": [ONE, ONE],
        "total": {
            "norm": [1.0, 2.0],
            "cosine": [[1.0, 0.5], [0.5, 1.0]],
            "model_conflict": [0.1, 0.2],
            "sign_conflict": 0.1,
        },
        "layers": [{"norm": [1.0, 2.0]}],
        "plots": ["merge_stats_norms.png"],
        "plots_note": ONE,
        "note": ONE,
    }
    score = {ONE: Score(0.5, None, True)}
    models = tuple(
        ModelResult(role, name, name, {ONE: score}, False)
        for role, name in [("merged", "merged"), ("base", ONE), ("model", ONE), ("model", ONE)]
    )
    requirement = Requirement(ONE, ONE, threshold=0.4)
    check = Check(requirement, ONE, 0.4, 0.5, True, True)
    evaluation = Evaluation("0.4.9", {"limit": 4, "num_fewshot": None, "dtype": ONE}, models, (check,))
    sanity = SanityReport({"merged": {ONE: 1.0}, ONE: {ONE: 1.0}}, (ONE, ONE), None)
    return stats, evaluation, sanity


def test_hostile_strings_in_every_card_field_render_inert(tmp_path: Path) -> None:
    plan = hostile_plan(tmp_path, {"title": ONE, "description": ONE, "tags": [ONE], "language": [ONE]})
    stats, evaluation, sanity = hostile_results(plan)
    card = render_card(plan, stats, evaluation, sanity)
    body = assert_inert(card.split("\n---\n", 1)[1])
    rows_keep_their_columns(card)
    headings = re.findall(r"<h2>(.*?)</h2>", body)
    assert set(headings) <= SECTIONS and len(headings) == len(set(headings)) == 12, headings
    assert len(re.findall(r"<h1>", body)) == 1
    assert "javascript" not in "".join(re.findall(r'href="([^"]*)"', body))
    assert "([terms](LICENSE))" in card  # the source's javascript: link was dropped for its LICENSE file
    data = ModelCard(card).data.to_dict()  # the front matter is still valid YAML with the hostile values
    assert data["license_name"] == ONE.lower() and data["license_link"] == "LICENSE"
    assert data["language"] == [ONE] and ONE in data["tags"]
    usage: dict[str, Any] = {}
    exec(re.findall(r"^model_id = .*$", card, flags=re.M)[0], usage)  # the usage snippet's line is Python
    assert usage["model_id"].endswith("out " + FOLDER.replace(RTL, ""))


def test_hostile_license_from_the_recipe_keeps_the_front_matter_valid_yaml(tmp_path: Path) -> None:
    name = 'x: y\n---\n- [a]\n\'"{{ b }}" #c ' + RTL
    plan = hostile_plan(
        tmp_path, {"license": "other", "license_name": name, "license_link": "https://huggingface.co/terms"}
    )
    card = render_card(plan)
    assert ModelCard(card).data.to_dict()["license_name"] == name.lower()
    assert_inert(card.split("\n---\n", 1)[1])
    rows_keep_their_columns(card)


def test_a_javascript_license_link_in_the_recipe_is_refused(tmp_path: Path) -> None:
    plan = hostile_plan(
        tmp_path, {"license": "other", "license_name": "x", "license_link": "javascript:alert(1)"}
    )
    with pytest.raises(
        CardError, match=r"card\.license_link: 'javascript:alert\(1\)' is not an http\(s\) URL"
    ):
        render_card(plan)


def test_hostile_strings_in_the_job_summaries_render_inert(tmp_path: Path) -> None:
    plan = hostile_plan(tmp_path, {})
    _, evaluation, _ = hostile_results(plan)
    for markdown in (
        summary_markdown(plan, "https://huggingface.co/x/commit/1", merged=True),
        eval_summary(evaluation),
    ):
        assert_inert(markdown)
        rows_keep_their_columns(markdown)
