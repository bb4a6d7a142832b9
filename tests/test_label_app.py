"""The Label tab through the real app (``python app.py`` in a subprocess): several clients labelling at once
through the API, SIGKILLs in the middle of labelling (once, and three times at seeded random moments with restarts),
and the keyboard shortcuts in a headless browser."""

from __future__ import annotations

import random
import re
import sqlite3
import threading
import time

import pytest

from finetuners.labels import LabelStore
from tests.app_process import ARTIFACTS, CHROMIUM, App, browser_page

gradio_client = pytest.importorskip("gradio_client")

SHOWN = re.compile(r"· pair #(\d+)")
SAVED = re.compile(r"Saved label #(\d+): \*\*(\w+)\*\* on pair #(\d+) by (\S+)\.")


def client(app: App):
    return gradio_client.Client(app.url, download_files=False, verbose=False)


def labeller(app: App, name: str, n: int, seed: int, acked: list, stop: threading.Event | None = None) -> None:
    """Label ``n`` pairs as ``name`` through the API; append (label id, pair id, choice) for every label the
    app acknowledged, checking that it is the pair that was on this session's screen."""
    c = client(app)
    rng = random.Random(seed)
    out = c.predict(name, api_name="/label_start")
    for _ in range(n):
        if stop is not None and stop.is_set():
            return
        shown = int(SHOWN.search(out[2]).group(1))
        choice = rng.choice(["left", "right", "tie", "skip"])
        out = c.predict(name, api_name=f"/label_{choice}")
        assert out[5] == "", out[5]
        label_id, said, pair, who = SAVED.search(out[3]).groups()
        assert (said, int(pair), who) == (choice, shown, name)  # this session's pair, acknowledged after commit
        acked.append((int(label_id), shown, choice))


def generate_pairs(app: App, n: int, steps: int = 1) -> None:
    prompts = "\n".join(f"a red circle {'above' if i % 2 else 'below'} a blue square" for i in range(n))
    msg, error = client(app).predict(prompts, None, "seeds", app.model, None, steps, 1, 0,
                                     api_name="/label_generate_pairs")  # fmt: skip
    assert error == "" and f"{n} pairs" in msg


@pytest.fixture
def start(tiny_pipeline_dir, tmp_path):
    """``start(data_dir)`` → a running app (stopped at the end of the test)."""
    apps = []

    def _start(data_dir) -> App:
        app = App(["--model", str(tiny_pipeline_dir), "--data-dir", str(data_dir)], tmp_path / "app.log")
        app.model = str(tiny_pipeline_dir)
        apps.append(app)
        return app

    yield _start
    for app in apps:
        app.stop()


def test_four_clients_label_at_once_and_nothing_crosses(start, tmp_path):
    data = tmp_path / "data"
    app = start(data)
    generate_pairs(app, 50)
    names = [f"labeller-{k}" for k in range(4)]
    acked = {name: [] for name in names}
    errors = []

    def run(name, k):
        try:
            labeller(app, name, 50, seed=k, acked=acked[name])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(name, k)) for k, name in enumerate(names)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    seconds = time.monotonic() - t0
    assert not errors, errors
    assert [len(acked[n]) for n in names] == [50] * 4

    with LabelStore(data / "labels.db") as store:
        rows = store._conn().execute("SELECT id, labeller, pair_id, choice, undone_at FROM labels").fetchall()
        assert len(rows) == 200 and all(undone is None for *_, undone in rows)
        by_id = {r[0]: r[1:4] for r in rows}
        for name in names:
            assert len({pair for _, pair, _ in acked[name]}) == 50  # every pair once per labeller
            for label_id, pair, choice in acked[name]:
                assert by_id[label_id] == (name, pair, choice)
        assert store.counts()["pairs"] == 50 and store.integrity_check().ok
    print(f"4 clients × 50 labels through the app: {seconds:.1f} s ({200 / seconds:.0f} labels/s)")


def label_until_killed(
    app: App, names: list[str], seed: int, kill_after: int, extra_s: float = 0.0, new_pairs: int = 300
) -> dict[str, list]:
    """Label as every one of ``names`` in threads while ``new_pairs`` more pairs are being generated (images, then
    rows); SIGKILL the app ``extra_s`` after ``kill_after`` labels were acknowledged. → the labels each name had
    acknowledged, as ``labeller`` records them."""
    stop = threading.Event()
    acked = {name: [] for name in names}
    errors = []

    def until_killed(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - expected once the app is killed; anything before is a failure
            if not stop.is_set():
                errors.append(f"{type(e).__name__}: {e}")

    threads = [
        threading.Thread(target=until_killed, args=(labeller, app, name, 40, seed + k, acked[name], stop), daemon=True)
        for k, name in enumerate(names)
    ]
    threads.append(threading.Thread(target=until_killed, args=(generate_pairs, app, new_pairs), daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(map(len, acked.values())) < kill_after and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra_s)
    stop.set()
    app.kill()  # SIGKILL in the middle of labelling: no clean-up runs
    for t in threads:
        t.join(timeout=30)
    acknowledged = {name: list(v) for name, v in acked.items()}
    assert not errors, errors
    assert sum(map(len, acknowledged.values())) >= kill_after
    return acknowledged


def assert_acknowledged_labels_stored(data, acknowledged: dict[str, list]) -> int:
    """The database after a kill: SQLite's integrity check passes, no pair points at a missing or altered image, no
    label at a missing pair, and every acknowledged label is there, live, as it was acknowledged. → pairs stored."""
    with LabelStore(data / "labels.db") as store:
        conn = store._conn()
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        report = store.integrity_check(verify_hashes=True)
        assert report.ok and report.missing_images == [] and report.corrupt_images == []
        orphans = conn.execute("SELECT COUNT(*) FROM labels WHERE pair_id NOT IN (SELECT id FROM pairs)").fetchone()
        assert orphans == (0,)
        live = {r[0]: r[1:] for r in conn.execute("SELECT id, labeller, pair_id, choice FROM labels "
                                                   "WHERE undone_at IS NULL")}  # fmt: skip
        for name, labels in acknowledged.items():
            for label_id, pair, choice in labels:
                assert live.get(label_id) == (name, pair, choice), (name, label_id)
        return store.counts()["pairs"]


def assert_serves_again(app: App, name: str, acknowledged: int) -> tuple[int, int, str]:
    """The restarted app shows ``name`` at least ``acknowledged`` labels done and takes a new one. → the new label
    as ``labeller`` records it."""
    c = client(app)
    out = c.predict(name, api_name="/label_start")
    done = int(re.search(rf"\*\*{re.escape(name)}\*\*: (\d+) done", out[4]).group(1))
    assert done >= acknowledged  # (a label committed just before the kill may not have been acked)
    shown = int(SHOWN.search(out[2]).group(1))
    out = c.predict(name, api_name="/label_left")
    assert out[5] == "", out[5]
    label_id, said, pair, who = SAVED.search(out[3]).groups()
    assert (said, int(pair), who) == ("left", shown, name)
    return int(label_id), shown, "left"


def test_sigkill_mid_labelling_loses_no_acknowledged_label(start, tmp_path):
    data = tmp_path / "data"
    app = start(data)
    generate_pairs(app, 40)
    acknowledged = label_until_killed(app, ["ann", "bob"], seed=0, kill_after=30)
    n_pairs = assert_acknowledged_labels_stored(data, acknowledged)
    print(f"killed after {sum(map(len, acknowledged.values()))} acknowledged labels, {n_pairs} pairs stored")
    assert_serves_again(start(data), "ann", len(acknowledged["ann"]))  # the restarted app goes on


def test_repeated_sigkill_at_random_moments_loses_no_acknowledged_label(start, tmp_path):
    """Three SIGKILLs at seeded random moments (after a random number of acknowledged labels, plus a random
    fraction of a second, while pairs are being generated), each followed by a restart on the same data folder.
    After each: every label acknowledged so far (before any of the kills, or by a restarted app) is stored."""
    rng = random.Random(9)
    data = tmp_path / "data"
    app = start(data)
    generate_pairs(app, 64)  # enough for both labellers through all three rounds
    acknowledged = {"ann": [], "bob": []}
    for round_ in range(3):
        kill_after, extra_s = rng.randint(4, 14), rng.uniform(0.0, 0.3)
        t0 = time.monotonic()
        acked = label_until_killed(app, list(acknowledged), seed=10 * round_, kill_after=kill_after, extra_s=extra_s)
        for name, labels in acked.items():
            acknowledged[name] += labels
        n_pairs = assert_acknowledged_labels_stored(data, acknowledged)
        app = start(data)
        for name in acknowledged:  # the restarted app serves, and what it acknowledges must survive the next kill
            acknowledged[name].append(assert_serves_again(app, name, len(acknowledged[name])))
        print(f"kill {round_ + 1} after {sum(map(len, acked.values()))} labels (+{extra_s:.2f} s): {n_pairs} pairs, "
              f"{sum(map(len, acknowledged.values()))} acknowledged in all; killed and back in "
              f"{time.monotonic() - t0:.1f} s")  # fmt: skip
    assert_acknowledged_labels_stored(data, acknowledged)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no chromium at /usr/bin/chromium (apt-get install chromium)")
def test_keyboard_shortcuts_label_and_the_counts_move(start, tmp_path):
    app = start(tmp_path / "data")
    with browser_page(app.url, timeout_ms=60_000, height=1100) as page:
        page.get_by_role("tab", name="Label").click()
        page.locator("#label-queue textarea").fill("a red circle\na blue square\na green triangle\na red star")
        steps = page.locator("#label-steps-a input")
        steps.fill("2")
        steps.press("Tab")
        page.locator("#label-generate").click()
        page.locator("#label-generated").get_by_text("Stored 4 pairs").wait_for()

        counts = page.locator("#label-counts")
        page.locator("#label-name").get_by_role("textbox").fill("kim")
        page.locator("#label-start").click()
        counts.get_by_text("kim: 0 done").wait_for()
        page.locator("#label-prompt").click()  # the focus leaves the text field

        def press(key: str, expect: str) -> None:
            page.keyboard.press(key)
            page.locator("#label-status").get_by_text(expect).wait_for()

        press("1", "left on pair #1 by kim")
        counts.get_by_text("kim: 1 done · 3 left").wait_for()
        press("ArrowRight", "right on pair #2 by kim")
        press("3", "tie on pair #3 by kim")
        counts.get_by_text("kim: 3 done · 1 left").wait_for()
        press("u", "Undid your last label on pair #3")
        counts.get_by_text("kim: 2 done").wait_for()
        press("0", "skip on pair #3 by kim")

        # Typing in a text field never labels.
        page.locator("#label-name").get_by_role("textbox").press("End")
        page.locator("#label-name").get_by_role("textbox").press("2")
        time.sleep(1.0)
        assert "kim: 3 done" in counts.inner_text()
        assert "Traceback" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "label-tab.png"), full_page=True)

        # The statistics panel draws the labels per labeller when opened.
        page.locator("#label-tab").get_by_text("Statistics", exact=True).click()
        plot = page.locator("#label-per-labeller .js-plotly-plot")
        plot.wait_for()
        bars = plot.evaluate("p => Object.fromEntries(p.data.map(t => [t.name, Array.from(t.y)]))")
        assert bars == {"left": [1], "right": [1], "tie": [0], "skip": [1]}
        page.screenshot(path=str(ARTIFACTS / "label-tab-statistics.png"), full_page=True)
        with sqlite3.connect(tmp_path / "data" / "labels.db") as conn:
            live = conn.execute("SELECT labeller, pair_id, choice FROM labels WHERE undone_at IS NULL ORDER BY id")
            assert live.fetchall() == [("kim", 1, "left"), ("kim", 2, "right"), ("kim", 3, "skip")]
