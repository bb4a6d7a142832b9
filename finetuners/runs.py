"""A training run on disk: ``runs/<name>/`` (PRODUCT.md, "Data the app keeps").

config.json            every setting, the model id and its fingerprint, seeds (written once)
metrics.jsonl          append-only, one JSON object per line, flushed and fsynced
checkpoints/step-N/    adapter (or UNet) + state.pt (optimiser, tracker, RNG); written to a temp folder
                       and renamed, so a folder named step-N is always complete; the last few are kept
samples/               from each evaluation, per step count K: a PNG strip of its first images and a .json of
                       their prompts and, where accuracy is measured, whether each follows its prompt
status.json            {"state": running|stopped|finished|failed, "error": ..., ...}, written atomically
STOP                   created by anyone to ask a running trainer to stop (checkpoint, then "stopped")
launch.json, train.log written by the run manager (``jobs.py``) when the app starts the run: the config it
                       asked for, the process id, and the process's stdout/stderr
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .errors import UserError
from .imageio import atomic_write_bytes, atomic_write_folder
from .names import check_name, child_folder, entries_of_new_folder, is_valid_name, typed_path

STATES = ("running", "stopped", "finished", "failed")
MAX_RUN_NAME = 100
_CKPT = re.compile(r"^step-(\d+)$")
CHECKPOINT_STATE = "state.pt"
LAUNCH_FILES = ("launch.json", "train.log")  # may precede config.json in a new run's folder (``jobs.py``)


def is_launch_file(name: str) -> bool:
    """A file the run manager writes before the trainer starts (or its atomic-write temp file)."""
    return name in LAUNCH_FILES or any(name.startswith(f".{f}.") for f in LAUNCH_FILES)


def validate_run_name(name: str) -> str:
    """Letters, digits, '.', '_' and '-' (no path separators, no '..'); at most 100 characters."""
    return check_name(name, "run", MAX_RUN_NAME)


def valid_run_name(name: str) -> bool:
    return is_valid_name(name, MAX_RUN_NAME)


def run_path(runs_root: str | Path, name: str) -> Path:
    """``runs_root/name``, refusing any name that could leave ``runs_root``."""
    return child_folder(runs_root, name, "run", MAX_RUN_NAME, "runs")


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


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over the pipeline's config files and the sizes of its weight files (cheap, catches swaps)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = p.relative_to(folder).as_posix()
            h.update(rel.encode())
            h.update(p.read_bytes() if p.suffix == ".json" else str(p.stat().st_size).encode())
    return h.hexdigest()


def spec_fingerprint(model: str) -> str:
    """``model_fingerprint`` of a model name's pipeline folder; for ``BASE+LORA``, of BASE's folder and the LoRA
    file's name and size together."""
    import hashlib

    from .models import resolve_lora_file, resolve_model_path, split_model_spec

    found = model_fingerprint(resolve_model_path(model))
    lora = split_model_spec(model)[1]
    if lora is None:
        return found
    file = resolve_lora_file(lora)
    return hashlib.sha256(f"{found}\n{file.name}\n{file.stat().st_size}".encode()).hexdigest()


def new_run_record(run_dir: Path, model: str, **record) -> dict:
    """config.json's content for a new run of ``model`` (its folder and fingerprint added to ``record``);
    ``UserError`` if ``run_dir`` already holds anything but the run manager's launch files."""
    from .models import resolve_model_path

    if not all(is_launch_file(name) for name in entries_of_new_folder(run_dir, "run folder")):
        raise UserError(f"run folder {str(run_dir)!r} already exists and is not empty; "
                        "use --resume to continue it or choose another name")  # fmt: skip
    folder = resolve_model_path(model)
    return {**record, "model_folder": str(folder), "model_fingerprint": spec_fingerprint(model)}


def read_run_record(run_dir: Path) -> dict:
    """config.json of a run to resume; ``UserError`` if there is none."""
    if not (run_dir / "config.json").is_file():
        raise UserError(f"cannot resume {str(run_dir)!r}: no config.json (not a run folder, or corrupt)")
    return read_json(run_dir / "config.json")


def resume_checkpoint(run_dir: Path, model: str, fingerprint: str) -> Path:
    """The newest complete checkpoint of a run whose ``model`` is unchanged since it started (``UserError``
    otherwise)."""
    if spec_fingerprint(model) != fingerprint:
        raise UserError(f"cannot resume {str(run_dir)!r}: the model {model!r} has changed since the run started")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"cannot resume {str(run_dir)!r}: no complete checkpoint")
    return ckpts[-1][1]


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


SAMPLE_IMAGES = 8  # images of an evaluation kept per step count in samples/


def write_samples(run_dir: str | Path, stem: str, images, prompts: list[str], followed=None) -> None:
    """``samples/<stem>.png``, the first ``SAMPLE_IMAGES`` of an evaluation's ``images`` ([n, 3, H, W] in [0, 1])
    side by side at twice their size, and ``samples/<stem>.json``: their ``prompts`` and, where the Shapes probe's
    accuracy is measured, ``followed`` (per image, whether it follows its prompt; null where not measured)."""
    from .imageio import save_png

    samples = Path(run_dir) / "samples"
    samples.mkdir(exist_ok=True)
    n = SAMPLE_IMAGES
    save_png(images[:n], samples / f"{stem}.png", scale=2)
    shown = {"prompts": list(prompts[:n]), "followed": None if followed is None else [bool(f) for f in followed[:n]]}
    atomic_write_bytes(samples / f"{stem}.json", json.dumps(shown).encode())


PHASE_PREFIX = "phase: "  # a trainer's log line naming what it does before its first step (the Fine-tune tab shows it)


def announce_phase(text: str) -> None:
    """Say on stderr, which a launched run's log captures, what the trainer is doing before it starts training."""
    print(PHASE_PREFIX + text, file=sys.stderr, flush=True)


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
    final = atomic_write_folder(Path(run_dir) / "checkpoints" / f"step-{step}", write)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------
# Checkpoints as models: "run:NAME/step-N" in the Sample tab's model list
# ---------------------------------------------------------------------------------------------------
CHECKPOINT_PREFIX = "run:"
_REF = re.compile(r"^run:([^/]+)/step-(\d+)$")
LISTED_STATES = ("finished", "stopped")  # runs whose checkpoints are offered as models


def checkpoint_ref(name: str, step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{name}/step-{step}"


def is_checkpoint_ref(model_id) -> bool:
    return isinstance(model_id, str) and model_id.strip().startswith(CHECKPOINT_PREFIX)


def checkpoint_refs(runs_root: str | Path, states: tuple[str, ...] = LISTED_STATES) -> list[str]:
    """``run:NAME/step-N`` for every complete checkpoint of the runs in ``states``; newest run first, and
    within a run the latest checkpoint first. Unreadable run folders are skipped."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not (p.is_dir() and valid_run_name(p.name) and (p / "config.json").is_file()):
            continue
        try:
            status = read_status(p)
        except UserError:
            continue
        if status and status.get("state") in states:
            steps = [n for n, _ in list_checkpoints(p)]
            found.append((p.stat().st_mtime, p.name, steps))
    return [checkpoint_ref(name, n) for _, name, steps in sorted(found, reverse=True) for n in reversed(steps)]


def resolve_checkpoint(runs_root: str | Path, ref: str) -> tuple[Path, Path]:
    """``run:NAME/step-N`` → (run folder, checkpoint folder); ``UserError`` for a bad or missing reference."""
    m = _REF.match(ref.strip())
    if not m:
        raise UserError(f"{ref!r} is not a checkpoint reference: expected run:NAME/step-N")
    run_dir = run_path(runs_root, m.group(1))
    ckpt = run_dir / "checkpoints" / f"step-{int(m.group(2))}"
    if not run_dir.is_dir():
        raise UserError(f"there is no run named {m.group(1)!r}")
    if not (ckpt / CHECKPOINT_STATE).is_file():
        raise UserError(f"run {m.group(1)!r} has no complete checkpoint step-{int(m.group(2))} (it may have been "
                        "replaced by a newer one): pick another from the list")  # fmt: skip
    return run_dir, ckpt


def load_checkpoint_pipeline(runs_root: str | Path, ref: str, device, dtype=None, loader=None):
    """The run's base pipeline with the checkpoint applied: its LoRA through diffusers' ``load_lora_weights``, or
    its whole UNet. ``loader(model_id, device, dtype)`` loads the base (default ``models.load_model``).
    ``UserError`` if the checkpoint is incomplete or the base model changed since the run was trained."""
    from .models import load_model

    run_dir, ckpt = resolve_checkpoint(runs_root, ref)
    record = read_json(run_dir / "config.json")
    try:
        algo = record["config"]["algo"]
        base, adapter, fingerprint = algo["model"], algo["adapter"], record["model_fingerprint"]
    except (KeyError, TypeError) as e:
        raise UserError(f"run {run_dir.name!r}: config.json is corrupt ({type(e).__name__}: {e})") from e
    if spec_fingerprint(base) != fingerprint:
        raise UserError(f"run {run_dir.name!r} was trained on {base!r}, which has changed since: its checkpoints "
                        "no longer fit it")  # fmt: skip
    pipe = (loader or load_model)(base, device, dtype)
    try:
        if adapter == "lora":
            from .lora import load_lora

            load_lora(pipe, ckpt / "lora", adapter_name="finetuned")
        else:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(ckpt / "unet", use_safetensors=True)
            pipe.register_modules(unet=unet.to(device=pipe.device, dtype=pipe.unet.dtype).eval())
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {ref!r} cannot be loaded: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        ) from e  # fmt: skip
    if (defaults := checkpoint_defaults(algo)) is not None:
        pipe.finetuners_defaults = defaults
    return pipe


def checkpoint_in(path: str | Path) -> tuple[Path, str] | None:
    """A folder that is a run's checkpoint (``runs/NAME/checkpoints/step-N``) or a run (``runs/NAME``: its latest
    complete checkpoint) → (runs folder, ``run:NAME/step-N``); None for any other path. ``UserError`` for a run
    without a complete checkpoint."""
    folder = Path(path)
    if (folder / CHECKPOINT_STATE).is_file() and _CKPT.match(folder.name) and folder.parent.name == "checkpoints":
        run_dir = folder.parent.parent
        return run_dir.parent, checkpoint_ref(run_dir.name, int(_CKPT.match(folder.name).group(1)))
    if (folder / "config.json").is_file() and (folder / "checkpoints").is_dir():
        found = list_checkpoints(folder)
        if not found:
            raise UserError(f"run {str(folder)!r} has no complete checkpoint yet")
        return folder.parent, checkpoint_ref(folder.name, found[-1][0])
    return None


def load_pipeline(model: str, device, dtype=None, *, runs_root: str | Path = "runs", allow_download: bool = False):
    """What the command line's ``--model`` names: a run's checkpoint as ``run:NAME/step-N`` (under ``runs_root``),
    a checkpoint folder, or a run folder (its latest checkpoint), each applied to its run's base model
    (``load_checkpoint_pipeline``); else a pipeline folder, hub id or 'shapes' (``models.load_model``)."""
    from .models import load_model

    if is_checkpoint_ref(model):
        return load_checkpoint_pipeline(runs_root, model, device, dtype)
    folder = typed_path(model, "model path")  # an over-long or NUL-holding name: a message, not an OSError
    if folder.is_dir() and (found := checkpoint_in(folder)) is not None:
        return load_checkpoint_pipeline(found[0], found[1], device, dtype)
    return load_model(model, device, dtype, allow_download=allow_download)


def checkpoint_defaults(algo: dict):
    """The sampler settings a run's checkpoint is meant for (``models.ModelDefaults``): its run's evaluation sampler
    and guidance (fine-tuning trains the conditional prediction, without guidance), at the step count it trained
    (``num_steps``; a run without one, SADM, its first evaluation count). None when the record lacks them (runs of
    earlier versions): the base model's defaults then apply."""
    from .models import ModelDefaults

    try:
        steps = algo["num_steps"] if "num_steps" in algo else list(algo["eval_steps"])[0]
        found = ModelDefaults(str(algo["eval_sampler"]), int(steps), float(algo["eval_guidance"]))
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return found if found.steps >= 1 and found.guidance >= 0 else None
