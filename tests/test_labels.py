"""The label store: transactions and WAL, threads and processes, crash safety, Pick-a-Pic export / import,
bad input that changes nothing, statistics (agreement, win rates, Bradley–Terry)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetuners.errors import UserError
from finetuners.labels import EXPORT_COLUMNS, LabelStore, bradley_terry, content_uid

REPO = Path(__file__).resolve().parent.parent


def png(seed: int, size: int = 8, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def snapshot(store: LabelStore) -> tuple[str, list[str]]:
    """Digest of both tables plus the exact set of files in the images folder."""
    return store.digest(), sorted(os.listdir(store.images_dir))


@pytest.fixture
def store(tmp_path) -> LabelStore:
    s = LabelStore(tmp_path / "labels.sqlite")
    yield s
    s.close()


def filled(store: LabelStore) -> list[int]:
    """Three pairs of two models, labels from two people (a tie, a skip, an undone label, a changed mind)
    and one pair nobody labelled."""
    ids = [
        store.add_pair(f"a red circle {i}", png(2 * i), png(2 * i + 1), "base@1", "tuned@1", {"seed": i})
        for i in range(4)
    ]
    store.add_label(ids[0], "ann", "left")
    store.add_label(ids[0], "bob", "left")
    store.add_label(ids[1], "ann", "right")
    store.add_label(ids[1], "bob", "tie")
    store.add_label(ids[2], "ann", "skip")
    store.add_label(ids[2], "bob", "left")
    store.add_label(ids[2], "bob", "right")  # changed mind: replaces the previous one
    store.add_label(ids[3], "ann", "left")
    assert store.undo_last("ann") == ids[3]  # pair 3 is unlabelled again
    return ids


# -- storage --------------------------------------------------------------------------------------------
def test_wal_full_sync_and_schema(store):
    conn = store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"pairs", "labels"} <= tables
    pair = store.add_pair("a red circle", png(0), png(1), "m0", "m1")
    assert (store.db_path.parent / (store.db_path.name + "-wal")).exists()
    assert store.get_pair(pair).image_0_path.read_bytes() == png(0)
    assert store.get_pair(pair).image_0_uid == content_uid(png(0))


def test_images_are_content_addressed_and_pairs_roundtrip(store):
    a = store.add_pair("  a red circle ", png(0), png(1), "m0", "m1", {"seed": 3, "steps": [1, 4]})
    b = store.add_pair("a blue square", png(0), png(2), "m0", "m1")  # the same left image: stored once
    p = store.get_pair(a)
    assert p.prompt == "a red circle" and p.meta == {"seed": 3, "steps": [1, 4]} and p.model_1 == "m1"
    assert store.get_pair(b).image_0_uid == p.image_0_uid
    assert len(list(store.images_dir.glob("*.png"))) == 3
    jpeg = store.add_pair("a jpeg", png(5, fmt="JPEG"), png(6, fmt="JPEG"), "m0", "m1")
    assert store.get_pair(jpeg).image_0_path.read_bytes().startswith(b"\x89PNG")  # stored as lossless PNG


def test_labels_undo_and_next_pair(store):
    ids = [store.add_pair(f"a red circle {i}", png(2 * i), png(2 * i + 1), "m0", "m1") for i in range(3)]
    assert store.next_pair_for("ann").id == ids[0]
    store.add_label(ids[0], "ann", "left")
    store.add_label(ids[1], "ann", "skip")  # a skip counts as seen
    assert store.next_pair_for("ann").id == ids[2]
    assert store.next_pair_for("ann", exclude=[ids[2]]) is None
    assert store.next_pair_for("bob").id == ids[1]  # bob gets the pair with fewest labels first
    store.add_label(ids[2], "ann", "tie")
    assert store.next_pair_for("ann") is None
    store.add_label(ids[0], "bob", "right")
    assert store.undo_last("ann") == ids[2] and store.undo_last("ann") == ids[1]
    assert store.labels_per_labeller() == {
        "ann": {"left": 1, "right": 0, "tie": 0, "skip": 0, "total": 1},
        "bob": {"left": 0, "right": 1, "tie": 0, "skip": 0, "total": 1},
    }  # bob's label survives ann's undo
    assert store.undo_last("carol") is None
    assert store.counts() == {"pairs": 3, "left": 1, "right": 1, "tie": 0, "skip": 0, "labels": 2, "undone": 2,
                             "labellers": 2, "unlabelled_pairs": 2}  # fmt: skip


def test_relabelling_keeps_one_live_label_per_labeller_and_pair(store):
    pair = store.add_pair("a red circle", png(0), png(1), "m0", "m1")
    store.add_label(pair, "ann", "left")
    store.add_label(pair, "ann", "right")
    assert [(lab.labeller, lab.choice) for lab in store.labels()] == [("ann", "right")]
    with pytest.raises(sqlite3.IntegrityError):  # the database itself enforces it
        with store._write() as conn:
            conn.execute(
                "INSERT INTO labels (pair_id, labeller, choice, created_at) VALUES (?, 'ann', 'tie', 'x')", (pair,)
            )


def test_a_failed_transaction_leaves_nothing(store):
    pair = store.add_pair("a red circle", png(0), png(1), "m0", "m1")
    before = snapshot(store)
    with pytest.raises(RuntimeError):
        with store._write() as conn:
            conn.execute(
                "INSERT INTO labels (pair_id, labeller, choice, created_at) VALUES (?, 'ann', 'left', 'x')", (pair,)
            )
            raise RuntimeError("crash in the middle of a transaction")
    assert snapshot(store) == before and store.labels() == []


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, p: s.add_label(p, "", "left"), "name"),
        (lambda s, p: s.add_label(p, "   ", "left"), "name"),
        (lambda s, p: s.add_label(p, "ann", "both"), "unknown choice"),
        (lambda s, p: s.add_label(p + 99, "ann", "left"), "unknown pair"),
        (lambda s, p: s.add_label("1", "ann", "left"), "unknown pair"),
        (lambda s, p: s.add_label(p, "x" * 200, "left"), "too long"),
        (lambda s, p: s.undo_last(""), "name"),
        (lambda s, p: s.add_pair("", png(7), png(8), "m0", "m1"), "prompt is empty"),
        (lambda s, p: s.add_pair("a red circle", b"not an image", png(8), "m0", "m1"), "image"),
        (lambda s, p: s.add_pair("a red circle", png(7), png(8), "", "m1"), "model_0"),
        (lambda s, p: s.add_pair("a red circle", png(7), png(8), "m0", "m1", {"x": object()}), "JSON"),
        (lambda s, p: s.get_pair(p + 99), "unknown pair"),
    ],
)
def test_bad_input_is_a_user_error_and_changes_nothing(store, call, message):
    pair = store.add_pair("a red circle", png(0), png(1), "m0", "m1")
    store.add_label(pair, "ann", "left")
    before = snapshot(store)
    with pytest.raises(UserError, match=message):
        call(store, pair)
    assert snapshot(store) == before


def test_names_can_be_optional(tmp_path):
    with LabelStore(tmp_path / "db.sqlite", require_names=False) as s:
        s.add_label(s.add_pair("a red circle", png(0), png(1), "m0", "m1"), "", "left")
        assert list(s.labels_per_labeller()) == ["anonymous"]


def test_not_a_label_database_is_refused_untouched(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is a text file, not a database\n" * 40)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE stuff (x)")
    c.close()
    damaged = tmp_path / "damaged.sqlite"
    with LabelStore(damaged) as s:
        filled(s)
        s._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 :] = os.urandom(len(data) - len(data) // 2)  # valid header, garbage pages
    damaged.write_bytes(bytes(data))
    for path, message in [(junk, "not an SQLite file"), (other, "another application"), (damaged, "corrupt")]:
        before = path.read_bytes()
        with pytest.raises(UserError, match=message):
            LabelStore(path)
        assert path.read_bytes() == before
        assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    with pytest.raises(UserError, match="folder"):
        LabelStore(tmp_path)


def test_reopening_keeps_everything(tmp_path):
    with LabelStore(tmp_path / "db.sqlite") as s:
        filled(s)
        content = s.content()
    with LabelStore(tmp_path / "db.sqlite") as s:
        assert s.content() == content and s.integrity_check().ok


# -- concurrency and crash safety -----------------------------------------------------------------------------
def test_four_threads_fifty_labels_each(store):
    ids = [store.add_pair(f"a red circle {i}", png(2 * i), png(2 * i + 1), "m0", "m1") for i in range(50)]
    errors = []

    def work(k: int) -> None:
        try:
            for i, pair in enumerate(ids):
                store.add_label(pair, f"labeller-{k}", ("left", "right", "tie")[(i + k) % 3])
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = store._conn().execute("SELECT labeller, pair_id, choice FROM labels").fetchall()
    assert len(rows) == 200
    expected = {
        (f"labeller-{k}", pair, ("left", "right", "tie")[(i + k) % 3]) for k in range(4) for i, pair in enumerate(ids)
    }
    assert set(rows) == expected
    assert store.integrity_check().ok


_CHILD = """
import io, sys
import numpy as np
from PIL import Image
from finetuners.labels import LabelStore

def png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

store = LabelStore(sys.argv[1])
for i in range(100000):
    pair = store.add_pair(f"a red circle {i}", png(10**6 + 2 * i), png(10**6 + 2 * i + 1), "m0", "m1", {"seed": i})
    label = store.add_label(pair, "child", ("left", "right", "tie")[i % 3])
    print(pair, label, flush=True)
"""


def test_labels_survive_a_sigkill_mid_labelling(tmp_path):
    db = tmp_path / "db.sqlite"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    parent = LabelStore(db)
    mine = [parent.add_pair(f"a blue square {i}", png(2 * i), png(2 * i + 1), "p0", "p1") for i in range(10)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True, env=env)
    acknowledged, my_labels = [], []
    try:
        deadline = time.time() + 40
        while len(acknowledged) < 25 and time.time() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acknowledged.append(tuple(int(x) for x in line.split()))
            if len(acknowledged) % 3 == 0 and len(my_labels) < len(mine):  # another process writes meanwhile
                my_labels.append(parent.add_label(mine[len(my_labels)], "parent", "left"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 25, "the child process did not label anything"
    parent.close()

    with LabelStore(db) as store:
        rows = {r[0]: r[1:] for r in store._conn().execute("SELECT id, pair_id, labeller, undone_at FROM labels")}
        for pair, label in acknowledged:
            assert rows[label] == (pair, "child", None)
        for label in my_labels:
            assert rows[label][1:] == ("parent", None)
        report = store.integrity_check(verify_hashes=True)
        assert report.ok, report  # no row points to a missing or partial image
        store.add_label(store.next_pair_for("after").id, "after", "tie")  # still writable


# -- export / import ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_import_round_trip(tmp_path, store, fmt):
    ids = filled(store)
    result = store.export(tmp_path / "export", fmt)
    assert result.table.name == f"labels.{fmt}" and result.labels == 5 and result.rows == 6 and result.images == 8
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["images", f"labels.{fmt}"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    rows = store.export_rows()
    assert all(list(r) == list(EXPORT_COLUMNS) for r in rows)
    tie = next(r for r in rows if r["user_id"] == "bob" and r["ranking_id"] == store.get_pair(ids[1]).uid)
    assert (tie["label_0"], tie["label_1"], tie["best_image_uid"], tie["has_label"]) == (0.5, 0.5, "", True)
    left = next(r for r in rows if r["user_id"] == "ann" and r["ranking_id"] == store.get_pair(ids[0]).uid)
    assert (left["label_0"], left["label_1"], left["best_image_uid"]) == (1.0, 0.0, left["image_0_uid"])
    assert left["meta"] == {"seed": 0} and left["are_different"] is True
    unlabelled = [r for r in rows if not r["has_label"]]
    assert len(unlabelled) == 1 and unlabelled[0]["ranking_id"] == store.get_pair(ids[3]).uid
    assert all(r["user_id"] for r in rows if r["has_label"])  # skips are not exported as labels

    other = tmp_path / "other"
    other.mkdir()
    with LabelStore(other / "db.sqlite") as imported:  # its own images folder: every file must travel
        got = imported.import_export(tmp_path / "export")
        assert (got.pairs_added, got.labels_added, got.labels_skipped, got.images_added) == (4, 5, 0, 8)
        assert imported.content() == store.content()
        assert imported.integrity_check(verify_hashes=True).ok
        assert imported.agreement() == store.agreement() and imported.win_rates() == store.win_rates()
        before = snapshot(imported)
        again = imported.import_export(tmp_path / "export" / f"labels.{fmt}")  # the table file works too
        assert (again.pairs_added, again.labels_added, again.labels_skipped) == (0, 0, 5)
        assert snapshot(imported) == before


def test_export_refuses_existing_or_unwritable_paths(tmp_path, store):
    filled(store)
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("x")
    refused = [
        (tmp_path / "taken", "already exists"),
        (tmp_path / "a-file", "already exists"),
        (tmp_path / "a-file" / "export", "does not exist"),
        (tmp_path / "no" / "export", "does not exist"),
    ]
    for path, message in refused:
        with pytest.raises(UserError, match=message):
            store.export(path)
    with pytest.raises(UserError, match="format"):
        store.export(tmp_path / "new", "csv")
    if Path("/proc/self").is_dir():  # a folder nobody can create anything in, even root
        with pytest.raises(UserError, match="cannot write"):
            store.export("/proc/finetuners-export")
    victim = next(store.images_dir.iterdir())  # a failure half-way leaves no partial export behind
    victim.rename(tmp_path / "moved.png")
    with pytest.raises(UserError, match="missing"):
        store.export(tmp_path / "new")
    (tmp_path / "moved.png").rename(victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "images", "labels.sqlite", "labels.sqlite-shm",
                                                         "labels.sqlite-wal", "taken"]  # fmt: skip


def _edit_export(folder: Path, edit) -> None:
    table = folder / "labels.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows = edit(rows) or rows
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda f: _edit_export(
                f, lambda rows: [{k: v for k, v in r.items() if k not in ("label_0", "model_1")} for r in rows]
            ),
            "label_0, model_1",
        ),
        (
            lambda f: _edit_export(f, lambda rows: [{k: v for k, v in r.items() if k != "image_1"} for r in rows]),
            "image_0/image_1",
        ),
        (lambda f: [p.unlink() for p in sorted((f / "images").iterdir())[:2]], "2 image file"),
        (lambda f: _edit_export(f, lambda rows: [r | {"label_0": 0.7} for r in rows]), "label_0 / label_1"),
        (
            lambda f: _edit_export(f, lambda rows: [r | {"image_0": "../../secret.png"} for r in rows]),
            "leaves the export",
        ),
        (lambda f: _edit_export(f, lambda rows: [r | {"user_id": ""} for r in rows]), "user_id is empty"),
        (lambda f: _edit_export(f, lambda rows: [r | {"created_at": "yesterday"} for r in rows]), "ISO 8601"),
        (lambda f: _edit_export(f, lambda rows: [r | {"ranking_id": "same"} for r in rows]), "two different pairs"),
        (lambda f: (f / "labels.jsonl").write_text('{"caption": "x"}\nnot json\n'), "line 2"),
        (lambda f: [p.write_bytes(b"garbage") for p in sorted((f / "images").iterdir())[-1:]], "image"),
        (lambda f: [p.write_bytes(png(99)) for p in sorted((f / "images").iterdir())[-1:]], "does not match"),
    ],
)
def test_a_bad_import_changes_nothing(tmp_path, store, edit, message):
    filled(store)
    store.export(tmp_path / "export")
    edit(tmp_path / "export")
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    with LabelStore(target_dir / "db.sqlite") as target:
        target.add_label(target.add_pair("a green triangle", png(50), png(51), "m0", "m1"), "zoe", "left")
        before = snapshot(target)
        with pytest.raises(UserError, match=message):
            target.import_export(tmp_path / "export")
        assert snapshot(target) == before


def test_import_conflicting_pair_changes_nothing(tmp_path, store):
    filled(store)
    store.export(tmp_path / "export")
    other = tmp_path / "other"
    other.mkdir()
    with LabelStore(other / "db.sqlite") as target:
        first = store.pairs()[0]
        target.import_export(tmp_path / "export")
        with target._write() as conn:  # the same ranking_id with other content
            conn.execute("UPDATE pairs SET prompt = 'edited' WHERE uid = ?", (first.uid,))
        _edit_export(tmp_path / "export", lambda rows: [r | {"created_at": "2030-01-01T00:00:00+00:00"} for r in rows])
        before = snapshot(target)
        with pytest.raises(UserError, match="other content"):
            target.import_export(tmp_path / "export")
        assert snapshot(target) == before


def test_import_pick_a_pic_parquet_with_jpeg_bytes(tmp_path, store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpgs = [png(i, size=16, fmt="JPEG") for i in range(4)]
    table = pa.table({
        "caption": ["a red circle", "a red circle", "a blue square"],
        "jpg_0": [jpgs[0], jpgs[0], jpgs[2]], "jpg_1": [jpgs[1], jpgs[1], jpgs[3]],
        "image_0_uid": ["uuid-a", "uuid-a", "uuid-c"], "image_1_uid": ["uuid-b", "uuid-b", "uuid-d"],
        "best_image_uid": ["uuid-a", "", "uuid-d"],
        "label_0": [1.0, 0.5, 0.0], "label_1": [0.0, 0.5, 1.0],
        "model_0": ["sdxl", "sdxl", "sd15"], "model_1": ["sd15", "sd15", "sdxl"],
        "user_id": [17, 42, 17], "ranking_id": [1001, 1001, 1002],
        "created_at": [datetime(2023, 5, 1, 12, 0, i, tzinfo=UTC) for i in range(3)],
        "has_label": [True, True, True], "are_different": [True, True, True],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "pickapic.parquet")
    got = store.import_export(tmp_path / "pickapic.parquet")
    assert (got.pairs_added, got.labels_added, got.images_added) == (2, 3, 4)
    assert store.integrity_check(verify_hashes=True).ok
    assert {(lab.labeller, lab.choice, lab.pair.uid) for lab in store.labels()} == {
        ("17", "left", "1001"), ("42", "tie", "1001"), ("17", "right", "1002")}  # fmt: skip
    assert store.labels()[0].created_at == "2023-05-01T12:00:00.000000+00:00"
    assert [r.model for r in store.win_rates()] == ["sdxl", "sd15"]


# -- statistics --------------------------------------------------------------------------------------------------
def test_agreement_and_win_rates(store):
    filled(store)
    agreement = store.agreement()
    # pair 0: ann left / bob left (agree); pair 1: ann right / bob tie (disagree); pair 2: ann skipped.
    assert agreement.n == 2 and agreement.overall == 0.5
    assert agreement.by_labellers == {("ann", "bob"): (2, 0.5)}
    rows = {r.model: r for r in store.win_rates()}
    # base@1 on the left: wins on pair 0 (twice), loses pair 1 (ann) and pair 2 (bob), one tie.
    assert (rows["base@1"].wins, rows["base@1"].losses, rows["base@1"].ties) == (2, 2, 1)
    assert rows["base@1"].win_rate == pytest.approx(0.5) and rows["base@1"].strength == pytest.approx(0, abs=1e-9)
    assert rows["base@1"].elo == pytest.approx(1500)


def test_bradley_terry_closed_form():
    # A beats B three times and loses once: with a vanishing prior, θ_A − θ_B = log 3.
    theta = bradley_terry(2, [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], prior=1e-9)
    assert theta[0] - theta[1] == pytest.approx(math.log(3), abs=1e-6) and theta.sum() == pytest.approx(0)
    # Ties count as half a win each way: two ties and nothing else put the items level.
    assert bradley_terry(2, [0, 1], [1, 0], [0.5, 0.5]) == pytest.approx([0, 0])
    # An undefeated item stays finite; a transitive chain is ordered.
    theta = bradley_terry(3, [0, 1, 0], [1, 2, 2], [1, 1, 1])
    assert np.isfinite(theta).all() and theta[0] > theta[1] > theta[2]
