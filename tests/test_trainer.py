"""Rewards registry, LoRA round trip, run folders, the SDPO/DDPO driver and the `train` CLI (fast, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetuners.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _config(model: Path, **over):
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig

    algo = dict(model=str(model), reward="jpeg-compressibility", num_steps=4, sample_batch_size=2,
                num_batches_per_epoch=1, train_batch_size=1, grad_accum=2, num_epochs=2, eval_steps=(1, 2),
                buffer_size=4, min_count=2)  # fmt: skip
    method = over.pop("method", "sdpo")
    outside = ("eval_every", "num_eval_prompts", "checkpoint_every", "prompt_list")  # TrainConfig's, not the algo's
    algo.update({k: over.pop(k) for k in list(over) if k not in outside})
    return TrainConfig(method=method, algo=SDPOConfig.preset("shapes", **algo), num_eval_prompts=2, eval_every=1,
                       **over)  # fmt: skip


# -- rewards --------------------------------------------------------------------------------------
def test_unknown_reward_lists_choices():
    from finetuners.rewards import make_reward

    with pytest.raises(UserError, match="jpeg-compressibility"):
        make_reward("nope")


@pytest.mark.parametrize("name", ["aesthetic", "imagereward", "pickscore", "hpsv2"])
def test_weight_rewards_need_a_local_path(name):
    from finetuners.rewards import REGISTRY, make_reward

    assert REGISTRY[name].needs_weights
    with pytest.raises(UserError, match="not available offline.*--reward-weights PATH"):
        make_reward(name)


def test_reward_flags_and_range_assertion():
    from finetuners.rewards import REGISTRY, make_reward

    assert REGISTRY["shapes-probe"].differentiable and not REGISTRY["jpeg-compressibility"].differentiable
    fn = make_reward("jpeg-compressibility")
    with pytest.raises(AssertionError):
        fn(torch.full((1, 3, 8, 8), 1.5), ["x"], [{}])
    with pytest.raises(AssertionError):
        fn(torch.zeros(1, 3, 8, 8, dtype=torch.float64), ["x"], [{}])


def test_jpeg_reward_monotone_in_noise():
    from finetuners.rewards import make_reward

    g = torch.Generator().manual_seed(0)
    base = torch.full((1, 3, 64, 64), 0.5)
    images = torch.cat([(base + s * (torch.rand(1, 3, 64, 64, generator=g) - 0.5)).clamp(0, 1)
                        for s in (0.0, 0.2, 0.6, 1.0)])  # fmt: skip
    comp, info = make_reward("jpeg-compressibility")(images, ["x"] * 4, [{}] * 4)
    incomp, _ = make_reward("jpeg-incompressibility")(images, ["x"] * 4, [{}] * 4)
    assert comp.dtype == torch.float32 and comp.shape == (4,)
    assert torch.all(info["jpeg_kb"][1:] > info["jpeg_kb"][:-1])  # noisier ⇒ larger file
    assert torch.all(comp[1:] < comp[:-1]) and torch.allclose(incomp, -comp)


# -- LoRA -----------------------------------------------------------------------------------------
def test_lora_round_trip_through_load_lora_weights(random_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    from finetuners.generate import SampleRequest, generate
    from finetuners.lora import LORA_FILE, add_lora, load_lora, lora_state_dict, save_lora
    from finetuners.models import load_model

    torch.manual_seed(0)
    pipe = load_model(str(random_pipeline_dir), "cpu")
    params = add_lora(pipe.unet, rank=4)
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # lora_B starts at 0: make the adapter matter
    save_lora(pipe.unet, tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / LORA_FILE)
    ours = lora_state_dict(pipe.unet)
    assert len(saved) == len(ours) and not any("module." in k for k in saved)
    request = SampleRequest(prompt="a red circle", steps=2, seed=3)
    want = generate(pipe, request).images

    fresh = load_model(str(random_pipeline_dir), "cpu")
    base = generate(fresh, request).images
    load_lora(fresh, tmp_path / "lora")
    got = generate(fresh, request).images
    reloaded = lora_state_dict(fresh.unet)
    for k, v in ours.items():
        assert torch.equal(v.float(), reloaded[k].float()), k
    assert torch.equal(got, want) and not torch.equal(base, want)


# -- runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden", "a" * 101])
def test_run_names_cannot_escape(tmp_path, name):
    from finetuners.runs import run_path

    with pytest.raises(UserError):
        run_path(tmp_path, name)


def test_a_run_folder_that_is_a_file_is_refused_in_words(tmp_path):
    """``train --run FILE`` (and ``sadm``): a message, not the NotADirectoryError of listing it."""
    from finetuners.runs import new_run_record

    file = tmp_path / "taken"
    file.write_text("not a run")
    with pytest.raises(UserError, match="is a file, not a folder"):
        new_run_record(file, "shapes")
    assert file.read_text() == "not a run"


@pytest.mark.parametrize("root", ["x" * 300, "a/" * 2100, "a\x00b"])
def test_a_runs_folder_no_filesystem_call_could_take_is_refused_in_words(tmp_path, root):
    """``--runs`` or ``--run``'s parent, typed: an over-long part or path, or a NUL byte, is a message, not the
    OSError (ENAMETOOLONG) or ValueError its first stat would raise; and so is a short root whose folder, once
    resolved under a deep working folder, would pass the path limit."""
    from finetuners.runs import run_path

    with pytest.raises(UserError, match="runs folder"):
        run_path(root, "fine-name")
    deep = tmp_path / "/".join(["d" * 200] * 19)
    deep = deep / ("d" * (4090 - len(str(deep)) - 1))  # a 4090-byte root: 'fine-name' in it passes 4095
    with pytest.raises(UserError, match="path is too long"):
        run_path(deep, "fine-name")


# -- driver ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sdpo", "ddpo"])
def test_two_epoch_run_writes_the_folder(random_pipeline_dir, tmp_path, method):
    from finetuners.runs import list_checkpoints, read_metrics, read_status
    from finetuners.trainer import train

    run = tmp_path / "runs" / "r"
    seen = []
    status = train(run, _config(random_pipeline_dir, method=method), on_metrics=seen.append)
    assert status["state"] == "finished" and read_status(run)["state"] == "finished"
    stored = json.loads((run / "config.json").read_text())
    assert stored["config"]["method"] == method and stored["config"]["algo"]["seed"] == 42
    assert stored["model_fingerprint"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == read_metrics(run) and len(lines) == len(seen)
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        for key in ("loss", "reward_mean", "reward_std", "grad_norm", "clipfrac", "adv_clipfrac_low",
                    "iterations_per_s", "peak_memory_mb"):  # fmt: skip
            assert key in r and r[key] == r[key], key
    evals = [r for r in lines if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and "eval_reward_k1" in evals[0] and "eval_reward_k2" in evals[0]
    ckpts = list_checkpoints(run)
    assert ckpts and (ckpts[-1][1] / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert any((run / "samples").glob("*.png"))
    assert not list((run / "checkpoints").glob(".*"))  # no temp folders left


def test_each_evaluation_strip_records_its_prompts_and_which_follow_them(tiny_pipeline_dir, tmp_path):
    """samples/epoch-N_kK.json beside each strip: the prompts of its images and, on a Shapes reward, whether each
    follows its prompt; the flags average to the evaluation's accuracy when the strip holds every evaluation image."""
    from dataclasses import replace

    from finetuners.runs import read_metrics
    from finetuners.shapes.world import eval_prompts
    from finetuners.trainer import train

    run = tmp_path / "runs" / "r"
    config = replace(_config(tiny_pipeline_dir, method="ddpo", reward="shapes-probe", num_epochs=1), num_eval_prompts=6)
    assert train(run, config)["state"] == "finished"
    evals = {r["epoch"]: r for r in read_metrics(run) if r["event"] == "eval"}
    for epoch in (0, 1):
        for k in (1, 2):
            shown = json.loads((run / "samples" / f"epoch-{epoch:05d}_k{k}.json").read_text())
            assert shown["prompts"] == eval_prompts(6) and len(shown["followed"]) == 6
            assert sum(shown["followed"]) / 6 == pytest.approx(evals[epoch][f"eval_accuracy_k{k}"])
    jpeg = tmp_path / "runs" / "jpeg"
    assert train(jpeg, _config(tiny_pipeline_dir, num_epochs=1))["state"] == "finished"
    # a JPEG reward: accuracy is measured all the same, since the probe can read the images and prompts
    followed = json.loads((jpeg / "samples" / "epoch-00001_k1.json").read_text())["followed"]
    last = [r for r in read_metrics(jpeg) if r["event"] == "eval"][-1]
    assert len(followed) == 2 and sum(followed) / 2 == pytest.approx(last["eval_accuracy_k1"])
    other = tmp_path / "runs" / "other"  # prompts the probe cannot read: not measured
    assert train(other, _config(tiny_pipeline_dir, num_epochs=1, prompt_list=("a cat",)))["state"] == "finished"
    assert json.loads((other / "samples" / "epoch-00001_k1.json").read_text())["followed"] is None
    assert not any("eval_accuracy_k1" in r for r in read_metrics(other))


def test_a_prompt_list_is_what_a_run_trains_and_evaluates_on(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Training draws every prompt from the list (replayably), each evaluation takes its first prompts (cycled), the
    list is stored with the run and resumes with it; a list the reward or the text encoder cannot read is refused
    before anything is written."""
    import finetuners.trainer as trainer
    from finetuners.runs import read_json

    prompts = ("a photo of a cat", "a lighthouse", "a red circle")  # within the Shapes encoder's 24 tokens
    config = _config(tiny_pipeline_dir, num_epochs=1, prompt_list=prompts)
    assert trainer.evaluation_prompts(config) == list(prompts[:2])  # num_eval_prompts 2
    assert trainer.evaluation_prompts(replace(config, num_eval_prompts=5)) == [*prompts, *prompts[:2]]
    cfg = replace(config.algo, pairs_per_prompt=1)
    drawn = trainer.training_prompts(cfg, epoch=3, batch=1, n=12, prompt_list=prompts)
    assert set(drawn) == set(prompts) and drawn == trainer.training_prompts(cfg, 3, 1, 12, prompt_list=prompts)
    assert not set(trainer.training_prompts(cfg, 3, 1, 12)) & set(prompts[:2])  # without the list: Shapes captions

    seen = []
    real = trainer.training_prompts
    monkeypatch.setattr(trainer, "training_prompts", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    run = tmp_path / "runs" / "listed"
    assert trainer.train(run, config)["state"] == "finished"
    assert seen and {p for batch in seen for p in batch} <= set(prompts)
    assert read_json(run / "config.json")["config"]["prompt_list"] == list(prompts)
    assert trainer.check_resumable(run).prompt_list == prompts
    assert json.loads((run / "samples" / "epoch-00001_k1.json").read_text())["prompts"] == list(prompts[:2])

    for bad, said in [((" a cat",), "without surrounding spaces"), (("",), "non-empty"), (("x" * 1001,), "too long"),
                      (["a cat"], "must be a list of texts"), ((1,), "must be a list of texts")]:  # fmt: skip
        with pytest.raises(UserError, match=said):
            replace(config, prompt_list=bad)
    with pytest.raises(UserError, match="reads Shapes captions only, and 'a photo of a cat' is not one"):
        _config(tiny_pipeline_dir, reward="shapes-probe", prompt_list=prompts)
    assert _config(tiny_pipeline_dir, reward="shapes-probe", prompt_list=prompts[2:]).prompt_list == prompts[2:]
    wordy = tmp_path / "runs" / "wordy"  # 78 tokens and more: the text encoder would cut it off
    with pytest.raises(UserError, match="too long for this model"):
        trainer.train(wordy, replace(config, prompt_list=("a cat" * 40,)))
    assert not wordy.exists()


def test_train_command_takes_a_prompt_file(tiny_pipeline_dir, tmp_path):
    from finetuners.runs import read_json

    file = tmp_path / "prompts.txt"
    file.write_text("\ufeffa photo of a cat\n\n  a lighthouse  \n")  # a BOM, a blank line, spaces: dropped
    run = tmp_path / "runs" / "cli"
    common = ["--model", str(tiny_pipeline_dir), "--reward", "jpeg-compressibility", "--epochs", "1", "--batch", "2",
              "--batches", "1", "--train-batch", "2", "--grad-accum", "1", "--train-steps", "2", "--eval-steps", "1",
              "--eval-prompts", "3"]  # fmt: skip
    r = _cli("train", "--run", str(run), "--prompt-file", str(file), *common, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_json(run / "config.json")["config"]["prompt_list"] == ["a photo of a cat", "a lighthouse"]
    shown = json.loads((run / "samples" / "epoch-00001_k1.json").read_text())
    assert shown["prompts"] == ["a photo of a cat", "a lighthouse", "a photo of a cat"]
    (tmp_path / "empty.txt").write_text("\n \n")
    for name, said in [("empty.txt", "--prompt-file is empty"), ("none.txt", "is not a file")]:
        r = _cli("train", "--run", str(tmp_path / "runs" / "x"), "--prompt-file", str(tmp_path / name), *common)
        assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.parametrize("method", ["sdpo", "ddpo"])
def test_one_minibatch_equals_accumulated_minibatches(random_pipeline_dir, tmp_path, method):
    """4 pairs per optimiser step as one minibatch or as 4 accumulated ones: the same update (the presets run
    one minibatch on CPU, where a small UNet's per-call overhead dominates)."""
    from safetensors.torch import load_file

    from finetuners.lora import LORA_FILE
    from finetuners.runs import list_checkpoints
    from finetuners.trainer import train

    weights = []
    for name, tb, accum in (("acc", 1, 4), ("one", 4, 1)):
        run = tmp_path / name
        config = _config(random_pipeline_dir, method=method, sample_batch_size=4, train_batch_size=tb,
                         grad_accum=accum, num_epochs=1, eval_steps=(1,), checkpoint_every=1)  # fmt: skip
        assert train(run, config)["state"] == "finished"
        weights.append(load_file(list_checkpoints(run)[-1][1] / "lora" / LORA_FILE))
    acc, one = weights
    assert acc.keys() == one.keys() and any("lora.up" in k for k in acc)
    moved = max(float(acc[k].abs().max()) for k in acc if "lora.up" in k)  # B ("up") starts at zero
    assert moved > 2e-4  # the epoch (SDPO 4 AdamW steps, DDPO 1, lr 3e-4) really changed the adapter ...
    for k in acc:  # ... and both batchings changed it the same way, to float noise (which Adam's 1/√v scales up
        # for near-zero gradients: 1.5 % of one step at most, seen 4e-6)
        torch.testing.assert_close(one[k], acc[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["sdpo", "ddpo"])
def test_lcm_steps_train_as_the_policy(random_pipeline_dir, tmp_path, method):
    """An epoch with LCM training steps: K − 1 steps train (the last is deterministic), and the adapter moves."""
    from safetensors.torch import load_file

    from finetuners.lora import LORA_FILE
    from finetuners.runs import list_checkpoints, read_metrics
    from finetuners.trainer import TrainConfig, train

    run = tmp_path / method
    config = _config(random_pipeline_dir, method=method, sample_batch_size=2, train_batch_size=2, grad_accum=1,
                     num_epochs=1, num_steps=3, train_sampler="lcm", eval_sampler="lcm", eval_steps=(2,))  # fmt: skip
    assert config.algo.trained_steps == 2
    assert train(run, config)["state"] == "finished"
    epoch = next(r for r in read_metrics(run) if r.get("event") == "epoch")
    assert epoch["updates"] == (2 if method == "sdpo" else 1) and epoch["grad_norm"] > 0
    weights = load_file(list_checkpoints(run)[-1][1] / "lora" / LORA_FILE)
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora.up" in k) > 1e-5
    with pytest.raises(UserError, match="LCM training steps are for SDPO and DDPO"):
        TrainConfig(method="bptt", algo=config.algo.__class__.preset("shapes", reward="shapes-probe",
                                                                      train_sampler="lcm"))  # fmt: skip


def test_stop_event_checkpoints_and_stops(random_pipeline_dir, tmp_path):
    import threading

    from finetuners.runs import list_checkpoints, read_status
    from finetuners.trainer import train

    run = tmp_path / "run"
    event = threading.Event()

    def on_metrics(rec):
        if rec.get("event") == "epoch":
            event.set()

    status = train(run, _config(random_pipeline_dir, num_epochs=50), stop_event=event, on_metrics=on_metrics)
    assert status["state"] == "stopped" and read_status(run)["state"] == "stopped"
    assert list_checkpoints(run)[-1][0] > 0


def test_nan_loss_fails_the_run(random_pipeline_dir, tmp_path, monkeypatch):
    import finetuners.trainer as trainer_mod
    from finetuners.runs import read_status

    real = trainer_mod.sdpo_minibatch_loss

    def nan_loss(*a, **k):
        loss, info = real(*a, **k)
        return loss * float("nan"), info

    monkeypatch.setattr(trainer_mod, "sdpo_minibatch_loss", nan_loss)
    status = trainer_mod.train(tmp_path / "run", _config(random_pipeline_dir))
    assert status["state"] == "failed" and "nan" in status["error"].lower()
    assert read_status(tmp_path / "run")["error"] == status["error"]


def test_bad_input_is_a_user_error_and_changes_nothing(random_pipeline_dir, tmp_path):
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig, train

    with pytest.raises(UserError, match="unknown reward"):
        _config(random_pipeline_dir, reward="nope")
    with pytest.raises(UserError, match="learning_rate"):
        _config(random_pipeline_dir, learning_rate=5.0)
    with pytest.raises(UserError, match="method"):
        TrainConfig(method="ppo", algo=SDPOConfig.preset("shapes"))
    # One SDPO step trains nothing (its pair's only x̂0 is the same image, test_sdpo.py); DDPO's samples are
    # independent, so one step is a valid DDPO run.
    with pytest.raises(UserError, match="SDPO needs at least 2 training steps"):
        _config(random_pipeline_dir, num_steps=1)
    assert TrainConfig(method="ddpo", algo=SDPOConfig.preset("shapes", num_steps=1)).algo.num_steps == 1
    from finetuners.rlr import RLRConfig

    with pytest.raises(UserError, match="all 0"):
        TrainConfig(method="rlr", algo=SDPOConfig.preset("shapes"), rlr=RLRConfig(c_fo=0, c_ho=0, c_zo=0))

    run = tmp_path / "run"
    train(run, _config(random_pipeline_dir, num_epochs=1))
    before = _tree_digest(run)
    other = tmp_path / "other-model"
    import shutil

    shutil.copytree(random_pipeline_dir, other)
    with pytest.raises(UserError, match="different config"):
        train(run, _config(other, num_epochs=1), resume=True)
    assert _tree_digest(run) == before
    # The same model id whose files changed since the run started.
    cfg = json.loads((other / "unet" / "config.json").read_text())
    cfg["norm_eps"] = 1e-6
    (other / "unet" / "config.json").write_text(json.dumps(cfg))
    run2 = tmp_path / "run2"
    train(run2, _config(other, num_epochs=1))
    cfg["norm_eps"] = 1e-5
    (other / "unet" / "config.json").write_text(json.dumps(cfg))
    before2 = _tree_digest(run2)
    with pytest.raises(UserError, match="changed"):
        train(run2, resume=True)
    assert _tree_digest(run2) == before2
    # Corrupt folders.
    with pytest.raises(UserError, match="already exists"):
        train(run, _config(random_pipeline_dir, num_epochs=1))
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "state.pt").write_bytes(b"garbage")
    before = _tree_digest(run)
    with pytest.raises(UserError, match="corrupt"):
        train(run, resume=True)
    assert _tree_digest(run) == before
    (run / "config.json").write_text("{not json")
    with pytest.raises(UserError):
        train(run, resume=True)
    with pytest.raises(UserError, match="no config.json"):
        train(tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()


# -- CLI ------------------------------------------------------------------------------------------
def _cli(*args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # conftest's: as a user runs it
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "finetuners", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=kw.get("timeout", 120))  # fmt: skip


def test_cli_bad_input_one_line_exit_2(tmp_path):
    for extra, msg in [(["--reward", "nope"], "unknown reward"), (["--lr", "3"], "learning_rate"),
                       (["--epochs", "0"], "num_epochs"), (["--batch", "0"], "sample_batch_size"),
                       (["--train-steps", "1"], "SDPO needs at least 2 training steps")]:  # fmt: skip
        r = _cli("train", "--run", str(tmp_path / "runs" / "x"), *extra)
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("train", "--run", str(tmp_path / "runs" / ".."))
    assert r.returncode == 2 and "invalid run name" in r.stderr
    assert not (tmp_path / "runs" / "x").exists()
    # after diffusers is imported too: its import of transformers' image processors adds no line of its own
    r = _cli("sample", "--prompt", "", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: the prompt is empty: type what the image "
                                                                   "should show"], r.stderr  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_resume_after_sigkill(random_pipeline_dir, tmp_path):
    from finetuners.runs import list_checkpoints, read_metrics, read_status

    run = tmp_path / "runs" / "killed"
    args = ["train", "--run", str(run), "--model", str(random_pipeline_dir), "--reward", "jpeg-compressibility",
            "--epochs", "20", "--batch", "2", "--batches", "1", "--train-batch", "1", "--grad-accum", "2",
            "--train-steps", "4", "--eval-steps", "1", "--eval-every", "100", "--eval-prompts", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetuners", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(list_checkpoints(run)) < 2:
            time.sleep(0.05)
        assert len(list_checkpoints(run)) >= 2, proc.stderr.read().decode() if proc.poll() is not None else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert read_status(run)["state"] == "running"  # killed: nobody wrote an end state
    done = [r["epoch"] for r in read_metrics(run) if r.get("event") == "epoch"]
    last_ckpt, ckpt_dir = list_checkpoints(run)[-1]
    import torch as _torch

    ckpt_epoch = _torch.load(ckpt_dir / "state.pt", weights_only=True)["epoch"]
    assert max(done) - ckpt_epoch <= 1  # checkpoint_every = 1: at most one interval lost
    config_before = (run / "config.json").read_bytes()

    r = _cli("train", "--run", str(run), "--resume", "--epochs", "21")  # a different setting is refused
    assert r.returncode == 2 and "different config" in r.stderr
    r = _cli("train", "--run", str(run), "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_status(run)["state"] == "finished"
    assert (run / "config.json").read_bytes() == config_before
    lines = read_metrics(run)
    resumed = [r for r in lines if r.get("event") == "resumed"]
    assert resumed and resumed[0]["epoch"] == ckpt_epoch and resumed[0]["global_step"] == last_ckpt
    after = [r["epoch"] for r in lines[lines.index(resumed[0]) :] if r.get("event") == "epoch"]
    assert after == list(range(ckpt_epoch + 1, 21))


# -- end to end on the trained Shapes model ----------------------------------------------------------
def _jpeg_sdpo_run(folder: Path, reward: str) -> str:
    """One 60-epoch SDPO run of the test below, in a worker process; returns its end state."""
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig, train

    torch.set_num_threads(1)
    # the minibatching the figures below were measured with: the preset now takes the same update as one minibatch
    # (test_one_minibatch_equals_accumulated_minibatches), which differs only by float rounding, but a 60-epoch run
    # amplifies rounding like a change of seed
    algo = SDPOConfig.preset("shapes", reward=reward, reward_variant="standard", num_epochs=60, eval_steps=(1,),
                             seed=0, train_batch_size=2, grad_accum=4)  # fmt: skip
    config = TrainConfig(algo=algo, eval_every=algo.num_epochs, num_eval_prompts=32, checkpoint_every=10**6)
    return train(folder, config)["state"]


@pytest.mark.slow
def test_short_sdpo_runs_move_jpeg_size_the_way_their_reward_asks(tmp_path):
    """60 SDPO epochs ("shapes" preset: LoRA r 4, lr 3e-4, K_train 2) on the shipped model, from one seed, with
    each sign of the JPEG reward: compressibility lowers the mean 1-step JPEG size of the fixed evaluation
    prompts and seeds, incompressibility raises it (start 0.776 kB). The evaluation is deterministic, so the only
    spread is training's. Measured on seeds 0-8 at 30 epochs: 18 of 18 runs moved the size the rewarded way, by
    0.002-0.044 kB; at 60 epochs the two weakest seeds (4, 6) moved it by 0.014-0.055 kB.

    The probe reward is not used here: over short runs its 1-step change is dominated by seed (K_train 4, 30
    epochs: +4.8 / +1.0 / +2.4 / -0.3 for seeds 0-3; docs/BENCHMARKS.md has the 20-minute runs)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from finetuners.runs import read_metrics

    rewards = {"jpeg-compressibility": -1.0, "jpeg-incompressibility": 1.0}
    # the two runs side by side, one process (and one torch thread) each: the same arithmetic as one after the other
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        states = list(pool.map(_jpeg_sdpo_run, [tmp_path / r for r in rewards], rewards))
    assert states == ["finished", "finished"]
    kb = {}
    for reward, sign in rewards.items():
        evals = [r for r in read_metrics(tmp_path / reward) if r.get("event") == "eval"]
        assert len(evals) == 2  # before the first epoch and after the last
        kb[reward] = [sign * r["eval_reward_k1"] for r in evals]  # JPEG kB before and after
    print(kb)
    (c0, c1), (i0, i1) = kb["jpeg-compressibility"], kb["jpeg-incompressibility"]
    assert c0 == pytest.approx(i0)  # the same start model, prompts and seeds
    assert c1 < c0 - 0.008 and i1 > i0 + 0.008, kb


def test_a_shapes_reward_on_a_model_that_draws_other_images_is_refused_before_anything_is_written(
    random_pipeline_dir, tmp_path, monkeypatch
):
    """The probe pools to its 3×3 grid, so it would score a 512×512 image without error; the run refuses instead."""
    from types import SimpleNamespace

    import finetuners.models
    from finetuners.rewards import check_reward_fits
    from finetuners.trainer import train

    sd = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)), vae_scale_factor=8)
    shapes = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)), vae_scale_factor=4)
    for name in ("shapes-probe", "shapes-accuracy"):
        check_reward_fits(name, shapes)
        with pytest.raises(UserError, match="reads 32×32 Shapes images, and this model draws 512×512"):
            check_reward_fits(name, sd)
    check_reward_fits("jpeg-compressibility", sd)
    monkeypatch.setattr(finetuners.models, "load_model", lambda *a, **k: sd)  # as if the folder held SD 1.x
    with pytest.raises(UserError, match="shapes-probe reads 32×32 Shapes images"):
        train(tmp_path / "run", _config(random_pipeline_dir, reward="shapes-probe", num_epochs=1))
    assert not (tmp_path / "run").exists()
