"""Security defaults of the real app: it listens on 127.0.0.1 only; with ``--auth`` nothing answers without the login,
and even with it the file route serves no file of the repo, the data folder or the system; run, policy, checkpoint and
export names cannot leave their folders (``tests/test_fuzz.py`` fuzzes every handler for the same; only safetensors
are ever loaded: ``tests/test_faults.py``)."""

from __future__ import annotations

import http.cookiejar
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.app_process import App

REPO = Path(__file__).resolve().parent.parent


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
    running.data = data
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


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port``, from /proc/net/tcp and tcp6 (hex, as the kernel shows)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_app_listens_on_127_0_0_1_only(app):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp on this system")
    assert _listening_addresses(app.port) == {"0100007F"}  # 127.0.0.1, little-endian hex; no 0.0.0.0, no ::
    with socket.socket() as s:  # and nothing answers on this machine's other addresses
        s.settimeout(2)
        others = {a for *_, (a, *_) in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        for address in others - {"127.0.0.1"}:
            if not address.startswith("127."):
                assert s.connect_ex((address, app.port)) != 0, address


def test_the_file_route_serves_nothing_outside_the_apps_files_even_when_logged_in(app):
    """Signed in, /gradio_api/file= still refuses the repo's sources, the data folder's database and system files."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": "ann", "password": "secret-pw"}).encode()
    with opener.open(app.url.rstrip("/") + "/login", data=form, timeout=20) as r:
        assert r.status == 200
    base = app.url.rstrip("/")
    with opener.open(base + "/config", timeout=20) as r:  # the login works
        assert r.status == 200
    for target in ("/etc/passwd", "../../../../etc/passwd", "app.py", str(REPO / "app.py"), "%2e%2e/app.py",
                   str(app.data / "labels.db"), "/proc/self/environ"):  # fmt: skip
        try:
            with opener.open(f"{base}/gradio_api/file={target}", timeout=20) as r:
                status, body = r.status, r.read(200)
        except urllib.error.HTTPError as e:
            status, body = e.code, b""
        assert status in (400, 403, 404), (target, status, body)


BAD_NAMES = ["..", "../x", "a/../../x", "/etc", "/tmp/x", "~", "~root/x", ".hidden", "a/b", "a\x00b", "x" * 300,
             "..\\x", "run:../x"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_policy_checkpoint_and_export_names_cannot_leave_their_folders(tmp_path, name):
    from finetuners.adadiff import policy_path
    from finetuners.errors import UserError
    from finetuners.runs import resolve_checkpoint, run_path
    from ui.backend import Backend, Settings
    from ui.label_tab import inside_data_dir

    root = tmp_path / "data"
    (root / "runs").mkdir(parents=True)
    with pytest.raises(UserError):
        run_path(root / "runs", name)
    with pytest.raises(UserError):
        policy_path(root / "policies", name)
    with pytest.raises(UserError):
        resolve_checkpoint(root / "runs", f"run:{name}/step-1")
    backend = Backend(Settings(model="m", data_dir=root))
    if name in ("..", "../x", "a/../../x", "/etc", "/tmp/x", "~", "~root/x", "a\x00b"):  # "..\\x" is a name here
        with pytest.raises(UserError):
            inside_data_dir(backend, name, "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_symlinked_run_folder_does_not_lead_out(tmp_path):
    from finetuners.errors import UserError
    from finetuners.runs import resolve_checkpoint, run_path

    runs = tmp_path / "runs"
    runs.mkdir()
    outside = tmp_path / "outside"
    (outside / "checkpoints" / "step-1").mkdir(parents=True)
    (outside / "checkpoints" / "step-1" / "state.pt").write_bytes(b"")
    (runs / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="escapes the runs folder"):
        run_path(runs, "link")
    with pytest.raises(UserError, match="escapes the runs folder"):
        resolve_checkpoint(runs, "run:link/step-1")
