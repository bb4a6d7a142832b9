"""A training run on disk: ``runs/<name>/`` (PRODUCT.md, "Data the app keeps").

config.json            every setting, the model id and its fingerprint, seeds (written once)
metrics.jsonl          append-only, one JSON object per line, flushed and fsynced
checkpoints/step-N/    adapter (or UNet) + state.pt (optimiser, tracker, RNG); written to a temp folder
                       and renamed, so a folder named step-N is always complete; the last few are kept
samples/               PNG strips from evaluation
status.json            {"state": running|stopped|finished|failed, "error": ..., ...}, written atomically
STOP                   created by anyone to ask a running trainer to stop (checkpoint, then "stopped")
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .errors import UserError
from .imageio import atomic_write_bytes

STATES = ("running", "stopped", "finished", "failed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CKPT = re.compile(r"^step-(\d+)$")
CHECKPOINT_STATE = "state.pt"


def validate_run_name(name: str) -> str:
    """Letters, digits, '.', '_' and '-' (no path separators, no '..'); at most 100 characters."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise UserError(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-' only "
                        "(no path separators or '..', at most 100 characters)")  # fmt: skip
    return name


def run_path(runs_root: str | Path, name: str) -> Path:
    """``runs_root/name``, refusing any name that could leave ``runs_root``."""
    root = Path(runs_root).resolve()
    path = (root / validate_run_name(name)).resolve()
    if path.parent != root:
        raise UserError(f"run name {name!r} escapes the runs folder")
    return path


def split_run_arg(run: str | Path) -> Path:
    """``--run runs/NAME``: the parent is the runs folder and the last part the validated name."""
    p = Path(run)
    return run_path(p.parent, p.name)


def write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {str(path)!r}: {e}") from e


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one JSON line to metrics.jsonl and fsync it."""
    line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
    with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every complete line of metrics.jsonl (a torn last line after a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def write_status(run_dir: str | Path, state: str, error: str | None = None, **extra) -> None:
    assert state in STATES, state
    write_json(Path(run_dir) / "status.json", {"state": state, "error": error, "time": time.time(), **extra})


def read_status(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "status.json"
    return read_json(path) if path.exists() else None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first, as (N, path)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / CHECKPOINT_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_checkpoint(run_dir: str | Path, step: int, write, keep: int = 3) -> Path:
    """``write(tmp_folder)`` fills a temp folder, which is fsynced and renamed to checkpoints/step-N.

    Older checkpoints beyond the last ``keep`` are removed afterwards.
    """
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{step}."))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
