"""`hubmerge ui`: the Gradio page and its named API endpoints (`/validate`, `/plan`, `/merge`), over `Service`."""

import html
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.events import api

from ..errors import HubmergeError
from ..merging.methods import METHODS, Param
from ..search.run import BEST_FILE
from .form import FIELDS, fields_of, read_form, write_form
from .service import Job, Problem, Service, card_markdown, cli_line, examples, lines_around, read_lock

__all__ = ["build", "serve"]

_CSS = """
#validation .ok { color: #15803d; font-weight: 600; }
#validation .problem { margin: .4em 0; }
#validation .message { color: #b91c1c; font-weight: 600; }
#validation pre { margin: .2em 0; padding: .3em .5em; background: #f8fafc; border-radius: 4px; }
#validation pre span { display: block; white-space: pre; }
#validation .at { background: #fee2e2; }
#progress progress { width: 100%; height: 1.2em; }
"""


# --- what the page shows ---------------------------------------------------------------------------------


def validation_html(problems: list[Problem], text: str, summary: str) -> str:
    if not problems:
        return f'<div class="ok" data-state="ok">ok: {html.escape(summary)}</div>'
    parts = []
    for p in problems:
        where = f"line {p.line}: " if p.line is not None else ""
        block = ""
        if p.line is not None:
            rows = [
                f'<span class="{"at" if n == p.line else "near"}">{n:>3} | {html.escape(line)}</span>'
                for n, line in lines_around(text, p.line)
            ]
            block = "<pre>" + "".join(rows) + "</pre>"
        parts.append(
            f'<div class="problem" data-line="{p.line or ""}">{block}'
            f'<div class="message">{html.escape(where)}{html.escape(p.message)}</div></div>'
        )
    return '<div data-state="error">' + "".join(parts) + "</div>"


def _size(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def progress_text(job: Job, eta: float | None) -> str:
    """A running merge in a line: bytes out of the total, tensors done, bytes in, and the time left."""
    p = job.progress
    if p is None:
        return f"merging {job.name}: fetching the sources"
    share = f" ({p.written / p.total:.0%})" if p.total else ""
    text = f"merging {job.name}: out {_size(p.written)} of {_size(p.total)}{share}, {p.tensors_done} of {p.tensors} tensors"
    text += ", sources read from the disk" if p.fetched is None else f", in {_size(p.fetched)} from the Hub"
    if p.uploaded is not None:
        text += f", up {_size(p.uploaded)}"
    return text + (f", about {eta:.0f} s left" if eta is not None else "")


def progress_html(job: Job, queue: str) -> str:
    state = job.state
    what = "search" if job.kind == "search" else "merge"
    if state == "waiting":
        text = f"job {job.id} waits for the job before it ({queue})"
    elif state == "running" and job.kind == "search":
        text = f"searching {job.name}"
    elif state == "running":
        text = progress_text(job, job.eta())
    elif state == "done" and job.kind == "search":
        text = f"done: the search of {job.name} wrote its results into {job.output}"
    elif state == "done":
        text = f"done: {job.name} merged into {job.result.output_dir if job.result else '?'}"
    elif state == "cancelled" and job.kind == "search":
        text = f"cancelled: no trial after the running one; the results so far are in {job.output}"
    elif state == "cancelled":
        text = "cancelled: nothing was written and the staging folder was removed"
    else:
        text = f"{what} failed: {job.error}"
    p = job.progress
    bar = f'<progress value="{p.written}" max="{p.total or 1}"></progress>' if p is not None else ""
    return f'<div data-state="{state}" data-job="{job.id}">{bar}<div>{html.escape(text)}</div></div>'


def trials_table(results: dict[str, Any] | None) -> tuple[list[str], list[list[Any]]]:
    """A search's trials as the page's table: number, state, score, each searched value, seconds, error."""
    trials = results["trials"] if results else []
    values = list(dict.fromkeys(name for t in trials for name in t["params"]))
    header = ["trial", "state", "score", *values, "seconds", "error"]
    rows = [
        [
            t["number"],
            t["state"],
            t["score"],
            *(t["params"].get(v) for v in values),
            t["seconds"],
            t["error"] or "",
        ]
        for t in trials
    ]
    return header, rows


def best_markdown(results: dict[str, Any] | None) -> str:
    """The best trial so far, in a line or two."""
    if not results:
        return "no trial finished yet"
    best = results["best"]
    done = sum(t["state"] in ("complete", "failed") for t in results["trials"])
    if best is None:
        return f"{done} trials finished, none complete yet"
    values = ", ".join(f"`{name} = {value!r}`" for name, value in best["params"].items())
    return (
        f"**best so far: trial {best['number']}**, score {best['score']:.6g} ({results['direction']}d), "
        f"of {done} finished trials; {values}"
    )


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def page_card(markdown: str, folder: Path) -> str:
    """The card as the page renders it: without its YAML metadata, images served from the output folder."""
    if markdown.startswith("---\n"):
        end = markdown.find("\n---\n", 4)
        if end != -1:
            markdown = markdown[end + 5 :]

    def served(match: re.Match[str]) -> str:
        target = folder / match.group(2)
        if "://" in match.group(2) or not target.is_file():
            return match.group(0)
        return f"![{match.group(1)}](/gradio_api/file={target})"

    return _IMAGE.sub(served, markdown)


def _field(param: Param) -> Any:
    """The form's input for a parameter, as the registry declares it (hidden until its method is chosen)."""
    common: dict[str, Any] = {
        "label": param.name,
        "info": param.help,
        "visible": False,
        "elem_id": f"param-{param.name}",
    }
    if param.choices:
        return gr.Dropdown(choices=list(param.choices), value=param.default, **common)
    if param.type is bool:
        return gr.Checkbox(value=bool(param.default), **common)
    if param.type in (int, float):
        return gr.Number(
            value=float(param.default) if param.default is not None else None,
            minimum=param.minimum,
            maximum=param.maximum,
            precision=0 if param.type is int else None,
            **common,
        )
    return gr.Textbox(value=str(param.default or ""), **common)


def form_updates(text: str) -> list[Any]:
    """The form showing the recipe `text`: method, base, models, then every parameter field; unchanged
    (skipped) while the text is not TOML."""
    form = read_form(text)
    if form is None:
        return [gr.skip()] * (3 + len(FIELDS))
    own = {p.name: p for p in fields_of(METHODS[form.method])} if form.method else {}
    updates = [
        gr.update(value=form.method),
        gr.update(value=form.base),
        gr.update(value="\n".join(form.models or []), interactive=form.models is not None),
    ]
    for name, shared in FIELDS.items():
        param = own.get(name, shared)  # the method's own default and help
        value = form.parameters.get(name, param.default)
        scheduled = isinstance(value, (list, dict))
        updates.append(
            gr.update(
                visible=name in own,
                value=param.default if scheduled else value,
                interactive=not scheduled,
                info=f"set in the recipe as a gradient or filter: edit it there. {param.help}"
                if scheduled
                else param.help,
            )
        )
    return updates


def from_form(text: str, method: str | None, base: str, models: str, *values: Any) -> Any:
    """The recipe `text` with the form's values written into it (only the fields of the method it had)."""
    if not method:
        return gr.skip()
    before = read_form(text)
    if before is None:
        return gr.skip()
    owned = {p.name for p in fields_of(METHODS[before.method])} if before.method else set()
    given: dict[str, Any] = {}
    for (name, param), value in zip(FIELDS.items(), values, strict=True):
        if name in owned and value is not None and not isinstance(before.parameters.get(name), (list, dict)):
            given[name] = param.type(value)
    return write_form(text, method, base, models.splitlines() if before.models is not None else None, given)


# --- the app ---------------------------------------------------------------------------------------------


def _error(exc: HubmergeError) -> gr.Error:
    return gr.Error("\n".join(cli_line(exc)), print_exception=False)


def push_handler(service: Service) -> Callable[..., tuple[str, str]]:
    """The Push button's handler: the typed token, else the visitor's "Sign in with Hugging Face" token (Gradio
    injects it by the `gr.OAuthToken | None` annotation); either is used for this push only."""

    def push(
        token: str, repo: str, private: bool, request: gr.Request, oauth_token: gr.OAuthToken | None
    ) -> tuple[str, str]:
        chosen = token.strip() or (oauth_token.token if oauth_token is not None else "")
        try:
            pushed = service.push(request.session_hash or "", chosen, repo, private)
        except HubmergeError as exc:
            raise _error(exc) from None
        return "", f"pushed to [{pushed.url}]({pushed.url})"  # the token field is emptied

    return push


def build(service: Service) -> gr.Blocks:
    shipped = examples()
    public = service.settings.public
    error = _error

    def validate_api(text: str, path: str = "") -> str:
        """Recipe TOML text → "ok", or the errors one per line as the CLI words them."""
        problems, _ = service.validate(text, path)
        return "\n".join(p.message for p in problems) if problems else "ok"

    def plan_api(text: str, path: str = "") -> str:
        """Recipe TOML text → the plan as `hubmerge plan --json` prints it."""
        try:
            return service.plan_json(text, path)
        except HubmergeError as exc:
            raise error(exc) from None

    def merge_api(text: str, path: str = "") -> tuple[str, list[gr.FileData]]:
        """Recipe TOML text → the model card (Markdown), then the output's files up to 50 MB each."""
        try:
            job = service.submit(text, path, "api")  # nobody cancels it: it stops when it is done
        except HubmergeError as exc:
            raise error(exc) from None
        job.finished.wait()
        if job.result is None:
            raise gr.Error(job.error or "the merge failed", print_exception=False)
        files = [gr.FileData(path=str(p)) for p in service.downloads(job.result)]
        return card_markdown(job.result), files

    def check(text: str, path: str) -> str:
        problems, recipe = service.validate(text, path)
        summary = f"{recipe.method.name}, {len(recipe.models)} models" if recipe is not None else ""
        return validation_html(problems, text, summary)

    def pick(name: str | None) -> tuple[Any, Any]:
        if not name or name not in shipped:
            return gr.skip(), gr.skip()
        file = shipped[name]
        return file.read_text(encoding="utf-8"), str(file)

    def show_plan(text: str, path: str) -> str:
        try:
            return service.plan_text(text, path)
        except HubmergeError as exc:
            raise error(exc) from None

    def run(text: str, path: str, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        try:
            job = service.submit(text, path, request.session_hash or "")
        except HubmergeError as exc:
            raise error(exc) from None
        skip = gr.skip()
        try:
            while not job.finished.wait(0.5):
                queue = service.queue_status()
                yield progress_html(job, queue), "\n".join(job.log), queue, skip, skip, skip, skip
        finally:
            if not job.finished.is_set():
                job.cancel.set()  # the page went away: so does its merge
        queue = service.queue_status()
        if job.result is None:
            yield progress_html(job, queue), "\n".join(job.log), queue, skip, skip, skip, skip
            return
        result = job.result
        card = page_card(card_markdown(result), result.output_dir)
        files = [str(p) for p in service.downloads(result)]
        repo = result.plan.recipe.output.repo or ""
        yield progress_html(job, queue), "\n".join(job.log), queue, card, read_lock(result), files, repo

    def cancel(request: gr.Request) -> tuple[str, str]:
        job = service.cancel(request.session_hash or "")
        if job is None:
            return "<div>nothing to cancel</div>", service.queue_status()
        job.finished.wait()
        return progress_html(job, service.queue_status()), service.queue_status()

    def run_search(text: str, path: str, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        try:
            job = service.submit(text, path, request.session_hash or "", kind="search")
        except HubmergeError as exc:
            raise error(exc) from None

        def shown() -> tuple[Any, ...]:
            results = job.search_results()
            header, rows = trials_table(results)
            best = (job.output / BEST_FILE) if job.output is not None else None
            best_text = best.read_text(encoding="utf-8") if best is not None and best.is_file() else ""
            queue = service.queue_status()
            return (
                progress_html(job, queue),
                best_markdown(results),
                gr.update(value=rows, headers=header),
                best_text,
                "\n".join(job.log),
                queue,
            )

        try:
            while not job.finished.wait(0.5):
                yield shown()
        finally:
            if not job.finished.is_set():
                job.cancel.set()  # the page went away: no more trials
        yield shown()

    demo: gr.Blocks
    with gr.Blocks(title="hubmerge") as demo:
        gr.Markdown(
            "# hubmerge\nMerge Qwen2.5 checkpoints from a TOML recipe: edit it, check the plan, run the merge, "
            "read the card, push it to the Hugging Face Hub."
            + (
                "\n\n*Public mode: models are read from the Hub"
                + (f" or below {service.settings.allowed_root}" if service.settings.allowed_root else "")
                + "; outputs stay in this app's work folder.*"
                if public
                else ""
            )
        )
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    example = gr.Dropdown(
                        choices=list(shipped), value=None, label="Example recipes", elem_id="example"
                    )
                    path = gr.Textbox(
                        value=str(service.settings.default_name),
                        label="Read as (relative folders are read from this file's folder)",
                        elem_id="recipe-path",
                    )
                editor = gr.Code(
                    value="",
                    language=None,
                    lines=18,
                    label="recipe (TOML)",
                    elem_id="editor",
                    interactive=True,
                )
                validation = gr.HTML(elem_id="validation")
                with gr.Accordion(
                    "Form (the method registry's parameters, kept in sync with the TOML)", open=False
                ):
                    method_field = gr.Dropdown(
                        choices=[(f"{m.name}: {m.title}", m.name) for m in METHODS.values()],
                        value=None,
                        label="method",
                        elem_id="form-method",
                    )
                    base_field = gr.Textbox(label="base (a Hub id or a folder)", elem_id="form-base")
                    models_field = gr.Textbox(
                        label="models, one per line ([[models]] tables are edited in the TOML)",
                        lines=3,
                        elem_id="form-models",
                    )
                    param_fields = [_field(p) for p in FIELDS.values()]
                plan_button = gr.Button("Show the plan", elem_id="plan-button")
                plan_view = gr.Code(label="Plan", language=None, elem_id="plan", interactive=False)
            with gr.Column(scale=2):
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
                queue = gr.Markdown(service.queue_status(), elem_id="queue")
                progress = gr.HTML(elem_id="progress")
                log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False, elem_id="log")
                gr.Markdown("## Push to the Hub")
                if service.settings.oauth:
                    gr.LoginButton(elem_id="login")
                token = gr.Textbox(
                    label="Hugging Face token (write access; used for this push only, never kept)",
                    type="password",
                    elem_id="token",
                )
                with gr.Row():
                    repo = gr.Textbox(label="Repo", placeholder="your-name/merged-model", elem_id="repo")
                    private = gr.Checkbox(value=True, label="Private", elem_id="private")
                push_button = gr.Button("Push", elem_id="push")
                pushed = gr.Markdown(elem_id="pushed")
        with gr.Tabs():
            with gr.Tab("Results", elem_id="results-tab"), gr.Row():
                with gr.Column(scale=3):
                    card = gr.Markdown(elem_id="card")
                with gr.Column(scale=2):
                    downloads = gr.File(
                        label="Files", file_count="multiple", interactive=False, elem_id="downloads"
                    )
                    lock = gr.Code(
                        label="hubmerge.lock.json",
                        language="json",
                        interactive=False,
                        max_lines=30,
                        elem_id="lock",
                    )
            with gr.Tab("Search", elem_id="search-tab"):
                gr.Markdown(
                    "Search the recipe's `[search]` values (`hubmerge search`): each trial merges and scores the "
                    "recipe with its values. One job at a time, in the same queue as the merges; Cancel asks for "
                    "no trial after the running one."
                )
                with gr.Row():
                    search_button = gr.Button("Search", variant="primary", elem_id="search")
                    search_cancel = gr.Button("Cancel the search", variant="stop", elem_id="search-cancel")
                search_progress = gr.HTML(elem_id="search-progress")
                best = gr.Markdown(elem_id="search-best")
                trials = gr.Dataframe(
                    headers=["trial", "state", "score", "seconds", "error"],
                    interactive=False,
                    elem_id="search-trials",
                )
                with gr.Row():
                    best_toml = gr.Code(
                        label="best.toml", language=None, interactive=False, elem_id="best-toml"
                    )
                    search_log = gr.Textbox(
                        label="Search log", lines=6, max_lines=12, interactive=False, elem_id="search-log"
                    )
        timer = gr.Timer(2)
        timer.tick(
            service.queue_status,
            None,
            queue,
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
        )

        example.change(pick, example, [editor, path], api_visibility="private")
        editor.change(
            check,
            [editor, path],
            validation,
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
        )
        form = [method_field, base_field, models_field, *param_fields]
        editor.change(
            form_updates,
            editor,
            form,
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
        )
        for component in form:
            # User edits only (`input`, `blur`): the form's own updates from the TOML must not write back.
            trigger = component.input if isinstance(component, (gr.Dropdown, gr.Checkbox)) else component.blur
            trigger(
                from_form,
                [editor, *form],
                editor,
                api_visibility="private",
                concurrency_limit=None,
                show_progress="hidden",
            )
        path.change(check, [editor, path], validation, api_visibility="private", concurrency_limit=None)
        plan_button.click(show_plan, [editor, path], plan_view, api_visibility="private")
        run_button.click(
            run,
            [editor, path],
            [progress, log, queue, card, lock, downloads, repo],
            api_visibility="private",
            concurrency_limit=None,  # the service runs one merge at a time and shows the others waiting
        )
        cancel_button.click(cancel, None, [progress, queue], api_visibility="private", concurrency_limit=None)
        push_button.click(
            push_handler(service), [token, repo, private], [token, pushed], api_visibility="private"
        )
        search_button.click(
            run_search,
            [editor, path],
            [search_progress, best, trials, best_toml, search_log, queue],
            api_visibility="private",
            concurrency_limit=None,  # the service runs one job at a time and shows the others waiting
        )
        search_cancel.click(
            cancel, None, [search_progress, queue], api_visibility="private", concurrency_limit=None
        )
        api(validate_api, api_name="validate", concurrency_limit=None)
        api(plan_api, api_name="plan")
        api(merge_api, api_name="merge", concurrency_limit=None)
    return demo


def serve(service: Service, host: str, port: int, share: bool) -> None:
    """Serve the app until stopped."""
    build(service).queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(service.settings.work_dir)],
        footer_links=["api"],
        css=_CSS,
    )
