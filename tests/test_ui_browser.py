"""The web app in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium) against `hubmerge ui`
started on 127.0.0.1, with the local Hub server as its Hub. Each state is screenshotted into the test's
artifact folder (`<tmp_path>/screenshots`)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from support.checkpoints import REPO
from support.hub import hub_env, local_hub
from support.hubserver import LocalHub
from support.uiapp import Served, serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "hf_ui_test_token_5c1f0e"  # a token no other test uses, searched for everywhere afterwards
EXAMPLE = REPO / "recipes" / "examples" / "tiny-ties.toml"
SEARCH = '\n[search]\nsampler = "grid"\n[search.space]\n"parameters.scaling_factor" = { low = 0.5, high = 1.0, step = 0.5 }\n'
WAIT = 120_000  # ms: an upper bound for a state to appear on a busy machine, not a timing assumption


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, hub: LocalHub, known_hashes_store: Path
) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("ui-browser")
    # no token but the one typed in the page
    env = hub_env(hub, folder, token="", HUBMERGE_CACHE=str(known_hashes_store))
    with serve(folder, env=env) as served:
        yield served


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _set_recipe(page: Page, text: str) -> None:
    page.click("#editor .cm-content")
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)


def _staging(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if ".hubmerge-" in p.name]


@pytest.mark.slow
def test_edit_plan_run_cancel_and_push_in_the_browser(
    app: Served, hub: LocalHub, browser: Browser, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    page.goto(app.url)
    expect(page.locator("#editor")).to_be_visible(timeout=WAIT)
    expect(page.locator("#queue")).to_contain_text("idle; 0 waiting")
    shot("01-loaded")

    # Nothing to push before a merge finished: refused, and nothing is created on the Hub.
    page.fill("#repo input, #repo textarea", "user/ui-merged")
    page.fill("#token input", TOKEN)
    page.click("#push")
    expect(page.get_by_text("nothing to push: run a merge first").first).to_be_visible(timeout=WAIT)
    assert "user/ui-merged" not in hub._repos
    page.fill("#token input", "")

    # The tiny demo from the shipped examples.
    page.click("#example input")
    page.get_by_role("option", name="examples/tiny-ties.toml").click()
    expect(page.locator("#validation [data-state=ok]")).to_contain_text("ok: ties, 3 models", timeout=WAIT)
    assert page.input_value("#recipe-path input, #recipe-path textarea") == str(EXAMPLE)
    shot("02-example")

    # The form shows the recipe with the registry's fields for its method; an edit there rewrites the TOML.
    page.get_by_text("Form (the method registry's parameters").click()
    expect(page.locator("#param-threshold input")).to_have_value("20", timeout=WAIT)
    expect(page.locator("#param-trim")).to_be_visible()  # a ties parameter the recipe leaves at its default
    expect(page.locator("#param-t")).to_be_hidden()  # slerp's, not ties's
    page.fill("#param-threshold input", "30")
    page.locator("#param-threshold input").blur()
    expect(page.locator("#editor .cm-content")).to_contain_text("threshold = 30.0", timeout=WAIT)
    expect(page.locator("#editor .cm-content")).to_contain_text("# Offline demo: the tiny")  # comments kept
    expect(page.locator("#validation [data-state=ok]")).to_be_visible(timeout=WAIT)
    shot("02b-form")

    # A typo: the error is shown at its line, worded as the CLI words it.
    text = EXAMPLE.read_text()
    typo = text.replace("threshold", "treshold")
    line = typo.splitlines().index("treshold = 20") + 1
    _set_recipe(page, typo)
    problem = page.locator("#validation .problem")
    expect(problem).to_have_attribute("data-line", str(line), timeout=WAIT)
    expect(problem.locator(".message")).to_have_text(
        f"line {line}: {EXAMPLE}: parameters.treshold: unknown key; did you mean 'threshold'?"
    )
    expect(problem.locator(".at")).to_contain_text(f"{line} | treshold = 20")
    shot("03-typo")

    _set_recipe(page, text)
    expect(page.locator("#validation [data-state=ok]")).to_be_visible(timeout=WAIT)
    shot("04-fixed")

    page.click("#plan-button")
    plan = page.locator("#plan")
    expect(plan).to_contain_text("method   ties", timeout=WAIT)
    expect(plan).to_contain_text("26 tensors")
    shot("05-plan")

    # Run: progress, then the card with its plots, the lock and the downloads.
    page.click("#run")
    expect(page.locator("#progress [data-state=done]")).to_be_visible(timeout=WAIT)
    card = page.locator("#card")
    expect(card.locator("h1")).to_have_text("tiny-ties")
    plots = card.locator("img")
    expect(plots).to_have_count(3)
    for i in range(3):
        assert plots.nth(i).evaluate("img => img.complete && img.naturalWidth > 0"), "a plot did not load"
    expect(page.locator("#lock")).to_contain_text('"hubmerge_version"')
    expect(page.locator("#downloads a[href$='/hubmerge.lock.json']")).to_have_count(1)
    expect(page.locator("#downloads a[href$='/README.md']")).to_have_count(1)
    expect(page.locator("#log textarea")).to_have_value(re.compile("warning: config.json is taken from base"))
    runs = sorted((app.work / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "tiny-ties" / "model.safetensors").is_file()
    shot("06-card")

    # A second run, cancelled midway: held after its first slice until the cancel arrives (support/uiapp.py).
    app.pause.touch()
    page.click("#run")
    running = page.locator("#progress [data-state=running]")
    # Bytes out of the total, tensors done, bytes in, and the time left at the rate so far.
    expect(running).to_contain_text(
        re.compile(
            r"merging tiny-ties\.toml: out 0\.\d\d MB of 0\.21 MB \(\d+%\), 1 of 26 tensors, sources read "
            r"from the disk, about \d+ s left"
        ),
        timeout=WAIT,
    )
    expect(page.locator("#queue")).to_contain_text("running tiny-ties.toml")
    assert app.reached.is_file()
    partial = Path(app.reached.read_text())
    assert partial.is_file() and partial.parent.name.startswith(".tiny-ties.hubmerge-")  # staging, midway
    shot("07-midway")
    page.click("#cancel")
    expect(page.locator("#progress [data-state=cancelled]")).to_be_visible(timeout=WAIT)
    expect(page.locator("#queue")).to_contain_text("idle; 0 waiting")
    assert sorted((app.work / "runs").iterdir()) == runs  # no output of the second run
    assert _staging(app.work) == []  # and no staging folder anywhere
    shot("08-cancelled")

    # Push the finished merge with a token typed in the page; the field is emptied afterwards.
    page.fill("#token input", TOKEN)
    page.fill("#repo input, #repo textarea", "user/ui-merged")
    page.click("#push")
    expect(page.locator("#pushed")).to_contain_text(
        f"pushed to {hub.url}/user/ui-merged/commit/", timeout=WAIT
    )
    assert page.input_value("#token input") == ""
    pushed = hub.files("user/ui-merged")
    assert pushed["model.safetensors"] == (runs[0] / "tiny-ties" / "model.safetensors").read_bytes()
    assert pushed["README.md"] == (runs[0] / "tiny-ties" / "README.md").read_bytes()
    assert hub._repos["user/ui-merged"].private
    shot("09-pushed")

    # A search of the same recipe's scaling factor, from the Search tab: its trials, then the best of them.
    _set_recipe(page, text + SEARCH)
    expect(page.locator("#validation [data-state=ok]")).to_be_visible(timeout=WAIT)
    page.get_by_role("tab", name="Search").click()
    page.click("#search")
    expect(page.locator("#search-progress [data-state=done]")).to_be_visible(timeout=WAIT)
    expect(page.locator("#search-best")).to_contain_text(re.compile(r"best so far: trial \d, score"))
    trials = page.locator("#search-trials")
    # The header row and one row per point of the grid.
    expect(trials.get_by_role("grid")).to_have_attribute("aria-rowcount", "3")
    expect(trials).to_contain_text("complete")
    expect(trials).to_contain_text("0.5")
    expect(page.locator("#best-toml")).to_contain_text("Found by `hubmerge search tiny-ties.toml`")
    shot("10-search")

    # The token is in no log, no file the app or the Hub client wrote, and not in the page source.
    assert TOKEN not in page.content()
    assert TOKEN not in app.log.read_text()
    folder = app.work.parent
    leaks = [p for p in folder.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    page.close()
