"""Pairwise preference labels: a SQLite store, statistics, and Pick-a-Pic export / import.

The labels are the asset of a labelling afternoon, so the store is written for durability first:

- SQLite in WAL mode with ``synchronous=FULL``: every committed label is fsynced to the WAL before
  ``add_label`` returns, so it survives a killed process *and* a power cut (NORMAL would only survive
  the former; a label is one small transaction per human click, so the extra fsync costs nothing).
- One connection per thread (and per process: a fork opens its own), a 30 s busy timeout, and write
  transactions that start with ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing.
- Images are PNG files named by the sha256 of their bytes, written atomically (temp file, fsync,
  rename, fsync of the folder) *before* the row that points at them is committed. A crash can leave
  an unreferenced image file, never a row that points at a missing one.
- Undo never deletes: it sets a tombstone (``undone_at``) on the labeller's own last label.

Export writes the Pick-a-Pic pairwise schema (ALGORITHMS.md §6) plus ``meta`` and ``pair_created_at``
into a new folder (``labels.jsonl`` or ``labels.parquet`` and ``images/``), built in a temporary
folder and renamed into place. Import takes such a folder (or a Pick-a-Pic table with ``jpg_0`` /
``jpg_1`` bytes), validates everything first and applies it in one transaction, or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

CHOICES = ("left", "right", "tie", "skip")
# choice -> (label_0, label_1) in the Pick-a-Pic convention; a skip is not a label.
CHOICE_LABELS = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5)}
MAX_PROMPT_CHARS = 1000
MAX_NAME_CHARS = 64
MAX_MODEL_CHARS = 500
BUSY_TIMEOUT_MS = 30_000
SCHEMA_VERSION = 1
APPLICATION_ID = 0x46544C42  # "FTLB": marks a finetuners label database
_SQLITE_MAGIC = b"SQLite format 3\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

EXPORT_COLUMNS = (
    "caption", "image_0", "image_1", "image_0_uid", "image_1_uid", "best_image_uid", "label_0", "label_1",
    "model_0", "model_1", "user_id", "ranking_id", "created_at", "has_label", "are_different", "meta",
    "pair_created_at",
)  # fmt: skip
# What an import needs; image bytes or paths come from image_0/image_1 or jpg_0/jpg_1. best_image_uid and
# are_different are derived (and checked when present); meta and pair_created_at are optional.
IMPORT_REQUIRED = (
    "caption", "image_0_uid", "image_1_uid", "label_0", "label_1", "model_0", "model_1", "user_id", "ranking_id",
    "created_at", "has_label",
)  # fmt: skip
TABLE_NAMES = {"jsonl": "labels.jsonl", "parquet": "labels.parquet"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,               -- stable id across exports: Pick-a-Pic's ranking_id
    prompt TEXT NOT NULL,
    image_0_uid TEXT NOT NULL,              -- sha256 of the PNG bytes; file images_dir/<uid>.png
    image_1_uid TEXT NOT NULL,
    model_0 TEXT NOT NULL,
    model_1 TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',        -- JSON: seeds and generation settings
    created_at TEXT NOT NULL                -- ISO 8601, UTC
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: "last label" is the largest id
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    labeller TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'skip')),
    created_at TEXT NOT NULL,
    undone_at TEXT                          -- tombstone: set by undo or when a newer label replaces it
);
CREATE INDEX IF NOT EXISTS labels_by_labeller ON labels(labeller, id);
CREATE INDEX IF NOT EXISTS labels_by_pair ON labels(pair_id);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_label ON labels(pair_id, labeller) WHERE undone_at IS NULL;
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder (the rename itself)."""
    from .imageio import atomic_write_bytes

    atomic_write_bytes(path, data)
    _fsync_dir(path.parent)


def png_bytes(image: Any) -> bytes:
    """PNG bytes from PNG bytes (checked), other image bytes (JPEG, WebP: re-encoded losslessly as PNG),
    a PIL image, or a tensor [3, H, W] in [0, 1]."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; all mean "not an image"
            raise UserError(f"image data could not be read as an image ({type(e).__name__})") from e
        if data.startswith(_PNG_MAGIC):
            return data
        with Image.open(io.BytesIO(data)) as im:
            image = im.convert("RGB")
    if not isinstance(image, Image.Image):
        import torch

        from .imageio import to_pil

        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise UserError("an image must be PNG bytes, a PIL image or a tensor [3, H, W] in [0, 1]")
        image = to_pil(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def content_uid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_sha256(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _check_text(value: Any, what: str, limit: int, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise UserError(f"{what} must be text, got {type(value).__name__}")
    value = value.strip()
    if not value and not empty_ok:
        raise UserError(f"{what} is empty")
    if len(value) > limit:
        raise UserError(f"{what} is too long ({len(value)} characters; at most {limit})")
    if any(ord(c) < 32 for c in value):
        raise UserError(f"{what} contains control characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: SQLite would refuse it mid-transaction
            raise UserError(f"{what} holds characters that are not valid text ({e.reason})") from e
    return value


def check_prompt(value: Any) -> str:
    """A pair's prompt as the store keeps it (stripped), or the ``UserError`` ``add_pair`` would raise for it: a
    caller checks a whole queue this way before it stores the first pair."""
    return _check_text(value, "the prompt", MAX_PROMPT_CHARS)


def _dump_meta(meta: Any) -> str:
    if meta is None:
        meta = {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"meta is not valid JSON: {e.msg}") from e
    if not isinstance(meta, dict):
        raise UserError("meta must be a JSON object (a dict)")
    try:
        return json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"meta must hold JSON values only: {e}") from e


# -- records returned to callers ------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    id: int
    uid: str
    prompt: str
    image_0_uid: str
    image_1_uid: str
    model_0: str
    model_1: str
    meta: dict
    created_at: str
    image_0_path: Path
    image_1_path: Path


@dataclass(frozen=True)
class Label:
    id: int
    pair: Pair
    labeller: str
    choice: str
    created_at: str

    @property
    def label_0(self) -> float:
        """Pick-a-Pic label of image 0 (left): 1, 0 or ½ for a tie; the Bradley–Terry target y."""
        return CHOICE_LABELS[self.choice][0]


@dataclass(frozen=True)
class Agreement:
    """Agreement between labellers on pairs both labelled (skips excluded).

    ``overall``: fraction of (pair, labeller a, labeller b) comparisons where a and b chose the same;
    ``n``: number of such comparisons; ``by_labellers``: (a, b) with a < b -> (n, fraction agreeing).
    ``None`` where nothing is comparable yet."""

    overall: float | None
    n: int
    by_labellers: dict[tuple[str, str], tuple[int, float]]


@dataclass(frozen=True)
class ModelRank:
    """One model id in the win-rate / Bradley–Terry table (labels on pairs with two different models)."""

    model: str
    wins: int
    losses: int
    ties: int
    win_rate: float  # (wins + ½ ties) / comparisons
    strength: float  # Bradley–Terry log-strength θ, centred (mean 0 over models)
    elo: float  # the same on the Elo scale: 1500 + 400·θ / ln 10

    @property
    def comparisons(self) -> int:
        return self.wins + self.losses + self.ties


@dataclass(frozen=True)
class IntegrityReport:
    sqlite: str  # PRAGMA integrity_check: "ok" or the first problems
    missing_images: list[str]  # uids referenced by a pair whose file is absent
    corrupt_images: list[str]  # files whose sha256 is not their name (only with verify_hashes=True)
    unreferenced_images: int  # files no pair points at (harmless: left by a crash between file and row)

    @property
    def ok(self) -> bool:
        return self.sqlite == "ok" and not self.missing_images and not self.corrupt_images


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    table: Path
    rows: int
    labels: int
    images: int


@dataclass(frozen=True)
class ImportResult:
    pairs_added: int
    labels_added: int
    labels_skipped: int  # already present, or older than the labeller's live label on that pair
    images_added: int


# -- Bradley–Terry ranking of model ids -------------------------------------------------------------------
def bradley_terry(
    n_items: int, i: Sequence[int], j: Sequence[int], y: Sequence[float], prior: float = 0.1, iters: int = 100
) -> np.ndarray:
    """MAP log-strengths θ [n_items] with P(i ≻ j) = σ(θ_i − θ_j).

    Maximises Σ_k y_k log σ(θ_i − θ_j) + (1 − y_k) log σ(θ_j − θ_i) − (prior/2)·‖θ‖² by Newton's method
    (concave, so it converges in a few steps); y = ½ counts a tie as half a win each way. The Gaussian
    prior keeps θ finite for an undefeated item. Returned centred (mean 0).
    """
    theta = np.zeros(n_items)
    if n_items == 0:
        return theta
    i, j, y = np.asarray(i, dtype=int), np.asarray(j, dtype=int), np.asarray(y, dtype=float)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(theta[i] - theta[j])))
        g = -prior * theta
        np.add.at(g, i, y - p)
        np.add.at(g, j, p - y)
        w = p * (1 - p)
        h = -prior * np.eye(n_items)
        np.add.at(h, (i, i), -w)
        np.add.at(h, (j, j), -w)
        np.add.at(h, (i, j), w)
        np.add.at(h, (j, i), w)
        step = np.linalg.solve(h, g)
        theta = theta - step
        if np.abs(step).max() < 1e-10:
            break
    return theta - theta.mean()


# -- the store ------------------------------------------------------------------------------------------
class LabelStore:
    """Pairs, labels and their images: ``db_path`` (SQLite) and ``images_dir`` (default: ``images/`` beside it).

    Safe to share between threads (each gets its own connection) and between processes (SQLite locking,
    WAL). Every method that writes is one transaction; a ``UserError`` leaves the store unchanged.
    ``require_names``: labels need a labeller name (otherwise an empty name becomes "anonymous").
    """

    def __init__(self, db_path: str | Path, images_dir: str | Path | None = None, *, require_names: bool = True):
        self.db_path = Path(db_path)
        self.images_dir = Path(images_dir) if images_dir is not None else self.db_path.parent / "images"
        self.require_names = require_names
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._open_checked()

    # -- connections ----------------------------------------------------------------------------------
    def _open_checked(self) -> None:
        """Refuse anything that is not a (healthy) label database, before writing a byte to it."""
        p = self.db_path
        if p.is_dir():
            raise UserError(f"{p} is a folder, not a label database file")
        if not p.parent.is_dir():
            raise UserError(f"the folder {p.parent} does not exist")
        if p.exists() and p.stat().st_size > 0:
            with open(p, "rb") as f:
                head = f.read(100)
            if not head.startswith(_SQLITE_MAGIC) or len(head) < 100:
                raise UserError(f"{p} is not a label database (not an SQLite file); it was left untouched")
        try:
            conn = sqlite3.connect(p, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as e:
            raise UserError(f"cannot open the label database {p}: {e}") from e
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise UserError(f"the label database {p} is corrupt ({check}); restore it from a backup or an export")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            conn.close()
            raise UserError(f"the label database {p} is corrupt ({e}); restore it from a backup or an export") from e
        except UserError:
            conn.close()
            raise
        foreign = tables - {"pairs", "labels", "sqlite_sequence"}
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and foreign):
            conn.close()
            raise UserError(f"{p} is an SQLite database of another application, not a label database")
        if version > SCHEMA_VERSION:
            conn.close()
            raise UserError(f"{p} was written by a newer version of finetuners (schema {version})")
        try:
            if not p.parent.exists() or not os.access(p.parent, os.W_OK):
                raise UserError(f"the folder {p.parent} is not writable")
            self.images_dir.mkdir(parents=True, exist_ok=True)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise UserError(f"the label database {p} cannot use WAL journaling here (got {mode})")
            if (app_id, version) != (APPLICATION_ID, SCHEMA_VERSION):  # new (both are set with the schema): create it
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA application_id = {APPLICATION_ID};"
                    f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
        except (sqlite3.Error, OSError) as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise UserError(f"cannot write the label database {p}: {e}") from e
        finally:
            conn.close()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(
                self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at its start (BEGIN IMMEDIATE) so writers queue on the busy timeout.
        A full disk is a ``UserError`` (the transaction is rolled back: nothing of it is stored)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back after an I/O error
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            if "full" not in str(e) and "disk I/O" not in str(e):
                raise
            raise UserError(f"the disk holding the label database is full ({e}): nothing was saved; free some space "
                            "and try again") from e  # fmt: skip

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this store opened (in any thread of this process)."""
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(sqlite3.Error):
                c.close()
        self._local = threading.local()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- images ---------------------------------------------------------------------------------------
    def image_path(self, uid: str) -> Path:
        if not _is_sha256(uid):
            raise UserError(f"not an image id: {uid!r}")
        return self.images_dir / f"{uid}.png"

    def _store_image(self, data: bytes) -> tuple[str, bool]:
        """Write PNG bytes under their content hash (if not there yet). Returns (uid, newly written)."""
        uid = content_uid(data)
        path = self.image_path(uid)
        if path.exists():
            return uid, False
        try:
            _write_durably(path, data)
        except OSError as e:
            raise UserError(f"cannot write the image to {self.images_dir}: {e.strerror or e}") from e
        return uid, True

    # -- writing --------------------------------------------------------------------------------------
    def add_pair(
        self, prompt: str, image_0: Any, image_1: Any, model_0: str, model_1: str, meta: dict | None = None
    ) -> int:
        """Store a pair (image 0 is shown on the left) and return its id.

        ``image_0`` / ``image_1``: PNG bytes (other image bytes, PIL images and tensors [3, H, W] in [0, 1]
        are converted to PNG). ``model_*``: the generator id (checkpoint, steps, sampler, guidance).
        ``meta``: JSON-serialisable generation settings (seeds ...). Files first, then the row."""
        prompt = check_prompt(prompt)
        model_0 = _check_text(model_0, "model_0", MAX_MODEL_CHARS)
        model_1 = _check_text(model_1, "model_1", MAX_MODEL_CHARS)
        meta_json = _dump_meta(meta)
        data = [png_bytes(image_0), png_bytes(image_1)]
        uids = [self._store_image(d)[0] for d in data]
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO pairs (uid, prompt, image_0_uid, image_1_uid, model_0, model_1, meta, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (uuid.uuid4().hex, prompt, uids[0], uids[1], model_0, model_1, meta_json, now_iso()),
            )
            return int(cur.lastrowid)

    def _labeller(self, labeller: Any) -> str:
        if labeller is None:
            labeller = ""
        name = _check_text(labeller, "the labeller name", MAX_NAME_CHARS, empty_ok=True)
        if not name:
            if self.require_names:
                raise UserError("type your name first: every label records who gave it")
            name = "anonymous"
        return name

    def add_label(self, pair_id: int, labeller: str, choice: str) -> int:
        """Record ``labeller``'s choice (left / right / tie / skip) on a pair, in one transaction.

        A labeller has at most one live label per pair: a new one tombstones the previous. Returns the
        label id; once it returns, the label is on disk."""
        name = self._labeller(labeller)
        if choice not in CHOICES:
            raise UserError(f"unknown choice {choice!r}: one of {', '.join(CHOICES)}")
        if isinstance(pair_id, bool) or not isinstance(pair_id, (int, np.integer)):
            raise UserError(f"unknown pair {pair_id!r}")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM pairs WHERE id = ?", (int(pair_id),)).fetchone() is None:
                raise UserError(f"unknown pair {pair_id}")
            now = now_iso()
            conn.execute(
                "UPDATE labels SET undone_at = ? WHERE pair_id = ? AND labeller = ? AND undone_at IS NULL",
                (now, int(pair_id), name),
            )
            cur = conn.execute(
                "INSERT INTO labels (pair_id, labeller, choice, created_at) VALUES (?, ?, ?, ?)",
                (int(pair_id), name, choice, now),
            )
            return int(cur.lastrowid)

    def undo_last(self, labeller: str) -> int | None:
        """Tombstone ``labeller``'s most recent live label. Returns its pair id (to show it again), or
        ``None`` when there is nothing to undo. Other labellers' labels are never touched."""
        name = self._labeller(labeller)
        with self._write() as conn:
            row = conn.execute(
                "SELECT id, pair_id FROM labels WHERE labeller = ? AND undone_at IS NULL ORDER BY id DESC LIMIT 1",
                (name,),
            ).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now_iso(), row[0]))
            return int(row[1])

    # -- reading --------------------------------------------------------------------------------------
    _PAIR_COLS = "p.id, p.uid, p.prompt, p.image_0_uid, p.image_1_uid, p.model_0, p.model_1, p.meta, p.created_at"

    def _pair(self, row: Sequence) -> Pair:
        return Pair(
            id=row[0], uid=row[1], prompt=row[2], image_0_uid=row[3], image_1_uid=row[4], model_0=row[5],
            model_1=row[6], meta=json.loads(row[7]), created_at=row[8],
            image_0_path=self.images_dir / f"{row[3]}.png", image_1_path=self.images_dir / f"{row[4]}.png",
        )  # fmt: skip

    def get_pair(self, pair_id: int) -> Pair:
        row = self._conn().execute(f"SELECT {self._PAIR_COLS} FROM pairs p WHERE p.id = ?", (pair_id,)).fetchone()
        if row is None:
            raise UserError(f"unknown pair {pair_id}")
        return self._pair(row)

    def pairs(self) -> list[Pair]:
        rows = self._conn().execute(f"SELECT {self._PAIR_COLS} FROM pairs p ORDER BY p.id").fetchall()
        return [self._pair(r) for r in rows]

    def next_pair_for(self, labeller: str, exclude: Sequence[int] = ()) -> Pair | None:
        """A pair ``labeller`` has no live label on (skips count as seen), or ``None`` when all are done.

        Pairs with the fewest labels come first (then the oldest), so coverage grows evenly; ``exclude``
        holds pair ids to pass over (e.g. the one on screen)."""
        name = self._labeller(labeller)
        excl = [int(e) for e in exclude]
        row = (
            self._conn()
            .execute(
                f"SELECT {self._PAIR_COLS} FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.id"
                " AND l.labeller = ? AND l.undone_at IS NULL)"
                f" AND p.id NOT IN ({','.join('?' * len(excl))})"
                " ORDER BY (SELECT COUNT(*) FROM labels l WHERE l.pair_id = p.id AND l.undone_at IS NULL"
                " AND l.choice != 'skip'), p.id LIMIT 1",
                (name, *excl),
            )
            .fetchone()
        )
        return None if row is None else self._pair(row)

    def labels(self, include_skips: bool = False) -> list[Label]:
        """Live labels (undone and replaced ones left out), oldest first."""
        skip = "" if include_skips else " AND l.choice != 'skip'"
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT l.id, l.labeller, l.choice, l.created_at, {self._PAIR_COLS} FROM labels l"
                f" JOIN pairs p ON p.id = l.pair_id WHERE l.undone_at IS NULL{skip} ORDER BY l.id"
            ).fetchall()
        return [Label(r[0], self._pair(r[4:]), r[1], r[2], r[3]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Pairs, live labels by choice, undone labels, labellers, and pairs with no label yet."""
        with self._read() as conn:
            out = {"pairs": conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]}
            by_choice = dict(
                conn.execute("SELECT choice, COUNT(*) FROM labels WHERE undone_at IS NULL GROUP BY choice").fetchall()
            )
            out.update({c: int(by_choice.get(c, 0)) for c in CHOICES})
            out["labels"] = out["left"] + out["right"] + out["tie"]
            out["undone"] = conn.execute("SELECT COUNT(*) FROM labels WHERE undone_at IS NOT NULL").fetchone()[0]
            out["labellers"] = conn.execute(
                "SELECT COUNT(DISTINCT labeller) FROM labels WHERE undone_at IS NULL"
            ).fetchone()[0]
            out["unlabelled_pairs"] = conn.execute(
                "SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.id"
                " AND l.undone_at IS NULL AND l.choice != 'skip')"
            ).fetchone()[0]
        return out

    def labels_per_labeller(self) -> dict[str, dict[str, int]]:
        """labeller -> live counts per choice and ``total`` (skips included in total), by name."""
        rows = (
            self._conn()
            .execute("SELECT labeller, choice, COUNT(*) FROM labels WHERE undone_at IS NULL GROUP BY labeller, choice")
            .fetchall()
        )
        out: dict[str, dict[str, int]] = {}
        for name, choice, n in rows:
            d = out.setdefault(name, dict.fromkeys(CHOICES, 0) | {"total": 0})
            d[choice] += n
            d["total"] += n
        return dict(sorted(out.items()))

    def agreement(self) -> Agreement:
        by_pair: dict[int, dict[str, str]] = defaultdict(dict)
        for pair_id, name, choice in (
            self._conn()
            .execute("SELECT pair_id, labeller, choice FROM labels WHERE undone_at IS NULL AND choice != 'skip'")
            .fetchall()
        ):
            by_pair[pair_id][name] = choice
        n: Counter = Counter()
        same: Counter = Counter()
        for choices in by_pair.values():
            for a, b in combinations(sorted(choices), 2):
                n[a, b] += 1
                same[a, b] += choices[a] == choices[b]
        total = sum(n.values())
        return Agreement(
            overall=sum(same.values()) / total if total else None,
            n=total,
            by_labellers={k: (n[k], same[k] / n[k]) for k in sorted(n)},
        )

    def _model_comparisons(self) -> list[tuple[str, str, float]]:
        return [
            (m0, m1, CHOICE_LABELS[c][0])
            for m0, m1, c in self._conn()
            .execute(
                "SELECT p.model_0, p.model_1, l.choice FROM labels l JOIN pairs p ON p.id = l.pair_id"
                " WHERE l.undone_at IS NULL AND l.choice != 'skip' AND p.model_0 != p.model_1"
            )
            .fetchall()
        ]

    def win_rates(self, prior: float = 0.1) -> list[ModelRank]:
        """Model ids ranked by Bradley–Terry strength from every live label on a pair of two different
        models (pairs of one model, e.g. two seeds, say nothing about models). Best first."""
        comps = self._model_comparisons()
        models = sorted({m for m0, m1, _ in comps for m in (m0, m1)})
        index = {m: k for k, m in enumerate(models)}
        theta = bradley_terry(
            len(models), [index[a] for a, _, _ in comps], [index[b] for _, b, _ in comps], [y for *_, y in comps], prior
        )
        wins, losses, ties = Counter(), Counter(), Counter()
        for a, b, y in comps:
            if y == 0.5:
                ties[a] += 1
                ties[b] += 1
            else:
                winner, loser = (a, b) if y == 1.0 else (b, a)
                wins[winner] += 1
                losses[loser] += 1
        rows = []
        for m in models:
            n = wins[m] + losses[m] + ties[m]
            t = float(theta[index[m]])
            rows.append(ModelRank(m, wins[m], losses[m], ties[m], (wins[m] + 0.5 * ties[m]) / n, t,
                                  1500 + 400 * t / math.log(10)))  # fmt: skip
        return sorted(rows, key=lambda r: (-r.strength, r.model))

    # -- checks ---------------------------------------------------------------------------------------
    def integrity_check(self, verify_hashes: bool = False) -> IntegrityReport:
        """SQLite's integrity check, and no pair pointing at a missing image (or, with ``verify_hashes``,
        at a file whose content no longer matches its name)."""
        conn = self._conn()
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        sqlite_ok = "ok" if rows == ["ok"] else "; ".join(rows[:5])
        uids = {u for r in conn.execute("SELECT image_0_uid, image_1_uid FROM pairs").fetchall() for u in r}
        missing = sorted(u for u in uids if not (self.images_dir / f"{u}.png").is_file())
        corrupt = []
        if verify_hashes:
            corrupt = sorted(
                u for u in uids - set(missing) if content_uid((self.images_dir / f"{u}.png").read_bytes()) != u
            )
        files = {p.stem for p in self.images_dir.glob("*.png")} if self.images_dir.is_dir() else set()
        return IntegrityReport(sqlite_ok, missing, corrupt, len(files - uids))

    def content(self) -> dict[str, list[tuple]]:
        """Everything an export carries, in a canonical order without local ids: pairs (uid, prompt, image
        uids, models, meta, created_at) and live labels (pair uid, labeller, choice, created_at), skips out."""
        with self._read() as conn:
            pairs = conn.execute(
                "SELECT uid, prompt, image_0_uid, image_1_uid, model_0, model_1, meta, created_at FROM pairs"
                " ORDER BY uid"
            ).fetchall()
            labels = conn.execute(
                "SELECT p.uid, l.labeller, l.choice, l.created_at FROM labels l JOIN pairs p ON p.id = l.pair_id"
                " WHERE l.undone_at IS NULL AND l.choice != 'skip' ORDER BY p.uid, l.labeller, l.created_at"
            ).fetchall()
        return {"pairs": [tuple(r) for r in pairs], "labels": [tuple(r) for r in labels]}

    def digest(self) -> str:
        """sha256 over every row of both tables (tombstones included) and the image file names: equal
        digests mean nothing stored changed."""
        h = hashlib.sha256()
        with self._read() as conn:
            for table in ("pairs", "labels"):
                for row in conn.execute(f"SELECT * FROM {table} ORDER BY id"):
                    h.update(json.dumps([table, *row]).encode())
        if self.images_dir.is_dir():
            for name in sorted(p.name for p in self.images_dir.iterdir()):
                h.update(name.encode())
        return h.hexdigest()

    # -- export ---------------------------------------------------------------------------------------
    def export_rows(self) -> list[dict]:
        """The Pick-a-Pic rows: one per live non-skip label, plus one ``has_label=False`` row (labels ½/½,
        no user) for each pair nobody has labelled, so pairs travel too. Image paths are relative."""
        with self._read() as conn:
            pairs = [self._pair(r) for r in conn.execute(f"SELECT {self._PAIR_COLS} FROM pairs p ORDER BY p.id")]
            labels = conn.execute(
                "SELECT pair_id, labeller, choice, created_at FROM labels"
                " WHERE undone_at IS NULL AND choice != 'skip' ORDER BY pair_id, id"
            ).fetchall()
        by_pair: dict[int, list] = defaultdict(list)
        for pair_id, *rest in labels:
            by_pair[pair_id].append(rest)
        rows = []
        for p in pairs:
            base = {
                "caption": p.prompt,
                "image_0": f"images/{p.image_0_uid}.png",
                "image_1": f"images/{p.image_1_uid}.png",
                "image_0_uid": p.image_0_uid,
                "image_1_uid": p.image_1_uid,
                "model_0": p.model_0,
                "model_1": p.model_1,
                "ranking_id": p.uid,
                "are_different": p.image_0_uid != p.image_1_uid,
                "meta": p.meta,
                "pair_created_at": p.created_at,
            }
            for name, choice, created_at in by_pair.get(p.id, []):
                l0, l1 = CHOICE_LABELS[choice]
                best = p.image_0_uid if choice == "left" else p.image_1_uid if choice == "right" else ""
                rows.append(base | {"best_image_uid": best, "label_0": l0, "label_1": l1, "user_id": name,
                                    "created_at": created_at, "has_label": True})  # fmt: skip
            if p.id not in by_pair:
                rows.append(base | {"best_image_uid": "", "label_0": 0.5, "label_1": 0.5, "user_id": "",
                                    "created_at": p.created_at, "has_label": False})  # fmt: skip
        return [{k: r[k] for k in EXPORT_COLUMNS} for r in rows]

    def export(self, path: str | Path, format: str = "jsonl") -> ExportResult:
        """Write a new folder ``path`` with ``labels.jsonl`` (or ``labels.parquet``) and ``images/``.

        Built in a temporary folder beside ``path`` and renamed into place, so ``path`` either does not
        exist or holds a complete export. An existing ``path`` or an unwritable place is a ``UserError``."""
        if format not in TABLE_NAMES:
            raise UserError(f"unknown export format {format!r}: jsonl or parquet")
        path = Path(path)
        if path.exists() or path.is_symlink():
            raise UserError(f"{path} already exists: choose a new name for the export")
        if not path.parent.is_dir():
            raise UserError(f"the folder {path.parent} does not exist")
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.mkdir()  # (not mkdtemp: its 0700 mode would survive the rename)
        except OSError as e:
            raise UserError(f"cannot write in {path.parent}: {e.strerror or e}") from e
        try:
            rows = self.export_rows()
            (tmp / "images").mkdir()
            uids = sorted({r[k] for r in rows for k in ("image_0_uid", "image_1_uid")})
            for uid in uids:
                src = self.images_dir / f"{uid}.png"
                if not src.is_file():
                    raise UserError(f"image {uid[:12]}… is missing from {self.images_dir}; run the integrity check")
                dst = tmp / "images" / f"{uid}.png"
                shutil.copyfile(src, dst)
                with open(dst, "rb") as f:
                    os.fsync(f.fileno())
            table = tmp / TABLE_NAMES[format]
            _write_table(table, rows, format)
            _fsync_dir(tmp / "images")
            _fsync_dir(tmp)
            if path.exists():
                raise UserError(f"{path} already exists: choose a new name for the export")
            os.rename(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"the export to {path} failed: {e.strerror or e}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        n_labels = sum(r["has_label"] for r in rows)
        log.info("exported %d rows (%d labels, %d images) to %s", len(rows), n_labels, len(uids), path)
        return ExportResult(path, path / TABLE_NAMES[format], len(rows), n_labels, len(uids))

    # -- import ---------------------------------------------------------------------------------------
    def import_export(self, path: str | Path) -> ImportResult:
        """Import an export folder (or a ``.jsonl`` / ``.parquet`` table in the Pick-a-Pic schema, with
        relative image paths in ``image_0`` / ``image_1`` or image bytes in ``jpg_0`` / ``jpg_1``).

        Everything is validated and every image read before anything is written; pairs and labels go in
        one transaction. Pairs are matched by ``ranking_id`` and labels by (pair, user, created_at), so
        importing the same export twice adds nothing. Images not already PNG are stored as lossless PNG
        re-encodings, under the hash of those bytes."""
        return self.import_rows(*read_export(path))

    def import_rows(self, root: Path, rows: list[dict]) -> ImportResult:
        """Import the rows of an export table read by ``read_export``, their relative image paths under ``root``."""
        pairs, labels, images = _validate_rows(rows, root, self)

        new_files: list[Path] = []
        try:
            for data in images.values():
                uid, new = self._store_image(data)
                if new:
                    new_files.append(self.image_path(uid))
            with self._write() as conn:
                result = self._apply_import(conn, pairs, labels)
        except BaseException:
            # Nothing was committed: remove the image files this import created, unless a row (added by
            # someone else meanwhile) already points at them.
            conn = self._conn()
            for f in new_files:
                used = conn.execute(
                    "SELECT 1 FROM pairs WHERE image_0_uid = ? OR image_1_uid = ? LIMIT 1", (f.stem, f.stem)
                ).fetchone()
                if used is None:
                    f.unlink(missing_ok=True)
            raise
        return ImportResult(result[0], result[1], result[2], len(new_files))

    def _apply_import(self, conn: sqlite3.Connection, pairs: dict[str, dict], labels: list[dict]) -> tuple:
        ids: dict[str, int] = {}
        n_pairs = 0
        for uid, p in pairs.items():
            row = conn.execute(
                "SELECT id, prompt, image_0_uid, image_1_uid, model_0, model_1 FROM pairs WHERE uid = ?", (uid,)
            ).fetchone()
            want = (p["prompt"], p["image_0_uid"], p["image_1_uid"], p["model_0"], p["model_1"])
            if row is not None:
                if tuple(row[1:]) != want:
                    raise UserError(
                        f"pair {uid!r} (ranking_id) already exists here with other content; nothing imported"
                    )
                ids[uid] = row[0]
                continue
            cur = conn.execute(
                "INSERT INTO pairs (uid, prompt, image_0_uid, image_1_uid, model_0, model_1, meta, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (uid, *want, p["meta"], p["created_at"]),
            )
            ids[uid] = cur.lastrowid
            n_pairs += 1
        added = skipped = 0
        for lab in labels:
            pair_id = ids[lab["pair_uid"]]
            live = conn.execute(
                "SELECT id, choice, created_at FROM labels WHERE pair_id = ? AND labeller = ? AND undone_at IS NULL",
                (pair_id, lab["labeller"]),
            ).fetchone()
            if live is not None and (live[2] >= lab["created_at"]):
                skipped += 1  # the same label, or the labeller changed their mind later than this one
                continue
            if live is not None:
                conn.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (lab["created_at"], live[0]))
            conn.execute(
                "INSERT INTO labels (pair_id, labeller, choice, created_at) VALUES (?, ?, ?, ?)",
                (pair_id, lab["labeller"], lab["choice"], lab["created_at"]),
            )
            added += 1
        return n_pairs, added, skipped


# -- export / import helpers ---------------------------------------------------------------------------
def _write_table(path: Path, rows: list[dict], format: str) -> None:
    if format == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [(c, pa.float64()) if c in ("label_0", "label_1") else (c, pa.bool_()) if c in ("has_label", "are_different")
         else (c, pa.string()) for c in EXPORT_COLUMNS]
    )  # fmt: skip
    cols = {c: [json.dumps(r[c], sort_keys=True) if c == "meta" else r[c] for r in rows] for c in EXPORT_COLUMNS}
    pq.write_table(pa.table(cols, schema=schema), path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_export(path: str | Path) -> tuple[Path, list[dict]]:
    """(folder that relative image paths start from, rows) of an export folder or a ``.jsonl`` / ``.parquet``
    table; a ``UserError`` for anything that is not one, before any store is touched."""
    table, root = _find_table(Path(path))
    return root, _read_table(table)


def _find_table(path: Path) -> tuple[Path, Path]:
    """(table file, folder that relative image paths start from)."""
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        found = [path / n for n in TABLE_NAMES.values() if (path / n).is_file()]
        if not found:
            found = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet") and p.is_file())
        if len(found) != 1:
            raise UserError(
                f"{path} should hold exactly one .jsonl or .parquet table (found {len(found)}): "
                "pass the table file itself"
            )
        return found[0], path
    if path.suffix not in (".jsonl", ".parquet"):
        raise UserError(f"{path.name} is not a .jsonl or .parquet table")
    return path, path.parent


def _read_table(table: Path) -> list[dict]:
    if table.suffix == ".jsonl":
        rows = []
        try:
            with open(table, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise UserError(f"{table.name} line {n} is not a JSON object")
                    rows.append(row)
        except json.JSONDecodeError as e:
            raise UserError(f"{table.name} line {n} is not valid JSON: {e.msg}") from e
        except UnicodeDecodeError as e:
            raise UserError(f"{table.name} is not UTF-8 text") from e
        columns = set().union(*rows) if rows else set()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(table)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{table.name} could not be read as Parquet: {str(e).splitlines()[0]}") from e
        rows = t.to_pylist()
        columns = set(t.column_names)
    missing = [c for c in IMPORT_REQUIRED if c not in columns]
    if not ({"image_0", "image_1"} <= columns or {"jpg_0", "jpg_1"} <= columns):
        missing.append("image_0/image_1 (or jpg_0/jpg_1)")
    if missing:
        raise UserError(f"{table.name} lacks the column(s) {', '.join(missing)}; nothing imported")
    if not rows:
        raise UserError(f"{table.name} has no rows; nothing imported")
    return rows


def _as_bool(v: Any, what: str) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if v in (0, 1):
        return bool(v)
    raise UserError(f"{what} must be true or false, got {v!r}")


def _as_time(v: Any, what: str) -> str:
    """A timestamp (datetime or ISO 8601 text; naive means UTC) as UTC ISO text, the store's one format, so
    that timestamps compare as strings."""
    if isinstance(v, str) and v.strip():
        try:
            v = datetime.fromisoformat(v.strip())
        except ValueError as e:
            raise UserError(f"{what} is not an ISO 8601 timestamp: {v!r}") from e
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="microseconds")
    raise UserError(f"{what} is not a timestamp: {v!r}")


def _image_source(row: dict, k: int) -> Any:
    for col in (f"jpg_{k}", f"image_{k}"):
        v = row.get(col)
        if isinstance(v, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            v = v.get("bytes") or v.get("path")
        if v is not None and v != "":
            return v
    return None


def _validate_rows(rows: list[dict], root: Path, store: LabelStore) -> tuple[dict, list, dict]:
    """Check every row and read every image; raise a UserError before anything is written.

    Returns pairs {ranking_id: fields}, labels [fields] and images {uid: PNG bytes}."""
    pairs: dict[str, dict] = {}
    labels: list[dict] = []
    images: dict[str, bytes] = {}
    missing_files: list[str] = []
    source_uid: dict[Any, str] = {}  # path or bytes digest -> stored uid (each file read once)
    root_resolved = root.resolve()
    for n, row in enumerate(rows, 1):
        where = f"row {n}"
        prompt = _check_text(row.get("caption"), f"{where}: caption", MAX_PROMPT_CHARS)
        model_0 = _check_text(str(row.get("model_0") or ""), f"{where}: model_0", MAX_MODEL_CHARS)
        model_1 = _check_text(str(row.get("model_1") or ""), f"{where}: model_1", MAX_MODEL_CHARS)
        ranking_id = row.get("ranking_id")
        if ranking_id is None or str(ranking_id).strip() == "":
            raise UserError(f"{where}: ranking_id is empty")
        ranking_id = str(ranking_id)
        uids = []
        for k in (0, 1):
            src = _image_source(row, k)
            if src is None:
                raise UserError(f"{where}: no image_{k}")
            if isinstance(src, str):
                rel = Path(src)
                full = (root / rel).resolve()
                if rel.is_absolute() or not full.is_relative_to(root_resolved):
                    raise UserError(f"{where}: image path {src!r} leaves the export folder")
                key = ("path", str(full))
                if key not in source_uid:
                    if not full.is_file():
                        missing_files.append(src)
                        uids.append(None)
                        continue
                    source_uid[key] = _ingest(full.read_bytes(), row.get(f"image_{k}_uid"), images, f"{where}: {src}")
            elif isinstance(src, (bytes, bytearray, memoryview)):
                key = ("bytes", hashlib.sha256(bytes(src)).hexdigest())
                if key not in source_uid:
                    source_uid[key] = _ingest(bytes(src), row.get(f"image_{k}_uid"), images, f"{where}: jpg_{k}")
            else:
                raise UserError(f"{where}: image_{k} must be a relative path or image bytes")
            uids.append(source_uid[key])
        if None in uids:
            continue
        meta = _dump_meta(row.get("meta"))
        has_label = _as_bool(row.get("has_label"), f"{where}: has_label")
        created_at = _as_time(row.get("created_at"), f"{where}: created_at")
        pair_created = row.get("pair_created_at")
        pair_created = _as_time(pair_created, f"{where}: pair_created_at") if pair_created else created_at
        pair = {"prompt": prompt, "image_0_uid": uids[0], "image_1_uid": uids[1], "model_0": model_0,
                "model_1": model_1, "meta": meta, "created_at": pair_created}  # fmt: skip
        seen = pairs.get(ranking_id)
        if seen is None:
            pairs[ranking_id] = pair
        elif any(seen[f] != pair[f] for f in ("prompt", "image_0_uid", "image_1_uid", "model_0", "model_1")):
            raise UserError(f"{where}: ranking_id {ranking_id!r} appears with two different pairs")
        else:
            seen["created_at"] = min(seen["created_at"], pair_created)
        if not has_label:
            continue
        try:
            l0, l1 = float(row.get("label_0")), float(row.get("label_1"))
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: label_0 / label_1 must be numbers") from e
        choice = {(1.0, 0.0): "left", (0.0, 1.0): "right", (0.5, 0.5): "tie"}.get((l0, l1))
        if choice is None:
            raise UserError(f"{where}: label_0 / label_1 must be 1/0, 0/1 or 0.5/0.5, got {l0}/{l1}")
        user = row.get("user_id")
        user = "" if user is None else str(user)
        if not user.strip() and store.require_names:
            raise UserError(f"{where}: user_id is empty, but every label needs its labeller")
        labeller = store._labeller(user)
        labels.append({"pair_uid": ranking_id, "labeller": labeller, "choice": choice, "created_at": created_at})
    if missing_files:
        few = ", ".join(sorted(set(missing_files))[:3])
        more = len(set(missing_files)) - 3
        raise UserError(
            f"{len(set(missing_files))} image file(s) are missing: {few}{f' and {more} more' if more > 0 else ''}"
        )
    labels.sort(key=lambda lab: lab["created_at"])
    return pairs, labels, images


def _ingest(data: bytes, claimed_uid: Any, images: dict[str, bytes], where: str) -> str:
    """PNG bytes for ``data`` and their uid; a sha256-looking ``claimed_uid`` must match PNG bytes."""
    try:
        png = png_bytes(data)
    except UserError as e:
        raise UserError(f"{where}: {e}") from e
    uid = content_uid(png)
    if data.startswith(_PNG_MAGIC) and isinstance(claimed_uid, str) and _is_sha256(claimed_uid) and claimed_uid != uid:
        raise UserError(f"{where}: the file's content does not match its uid (corrupt or edited)")
    images[uid] = png
    return uid
