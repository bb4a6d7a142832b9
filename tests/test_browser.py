"""The real app in a real browser: start ``python app.py`` on a free port and drive headless chromium."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app_process import ARTIFACTS, CHROMIUM, App, browser_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def app_data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def app_url(tiny_pipeline_dir, tmp_path_factory, app_data_dir):
    log = tmp_path_factory.mktemp("app") / "app.log"
    app = App(["--model", str(tiny_pipeline_dir), "--data-dir", str(app_data_dir)], log)
    try:
        yield app.url
    finally:
        app.stop()


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url) as page:
        page.locator("#sample-prompt textarea").wait_for()
        yield page


def test_generate_shows_images_and_the_x0_strip(page):
    # the prompt starts filled in, so a first click samples something
    assert page.locator("#sample-prompt textarea").input_value() == "a red circle above a blue square"
    steps = page.locator("#sample-steps input[type=number]")
    steps.fill("4")
    steps.press("Enter")
    page.locator("#sample-generate").click()
    image = page.locator("#sample-gallery img").first
    image.wait_for(timeout=180_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('#sample-gallery img'); return i && i.complete && i.naturalWidth; }"
    )
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 0 and height > 0
    assert page.locator("#sample-strip img").count() == 4  # one x̂0 per step
    info = page.locator("#sample-info").inner_text()
    assert "s per image" in info and "4 steps" in info
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "sample-tab.png"), full_page=True)


def test_empty_prompt_shows_a_message_and_keeps_the_images(page):
    before = page.locator("#sample-gallery img").count()
    page.locator("#sample-prompt textarea").fill("")
    page.locator("#sample-generate").click()
    error = page.locator("#sample-error")
    error.get_by_text("prompt is empty").wait_for()
    assert "Traceback" not in page.content()
    assert page.locator("#sample-gallery img").count() == before
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "sample-tab-error.png"), full_page=True)


def test_a_missing_model_typed_in_shows_a_message(page):
    model = page.locator("#sample-model input")
    model.fill("/no/such/model")
    model.press("Enter")
    page.locator("#sample-error").get_by_text("does not exist").wait_for()
    assert "Traceback" not in page.content()


def test_superpose_and_shows_images_and_the_kappa_plot(page):
    page.get_by_role("tab", name="Superpose").click()
    # the prompts start filled in, so a first click composes something
    assert page.locator("#superpose-prompt-a textarea").input_value() == "a red circle"
    assert page.locator("#superpose-prompt-b textarea").input_value() == "a blue square"
    steps = page.locator("#superpose-steps input[type=number]")
    steps.fill("20")  # the fewest the density estimator accepts
    steps.press("Enter")
    page.locator("#superpose-mode").get_by_text("AND", exact=True).click()
    page.locator("#superpose-run").click()
    page.locator("#superpose-kappa .js-plotly-plot").wait_for(timeout=180_000)
    for gallery in ("#superpose-gallery", "#superpose-avg", "#superpose-baseline"):
        page.wait_for_function(
            f"() => {{ const i = document.querySelector('{gallery} img'); return i && i.complete && i.naturalWidth; }}"
        )
    n_points = page.locator("#superpose-kappa .js-plotly-plot").evaluate("p => p.data[0].x.length")
    assert n_points == 20  # κ_A at every step
    info = page.locator("#superpose-info").inner_text()
    assert "AND" in info and "3 UNet rows per step" in info
    # the Shapes probe's reading: a table row per sampler, and what it sees under each image
    table = page.locator("#superpose-info table")
    assert table.locator("th").all_inner_texts()[:2] == ["Shapes probe, of 1 image", "both"]
    assert [r.split("\t")[0] for r in table.locator("tbody tr").all_inner_texts()] == ["AND", "averaged (κ = ½)",
                                                                                       "joint prompt"]  # fmt: skip
    caption = page.locator("#superpose-gallery .caption-label").first.inner_text()
    assert caption.startswith("seed 0 · ") and len(caption) > len("seed 0 · ")
    assert page.locator("#superpose-error").inner_text().strip() == ""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "superpose-tab.png"), full_page=True)


# -- Fine-tune tab -------------------------------------------------------------------------------------------------
def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Tab")


def _reward_points(page) -> int:
    """Points of the first line (1-step reward) in the live reward plot; 0 before it is drawn."""
    return page.locator("#finetune-curve-reward").evaluate(
        "el => { const p = el.querySelector('.js-plotly-plot'); return p && p.data && p.data.length ? "
        "p.data[0].x.length : 0; }"
    )


def _start_tiny_run(page, name: str, epochs: int) -> None:
    """The form, set for a run that takes well under a second per epoch on the CPU."""
    page.get_by_role("tab", name="Fine-tune").click()
    reward = page.locator("#finetune-reward-name input")
    reward.click()
    reward.fill("jpeg-comp")
    page.get_by_role("option", name="jpeg-compressibility", exact=True).click()
    for elem_id, value in [("finetune-batch", "2"), ("finetune-epochs", str(epochs)), ("finetune-k", "2")]:
        _fill(page, elem_id, value)
    for k in ("4", "8"):  # evaluate at 1 and 2 steps only
        box = page.locator("#finetune-eval-steps").get_by_label(k, exact=True)
        if box.is_checked():
            box.uncheck()
    batches = page.locator("#finetune-batches input")
    if not batches.is_visible():
        page.get_by_text("More settings").click()
    _fill(page, "finetune-batches", "1")
    _fill(page, "finetune-eval-prompts", "2")
    page.locator("#finetune-name input").fill(name)
    page.locator("#finetune-start").click()


def test_picking_a_method_sets_its_train_steps(page):
    page.get_by_role("tab", name="Fine-tune").click()
    k = page.locator("#finetune-k input").first
    for method, steps in [("Full backprop", "2"), ("DDPO", "8"), ("RLR", "2"), ("SDPO", "8")]:
        page.locator("#finetune-method").get_by_label(method, exact=True).check()
        page.wait_for_function("([el, v]) => el.value === v", arg=[k.element_handle(), steps], timeout=10_000)


def test_finetune_run_grows_its_curve_and_stops(page):
    _start_tiny_run(page, "browser-run", epochs=1000)
    status = page.locator("#finetune-status")
    status.get_by_text("browser-run: running").wait_for(timeout=120_000)
    page.wait_for_function("() => document.querySelector('#finetune-curve-reward .js-plotly-plot')", timeout=60_000)
    first = _reward_points(page)
    deadline = time.monotonic() + 60
    while _reward_points(page) <= max(first, 1) and time.monotonic() < deadline:
        time.sleep(0.5)
    grown = _reward_points(page)
    assert grown > max(first, 1), (first, grown)  # new evaluations arrive while the run trains
    page.locator("#finetune-samples img").first.wait_for()
    page.locator("#finetune-sample-prompts").get_by_text("Prompts by column: 1").wait_for()  # what each image shows
    page.locator("#finetune-stop").click()
    status.get_by_text("browser-run: stopped").wait_for(timeout=30_000)
    assert page.locator("#finetune-error").inner_text().strip() == ""
    assert "browser-run" in page.locator("#finetune-runs").inner_text()
    assert "Traceback" not in page.content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "finetune-tab.png"), full_page=True)


def test_a_killed_training_process_is_reported_and_the_app_stays_up(page, app_url, app_data_dir):
    import json
    import signal

    _start_tiny_run(page, "browser-killed", epochs=1000)
    status_file = app_data_dir / "runs" / "browser-killed" / "status.json"
    page.locator("#finetune-status").get_by_text("browser-killed: running").wait_for(timeout=120_000)
    os.kill(json.loads(status_file.read_text())["pid"], signal.SIGKILL)
    page.locator("#finetune-status").get_by_text("exited unexpectedly").wait_for(timeout=30_000)
    assert "killed by SIGKILL" in page.locator("#finetune-status").inner_text()
    assert "Traceback" not in page.content()
    with urllib.request.urlopen(app_url, timeout=10) as r:  # the app itself is untouched
        assert r.status == 200
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "finetune-tab-killed.png"), full_page=True)
