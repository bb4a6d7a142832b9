"""Training runs as processes of their own: start, stop, resume and list them (the Fine-tune tab's engine).

    manager = RunManager("data/runs")
    manager.start("first", config)   # python -m finetuners train --run data/runs/first --config …/launch.json
    manager.stop("first")            # a STOP file; the trainer checkpoints and exits; terminated after a timeout
    manager.resume("first")          # python -m finetuners train --run data/runs/first --resume
    manager.list()                   # [RunInfo(name, state, error, epoch, …)]

A run trains in a child process (the same CLI a user runs by hand), in a session of its own, with its stdout
and stderr in ``train.log`` inside the run folder. Whatever happens to it — a NaN, an out-of-memory kill, a
segfault — the process that started it (the app) is untouched: it reads the run folder and says what
happened. A process that died without writing an end state (status.json still "running") is reported as
failed, with its exit code where known, and status.json is corrected so that every reader agrees.

Everything that can be checked before a process starts is checked here (name, config, reward, model,
resumability), so that bad input raises ``UserError`` and leaves the runs folder as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import runs
from .errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent  # where ``python -m finetuners`` is importable from
LAUNCH_FILE, LOG_FILE = runs.LAUNCH_FILES
ACTIVE = ("starting", "running", "stopping")  # states of a run whose process is (believed to be) alive
DEFAULT_STOP_TIMEOUT_S = 30.0  # after a Stop, how long the trainer has to checkpoint and exit before SIGTERM
KILL_GRACE_S = 5.0  # after SIGTERM, how long before SIGKILL
LOW_DISK_BYTES = 1 << 20  # a run whose disk has less free space than this died of a full disk, most likely


@dataclass(frozen=True)
class RunInfo:
    """What the runs list and the live view show about one run."""

    name: str
    path: Path
    state: str  # starting | running | stopping | stopped | finished | failed
    error: str | None = None  # in words, for a failed run (or a note on a stopped one)
    epoch: int | None = None  # epochs completed
    num_epochs: int | None = None
    method: str | None = None
    reward: str | None = None
    model: str | None = None
    adapter: str | None = None
    train_sampler: str | None = None  # the training policy's steps: "ddim" or "lcm"
    checkpoints: tuple[int, ...] = ()  # optimiser steps of the complete checkpoints, oldest first
    pid: int | None = None
    config_error: str | None = None  # config.json missing or unreadable (the run cannot be resumed)
    phase: str | None = None  # while starting: what the trainer says it is doing (``runs.announce_phase``)
    prompts: int = 0  # prompts of the run's own list (TrainConfig.prompt_list); 0: the Shapes world's captions

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe(self) -> str:
        """One line in words: "running · epoch 3 of 20", "failed: the loss became nan …"."""
        progress = f"epoch {self.epoch} of {self.num_epochs}" if self.epoch is not None and self.num_epochs else None
        text = " · ".join(x for x in (self.state, progress) if x)
        return f"{text}: {self.error}" if self.error else text


@dataclass
class _Child:
    """A training process this manager started (so its exit code is known)."""

    proc: subprocess.Popen
    started: float  # time.time() at launch
    terminated: bool = False  # we sent SIGTERM/SIGKILL after the stop timeout
    lock: threading.Lock = field(default_factory=threading.Lock)


class RunManager:
    """Runs under one folder (``<data_dir>/runs``). Thread-safe; one instance per app.

    ``python``: the interpreter for the child processes (default: this one). ``env``: extra environment
    variables for them. ``stop_timeout_s``: how long a Stop waits for the trainer before terminating it.
    """

    def __init__(self, runs_root: str | Path, *, python: str | None = None, env: dict[str, str] | None = None,
                 stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S):  # fmt: skip
        self.root = Path(runs_root)
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.stop_timeout_s = stop_timeout_s
        self._children: dict[str, _Child] = {}
        self._lock = threading.Lock()

    # -- actions --------------------------------------------------------------------------------------------
    def start(self, name: str, config) -> RunInfo:
        """Start a new run ``name`` training ``config`` in its own process: a ``TrainConfig`` (``python -m
        finetuners train``) or a ``SADMConfig`` (``python -m finetuners sadm``)."""
        from .models import resolve_model_path
        from .rewards import make_reward

        path = self._path(name)
        if path.exists():
            raise UserError(f"a run named {name!r} already exists: choose another name (or Resume that run)")
        subcommand, stored = _launch_of(config)
        sadm = subcommand != "train"
        resolve_model_path(config.model if sadm else config.algo.model)  # a missing model fails here, not in the child
        if not sadm:
            make_reward(config.algo.reward, "cpu", config.reward_weights)  # a reward without weights fails here too
        with self._lock:
            try:
                path.mkdir(parents=True, exist_ok=False)
            except FileExistsError as e:  # another click won the race for this name
                raise UserError(f"a run named {name!r} already exists: choose another name") from e
            except OSError as e:
                raise UserError(f"cannot create the run folder {str(path)!r}: {e.strerror}") from e
            launch = {"config": stored, "time": time.time(), "resume": False}
            runs.write_json(path / LAUNCH_FILE, launch)
            self._spawn(name, path, [subcommand, "--run", str(path), "--config", str(path / LAUNCH_FILE)], launch)
        return self.info(name)

    def resume(self, name: str) -> RunInfo:
        """Continue a stopped or failed run from its last complete checkpoint, with its stored config."""
        from .sadm import METHOD as SADM
        from .sadm import check_resumable as check_sadm
        from .trainer import check_resumable

        path = self._existing(name)
        info = self.info(name)
        if info.active:
            raise UserError(f"run {name!r} is {info.state}: stop it before resuming")
        if info.state == "finished":
            raise UserError(f"run {name!r} has finished all its epochs: there is nothing to resume")
        sadm = (_read_config(path)[0] or {}).get("method") == SADM
        config = (check_sadm if sadm else check_resumable)(path)  # UserError: corrupt, another model, no checkpoint
        with self._lock:
            (path / "STOP").unlink(missing_ok=True)  # a stale request from before a crash would stop it at once
            subcommand, stored = _launch_of(config)
            launch = {"config": stored, "time": time.time(), "resume": True}
            self._spawn(name, path, [subcommand, "--run", str(path), "--resume"], launch)
        return self.info(name)

    def stop(self, name: str) -> RunInfo:
        """Ask a running trainer to stop (it checkpoints and exits); terminate it if it has not after the timeout."""
        path = self._existing(name)
        info = self.info(name)
        if not info.active:
            raise UserError(f"run {name!r} is not running (it is {info.state})")
        (path / "STOP").touch()
        child = self._children.get(name)
        if child is not None:
            threading.Thread(target=self._enforce_stop, args=(name, child), daemon=True).start()
        elif info.pid is not None:  # started elsewhere (the CLI, or before the app restarted)
            threading.Thread(target=self._enforce_stop_pid, args=(path, info.pid), daemon=True).start()
        return self.info(name)

    def wait(self, name: str, timeout_s: float = 120.0, poll_s: float = 0.1) -> RunInfo:
        """Block until the run is no longer active (for scripts and tests); ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.info(name)
            if not info.active:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {name!r} is still {info.state} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every run this manager started and wait for them (tests; the app leaves runs training)."""
        for name in list(self._children):
            try:
                if self.info(name).active:
                    self.stop(name)
            except UserError:
                pass
        for child in list(self._children.values()):
            try:
                child.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.proc.wait(10)

    # -- reading --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Names of the run folders, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and runs.valid_run_name(p.name) and any((p / f).exists() for f in (
                    "config.json", "status.json", LAUNCH_FILE)):  # fmt: skip
                found.append((p.stat().st_mtime, p.name))
        return [n for _, n in sorted(found, reverse=True)]

    def list(self) -> list[RunInfo]:
        return [self.info(n) for n in self.names()]

    def info(self, name: str) -> RunInfo:
        """The run's state, read from its folder and, for a process that died silently, its exit code."""
        path = self._existing(name)
        config, config_error = _read_config(path)
        try:
            status = runs.read_status(path)
        except UserError:
            status = {"state": "failed", "error": "status.json is unreadable"}
        launch = _read_launch(path)
        state = (status or {}).get("state")
        error = (status or {}).get("error")
        pid = (status or {}).get("pid") if state == "running" else None
        launched_after = launch is not None and launch.get("time", 0) > (status or {}).get("time", 0)
        child = self._children.get(name)
        if launched_after:  # a process was started after the last status (a new run, or a resume)
            config = config or _config_from(launch.get("config"))
            alive, code = self._alive(child, launch.get("pid"))
            if alive:
                state, error, pid = "starting", None, launch.get("pid")
            else:
                status = runs.read_status(path)  # it may have written its state just before exiting
                if status is None or status.get("time", 0) < launch["time"]:
                    state = "failed"
                    error = f"the training process exited before training began ({_exit_words(code)})"
                    error += _log_hint(path)
                else:
                    state, error, pid = status.get("state"), status.get("error"), status.get("pid")
        if state == "running":
            alive, code = self._alive(child, pid)
            if not alive:
                state, error = self._died(path, child, code)
            elif (path / "STOP").exists():
                state = "stopping"
        if state not in runs.STATES and state not in ACTIVE:
            state, error = "failed", f"status.json holds an unknown state {state!r}"
        epoch = _last_epoch(path)
        if epoch is None:
            epoch = (status or {}).get("epoch")
        algo = (config or {}).get("algo", {}) if isinstance(config, dict) else {}
        typed = config.get("prompt_list") if isinstance(config, dict) else None
        return RunInfo(
            name=name, path=path, state=state, error=error, epoch=epoch,
            num_epochs=algo.get("num_epochs", algo.get("epochs")), method=(config or {}).get("method"),
            reward=algo.get("reward", _sadm_objective(algo)), model=algo.get("model"),
            adapter=algo.get("adapter"), train_sampler=algo.get("train_sampler"),
            checkpoints=tuple(n for n, _ in runs.list_checkpoints(path)),
            pid=pid, config_error=config_error, phase=_phase(path) if state == "starting" else None,
            prompts=len(typed) if isinstance(typed, list) else 0,
        )  # fmt: skip

    def metrics(self, name: str) -> list[dict]:
        return runs.read_metrics(self._existing(name))

    def log_tail(self, name: str, lines: int = 20) -> str:
        return _tail(self._existing(name) / LOG_FILE, lines)

    # -- internals ------------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return runs.run_path(self.root, name)

    def _existing(self, name: str) -> Path:
        if not isinstance(name, str) or not name.strip():
            raise UserError("no run chosen: pick one from the runs list")
        path = self._path(name.strip())
        if not path.is_dir():
            raise UserError(f"there is no run named {name!r}")
        return path

    def _spawn(self, name: str, path: Path, command: list[str], launch: dict) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH")) if x)
        argv = [self.python, "-m", "finetuners", *command]
        with open(path / LOG_FILE, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            # its own session: a Ctrl-C or a signal to the app's process group does not reach the trainer
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self._children[name] = _Child(proc, launch["time"])
        runs.write_json(path / LAUNCH_FILE, {**launch, "pid": proc.pid, "command": argv})
        log.info("run %s: started process %d (%s)", name, proc.pid, " ".join(command))

    def _alive(self, child: _Child | None, pid) -> tuple[bool, int | None]:
        """(alive, exit code if known). Our own child is polled (which also reaps it); another pid is probed."""
        if child is not None and (pid is None or child.proc.pid == pid):
            code = child.proc.poll()
            return code is None, code
        if not isinstance(pid, int) or pid <= 0:
            return False, None
        return _pid_alive(pid), None

    def _died(self, path: Path, child: _Child | None, code: int | None) -> tuple[str, str]:
        """A process that left status.json "running": say so, and correct status.json (it cannot write any more)."""
        status = runs.read_status(path) or {}
        if status.get("state") != "running":  # it wrote its end state between our two reads
            return status.get("state", "failed"), status.get("error")
        if child is not None and child.terminated:
            state = "stopped"
            error = (f"the trainer did not stop within {self.stop_timeout_s:g} s and was terminated; "
                     "Resume continues from the last checkpoint")  # fmt: skip
        else:
            state = "failed"
            error = f"the training process exited unexpectedly ({_exit_words(code)})" + _log_hint(path)
            error += _disk_hint(path)
        extra = {k: v for k, v in status.items() if k not in ("state", "error", "time", "pid")}
        try:
            runs.write_status(path, state, error=error, **extra)
            (path / "STOP").unlink(missing_ok=True)
        except OSError as e:  # a full disk: say what happened all the same (status.json is corrected later)
            log.warning("cannot correct %s/status.json: %s", path, e)
        return state, error

    def _enforce_stop(self, name: str, child: _Child) -> None:
        """After a Stop: wait for the process; SIGTERM its group after the timeout, SIGKILL after a grace period."""
        with child.lock:
            try:
                child.proc.wait(self.stop_timeout_s)
                return
            except subprocess.TimeoutExpired:
                pass
            log.warning("run %s: no exit %.0f s after Stop; terminating process %d", name, self.stop_timeout_s,
                        child.proc.pid)  # fmt: skip
            child.terminated = True
            _signal_group(child.proc.pid, signal.SIGTERM)
            try:
                child.proc.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.proc.wait(10)
        try:
            self.info(name)  # records the "stopped" state now rather than at the next look
        except UserError:
            pass

    def _enforce_stop_pid(self, path: Path, pid: int) -> None:
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.2)
        status = runs.read_status(path) or {}
        if status.get("state") == "running" and status.get("pid") == pid:
            _signal_group(pid, signal.SIGTERM)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie counts as dead)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the trainer leads its own session: this reaches its workers too
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _exit_words(code: int | None) -> str:
    if code is None:
        return "exit code unknown: it was not started by this app"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = {"SIGKILL": ", e.g. by the out-of-memory killer", "SIGSEGV": ", a crash"}.get(name, "")
        return f"code {code}: killed by {name}{why}"
    return f"code {code}"


def _phase(path: Path) -> str | None:
    """The newest phase the trainer announced since the log's last launch header, if any."""
    phase = None
    for line in _tail(path / LOG_FILE, 200).splitlines():
        if line.startswith("=== "):
            phase = None
        elif line.startswith(runs.PHASE_PREFIX):
            phase = line[len(runs.PHASE_PREFIX) :].strip() or None
    return phase


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _log_hint(path: Path) -> str:
    """The trainer's own last words from train.log ("error: …"), if it printed any."""
    last = [line.strip() for line in _tail(path / LOG_FILE, 20).splitlines() if line.strip()]
    last = [line for line in last if not line.startswith("===")]  # the manager's own launch headers
    errors = [line for line in last if line.startswith("error:")]
    if errors:
        return f"; it said: {errors[-1].removeprefix('error:').strip()[:300]}"
    return f"; see {LOG_FILE} in the run folder" if last else ""


def _disk_hint(path: Path) -> str:
    """Words for a full disk under the run folder (the trainer's own message may not have fitted in train.log)."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    if free >= LOW_DISK_BYTES:
        return ""
    return (f"; the disk holding the run is full (No space left on device: {free // 1024} kB free): free some space, "
            "then Resume from the last checkpoint")  # fmt: skip


def _last_epoch(path: Path) -> int | None:
    """Epochs completed, from the last lines of metrics.jsonl (status.json holds it only at start and end)."""
    for line in reversed(_tail(path / "metrics.jsonl", 50).splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            return record["epoch"]
    return None


def _read_launch(path: Path) -> dict | None:
    try:
        launch = json.loads((path / LAUNCH_FILE).read_text())
    except (OSError, ValueError):
        return None
    return launch if isinstance(launch, dict) and isinstance(launch.get("time"), int | float) else None


def _launch_of(config) -> tuple[str, dict]:
    """(the ``python -m finetuners`` subcommand that trains ``config``, the config as launch.json stores it)."""
    from .sadm import METHOD as SADM
    from .sadm import SADMConfig

    if isinstance(config, SADMConfig):
        return SADM, {"method": SADM, "algo": config.to_dict()}
    return "train", config.to_dict()


def _sadm_objective(algo: dict) -> str | None:
    """What a SADM run optimises, in words (it has no reward)."""
    if "structure_weight" not in algo:
        return None
    return f"denoising + structure, λ = {algo['structure_weight']:g}" if algo["structure_weight"] else "denoising"


def _config_from(config) -> dict | None:
    return config if isinstance(config, dict) and isinstance(config.get("algo"), dict) else None


def _read_config(path: Path) -> tuple[dict | None, str | None]:
    """(the stored TrainConfig dict, None) or (None, why it is unusable)."""
    if not (path / "config.json").is_file():
        return None, "no config.json"
    try:
        record = json.loads((path / "config.json").read_text())
        config = _config_from(record.get("config") if isinstance(record, dict) else None)
    except (OSError, ValueError) as e:
        return None, f"config.json is unreadable ({e})"
    return (config, None) if config is not None else (None, "config.json holds no training config")


__all__ = ["ACTIVE", "RunInfo", "RunManager"]
