"""The Adaptive steps tab in a real browser: the real app (``python app.py``) with one saved policy, headless
chromium asks for a prompt's step distribution and sees the bar chart and the ladder."""

from __future__ import annotations

import json

import pytest

from finetuners import adadiff as ad
from tests.app_process import ARTIFACTS, CHROMIUM, App, browser_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def app(tiny_pipeline_dir, tmp_path_factory):
    """The app with ``<data_dir>/policies/browser`` saved (an untrained policy: the wiring is what is tested)."""
    data = tmp_path_factory.mktemp("data")
    hidden = json.loads((tiny_pipeline_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    config = ad.AdaDiffConfig(candidates=(1, 2, 4), hidden=8)
    ad.save_policy(data / "policies" / "browser", ad.StepPolicy(2 * hidden, config.candidates, 8), config)
    running = App(["--model", str(tiny_pipeline_dir), "--data-dir", str(data)], tmp_path_factory.mktemp("log") / "a")
    yield running
    running.stop()


def test_adaptive_tab_shows_the_step_distribution(app):
    with browser_page(app.url, height=1100) as page:
        page.get_by_role("tab", name="Adaptive steps").click()
        page.locator("#adaptive-prompt textarea").fill("a red circle above a blue square")
        page.locator("#adaptive-choose").click()
        page.locator("#adaptive-probs .js-plotly-plot").wait_for(timeout=180_000)
        assert page.locator("#adaptive-probs .js-plotly-plot .bars path").count() == 3  # one bar per candidate
        page.locator("#adaptive-info").get_by_text("Chosen:").wait_for()
        page.wait_for_function("() => document.querySelectorAll('#adaptive-ladder img').length >= 3")
        assert page.locator("#adaptive-error").inner_text().strip() == ""
        assert "Traceback" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "adaptive-tab.png"), full_page=True)
