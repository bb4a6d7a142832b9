"""One walk through every tab of the real app (``python app.py`` in a subprocess) in headless chromium, as a user
would go: sample, label a few pairs, start and stop a short fine-tuning run, sample its checkpoint beside the base
model, train a tiny step policy and view its choice for a prompt, superpose two prompts. A screenshot of each tab
is kept in the test artefacts folder.

The per-tab browser tests (test_browser.py, test_label_app.py, test_adaptive_browser.py) go deeper into each tab;
this one checks that a single session can go through all of them in turn, each showing real content."""

from __future__ import annotations

import re
import sqlite3
import time

import pytest

from tests.app_process import ARTIFACTS, CHROMIUM, App, browser_page
from tests.test_browser import _reward_points, _start_tiny_run

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no chromium at /usr/bin/chromium (apt-get install chromium)"),
]

LOADED_IMG = "() => {{ const i = document.querySelector('{} img'); return i && i.complete && i.naturalWidth > 0; }}"


def _shot(page, tab: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"walkthrough-{tab}.png"), full_page=True)
    assert "Traceback" not in page.content()


def _number(page, selector: str, value: str) -> None:
    box = page.locator(f"{selector} input").first
    box.fill(value)
    box.press("Tab")


def _sample(page) -> None:
    page.locator("#sample-prompt textarea").fill("a red circle above a blue square")
    _number(page, "#sample-steps", "2")
    page.locator("#sample-generate").click()
    page.wait_for_function(LOADED_IMG.format("#sample-gallery"), timeout=120_000)
    width, height = page.locator("#sample-gallery img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert width > 0 and height > 0
    assert page.locator("#sample-strip img").count() == 2  # one x̂0 per step
    assert "2 steps" in page.locator("#sample-info").inner_text()
    assert page.locator("#sample-error").inner_text().strip() == ""
    _shot(page, "sample")


def _label(page, data_dir) -> None:
    page.get_by_role("tab", name="Label").click()
    page.locator("#label-queue textarea").fill("a red circle\na blue square\na green triangle")
    _number(page, "#label-steps-a", "1")
    page.locator("#label-generate").click()
    page.locator("#label-generated").get_by_text("Stored 3 pairs").wait_for(timeout=120_000)
    counts = page.locator("#label-counts")
    page.locator("#label-name").get_by_role("textbox").fill("walker")
    page.locator("#label-start").click()
    counts.get_by_text("walker: 0 done · 3 left").wait_for()
    page.wait_for_function(LOADED_IMG.format("#label-left-image"))
    page.wait_for_function(LOADED_IMG.format("#label-right-image"))
    page.locator("#label-left").click()  # a button
    page.locator("#label-status").get_by_text("left on pair #1 by walker").wait_for()
    counts.get_by_text("walker: 1 done · 2 left").wait_for()
    page.locator("#label-prompt").click()  # then the keys, with the focus out of the text fields
    page.keyboard.press("2")
    page.locator("#label-status").get_by_text("right on pair #2 by walker").wait_for()
    counts.get_by_text("walker: 2 done · 1 left").wait_for()
    _shot(page, "label")
    with sqlite3.connect(data_dir / "labels.db") as conn:
        rows = conn.execute("SELECT labeller, pair_id, choice FROM labels WHERE undone_at IS NULL ORDER BY id")
        assert rows.fetchall() == [("walker", 1, "left"), ("walker", 2, "right")]


def _finetune(page) -> None:
    _start_tiny_run(page, "walk-run", epochs=1000)
    status = page.locator("#finetune-status")
    status.get_by_text("walk-run: running").wait_for(timeout=120_000)
    deadline = time.monotonic() + 90
    while _reward_points(page) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _reward_points(page) >= 1  # the live curve has its first evaluation
    page.locator("#finetune-stop").click()
    status.get_by_text("walk-run: stopped").wait_for(timeout=30_000)
    assert page.locator("#finetune-error").inner_text().strip() == ""
    assert "walk-run" in page.locator("#finetune-runs").inner_text()
    _shot(page, "finetune")


def _compare(page) -> None:
    """Back in the Sample tab: the stopped run's checkpoint beside the base model, one pair per seed."""
    page.get_by_role("tab", name="Sample").click()
    compare = page.locator("#sample-compare input")
    compare.click()
    page.get_by_role("option").first.wait_for()
    ref = next(o.strip() for o in page.get_by_role("option").all_inner_texts() if o.startswith("run:walk-run/step-"))
    page.get_by_role("option", name=ref, exact=True).click()
    _number(page, "#sample-batch", "2")
    page.locator("#sample-generate").click()
    page.locator("#sample-info").get_by_text(ref).wait_for(timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('#sample-gallery img')].filter(i => i.complete && "
                           "i.naturalWidth > 0).length === 4")  # fmt: skip
    shown = page.locator("#sample-gallery").inner_text()
    assert all(f"{tag} · seed {i}" in shown for tag in "AB" for i in (0, 1)), shown
    assert page.locator("#sample-error").inner_text().strip() == ""
    _shot(page, "compare")


def _adaptive(page) -> None:
    page.get_by_role("tab", name="Adaptive steps").click()
    # No policy yet: train the smallest one (1 prompt × 1 seed at 1 and 2 steps, a few epochs) in the tab.
    page.locator("#adaptive-name").get_by_role("textbox").fill("walk-policy")
    page.locator("#adaptive-candidates").get_by_role("textbox").fill("1 2")
    for selector, value in [("#adaptive-train-prompts", "1"), ("#adaptive-seeds", "1"), ("#adaptive-epochs", "5")]:
        _number(page, selector, value)
    page.locator("#adaptive-train").click()
    page.locator("#adaptive-status").get_by_text("saved walk-policy").wait_for(timeout=120_000)
    page.locator("#adaptive-train-plot .js-plotly-plot").wait_for()
    epochs = page.locator("#adaptive-train-plot .js-plotly-plot").evaluate("p => p.data[0].x.length")
    assert epochs == 5  # one point per epoch
    assert page.locator("#adaptive-policy input").input_value() == "walk-policy"

    page.locator("#adaptive-prompt textarea").fill("a red circle above a blue square")
    page.locator("#adaptive-choose").click()
    plot = page.locator("#adaptive-probs .js-plotly-plot")
    plot.wait_for(timeout=120_000)
    probs = plot.evaluate("p => Array.from(p.data[0].y)")
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-4  # π over the two candidates
    info = page.locator("#adaptive-info").inner_text()
    chosen = int(re.search(r"Chosen: (\d+) steps?", info).group(1))
    assert chosen in (1, 2)
    page.wait_for_function("() => [...document.querySelectorAll('#adaptive-ladder img')].filter(i => i.complete && "
                           "i.naturalWidth > 0).length >= 2")  # fmt: skip
    assert page.locator("#adaptive-error").inner_text().strip() == ""
    _shot(page, "adaptive")


def _superpose(page) -> None:
    page.get_by_role("tab", name="Superpose").click()
    page.locator("#superpose-prompt-a textarea").fill("a red circle")
    page.locator("#superpose-prompt-b textarea").fill("a blue square")
    _number(page, "#superpose-steps", "20")  # the fewest the density estimator accepts
    page.locator("#superpose-mode").get_by_text("AND", exact=True).click()
    page.locator("#superpose-run").click()
    page.locator("#superpose-kappa .js-plotly-plot").wait_for(timeout=120_000)
    for gallery in ("#superpose-gallery", "#superpose-avg", "#superpose-baseline"):
        page.wait_for_function(LOADED_IMG.format(gallery))
    kappa = page.locator("#superpose-kappa .js-plotly-plot").evaluate("p => Array.from(p.data[0].y, Number.isFinite)")
    assert kappa == [True] * 20  # κ_A at every step
    assert "AND" in page.locator("#superpose-info").inner_text()
    assert page.locator("#superpose-error").inner_text().strip() == ""
    _shot(page, "superpose")


def test_a_user_walks_through_every_tab(tiny_pipeline_dir, tmp_path):
    data = tmp_path / "data"
    app = App(["--model", str(tiny_pipeline_dir), "--data-dir", str(data)], tmp_path / "app.log")
    try:
        with browser_page(app.url, timeout_ms=60_000, height=1100) as page:
            page.locator("#sample-prompt textarea").wait_for()
            stages = [("sample", _sample, ()), ("label", _label, (data,)), ("finetune", _finetune, ()),
                      ("compare", _compare, ()), ("adaptive", _adaptive, ()),
                      ("superpose", _superpose, ())]  # fmt: skip
            for name, stage, args in stages:
                t0 = time.monotonic()
                stage(page, *args)
                print(f"{name}: {time.monotonic() - t0:.1f} s")
        assert app.proc.poll() is None  # the app is still up after the whole walk
    finally:
        app.stop()
