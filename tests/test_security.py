"""Security defaults of the real app: with ``--auth`` nothing answers without the login."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.app_process import App


def _status(url: str, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def app(tiny_pipeline_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    running = App(["--model", str(tiny_pipeline_dir), "--data-dir", str(data), "--auth", "ann:secret-pw"],
                  tmp_path_factory.mktemp("log") / "app.log")  # fmt: skip
    yield running
    running.stop()


def test_api_routes_refuse_requests_without_the_login(app):
    base = app.url.rstrip("/")
    for route in ("/config", "/gradio_api/info", "/gradio_api/file=README.md"):
        assert _status(base + route) == 401, route
    body = json.dumps({"data": ["ann"]}).encode()
    for route in ("/gradio_api/call/sample", "/gradio_api/call/label_left", "/gradio_api/run/predict",
                  "/gradio_api/queue/join", "/gradio_api/upload"):  # fmt: skip
        assert _status(base + route, body) == 401, route
    assert "secret-pw" not in (app.log.read_text())


def test_the_login_opens_the_api(app):
    from gradio_client import Client

    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types for a refused login
        Client(app.url, verbose=False)
    client = Client(app.url, auth=("ann", "secret-pw"), verbose=False)
    assert "/sample" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    with pytest.raises(Exception):  # noqa: B017
        Client(app.url, auth=("ann", "wrong"), verbose=False)
