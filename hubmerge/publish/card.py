"""The model card: README.md front matter the Hub understands, and a body a reader can check.

The front matter is built with `huggingface_hub.ModelCardData`, so it is valid YAML that `ModelCard`
parses and writes back unchanged. The body is a Jinja template (`templates/model_card.md.j2`, or the
recipe's `[card] template`) rendered in a sandbox with `StrictUndefined`: a misspelt variable is an error,
and a template cannot reach Python internals. The rendered card must still carry the computed metadata.

Strings from sources and recipes (folder names, card metadata, config.json values, `[card]` keys, task names)
are untrusted: every value a template prints is escaped as inline Markdown text (`markdown.text`: no tag,
link, table cell, heading or bidirectional override comes out of it), except the `Markdown` values hubmerge
composed from escaped parts (`sources[].markdown`, `notes`, `front_matter`, the recipe's text in its fence).
A value inside a code span goes through the `code` filter, a Python string literal through `literal`. A
license link is kept only when it is an http(s) URL or a file name (never `javascript:`).

License: derived from the sources' own cards, never guessed. Each source's `license` (with `license_name`
when it is `other`) is read from its README front matter at the pinned revision; Qwen's names are ranked
apache-2.0 < qwen < qwen-research, and the most restrictive governs. `qwen` and `qwen-research` are not
Hub license ids, so they are written as `license: other` + `license_name` + `license_link`. A card that
says `license_name: tongyi-qianwen` (early Qwen2.5-3B revisions, later relabelled qwen-research; also the
name of the Tongyi Qianwen license of earlier Qwen releases) is counted as qwen-research, the most restrictive
reading, since the name alone does not tell which terms apply. A source without a license, or licenses that
cannot be ranked, stop the run until the recipe sets `[card] license`, which is read like a source's card.

Template context (every variable is always defined):

    front_matter   str    the YAML metadata, without the `---` lines
    metadata       dict   the same metadata as a mapping
    title          str    `[card] title`, or the output repo name, or the recipe file name
    description    str    `[card] description`, or a one-paragraph summary
    method         dict   name, title, formula, legend (list of "symbol: meaning"), description (a paragraph
                          on what the formula's operations do, or ""), uses_base (bool: the base's weights
                          enter the math), paper (dict or None: id, cite, title, url)
    parameters     list   method parameters: dicts of name, value, help
    sources        list   dicts of role ("base", "model", "tokenizer"), name (Hub id or folder relative to
                          the recipe), markdown, repo_id, reference (as written), revision (as written), sha,
                          url, license (as the source's card declares it), parameters (dict, per model)
    license        dict   id, name, link, text ("apache-2.0", "other (qwen-research)"), from_recipe (bool),
                          file (LICENSE file copied into the output, or None), file_source (its role and name),
                          aliased (the sources whose tongyi-qianwen was counted as qwen-research)
    fusionbench    dict or None   pool, method_config, command, notes: when the recipe reproduces a
                          FusionBench Qwen2.5-1.5B configuration
    architecture   dict   model_type, hidden_size, layers, heads, kv_heads, vocab_size, context,
                          tie_embedding, parameter_count, dtype, compute_dtype, shards
    qwen25         dict or None   name, layers, heads, kv_heads, tie_embedding, context, generation, license
    notes          list   statements about the merge (where config.json comes from, config differences)
    usage          dict   model_id ([output] repo, else ./ and the output folder relative to the working
                          directory, or its name when it is not below it), chat_template (bool)
    recipe         dict   file, text (as saved in the output: `Recipe.published_text`), fence (a Markdown fence
                          longer than any backtick run in text), sha256 (of text), saved_as (the recipe's file
                          name in the output)
    provenance     dict   hubmerge_version, lock_file, reproducible (every source is a Hub repo at a sha)
    citations      list   BibTeX entries: Qwen2.5, the method's paper, FusionBench when it is the reference
    diagnostics    dict or None   the merge diagnostics (merge_stats.json), None before the merge: applicable
                          (bool), note, sign_conflict (str), trims (bool), models (rows of model, norm,
                          mean_layer_norm, mean_cosine, conflict, kept, dropped: formatted str), plots (dicts of
                          file, title), plots_note (str or None: why there are no plots; the default card leaves
                          it out, since a missing extra of the machine that merged says nothing about the model)
    evaluation     dict or None   lm-eval results, None unless evaluated: models (markdown names of the base and
                          models evaluated, in the table's order), rows (dicts of task, metric, merged, direction
                          "↑"/"↓", sources: dicts of value and difference, the merge minus that source; all
                          formatted str), settings (str), lm_eval_version, chart (PNG file name), checks (dicts
                          of text, passed: the `[eval] require` gate)
    sanity         dict or None   the quick sanity check, None when it did not run: passed (bool), skipped (the
                          reason, or None), warnings (list), ratio (the loss threshold), domains (dicts of
                          domain, merged, best, worst: the merge's and the sources' loss per token, str)
    gguf           dict or None   the GGUF files of `[output] gguf`, None without: repo (the companion repo, or
                          None when they sit beside the weights), files (dicts of name, type)
    search         dict or None   the search that found the values (`hubmerge search --publish best`): sampler,
                          seed, trials (finished), states ("3 complete, 1 failed"), objective, direction
                          ("minimized"/"maximized"), space (dicts of path, drawn_from), best and as_written
                          (dicts of number, score; as_written None when not tried), gain (str or None), names
                          (the searched values' names), top (dicts of number, score, cells: the best trials)
    hubmerge_version  str  the version of hubmerge that rendered the card
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import CardError
from ..gguf.card import gguf_links
from ..merging.methods import Method
from ..merging.methods.base import Citation, resolve_defaults
from ..merging.plan import MergePlan
from ..merging.schedule import Setting, describe, to_json
from ..recipe.load import Recipe
from ..recipe.reference import ModelRef
from ..sources.resolve import LICENSE_FILES, Source
from .files import CHART_FILE, LOCK_FILE, RECIPE_COPY, STATS_PLOTS
from .markdown import Markdown, code, finalize, literal, safe_url, text, visible

if TYPE_CHECKING:
    from huggingface_hub import CardData, ModelCardData

    from ..quality.evaluate import Evaluation
    from ..quality.sanity import SanityReport
    from ..search.publish import SearchCard

__all__ = ["LICENSE_FILES", "License", "combine_licenses", "license_file", "render_card", "source_license"]

# Licenses hubmerge can rank, least to most restrictive (Qwen2.5: 0.5B-32B apache-2.0, 72B qwen, 3B qwen-research).
QWEN_LICENSES = ("apache-2.0", "qwen", "qwen-research")
_ALIASES = {"tongyi-qianwen": "qwen-research"}
_DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.j2"
_HUB = "https://huggingface.co"


@dataclass(frozen=True)
class License:
    """A license as Hub metadata states it: a Hub license id, and for `other` a name and a link."""

    id: str
    name: str | None = None
    link: str | None = None

    @property
    def key(self) -> str:
        """What the license is: its name when the id is `other`, else its id."""
        return (self.name or "other") if self.id == "other" else self.id

    def __str__(self) -> str:
        return f"other ({self.name})" if self.id == "other" and self.name else self.id


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _declared(card_data: Mapping[str, Any] | None) -> tuple[str, str]:
    """(license, license_name) as a card states them, lower-cased; "" where absent."""
    data = card_data or {}
    return (_text(data.get("license")) or "").lower(), (_text(data.get("license_name")) or "").lower()


def _declared_name(card_data: Mapping[str, Any] | None) -> str:
    """The license's name as declared: `license_name` for `other`, else `license`."""
    declared, name = _declared(card_data)
    return name if declared == "other" else declared


def source_license(card_data: Mapping[str, Any] | None) -> License | None:
    """The license a source's card metadata declares, normalised; None when it declares none.

    `license: qwen-research` and `license: other` + `license_name: qwen-research` are the same license;
    `tongyi-qianwen` counts as `qwen-research`. `other` without a `license_name` says nothing: None.
    """
    raw = _declared_name(card_data)
    key = _ALIASES.get(raw, raw)
    if not key:
        return None
    link = _text((card_data or {}).get("license_link"))
    if _declared(card_data)[0] == "other" or key in QWEN_LICENSES[1:]:
        return License("other", key, link)
    return License(key, None, link)


def combine_licenses(licenses: Sequence[License]) -> License | None:
    """The license that governs a merge of sources under `licenses` (non-empty), or None if undecidable.

    Identical licenses govern themselves. Different ones are ranked only when all are Qwen's
    (apache-2.0 < qwen < qwen-research); the first of the most restrictive is returned, with its link.
    """
    keys = [lic.key for lic in licenses]
    if all(k == keys[0] for k in keys):
        return licenses[0]
    if all(k in QWEN_LICENSES for k in keys):
        return max(licenses, key=lambda lic: QWEN_LICENSES.index(lic.key))
    return None


@dataclass(frozen=True)
class _Entry:
    role: str
    name: str  # the mention's recipe key (`Role.name`): "base", "models[1]", "tokenizer"
    source: Source
    ref: ModelRef  # as the recipe wrote it, with this entry's per-model parameters


def _entries(plan: MergePlan) -> list[_Entry]:
    """One entry per mention of a source; a tokenizer that is also a base or a model is listed as that."""
    entries = [_Entry(r.kind, r.name, r.source, r.ref) for r in plan.roles if r.kind != "tokenizer"]
    entries += [
        _Entry(r.kind, r.name, r.source, r.ref)
        for r in plan.roles
        if r.kind == "tokenizer" and all(e.source is not r.source for e in entries)
    ]
    return entries


@dataclass(frozen=True)
class _Licensing:
    license: License  # as the front matter states it
    from_recipe: bool
    file: tuple[_Entry, str] | None


def _no_license_reason(source: Source) -> str:
    data = source.card_data
    if not data:
        return (
            "it has no README.md with YAML front matter"
            if source.ref.is_local
            else "its model card has no metadata"
        )
    if _text(data.get("license")) is None:
        return "its model card metadata has no `license`"
    return "its model card says `license: other` without a `license_name`"


def _licensing(plan: MergePlan, entries: list[_Entry]) -> _Licensing:
    spec = plan.recipe.card
    where = f"{plan.recipe.path}: card"
    found = [(e, source_license(e.source.card_data)) for e in entries]
    if spec.license is not None:  # read like a source's card: `qwen-research` becomes other + license_name
        recipe_license = {
            "license": spec.license,
            "license_name": spec.license_name,
            "license_link": spec.license_link,
        }
        chosen = source_license(recipe_license)
        if chosen is None:
            raise CardError(
                f'{where}.license: "other" needs license_name (a short slug such as "qwen-research") and license_link'
            )
    else:
        if spec.license_name is not None:
            raise CardError(
                f'{where}.license_name: also set license = "other"; without [card] license, hubmerge derives the '
                "license from the sources"
            )
        for entry, lic in found:
            if lic is None:
                raise CardError(
                    f"{entry.source.label}: no license: {_no_license_reason(entry.source)}. hubmerge never guesses a "
                    f"license: check the source's terms and set [card] license in {plan.recipe.path} "
                    '(for a custom license: license = "other" with license_name and license_link)'
                )
        combined = combine_licenses([lic for _, lic in found if lic is not None])
        if combined is None:
            listing = "; ".join(f"{e.source.label}: {lic}" for e, lic in found)
            raise CardError(
                f"cannot combine the sources' licenses ({listing}); hubmerge ranks only "
                f"{' < '.join(QWEN_LICENSES)}. Decide the merge's license and set [card] license in {plan.recipe.path}"
            )
        chosen = combined
    if spec.license_link is not None and safe_url(spec.license_link) is None:
        raise CardError(
            f"{where}.license_link: {spec.license_link!r} is not an http(s) URL or a file name in the repository"
        )
    governing = [(e, lic) for e, lic in found if lic is not None and lic.key == chosen.key]
    file = next(((e, name) for e, _ in governing for name in LICENSE_FILES if name in e.source.files), None)
    link = (
        spec.license_link
        or (file[1] if file else None)
        or next((lic.link for _, lic in governing if safe_url(lic.link)), None)  # never a javascript: link
    )
    if chosen.id == "other" and link is None:
        raise CardError(
            f"{where}: license {chosen.key!r} is `other` on the Hub, which needs a link to its terms, and no source "
            f"ships a LICENSE file or a license_link; set [card] license_link in {plan.recipe.path}"
        )
    keep_link = chosen.id == "other" or spec.license_link is not None
    return _Licensing(
        License(chosen.id, chosen.name, link if keep_link else None), spec.license is not None, file
    )


def license_file(plan: MergePlan) -> tuple[Source, str] | None:
    """The source whose LICENSE file governs the merge, and the file's name, to copy into the output.

    It is the first source (base, models, tokenizer) under the card's license that ships one of
    `LICENSE_FILES`; None when none does. Raises `CardError` when the license cannot be decided.
    """
    found = _licensing(plan, _entries(plan)).file
    return (found[0].source, found[1]) if found else None


# --- the body ----------------------------------------------------------------------------------------------

_QWEN25_BIBTEX = """\
@misc{qwen2025qwen25technicalreport,
      title={Qwen2.5 Technical Report},
      author={Qwen and : and An Yang and Baosong Yang and Beichen Zhang and Binyuan Hui and Bo Zheng and Bowen Yu and Chengyuan Li and Dayiheng Liu and Fei Huang and Haoran Wei and Huan Lin and Jian Yang and Jianhong Tu and Jianwei Zhang and Jianxin Yang and Jiaxi Yang and Jingren Zhou and Junyang Lin and Kai Dang and Keming Lu and Keqin Bao and Kexin Yang and Le Yu and Mei Li and Mingfeng Xue and Pei Zhang and Qin Zhu and Rui Men and Runji Lin and Tianhao Li and Tianyi Tang and Tingyu Xia and Xingzhang Ren and Xuancheng Ren and Yang Fan and Yang Su and Yichang Zhang and Yu Wan and Yuqiong Liu and Zeyu Cui and Zhenru Zhang and Zihan Qiu},
      year={2025},
      eprint={2412.15115},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2412.15115},
}"""


_FUSIONBENCH_ID = "2406.03280"
_FUSIONBENCH = Citation(
    "Tang et al. 2024",
    "FusionBench: A Comprehensive Benchmark of Deep Model Fusion",
    "Anke Tang and Li Shen and Yong Luo and Han Hu and Bo Du and Dacheng Tao",
    2024,
    "tang2024fusionbench",
)

# FusionBench's Qwen2.5-1.5B model pools (config/modelpool/CausalLMPool/); the method configs its docs run on
# them are the methods' own (`Method.fusionbench_config`).
_FB_BASE = "Qwen/Qwen2.5-1.5B"
_FB_POOLS = {
    frozenset({"Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Coder-1.5B"}): "Qwen2.5-1.5B_math_and_code",
    frozenset(
        {"Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Coder-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"}
    ): "Qwen2.5-1.5B_three_models",
}


def _dtype(value: Any) -> str:
    return str(value).removeprefix("torch.")


def _local_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _model_settings(recipe: Recipe, model: ModelRef) -> dict[str, Setting]:
    """A model's per-model parameters as the recipe sets them (its own, else `[parameters]`), and its weight
    even when left at the default: the knobs a recipe leaves alone (a density of 1: no sparsification) would
    only be noise in the models table."""
    method = recipe.method
    names = {p.name for p in method.model_params}
    defaults = resolve_defaults([p for p in method.model_params if p.name == "weight"], {})
    given = {k: v for k, v in recipe.parameters.items() if k in names}
    return {**defaults, **given, **model.params}


def _setting_text(setting: Setting) -> str:
    """A setting for the card: a string as it is, anything else as the recipe writes it."""
    return setting if isinstance(setting, str) else describe(setting)


def _source_context(entry: _Entry, root: Path, params: Mapping[str, Setting]) -> dict[str, Any]:
    s, ref = entry.source, entry.ref
    repo_id = ref.repo_id
    name = repo_id or _local_name(ref.path or Path(ref.text), root)
    declared, license_name = _declared(s.card_data)
    return {
        "role": entry.role,
        "name": name,
        "markdown": Markdown(f"[{repo_id}]({_HUB}/{repo_id})") if repo_id else code(name),
        "repo_id": repo_id,
        "reference": ref.text,
        "revision": ref.revision,
        "sha": s.sha,
        "url": safe_url(f"{_HUB}/{repo_id}/tree/{s.sha}") if repo_id and s.sha else None,
        "license": str(License(declared, license_name or None)) if declared else "unknown",
        "parameters": {k: to_json(v) for k, v in params.items()},
    }


def _fusionbench(plan: MergePlan, entries: list[_Entry]) -> dict[str, Any] | None:
    r = plan.recipe
    # The tokenizer source does not change a weight, so an instruct tokenizer keeps the reference.
    if r.base is None or r.base.repo_id != _FB_BASE:
        return None
    ids = [m.repo_id or "" for m in r.models]
    pool = _FB_POOLS.get(frozenset(ids)) if len(set(ids)) == len(ids) else None
    reference = r.method.fusionbench_config
    if pool is None or reference is None:
        return None
    globals_ = {p.name for p in r.method.params}
    for name, value in reference.parameters.items():
        settings = (
            [r.parameters.get(name)] if name in globals_ else [_model_settings(r, m)[name] for m in r.models]
        )
        if any(setting != value for setting in settings):
            return None
    override = "".join(f" method.{name}={reference.parameters[name]}" for name in reference.overrides)
    notes = [
        f"FusionBench computes in the pool's bfloat16 and rounds after every operation; hubmerge computes in "
        f"{_dtype(plan.compute_dtype)} and rounds once to {_dtype(plan.out_dtype)}, so the weights can differ in the "
        "last bits."
    ]
    if reference.config_json is not None:
        config_from = next(e for e in entries if e.source is plan.config_source)
        notes.append(
            f"FusionBench's {_lower_first(r.method.title)} takes config.json from {reference.config_json}; this "
            f"merge takes it from {config_from.ref.repo_id or config_from.role}."
        )
    tokenizer = r.tokenizer_source
    if tokenizer.repo_id != _FB_BASE:
        notes.append(
            f"FusionBench saves the base's tokenizer; this merge takes the tokenizer, chat template, generation "
            f"config and special token ids from {tokenizer.repo_id or tokenizer.text}, which changes no weight."
        )
    return {
        "pool": f"CausalLMPool/{pool}",
        "method_config": reference.config,
        "command": Markdown(
            f"fusion_bench method={reference.config}{override} modelpool=CausalLMPool/{pool}"
        ),
        "notes": notes,
    }


def _has_chat_template(source: Source) -> bool:
    if {"chat_template.jinja", "chat_template.json"} & set(source.files):
        return True
    if "tokenizer_config.json" not in source.files:
        return False
    if source.ref.path is not None:
        path: Path | None = source.ref.path / "tokenizer_config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(
            source.ref.repo_id or "", "tokenizer_config.json", revision=source.sha
        )
        path = Path(cached) if isinstance(cached, str) else None
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("chat_template"))


def _local_model_id(folder: Path) -> str:
    """The output folder for from_pretrained, starting with ./ so that it is not taken for a Hub id (a bare
    "tiny-ties" would be): relative to where hubmerge ran when it is below, else as seen from its parent
    folder. The card never holds an absolute path, which would name the user's folders."""
    try:
        return f"./{folder.absolute().relative_to(Path.cwd()).as_posix()}"
    except ValueError:
        return f"./{folder.name}"


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _lower_first(title: str) -> str:
    """Lower-case a method title for mid-sentence use, unless it opens with an acronym ("TIES merging")."""
    return title if title[1:2].isupper() else title[:1].lower() + title[1:]


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _as_dict(data: CardData) -> dict[str, Any]:
    return dict(data.to_dict())  # type: ignore[no-untyped-call]  # huggingface_hub leaves it unannotated


def _card_data(plan: MergePlan, entries: list[_Entry], lic: License) -> ModelCardData:
    from huggingface_hub import ModelCardData

    spec = plan.recipe.card
    # Only the models whose weights went into the merge: for a method that ignores the base (`uses_base`) the
    # base gives config.json alone, and a tokenizer source gives no weights.
    merged = ("model", "base") if plan.recipe.method.uses_base else ("model",)
    base_model = list(dict.fromkeys(e.ref.repo_id for e in entries if e.role in merged and e.ref.repo_id))
    languages: list[str] = []
    for e in entries:
        value = (e.source.card_data or {}).get("language")
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        languages += [v for v in values if isinstance(v, str)]
    return ModelCardData(
        base_model=base_model or None,
        language=list(dict.fromkeys([*languages, *spec.language])) or None,
        library_name="transformers",
        license=lic.id,
        license_name=lic.name,
        license_link=lic.link,
        pipeline_tag="text-generation",
        tags=list(
            dict.fromkeys(
                [
                    "merge",
                    "hubmerge",
                    plan.recipe.method.name,
                    *(["qwen2.5"] if plan.qwen25 else []),
                    *spec.tags,
                ]
            )
        ),
        base_model_relation="merge" if base_model else None,
    )


def _method_context(method: Method, paper_id: str | None) -> dict[str, Any]:
    paper = method.citation
    return {
        # The method's texts are hubmerge's own Markdown (its registry entry), printed as they are.
        "name": method.name,
        "title": Markdown(method.title),
        "formula": Markdown(method.formula),
        "legend": [Markdown(f"{symbol}: {meaning}") for symbol, meaning in method.legend()],
        "description": Markdown(method.description),
        "uses_base": method.uses_base,
        "paper": None
        if paper_id is None
        else {
            "id": paper_id,
            "cite": Markdown(paper.cite) if paper else text(f"arXiv:{paper_id}"),
            "title": Markdown(paper.title) if paper else None,
            "url": safe_url(f"https://arxiv.org/abs/{paper_id}"),
        },
    }


def _context(plan: MergePlan) -> dict[str, Any]:
    r = plan.recipe
    entries = _entries(plan)
    licensing = _licensing(plan, entries)
    lic = licensing.license
    card_data = _card_data(plan, entries, lic)
    sources = [
        _source_context(e, r.path.parent, _model_settings(r, e.ref) if e.role == "model" else {})
        for e in entries
    ]
    by_entry = {e.name: s for e, s in zip(entries, sources, strict=True)}
    base = next((s for s in sources if s["role"] == "base"), None)
    title = r.card.title or (r.output.repo.split("/")[-1] if r.output.repo else r.path.stem)
    with_base = f", with {base['markdown']} as the base" if base and r.method.uses_base else ""
    description = r.card.description or Markdown(
        f"{text(title)} is a merge of {_join([s['markdown'] for s in sources if s['role'] == 'model'])}{with_base}, "
        f"made with hubmerge {__version__} using {_lower_first(r.method.title)}. No training was involved: every weight "
        "was computed from the sources listed below by the recipe included in this card."
    )
    paper_id = (r.method.paper or "").removeprefix("arXiv:") or None
    paper = r.method.citation
    fusionbench = _fusionbench(plan, entries)
    citations = [_QWEN25_BIBTEX]
    if paper is not None and paper_id is not None:
        citations.append(paper.bibtex(paper_id))
    if fusionbench is not None:
        citations.append(_FUSIONBENCH.bibtex(_FUSIONBENCH_ID))

    config_from = next(by_entry[e.name] for e in entries if e.source is plan.config_source)
    if base is not None and not r.method.uses_base:
        notes = [
            Markdown(
                f"The base ({base['markdown']}) takes no part in the {_lower_first(r.method.title)}; it provides "
                "config.json."
            )
        ]
    else:
        notes = [Markdown(f"config.json comes from the {config_from['role']} ({config_from['markdown']}).")]
    tokenizer_from = next(by_entry[e.name] for e in entries if e.source is plan.tokenizer)
    notes.append(
        Markdown(
            f"The tokenizer files, chat template, generation_config.json and the special token ids in config.json "
            f"(bos, eos and pad) come from the tokenizer source, the {tokenizer_from['role']} "
            f"({tokenizer_from['markdown']})."
        )
    )
    if plan.config_differences:  # their values come from the sources' config.json
        differences = "; ".join(text(d) for d in plan.config_differences)
        notes.append(Markdown(f"These config.json fields differ between the sources: {differences}."))
    config = plan.config
    q = plan.qwen25
    file = licensing.file
    return {
        "front_matter": Markdown(card_data.to_yaml()),
        "metadata": _as_dict(card_data),
        "title": title,
        "description": description,
        "method": _method_context(r.method, paper_id),
        "parameters": [
            {"name": p.name, "value": _setting_text(r.parameters[p.name]), "help": Markdown(p.help)}
            for p in r.method.params + r.method.model_params  # a per-model default in [parameters] too
            if p.name in r.parameters
        ],
        "sources": sources,
        "license": {
            "id": lic.id,
            "name": lic.name,
            "link": safe_url(lic.link),
            "text": str(lic),
            "from_recipe": licensing.from_recipe,
            "file": file[1] if file else None,
            "file_source": Markdown(
                f"{by_entry[file[0].name]['role']} ({by_entry[file[0].name]['markdown']})"
            )
            if file
            else None,
            "aliased": [
                by_entry[e.name]["markdown"]
                for e in entries
                if _declared_name(e.source.card_data) in _ALIASES
            ],
        },
        "fusionbench": fusionbench,
        "architecture": {
            "model_type": config.get("model_type"),
            "hidden_size": config.get("hidden_size"),
            "layers": config.get("num_hidden_layers"),
            "heads": config.get("num_attention_heads"),
            "kv_heads": config.get("num_key_value_heads"),
            "vocab_size": config.get("vocab_size"),
            "context": config.get("max_position_embeddings"),
            "tie_embedding": plan.tie_word_embeddings,
            "parameter_count": plan.parameter_count,
            "dtype": _dtype(plan.out_dtype),
            "compute_dtype": _dtype(plan.compute_dtype),
            "shards": [s.file for s in plan.shards],
        },
        "qwen25": None
        if q is None
        else {
            "name": q.name,
            "layers": q.layers,
            "heads": q.heads,
            "kv_heads": q.kv_heads,
            "tie_embedding": q.tie_embedding,
            "context": q.context,
            "generation": q.generation,
            "license": q.license,
        },
        "notes": notes,
        "usage": {
            "model_id": r.output.repo or _local_model_id(r.output.dir),
            "chat_template": _has_chat_template(plan.tokenizer),
        },
        "recipe": {
            "file": r.path.name,
            "text": visible(
                r.published_text.rstrip("\n")
            ),  # inside a fence longer than any backtick run in it
            "fence": Markdown(_fence(r.published_text)),
            "sha256": r.sha256,
            "saved_as": RECIPE_COPY,
        },
        "provenance": {
            "hubmerge_version": __version__,
            "lock_file": LOCK_FILE,
            "reproducible": all(s["repo_id"] and s["sha"] for s in sources),
        },
        "citations": [Markdown(c) for c in citations],
        "hubmerge_version": __version__,
    }


# --- rendering ---------------------------------------------------------------------------------------------


def _template_line(exc: BaseException, filename: str) -> int | None:
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@functools.lru_cache(maxsize=8)
def _environment(folder: Path) -> Any:
    """The sandbox that renders the templates of `folder`. Kept, with the templates it compiled (a card's
    template takes longer to compile than to render): Jinja compiles a template again when its file changes."""
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(folder),
        finalize=finalize,  # strings from sources and recipes print inert, unless hubmerge built them (Markdown)
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(code=code, literal=literal)
    return env


def _render(template_path: Path, context: Mapping[str, Any]) -> str:
    from jinja2 import TemplateError, TemplateNotFound, TemplateSyntaxError
    from jinja2.exceptions import SecurityError, UndefinedError

    env = _environment(template_path.parent)
    filename = str(template_path)
    try:
        return str(env.get_template(template_path.name).render(context))
    except TemplateSyntaxError as exc:
        raise CardError(
            f"{exc.filename or filename}:{exc.lineno}: template syntax error: {exc.message}"
        ) from None
    except TemplateNotFound as exc:
        raise CardError(f"{filename}: template {exc.name!r} not found next to it") from None
    except SecurityError as exc:
        at = f"{filename}:{_template_line(exc, filename) or '?'}"
        raise CardError(
            f"{at}: refused by the sandbox: {exc}. Card templates may use only the documented variables "
            "(see hubmerge/publish/card.py)"
        ) from None
    except UndefinedError as exc:
        at = f"{filename}:{_template_line(exc, filename) or '?'}"
        raise CardError(f"{at}: {exc}; the template can use: {', '.join(sorted(context))}") from None
    except TemplateError as exc:
        raise CardError(f"{filename}:{_template_line(exc, filename) or '?'}: {exc}") from None
    except (
        Exception
    ) as exc:  # a template is user code: a filter applied to the wrong type, a division by zero
        raise CardError(
            f"{filename}:{_template_line(exc, filename) or '?'}: rendering failed: {type(exc).__name__}: {exc}"
        ) from None


def _check_front_matter(card: str, metadata: Mapping[str, Any], template: Path) -> None:
    from huggingface_hub import ModelCard

    try:
        found = _as_dict(ModelCard(card).data) if card.lstrip().startswith("---") else {}
    except Exception as exc:  # YAML errors from a custom template
        raise CardError(f"{template}: the card's front matter is not valid YAML ({exc})") from None
    wrong = [key for key, value in metadata.items() if found.get(key) != value]
    if wrong:
        raise CardError(
            f"{template}: the card must start with the metadata hubmerge computed ({', '.join(wrong)} missing or "
            "changed); begin the template with ---, {{ front_matter }}, --- on three lines, and change metadata "
            "through the [card] keys of the recipe"
        )


def _diagnostics(
    stats: Mapping[str, Any] | None, sources: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """The template's view of merge_stats.json, models named as in the sources table."""
    from ..quality.diagnostics import model_summary, number_text

    if stats is None:
        return None
    names = [s["markdown"] for s in sources if s["role"] == "model"]
    rows = model_summary(stats)
    titles = dict(STATS_PLOTS.values())
    return {
        "applicable": bool(rows),
        "note": stats.get("note"),
        "sign_conflict": number_text(stats["total"]["sign_conflict"], percent=True) if rows else None,
        "trims": bool(rows) and rows[0]["kept"] is not None,
        "models": [
            {
                "model": name,
                "norm": number_text(r["norm"]),
                "mean_layer_norm": number_text(r["mean_layer_norm"]),
                "mean_cosine": number_text(r["mean_cosine"]),
                "conflict": number_text(r["conflict"], percent=True),
                "kept": number_text(r["kept"], percent=True),
                "dropped": number_text(r["dropped"], percent=True),
            }
            for name, r in zip(names, rows, strict=False)
        ],
        "plots": [{"file": safe_url(file), "title": titles[file]} for file in stats.get("plots", [])],
        "plots_note": stats.get("plots_note"),
    }


def _evaluation(evaluation: Evaluation | None, sources: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The template's view of the lm-eval results: the merge, then base and models named as in the sources."""

    if evaluation is None:
        return None
    names = [s["markdown"] for s in sources if s["role"] in ("base", "model")]
    settings = evaluation.settings
    described = [
        f"limit {settings['limit']}" if settings["limit"] is not None else "all examples",
        f"{settings['num_fewshot']}-shot"
        if settings["num_fewshot"] is not None
        else "the tasks' default shots",
        f"dtype {settings['dtype']}",
    ]
    return {
        "models": names[: len(evaluation.models) - 1],
        "rows": [
            {
                "task": task,
                "metric": metric,
                "merged": f"{scores[0].value:.4f}",
                "direction": "↑" if scores[0].higher_is_better else "↓",
                "sources": [
                    # numbers hubmerge formats: Markdown as they are (a leading + is no list item in a cell)
                    {"value": f"{s.value:.4f}", "difference": Markdown(f"{scores[0].value - s.value:+.4f}")}
                    for s in scores[1:]
                ],
            }
            for task, metric, scores in evaluation.rows()
        ],
        "settings": ", ".join(described),
        "lm_eval_version": evaluation.lm_eval_version,
        "chart": safe_url(CHART_FILE),
        "checks": [{"text": c.describe(), "passed": c.passed} for c in evaluation.checks],
    }


def _sanity(report: SanityReport | None) -> dict[str, Any] | None:
    from ..quality.sanity import LOSS_RATIO

    if report is None:
        return None
    merged = report.losses.get("merged", {})
    sources = [losses for name, losses in report.losses.items() if name != "merged"]
    return {
        "passed": report.passed,
        "skipped": report.skipped,
        "warnings": list(report.warnings),
        "ratio": LOSS_RATIO,
        "domains": [
            {
                "domain": domain,
                "merged": f"{loss:.3f}",
                "best": f"{min(s[domain] for s in sources):.3f}" if sources else "—",
                "worst": f"{max(s[domain] for s in sources):.3f}" if sources else "—",
            }
            for domain, loss in merged.items()
        ],
    }


def _search(card: SearchCard | None) -> dict[str, Any] | None:
    """The template's view of the search that found the recipe's values."""
    if card is None:
        return None

    def trial(record: Mapping[str, Any]) -> dict[str, Any]:
        return {"number": record["number"], "score": f"{record['score']:.6g}"}

    names = list(card.best["params"])
    written = card.as_written
    gain = None
    if written is not None and written["number"] != card.best["number"]:
        gain = f"{abs(card.best['score'] - written['score']):.6g}"
    return {
        "sampler": card.sampler,
        "seed": "none" if card.seed is None else str(card.seed),
        "trials": sum(card.states.values()),
        "states": ", ".join(f"{n} {state}" for state, n in card.states.items() if n),
        "objective": " + ".join(f"{weight:g}·{name}" for name, weight in card.objective.items()),
        "direction": f"{card.direction}d",
        "space": [{"path": path, "drawn_from": what} for path, what in card.space],
        "best": trial(card.best),
        "as_written": None if written is None else trial(written),
        "gain": gain,
        "names": names,
        "top": [{**trial(t), "cells": [f"{t['params'][name]!r}" for name in names]} for t in card.top],
    }


def _with_model_index(context: dict[str, Any], evaluation: Evaluation) -> None:
    """Add the merge's scores to the front matter as `model-index`, through huggingface_hub's `EvalResult`."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            metric_type=metric.partition(",")[0],
            metric_name=metric,
            metric_value=scores[0].value,
            source_name=f"lm-evaluation-harness {evaluation.lm_eval_version}",
            source_url="https://github.com/EleutherAI/lm-evaluation-harness",
        )
        for task, metric, scores in evaluation.rows()
    ]
    data = ModelCardData(**context["metadata"], model_name=context["title"], eval_results=results)
    context["front_matter"] = Markdown(data.to_yaml())
    context["metadata"] = _as_dict(data)


def render_card(
    plan: MergePlan,
    stats: Mapping[str, Any] | None = None,
    evaluation: Evaluation | None = None,
    sanity: SanityReport | None = None,
) -> str:
    """Render README.md for the merge `plan` describes, with the diagnostics `stats` (merge_stats.json)
    when the merge collected them, and the `evaluation` and `sanity` check results when they ran.
    Raises `CardError` (license, template)."""
    context = _context(plan)
    context["diagnostics"] = _diagnostics(stats, context["sources"])
    context["evaluation"] = _evaluation(evaluation, context["sources"])
    context["sanity"] = _sanity(sanity)
    context["gguf"] = gguf_links(plan)
    context["search"] = _search(plan.recipe.search_card)
    if evaluation is not None:
        _with_model_index(context, evaluation)
    template = plan.recipe.card.template or _DEFAULT_TEMPLATE
    card = _render(template, context).rstrip("\n") + "\n"
    _check_front_matter(card, context["metadata"], template)
    return card
