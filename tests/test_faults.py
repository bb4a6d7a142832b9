"""Faults: a corrupt checkpoint, a pickle where weights belong, a full disk under the runs and labels, and a training
process SIGKILLed again and again at random moments. After each, the app reports in words (a ``UserError``, a failed
run with its reason), nothing already stored is lost, and every checkpoint listed as complete loads.

SIGKILLs of the labelling app (once, and three times with restarts) are in test_label_app.py, single SIGKILLs of a
trainer in test_finetune_tab.py and test_trainer.py; these tests add the corruptions, the disk and the repeated
trainer kills. Runs are tiny (batch 2, K = 2) on the
app-test model, through the same ``python -m finetuners train`` a user or the Fine-tune tab starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetuners.errors import UserError
from finetuners.runs import checkpoint_ref, list_checkpoints, read_metrics, read_status, write_status
from tests.app_process import wait_for
from ui.backend import Backend, Settings

REPO = Path(__file__).resolve().parent.parent
TINY_ARGS = ["--reward", "jpeg-compressibility", "--batch", "2", "--batches", "1", "--train-batch", "1",
             "--grad-accum", "2", "--train-steps", "2", "--eval-steps", "1", "--eval-every", "1000",
             "--eval-prompts", "1"]  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _train(run: Path, *args: str, model: Path | None = None, wait: bool = True, timeout: float = 180, log=None):
    argv = [sys.executable, "-m", "finetuners", "train", "--run", str(run), *args]
    argv += ["--model", str(model), *TINY_ARGS] if model is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log or subprocess.DEVNULL,
                                stderr=log or subprocess.PIPE, start_new_session=True)  # fmt: skip
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _loads(ckpt: Path) -> None:
    """A complete checkpoint: its LoRA (safetensors) and state.pt read back, with tensors of the right kinds."""
    from safetensors.torch import load_file

    lora = load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    assert int(state["global_step"]) == int(ckpt.name.removeprefix("step-")) and "optimizer" in state


def _visible_partials(run: Path) -> list[str]:
    """Folders under checkpoints/ that look like a checkpoint but are not complete ones."""
    folder = run / "checkpoints"
    complete = {p.name for _, p in list_checkpoints(run)}
    return [p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name not in complete]


@pytest.fixture(scope="module")
def finished(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A finished two-epoch LoRA run (checkpoints step-2 and step-4), to be copied and damaged."""
    run = tmp_path_factory.mktemp("runs") / "done"
    r = _train(run, "--epochs", "2", model=tiny_pipeline_dir)
    assert r.returncode == 0, r.stderr
    assert [n for n, _ in list_checkpoints(run)] == [2, 4] and read_status(run)["state"] == "finished"
    return run


def _copy(finished: Path, data: Path, name: str) -> Path:
    run = data / "runs" / name
    shutil.copytree(finished, run)
    return run


def _backend(data: Path, model: Path) -> Backend:
    return Backend(Settings(model=str(model), device="cpu", data_dir=data))


def _pickle_bomb(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is unpickled: proof that it was never unpickled if it is absent."""

    class Bomb:
        def __reduce__(self):
            return open, (str(marker), "w")

    return pickle.dumps(Bomb())


# -- (a) corrupt checkpoints -----------------------------------------------------------------------------------------
def test_a_truncated_checkpoint_is_reported_and_the_others_still_load(finished, tiny_pipeline_dir, tmp_path):
    data = tmp_path / "data"
    run = _copy(finished, data, "torn")
    lora = run / "checkpoints" / "step-4" / "lora" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
    backend = _backend(data, tiny_pipeline_dir)
    before = _digest(run)
    assert backend.checkpoint_choices() == [checkpoint_ref("torn", 4), checkpoint_ref("torn", 2)]

    from ui.sample_tab import on_model_change, run_sample

    with pytest.raises(UserError, match=r"checkpoint 'run:torn/step-4' cannot be loaded"):
        backend.pipeline(checkpoint_ref("torn", 4))
    *_, message = on_model_change(backend, checkpoint_ref("torn", 4))
    assert "Cannot load the model" in message and "cannot be loaded" in message and "Traceback" not in message
    view = run_sample(backend, checkpoint_ref("torn", 2), "a red circle", "", 1, "ddim-trailing", 0.0, 1.0, 0, 1)
    assert len(view.images) == 1  # the earlier checkpoint is untouched and samples

    write_status(run, "stopped")  # resumable: the manager resumes from the last (torn) checkpoint
    before = _digest(run)
    manager = backend.run_manager()
    manager.resume("torn")
    info = manager.wait("torn", timeout_s=120)
    assert info.state == "failed" and "checkpoint" in info.error and "is corrupt" in info.error, info.error
    assert "step-4" in info.error
    after = _digest(run)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == {
        k: v for k, v in before.items() if k.startswith("checkpoints/")}  # fmt: skip
    assert after["config.json"] == before["config.json"] and after["metrics.jsonl"] == before["metrics.jsonl"]


def test_a_garbage_state_or_config_is_reported(finished, tiny_pipeline_dir, tmp_path):
    from finetuners.trainer import train
    from ui.finetune_tab import describe_status

    data = tmp_path / "data"
    run = _copy(finished, data, "garbage")
    (run / "checkpoints" / "step-4" / "state.pt").write_bytes(b"\x80\x04 not a checkpoint")
    write_status(run, "stopped")
    before = _digest(run)
    with pytest.raises(UserError, match=r"checkpoint .*step-4.* is corrupt"):
        train(run, resume=True)
    assert _digest(run) == before  # refused before anything is written

    (run / "config.json").write_text("{ not json")
    backend = _backend(data, tiny_pipeline_dir)
    with pytest.raises(UserError, match="cannot read .*config.json"):
        backend.pipeline(checkpoint_ref("garbage", 2))
    info = backend.run_manager().info("garbage")
    assert info.config_error and "unreadable" in info.config_error
    assert "cannot be resumed" in describe_status(info)
    with pytest.raises(UserError, match="config.json"):
        backend.run_manager().resume("garbage")
    assert _digest(run) == {**before, "config.json": hashlib.sha256(b"{ not json").hexdigest()}


# -- (b) pickles are never loaded ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["bin-only", "pickle-named-safetensors", "state-pt"])
def test_a_pickled_checkpoint_is_refused_and_never_unpickled(finished, tiny_pipeline_dir, tmp_path, where):
    from finetuners.trainer import train

    data = tmp_path / "data"
    run = _copy(finished, data, "pickled")
    marker = tmp_path / "UNPICKLED"
    bomb = _pickle_bomb(marker)
    lora = run / "checkpoints" / "step-4" / "lora"
    if where == "bin-only":
        (lora / "pytorch_lora_weights.safetensors").unlink()
        for name in ("pytorch_lora_weights.bin", "adapter_model.bin", "lora.pt", "lora.ckpt"):
            (lora / name).write_bytes(bomb)
    elif where == "pickle-named-safetensors":
        (lora / "pytorch_lora_weights.safetensors").write_bytes(bomb)
    else:
        (run / "checkpoints" / "step-4" / "state.pt").write_bytes(bomb)
    backend = _backend(data, tiny_pipeline_dir)
    if where != "state-pt":  # the Sample tab reads only the adapter
        with pytest.raises(UserError, match="cannot be loaded"):
            backend.pipeline(checkpoint_ref("pickled", 4))
    write_status(run, "stopped")
    with pytest.raises(UserError, match="is corrupt"):
        train(run, resume=True)  # state.pt through torch.load(weights_only=True): no code runs
    assert not marker.exists()


def test_model_folders_with_only_pickle_weights_are_refused(tiny_pipeline_dir, tmp_path, tiny_clip_dir):
    from finetuners import adadiff as ad
    from finetuners.models import load_model
    from finetuners.preference import ClipFeatures

    marker = tmp_path / "UNPICKLED"
    bomb = _pickle_bomb(marker)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    for f in (pipeline / "unet").glob("*.safetensors"):
        f.unlink()
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(bomb)
    with pytest.raises(UserError, match="could not load .* as a Stable-Diffusion pipeline"):
        load_model(str(pipeline), "cpu")

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    (clip / "model.safetensors").unlink()
    (clip / "pytorch_model.bin").write_bytes(bomb)
    with pytest.raises(UserError, match="found only pickle weights: pytorch_model.bin"):
        ClipFeatures(clip)

    policy = tmp_path / "policy"
    config = ad.AdaDiffConfig(candidates=(1, 2))
    ad.save_policy(policy, ad.StepPolicy(8, config.candidates, config.hidden), config)
    (policy / ad.POLICY_FILE).write_bytes(bomb)
    with pytest.raises(UserError, match="is corrupt"):
        ad.load_policy(policy)
    assert not marker.exists()


# -- (c) a full disk -------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (the kernel refuses writes beyond it with ENOSPC), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the filler's path (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    try:
        with open(disk / "filler-tail", "wb") as f:  # the last partial block
            for _ in range(1 << 16):
                f.write(b"\0")
                f.flush()
    except OSError:
        pass
    return filler


def test_a_full_disk_fails_the_run_in_words_and_keeps_labels_and_checkpoints(small_disk, tiny_pipeline_dir):
    from finetuners.labels import png_bytes
    from ui.finetune_tab import describe_status
    from ui.label_tab import on_label, record_label

    data = small_disk / "data"
    backend = _backend(data, tiny_pipeline_dir)
    store = backend.label_store()
    gen = torch.Generator().manual_seed(0)
    pairs = [store.add_pair(f"a red circle {i}", png_bytes(torch.rand(3, 8, 8, generator=gen)),
                            png_bytes(torch.rand(3, 8, 8, generator=gen)), "m@1", "m@2") for i in range(4)]  # fmt: skip
    record_label(backend, "ann", pairs[0], "left")

    manager = backend.run_manager()
    run = data / "runs" / "filled"
    run.mkdir(parents=True)
    log = open(run / "train.log", "wb")  # as the run manager starts a trainer: its output in the run's train.log
    proc = _train(run, "--epochs", "500", model=tiny_pipeline_dir, wait=False, log=log)
    try:
        wait_for(lambda: len(list_checkpoints(run)) >= 1, 120, "a first checkpoint")
        kept = {p.name: _digest(p) for _, p in list_checkpoints(run)}
        labels_before = store.digest()
        _fill(small_disk)
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    log.close()
    assert code != 0 and "Traceback" not in (run / "train.log").read_text()  # its last words may not fit on the disk
    info = manager.info("filled")  # status.json may still say "running": the process is gone, so it failed
    assert info.state == "failed" and "the disk holding the run is full (No space left on device" in info.error, info
    assert "No space left on device" in describe_status(info)
    assert not _visible_partials(run)
    for _, ckpt in list_checkpoints(run):  # every checkpoint listed as complete loads, the kept ones unchanged
        _loads(ckpt)
        if ckpt.name in kept:
            assert _digest(ckpt) == kept[ckpt.name]
    newest = max(kept, key=lambda name: int(name.removeprefix("step-")))
    assert newest in {p.name for _, p in list_checkpoints(run)} or len(list_checkpoints(run)) == 3

    # labelling on the full disk: each click is acknowledged and stored, or refused in words with nothing stored
    for pair in pairs[1:]:
        before = len(store.labels(include_skips=True))
        *_, error, _ = on_label(backend, "ann", pair, "right")
        after = len(store.labels(include_skips=True))
        if error:
            assert "full" in error and after == before, error
        else:
            assert after == before + 1
    assert store.integrity_check().ok  # every row's images are there
    assert [(lb.pair.id, lb.labeller, lb.choice) for lb in store.labels() if lb.pair.id == pairs[0]] == [
        (pairs[0], "ann", "left")]  # the label from before the disk filled  # fmt: skip
    refused = [p for p in pairs[1:] if not any(lb.pair.id == p for lb in store.labels())]

    for filler in small_disk.glob("filler*"):  # space again: the refused clicks go through
        filler.unlink()
    for pair in refused:
        assert record_label(backend, "ann", pair, "tie").status.startswith("✓ Saved label")
    assert {lb.pair.id: lb.choice for lb in store.labels()}[pairs[0]] == "left" and store.digest() != labels_before
    assert len(store.labels()) == len(pairs)
    store.close()


# -- (d) SIGKILL again and again -------------------------------------------------------------------------------------
def test_repeated_sigkill_at_random_moments_keeps_every_checkpoint_loadable(tiny_pipeline_dir, tmp_path):
    """Four kills at seeded random moments (while loading, sampling, training or writing a checkpoint), each followed
    by a resume; then a resume to the end. Every complete checkpoint loads after every kill; the epochs after the
    last resume follow on from its checkpoint."""
    rng = random.Random(20240609)
    run = tmp_path / "runs" / "killed"
    epochs = 60  # long enough that no kill round (≤ 2.5 s of training) can reach the end
    for i in range(4):
        args = ["--epochs", str(epochs)] if i == 0 else ["--resume"]
        have = len(list_checkpoints(run)) if run.exists() else 0
        proc = _train(run, *args, model=tiny_pipeline_dir if i == 0 else None, wait=False)
        try:
            if i == 0:  # the first kill must leave a checkpoint to resume from
                wait_for(lambda have=have: len(list_checkpoints(run)) > have, 120, "a first checkpoint")
            else:
                wait_for(lambda p=proc: (read_status(run) or {}).get("pid") == p.pid, 120, "the resumed trainer")
            time.sleep(rng.uniform(0.0, 2.5))
            assert proc.poll() is None, proc.stderr.read().decode()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        ckpts = list_checkpoints(run)
        assert ckpts and not _visible_partials(run)
        for _, ckpt in ckpts:
            _loads(ckpt)
        assert read_status(run)["state"] == "running"  # killed: nobody wrote an end state

    backend = _backend(tmp_path, tiny_pipeline_dir)
    last, _ = list_checkpoints(run)[-1]
    write_status(run, "stopped")  # listed in the Sample tab: the latest checkpoint samples
    from ui.sample_tab import run_sample

    view = run_sample(backend, checkpoint_ref("killed", last), "a red circle", "", 1, "ddim-trailing", 0.0, 1.0, 0, 1)
    assert len(view.images) == 1

    r = _train(run, "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_status(run)["state"] == "finished"
    lines = read_metrics(run)
    resumed = [x for x in lines if x.get("event") == "resumed"]
    assert 3 <= len(resumed) <= 4  # one per resume that got past loading its checkpoint (a kill may precede one)
    after = [x["epoch"] for x in lines[lines.index(resumed[-1]) :] if x.get("event") == "epoch"]
    assert after == list(range(resumed[-1]["epoch"] + 1, epochs + 1))
    assert json.loads((run / "config.json").read_text())["config"]["algo"]["num_epochs"] == epochs
