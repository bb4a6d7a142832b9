"""The Fine-tune tab without a browser: its handlers, the run manager (training in processes of its own), what the
tab shows when a training process dies or diverges, and fine-tuned checkpoints offered in the Sample tab.

Runs are tiny (batch 2, K = 2, two evaluation prompts) on the app-test model; each process costs ~5 s to start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from finetuners.errors import UserError
from finetuners.jobs import RunManager
from finetuners.runs import list_checkpoints, read_metrics, read_status
from finetuners.shapes.world import eval_prompts
from tests.app_process import wait_for
from ui.backend import Backend, Settings
from ui.finetune_tab import (
    CONFIG_FIELDS,
    CURVES,
    METHOD_STEPS,
    METHODS,
    NO_RUN_NOTE,
    SHEET_GAP,
    curve_figure,
    make_config,
    method_steps,
    on_refresh,
    on_resume,
    on_start,
    on_stop,
    resume_run,
    run_view,
    sheet_bar,
    sheet_header,
    start_run,
    stop_run,
)

TINY = dict(method="SDPO", reward="jpeg-compressibility", learning_rate=3e-4, batch=2, epochs=2, train_steps=2,
            eval_steps=[1, 2], adapter="LoRA", lora_rank=2, batches_per_epoch=1, eval_prompts=2,
            eval_every=1)  # fmt: skip


def _tree_digest(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def backend(tiny_pipeline_dir, tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the training processes inherit it: 2 cores, tests in parallel
    b = Backend(Settings(model=str(tiny_pipeline_dir), device="cpu", data_dir=tmp_path_factory.mktemp("data")))
    yield b
    b.run_manager().shutdown()


@pytest.fixture(scope="module")
def finished_run(backend):
    """A finished two-epoch LoRA run (checkpoints after each epoch)."""
    info = start_run(backend, "finished-lora", **TINY)
    assert info.state == "starting" and (info.path / "launch.json").is_file()
    done = backend.run_manager().wait("finished-lora", timeout_s=120)
    assert done.state == "finished", backend.run_manager().log_tail("finished-lora")
    return done


# -- bad input: a clear message, nothing written -------------------------------------------------------------------
BAD_START = [
    (dict(reward="nope"), "unknown reward 'nope'"),
    (dict(reward="aesthetic"), "needs weights that are not on this machine"),
    (dict(reward="pickscore", weights="/no/such/folder"), "does not exist"),
    (dict(reward=""), "no reward chosen"),
    (dict(learning_rate=0), "learning rate must be above 0 and at most 1, got 0"),
    (dict(learning_rate=5.0), "learning rate must be above 0 and at most 1, got 5.0"),
    (dict(learning_rate=-1e-4), "learning rate must be above 0 and at most 1"),
    (dict(learning_rate=None), "learning rate is empty"),
    (dict(learning_rate=float("nan")), "learning rate must be a finite number"),
    (dict(batch=0), "batch must be from 1 to 64, got 0"),
    (dict(batch=65), "batch must be from 1 to 64, got 65"),
    (dict(batch=2.5), "batch must be a whole number"),
    (dict(epochs=0), "epochs must be from 1"),
    (dict(train_steps=0), "train steps K must be from 1"),
    (dict(train_steps=1), "SDPO needs at least 2 training steps"),
    (dict(lora_rank=0), "LoRA rank must be from 1"),
    (dict(eval_steps=[]), "no evaluation step counts chosen"),
    (dict(method="PPO"), "unknown method 'PPO'"),
    (dict(adapter="DoRA"), "unknown adapter 'DoRA'"),
    (dict(method="RLR"), "RLR backpropagates through the reward, and 'jpeg-compressibility' is not differentiable"),
    (dict(method="Full backprop"), "BPTT backpropagates through the reward"),
    (dict(method="RLR", reward="shapes-probe", s_nu=0), "ZO perturbation std must be above 0"),
    (dict(method="RLR", reward="shapes-probe", rlr_h=-1), "RLR h must be from 0 to 1000"),
    (dict(method="RLR", reward="shapes-probe", zo_mode="sometimes"), "unknown ZO mode 'sometimes'"),
    (dict(reward="shapes-probe", prompts="a red circle\na photo of a cat"), "reads Shapes captions only"),
    (dict(prompts="a cat" * 40), "too long for this model: 161 tokens, at most 24"),
    (dict(prompts="x" * 1001), "the prompt is too long"),
    (dict(prompts=7), "the prompts must be text, one per line"),
    (dict(method="SADM-style", prompts="a red circle"), "clear the prompts"),
]


@pytest.mark.parametrize(
    "change, message",
    BAD_START,
    ids=[",".join(f"{k}={v!r}" for k, v in c.items() if k != "weights")[:40] for c, _ in BAD_START],
)
def test_bad_settings_are_refused_and_write_nothing(backend, change, message):
    root = backend.runs_root
    before = _tree_digest(root)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        start_run(backend, "bad-settings", **{**TINY, **change})
    assert _tree_digest(root) == before and not (root / "bad-settings").exists()


def test_typed_prompts_reach_the_run_config(backend):
    """One prompt a line, blank lines and surrounding spaces dropped, repeats kept (they weigh the draw); none: the
    Shapes world's captions."""
    config = make_config(backend, **{**TINY, "prompts": "a photo of a cat\n\n  a red circle \na photo of a cat\n"})
    assert config.prompt_list == ("a photo of a cat", "a red circle", "a photo of a cat")
    assert make_config(backend, **{**TINY, "prompts": " \n"}).prompt_list == ()
    assert make_config(backend, **TINY).prompt_list == ()


def test_rlr_settings_reach_the_run_config(backend):
    config = make_config(backend, **{**TINY, "method": "RLR", "reward": "shapes-probe", "rlr_h": 1, "zo_mode": "SPSA",
                                     "s_nu": 0.01, "truncation": 3})  # fmt: skip
    assert config.method == "rlr" and config.rlr.h == 1 and config.rlr.zo_mode == "spsa"
    assert config.rlr.s_nu == 0.01 and config.rlr.truncation == 3
    assert make_config(backend, **{**TINY, "method": "DRaFT-K", "reward": "shapes-probe"}).method == "draft"


def test_picking_a_method_sets_its_train_steps_and_the_form_then_starts(backend):
    """SDPO and DDPO train 8-step trajectories, the methods that backpropagate the reward 2 (the CLI's default); SADM
    samples none and keeps what the form shows. Each method's K is a valid start with the rest of the form."""
    assert [method_steps(m, 5) for m in METHODS] == [8, 8, 2, 2, 2, 5]
    assert set(METHOD_STEPS) == set(METHODS) - {"SADM-style"}
    for method, k in METHOD_STEPS.items():
        config = make_config(backend, **{**TINY, "method": method, "reward": "shapes-probe", "train_steps": k})
        assert (config.method, config.algo.num_steps) == (METHODS[method], k)


def test_a_shapes_reward_for_a_model_that_draws_other_images_is_refused(backend, monkeypatch):
    pipe = backend.pipeline(backend.settings.model)
    assert make_config(backend, **{**TINY, "reward": "shapes-probe"}).algo.reward == "shapes-probe"
    monkeypatch.setattr(pipe, "vae_scale_factor", 64)  # as if the model drew 512×512 images from its 8×8 latents
    with pytest.raises(UserError, match="shapes-probe reads 32×32 Shapes images, and this model draws 512×512"):
        make_config(backend, **{**TINY, "reward": "shapes-probe"})
    assert make_config(backend, **TINY).algo.reward == "jpeg-compressibility"


def test_trajectory_length_picks_the_step_weighting(backend):
    short, long = (make_config(backend, **{**TINY, "train_steps": k}).algo for k in (2, 8))
    assert (short.num_steps, short.lam) == (2, 0.1) and (long.num_steps, long.lam) == (8, 0.99)


def test_a_small_unet_trains_each_update_as_one_minibatch(backend, monkeypatch):
    """Same pairs per optimiser step either way; a small UNet (the Shapes one) takes them in one minibatch (its
    per-call overhead, not memory, bounds the time), a large one two pairs at a time, accumulated."""
    import finetuners.models
    import ui.finetune_tab as tab

    for b in (16, 6, 3):
        tiny = make_config(backend, **{**TINY, "batch": b}).algo
        with monkeypatch.context() as m:
            m.setattr(finetuners.models, "SMALL_UNET_PARAMS", 0)  # as if the UNet were large
            other = make_config(backend, **{**TINY, "batch": b}).algo
        assert tiny.grad_accum == 1 and tiny.train_batch_size == other.train_batch_size * other.grad_accum
        assert other.train_batch_size <= 2 and tiny.updates_per_epoch == other.updates_per_epoch
    assert tab.default_eval_prompts(backend) == 32  # and evaluates more prompts by default
    monkeypatch.setattr(finetuners.models, "SMALL_UNET_PARAMS", 0)
    assert tab.default_eval_prompts(backend) == 8


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "x" * 101, "with space"])
def test_bad_run_names_are_refused(backend, name, tmp_path):
    root = backend.runs_root
    before = _tree_digest(root.parent)
    with pytest.raises(UserError, match="invalid run name"):
        start_run(backend, name, **TINY)
    assert _tree_digest(root.parent) == before
    assert not (root.parent / "escape").exists()


def test_the_gradio_handler_shows_the_message_and_selects_nothing(tiny_pipeline_dir, tmp_path):
    # a backend of its own: the empty page it checks needs a runs folder that no other test has written to
    backend = Backend(Settings(model=str(tiny_pipeline_dir), device="cpu", data_dir=tmp_path / "data"))
    rlr = dict(rlr_h=2, zo_mode="likelihood ratio", s_nu=1e-3, truncation=1, structure_weight=0.1, domain="shapes",
               init="fine-tune the model's UNet", prompts="")  # fmt: skip
    values = [{**TINY, **rlr, "weights": "", "seed": 42, "learning_rate": 7.0}[k] for k in CONFIG_FIELDS]
    error, picker, name = on_start(backend, "from-the-ui", *values)
    assert "Cannot start" in error and "learning rate must be above 0 and at most 1, got 7.0" in error
    assert "Traceback" not in error and not (backend.runs_root / "from-the-ui").exists()
    message = on_stop(backend, "no-such-run")
    assert "there is no run named 'no-such-run'" in message
    message = on_resume(backend, "")
    assert "no run chosen" in message
    status, _, _, *curves, samples, prompts, shown = on_refresh(backend, None, None)
    assert "No run selected" in status and samples is None and prompts == ""
    # each curve's frame, titled and empty, says how to fill it; the next tick sends nothing again
    assert [f.layout.title.text for f in curves] == [CURVES[p][0] for p in CURVES]
    assert all(not any(t.x for t in f.data) and f.layout.annotations[0].text == NO_RUN_NOTE for f in curves)
    assert list(on_refresh(backend, None, shown)[3:-1]) == [gr.skip()] * (len(CURVES) + 2)


def test_start_refuses_a_name_that_exists(backend, finished_run):
    before = _tree_digest(finished_run.path)
    with pytest.raises(UserError, match="a run named 'finished-lora' already exists"):
        start_run(backend, "finished-lora", **TINY)
    assert _tree_digest(finished_run.path) == before


def test_resume_refuses_a_corrupt_or_foreign_run(backend, finished_run):
    import shutil

    root = backend.runs_root
    with pytest.raises(UserError, match="has finished all its epochs"):
        resume_run(backend, "finished-lora")
    for case in ("bad-json", "bad-config", "other-model", "no-checkpoint"):
        folder = root / case
        shutil.copytree(finished_run.path, folder)
        runs_state = json.loads((folder / "status.json").read_text())
        runs_state["state"] = "stopped"  # a resumable-looking run ...
        (folder / "status.json").write_text(json.dumps(runs_state))
        record = json.loads((folder / "config.json").read_text())
        if case == "bad-json":  # ... whose config.json is not JSON
            (folder / "config.json").write_text("{not json")
        elif case == "bad-config":  # ... holds a setting out of range
            record["config"]["algo"]["learning_rate"] = 50.0
            (folder / "config.json").write_text(json.dumps(record))
        elif case == "other-model":  # ... was trained on another model (fingerprint mismatch)
            record["model_fingerprint"] = "0" * 64
            (folder / "config.json").write_text(json.dumps(record))
        else:
            shutil.rmtree(folder / "checkpoints")
    expected = {"bad-json": "cannot read", "bad-config": "config.json is corrupt.*learning_rate",
                "other-model": "has changed since the run started",
                "no-checkpoint": "no complete checkpoint"}  # fmt: skip
    for case, message in expected.items():
        before = _tree_digest(root / case)
        with pytest.raises(UserError, match=message):
            resume_run(backend, case)
        shown = on_resume(backend, case)
        assert "Cannot resume" in shown and "Traceback" not in shown
        assert _tree_digest(root / case) == before, case
    view = run_view(backend, "bad-json")
    assert "cannot be resumed" in view.status


# -- a finished run: folder, live view, checkpoints in the Sample tab ---------------------------------------------
def test_a_finished_run_shows_curves_samples_and_status(backend, finished_run):
    assert finished_run.epoch == 2 and finished_run.checkpoints and finished_run.method == "sdpo"
    log = (finished_run.path / "train.log").read_text()
    assert "--config" in log and "finished" in log
    view = run_view(backend, "finished-lora")
    assert "finished-lora: finished" in view.status and "epoch 2 of 2" in view.status
    reward = view.figures["reward"]
    assert [t.name for t in reward.data] == ["1 step", "2 steps"]
    assert list(reward.data[0].x) == [0, 1, 2] and view.points == 3  # evaluations before and after each epoch
    evals = [r for r in read_metrics(finished_run.path) if r["event"] == "eval"]
    assert list(reward.data[1].y) == [r["eval_reward_k2"] for r in evals]
    first, second = reward.data  # a later line is drawn inside an earlier one it may cover, in another dash
    assert first.marker.size > second.marker.size and first.line.width > second.line.width
    assert first.line.dash != second.line.dash
    for plot in ("loss", "grad_norm", "memory", "speed"):
        assert list(view.figures[plot].data[0].x) == [1, 2], plot
    accuracy = view.figures["accuracy"]  # a JPEG reward on Shapes captions: the probe's accuracy all the same
    assert list(accuracy.data[1].y) == [r["eval_accuracy_k2"] for r in evals]
    strips = [Image.open(finished_run.path / "samples" / f"epoch-00002_k{k}.png").convert("RGB") for k in (1, 2)]
    sheet = view.samples  # under a header, the two strips stacked, 1 step on top, each whole, names in a margin
    margin, header = sheet.width - strips[0].width, sheet_header(strips[0].height)
    bar = sheet_bar(strips[0].height)  # under each strip its followed / not bars (accuracy is measured)
    body = header + 2 * (strips[0].height + bar) + SHEET_GAP  # and under them a footer as high: column numbers
    assert margin > 0 and sheet.height == body + header
    for i, strip in enumerate(strips):
        top = header + i * (strip.height + bar + SHEET_GAP)
        assert sheet.crop((margin, top, sheet.width, top + strip.height)).tobytes() == strip.tobytes()
        assert len(set(sheet.crop((0, top, margin, top + strip.height)).getdata())) > 1  # the row's name is drawn
    assert len(set(sheet.crop((0, 0, sheet.width, header)).getdata())) > 1  # and the evaluation's, above
    tile = strips[0].width // 2  # two evaluation prompts: a number drawn under each image's centre, none between
    inks = [len(set(sheet.crop((margin + x - 4, body, margin + x + 4, sheet.height)).getdata())) for x in (tile // 2,
            tile, tile + tile // 2)]  # fmt: skip
    assert inks[0] > 1 and inks[1] == 1 and inks[2] > 1, inks
    assert view.prompts == "Prompts by column: " + " · ".join(f"**{i}** {p}" for i, p in enumerate(eval_prompts(2), 1))
    assert run_view(backend, "finished-lora", view.key) is None  # nothing changed: nothing re-sent
    status, table, picker, *rest = on_refresh(backend, "finished-lora", None)
    rows = {r[0]: r for r in table["value"]}
    assert rows["finished-lora"][1] == "finished" and rows["finished-lora"][4] == "2/2"
    assert picker["value"] == "finished-lora" and "finished-lora" in picker["choices"]
    assert status == view.status and len(rest) == len(CURVES) + 3
    again = on_refresh(backend, "finished-lora", rest[-1])  # the next tick: nothing changed, nothing sent
    assert all(isinstance(u, dict) and u.get("__type__") == "update" and len(u) == 1 for u in again[:-1]), again


def test_the_sample_sheet_marks_the_images_that_follow_their_prompts(tmp_path):
    """A green bar under an image that follows its prompt, a red one under one that does not, read from the
    trainer's .json beside the strip; a strip without one keeps its rows as they were, and a broken one is ignored."""
    from ui.finetune_tab import FOLLOWED_COLOURS, sample_sheet, strip_notes

    strip = Image.new("RGB", (4 * 64, 64), "black")  # four 64-px images
    path = tmp_path / "epoch-00003_k1.png"
    strip.save(path)
    path.with_suffix(".json").write_text(json.dumps({"prompts": ["a"] * 4, "followed": [True, False, False, True]}))
    prompts, followed = strip_notes(path)
    assert prompts == ["a"] * 4 and followed == [True, False, False, True]
    sheet = sample_sheet("epoch 3", [("1 step", strip, followed)])
    bar, header = sheet_bar(64), sheet_header(64)
    assert sheet.height == header + 64 + bar
    margin, y = sheet.width - strip.width, header + 64 + bar // 2
    colours = [sheet.getpixel((margin + 64 * j + 32, y)) for j in range(4)]
    assert colours == [ImageColor.getrgb(FOLLOWED_COLOURS[f]) for f in followed]
    assert sheet.crop((margin, header, sheet.width, header + 64)).tobytes() == strip.tobytes()  # the images untouched
    path.with_suffix(".json").write_text("{ not json")
    assert strip_notes(path) == (None, None) and strip_notes(tmp_path / "none.png") == (None, None)
    assert sample_sheet("epoch 3", [("1 step", strip, None)]).height == header + 64


def test_the_sheet_shows_the_newest_whole_evaluation(tmp_path):
    """While an evaluation is writing its strips (1 step, then 2…), the sheet keeps the previous one whole."""
    from ui.finetune_tab import latest_samples

    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("epoch-00001_k1", "epoch-00001_k2", "epoch-00002_k1", "epoch-00002_k2", "epoch-00003_k1"):
        Image.new("RGB", (8, 8)).save(samples / f"{name}.png")
    (samples / "epoch-00004_k1.json").write_text("{}")  # not a strip
    when, strips = latest_samples(tmp_path)
    assert when == "epoch 2" and [(p.name, k) for p, k in strips] == [(f"epoch-00002_k{k}.png", k) for k in (1, 2)]
    Image.new("RGB", (8, 8)).save(samples / "epoch-00003_k2.png")
    assert latest_samples(tmp_path)[0] == "epoch 3"
    assert latest_samples(tmp_path / "none") == (None, [])


def test_checkpoints_are_models_in_the_sample_tab(backend, finished_run, tiny_pipeline_dir):
    from finetuners.generate import SampleRequest

    choices = backend.model_choices()
    steps = [n for n, _ in list_checkpoints(finished_run.path)]
    refs = [f"run:finished-lora/step-{n}" for n in reversed(steps)]
    assert choices[0] == str(tiny_pipeline_dir) and all(r in choices for r in refs)
    request = SampleRequest(prompt="a red circle above a blue square", steps=2, seed=7, sampler="ddim")
    base = backend.generate(str(tiny_pipeline_dir), request).images
    tuned = backend.generate(refs[0], request).images
    again = backend.generate(refs[0], request).images
    assert base.shape == tuned.shape and torch.equal(tuned, again)
    assert (tuned - base).abs().max() > 1e-4  # the LoRA changes the images at the same seed
    pipe = backend.pipeline(refs[0])
    assert "finetuned" in pipe.unet.peft_config  # loaded by diffusers' load_lora_weights
    locked = Backend(Settings(model=str(tiny_pipeline_dir), device="cpu", data_dir=backend.settings.data_dir,
                              custom_models=False))  # fmt: skip
    assert locked.check_model(refs[0]) == refs[0]
    for bad, message in [("run:../step-1", "invalid run name"), ("run:finished-lora/step-999", "no complete"),
                         ("run:finished-lora", "not a checkpoint reference")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            backend.pipeline(bad)


def test_the_sample_tab_puts_base_and_checkpoint_side_by_side(backend, finished_run, tiny_pipeline_dir):
    """Compare with: each seed's base image, then the checkpoint's, made by the very same request as each model
    alone would make them; strips and timings for both. Comparing a model with itself, or with a missing
    checkpoint, is refused in words and changes nothing shown."""
    from ui.sample_tab import on_generate, run_sample

    base, ref = str(tiny_pipeline_dir), f"run:finished-lora/step-{list_checkpoints(finished_run.path)[-1][0]}"
    args = ("a red circle above a blue square", "", 2, "ddim", 0.0, 1.0, 7, 3)
    both = run_sample(backend, base, *args, compare=ref)
    alone, tuned = run_sample(backend, base, *args), run_sample(backend, ref, *args)
    assert both.compared and not alone.compared and len(both.images) == 6
    for i in range(3):
        (a, caption_a), (b, caption_b) = both.images[2 * i : 2 * i + 2]
        assert (caption_a, caption_b) == (f"A · {alone.images[i][1]}", f"B · {tuned.images[i][1]}")
        assert caption_a.startswith(f"A · seed {7 + i} · ")  # then ✓ or ✗: what the Shapes probe reads
        assert a.tobytes() == alone.images[i][0].tobytes() and b.tobytes() == tuned.images[i][0].tobytes()
    assert any(x[0].tobytes() != y[0].tobytes() for x, y in zip(alone.images, tuned.images))  # the pairs differ
    assert [label.split(" · ")[0] for label, _ in both.strips] == ["A", "B", "A", "B"]
    assert both.info.startswith(f"**A** = `{base}`: ") and f"  \n**B** = `{ref}`: " in both.info
    a, b = (sum(c.endswith(" · ✓") for _, c in view.images) for view in (alone, tuned))
    assert both.info.endswith(f"Shapes probe, the prompt followed: **A {a} of 3** · **B {b} of 3**")
    gallery, *_ = on_generate(backend, base, *args, compare=ref)
    assert gallery["columns"] == 4  # two pairs per row: each pair stays on one row
    with pytest.raises(UserError, match="already the model"):
        run_sample(backend, base, *args, compare=base)
    for bad, message in [(base, "already the model"), ("run:finished-lora/step-999", "no complete checkpoint")]:
        gallery, strip, info, error, state = on_generate(backend, base, *args, compare=bad)
        assert message in error and all(u == gr.skip() for u in (gallery, strip, info, state)), error


def test_a_checkpoint_samples_as_its_run_evaluated_it(backend, finished_run, tiny_pipeline_dir):
    """Fine-tuning trains the conditional prediction (no guidance): a checkpoint's defaults in every tab are its run's
    evaluation sampler and guidance, at the step count it trained, not the base model's."""
    from finetuners.runs import read_json
    from ui.sample_tab import defaults_for

    algo = read_json(finished_run.path / "config.json")["config"]["algo"]
    ref = f"run:finished-lora/step-{list_checkpoints(finished_run.path)[-1][0]}"
    d, base = backend.defaults(ref), backend.defaults(str(tiny_pipeline_dir))
    assert (d.sampler, d.steps, d.guidance) == (algo["eval_sampler"], algo["num_steps"], algo["eval_guidance"])
    assert (d.sampler, d.steps) == ("ddim-trailing", 2) and d.guidance <= 1 < base.guidance
    assert defaults_for(backend, ref) == (2, "ddim-trailing", d.guidance)  # the Sample tab's form follows it
    assert backend.defaults(str(tiny_pipeline_dir)) == base  # the base model's own are untouched
    # still a model of its base's family: superposed with the base model (SuperDiff refuses few-step families)
    from finetuners.superdiff import MIN_SD_STEPS, SuperDiffConfig, superpose_models

    config = SuperDiffConfig(mode="or", steps=MIN_SD_STEPS, guidance=1.0)
    pipes = backend.pipeline(str(tiny_pipeline_dir)), backend.pipeline(ref)
    result = superpose_models(*pipes, "a red circle", config, seed=0)
    assert result.images.shape[0] == 1 and torch.isfinite(result.images).all()


def test_the_cli_samples_a_checkpoint_as_the_app_does(backend, finished_run, tiny_pipeline_dir, tmp_path, capsys):
    """``--model`` takes a run folder (its latest checkpoint), a checkpoint folder, or run:NAME/step-N with --runs;
    each gives the app's image for the same request, at the checkpoint's defaults. A run without a checkpoint, or a
    reference to a missing one, is refused in one line."""
    from finetuners.__main__ import main
    from finetuners.generate import SampleRequest

    step = list_checkpoints(finished_run.path)[-1][0]
    ref = f"run:finished-lora/step-{step}"
    d = backend.defaults(ref)
    want = backend.generate(ref, SampleRequest(prompt="a red circle", steps=d.steps, sampler=d.sampler,
                                               guidance=d.guidance, seed=5)).images[0]  # fmt: skip
    as_png = np.asarray((want.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8))
    ckpt = finished_run.path / "checkpoints" / f"step-{step}"
    for i, model in enumerate([str(finished_run.path), str(ckpt), ref]):
        out = tmp_path / f"out{i}"
        extra = ["--runs", str(backend.runs_root)] if model == ref else []
        assert main(["sample", "--model", model, "--prompt", "a red circle", "--seed", "5", "--out", str(out),
                     *extra]) == 0, capsys.readouterr().err  # fmt: skip
        got = np.asarray(Image.open(out / "seed5.png").convert("RGB"))
        assert np.abs(got.astype(int) - as_png.astype(int)).max() <= 1, model
    empty = tmp_path / "runs" / "no-checkpoint"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    for model, message in [(str(empty), "has no complete checkpoint yet"),
                           ("run:finished-lora/step-999", "no complete checkpoint step-999")]:  # fmt: skip
        capsys.readouterr()
        assert main(["sample", "--model", model, "--runs", str(backend.runs_root), "--out", str(tmp_path / "x"),
                     "--prompt", "a red circle"]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_a_full_unet_checkpoint_loads_in_the_sample_tab(backend, tiny_pipeline_dir):
    from finetuners.generate import SampleRequest

    start_run(backend, "full-unet", **{**TINY, "adapter": "Full UNet", "epochs": 1, "learning_rate": 1e-3})
    info = backend.run_manager().wait("full-unet", timeout_s=120)
    assert info.state == "finished" and info.adapter == "full"
    ref = f"run:full-unet/step-{info.checkpoints[-1]}"
    assert (info.path / "checkpoints" / f"step-{info.checkpoints[-1]}" / "unet" / "config.json").is_file()
    request = SampleRequest(prompt="a green triangle", steps=2, seed=3, sampler="ddim")
    base = backend.generate(str(tiny_pipeline_dir), request).images
    tuned = backend.generate(ref, request).images
    assert (tuned - base).abs().max() > 1e-4


# -- processes that die: the app stays up and says why --------------------------------------------------------------
def test_sigkill_is_reported_and_resume_continues_from_the_last_checkpoint(backend):
    """The run manager's side of resume-after-SIGKILL (the CLI's is in test_trainer.py): the tab shows the death in
    words, status.json is corrected, Resume continues from the last checkpoint with the stored config."""
    manager = backend.run_manager()
    start_run(backend, "killed", **{**TINY, "epochs": 500, "eval_every": 1000})
    path = backend.runs_root / "killed"
    wait_for(lambda: len(list_checkpoints(path)) >= 2, what="two checkpoints")
    info = manager.info("killed")
    assert info.state == "running" and info.pid
    os.kill(info.pid, signal.SIGKILL)
    info = wait_for(lambda: (i := manager.info("killed")).state == "failed" and i, 10, "the death to be seen")
    assert "the training process exited unexpectedly (code -9: killed by SIGKILL" in info.error
    assert read_status(path)["state"] == "failed" and read_status(path)["error"] == info.error
    status, *_ = on_refresh(backend, "killed", None)
    assert "Training failed" in status and "exited unexpectedly" in status and "Traceback" not in status
    ckpt_step, ckpt_dir = list_checkpoints(path)[-1]
    ckpt_epoch = torch.load(ckpt_dir / "state.pt", weights_only=True)["epoch"]
    done = max(r["epoch"] for r in read_metrics(path) if r.get("event") == "epoch")
    assert done - ckpt_epoch <= 1  # checkpoint_every = 1: at most one interval lost
    config_before = (path / "config.json").read_bytes()

    message = on_resume(backend, "killed")
    assert message == ""
    assert manager.info("killed").state in ("starting", "running")
    with pytest.raises(UserError, match="stop it before resuming"):
        resume_run(backend, "killed")
    wait_for(lambda: any(r.get("event") == "epoch" and r["epoch"] > ckpt_epoch + 1 for r in read_metrics(path)),
              what="two epochs after resuming")  # fmt: skip
    t0 = time.monotonic()
    stop_run(backend, "killed")
    info = manager.wait("killed", timeout_s=30)
    stop_s = time.monotonic() - t0
    assert info.state == "stopped" and info.error is None and stop_s < 10, (info, stop_s)
    assert not (path / "STOP").exists() and (path / "config.json").read_bytes() == config_before
    lines = read_metrics(path)
    resumed = [r for r in lines if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == ckpt_epoch and resumed[0]["global_step"] == ckpt_step
    after = [r["epoch"] for r in lines[lines.index(resumed[0]) :] if r.get("event") == "epoch"]
    assert after == list(range(ckpt_epoch + 1, ckpt_epoch + 1 + len(after)))
    with pytest.raises(UserError, match="is not running"):
        stop_run(backend, "killed")


def test_a_nan_loss_fails_the_run_and_the_tab_says_so(backend, monkeypatch):
    monkeypatch.setenv("FINETUNERS_INJECT_NAN_LOSS", "2")  # the trainer's documented fault hook: NaN after 2 updates
    start_run(backend, "diverged", **{**TINY, "epochs": 20})
    info = backend.run_manager().wait("diverged", timeout_s=120)
    assert info.state == "failed" and "the loss became nan" in info.error and "lower learning rate" in info.error
    status, *_ = on_refresh(backend, "diverged", None)
    assert "diverged: failed" in status and "the loss became nan" in status
    assert [r for r in read_metrics(info.path) if r.get("event") == "failed"]


# -- the manager with stand-in trainers (no torch: fast) -----------------------------------------------------------
def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable called as ``python -m finetuners train --run DIR …``: ``$5`` is the run folder."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\nRUN=$5\n" + body)
    script.chmod(0o755)
    return str(script)


def _tiny_config(backend):
    return make_config(backend, **TINY)


RUNNING = 'echo "{\\"state\\": \\"running\\", \\"pid\\": $$, \\"time\\": $(date +%s.%N)}" > "$RUN/status.json"\n'


def test_a_trainer_that_ignores_stop_is_terminated(backend, tmp_path):
    manager = RunManager(tmp_path / "runs", python=_fake_python(tmp_path, RUNNING + "exec sleep 600\n"),
                         stop_timeout_s=0.5)  # fmt: skip
    manager.start("stubborn", _tiny_config(backend))
    wait_for(lambda: manager.info("stubborn").state == "running", 10, "the stand-in to run")
    assert manager.stop("stubborn").state == "stopping"
    info = manager.wait("stubborn", timeout_s=15)
    assert info.state == "stopped" and "did not stop within 0.5 s and was terminated" in info.error
    assert "Resume continues from the last checkpoint" in info.error
    assert read_status(tmp_path / "runs" / "stubborn")["state"] == "stopped"


@pytest.mark.parametrize("body, message", [
    ('echo "error: reward \'x\' is not available offline" >&2\nexit 2\n',
     "exited before training began (code 2); it said: reward 'x' is not available offline"),
    (RUNNING + "kill -SEGV $$\n", "exited unexpectedly (code -11: killed by SIGSEGV, a crash)"),
    (RUNNING + "exit 3\n", "exited unexpectedly (code 3)"),
], ids=["exit-2-before-training", "segfault", "exit-3"])  # fmt: skip
def test_a_process_that_dies_silently_is_reported(backend, tmp_path, body, message):
    manager = RunManager(tmp_path / "runs", python=_fake_python(tmp_path, body))
    manager.start("dies", _tiny_config(backend))
    info = wait_for(lambda: (i := manager.info("dies")).state == "failed" and i, 15, "the failure to be seen")
    assert message in info.error
    assert [i.name for i in manager.list()] == ["dies"]


def test_a_run_started_elsewhere_that_died_is_reported(backend, tmp_path):
    """A run whose process this app did not start (the CLI, or an app since restarted): its pid is probed."""
    folder = tmp_path / "runs" / "orphan"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": make_config(backend, **TINY).to_dict()}))
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = gone.pid
    (folder / "status.json").write_text(json.dumps({"state": "running", "pid": dead, "time": time.time()}))
    info = RunManager(tmp_path / "runs").info("orphan")
    assert info.state == "failed" and "exit code unknown: it was not started by this app" in info.error


def test_cli_config_file_gives_every_setting(backend, tmp_path):
    """The manager starts runs with ``train --config launch.json``; mixing it with other settings is refused."""
    import subprocess
    import sys

    from finetuners.jobs import REPO_ROOT

    launch = tmp_path / "launch.json"
    launch.write_text(json.dumps({"config": make_config(backend, **TINY).to_dict()}))
    run = tmp_path / "runs" / "mixed"
    r = subprocess.run([sys.executable, "-m", "finetuners", "train", "--run", str(run), "--config", str(launch),
                        "--epochs", "3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--config gives every setting" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not run.exists()


# -- SADM-style runs in the same tab ------------------------------------------------------------------------------
SADM_TINY = {**TINY, "method": "SADM-style", "batch": 2, "eval_steps": [1], "eval_prompts": 4, "epochs": 2,
             "structure_weight": 0.1}  # fmt: skip


def test_sadm_settings_are_validated_in_words(backend):
    root = backend.runs_root
    before = _tree_digest(root)
    for change, message in [({"batch": 1}, "batch_size must be at least 2 for SADM"),
                            ({"domain": "moon"}, "unknown domain 'moon'"),
                            ({"structure_weight": -1}, "structure weight λ must be from 0"),
                            ({"init": "whatever"}, "unknown initialisation 'whatever'")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            start_run(backend, "bad-sadm", **{**SADM_TINY, **change})
    assert _tree_digest(root) == before
    config = make_config(backend, **{**SADM_TINY, "domain": "large", "init": "from scratch"})
    assert config.domain == "large" and config.init == "scratch" and config.structure_weight == 0.1


def test_a_sadm_run_trains_shows_fd_and_losses_and_its_checkpoint_samples(backend, tiny_pipeline_dir):
    from finetuners.models import load_model
    from finetuners.runs import load_checkpoint_pipeline

    info = start_run(backend, "sadm-run", **SADM_TINY)
    assert info.state == "starting"
    # before its first step the trainer renders and encodes its real images (a minute on a CPU): the status says so
    deadline, said = time.time() + 120, None
    while time.time() < deadline and said is None:
        view = run_view(backend, "sadm-run")
        if "real images" in view.status:
            said = view.status
        elif "starting" not in view.status:
            break
        time.sleep(0.2)
    assert (
        said is not None
        and "sadm-run: starting** · rendering and encoding 4096 real images of the shapes world…" in said
    ), said
    done = backend.run_manager().wait("sadm-run", timeout_s=240)
    assert done.state == "finished", backend.run_manager().log_tail("sadm-run")
    assert done.method == "sadm" and done.epoch == 2 and done.checkpoints and "λ = 0.1" in done.reward
    view = run_view(backend, "sadm-run")
    assert "SADM" in view.status and "epoch 2 of 2" in view.status
    fd = view.figures["reward"]
    assert "FD-probe" in fd.layout.title.text and [t.name for t in fd.data] == ["1 step"]
    evals = [r for r in read_metrics(done.path) if r["event"] == "eval"]
    assert list(fd.data[0].y) == [r["eval_fd_probe_k1"] for r in evals] and len(evals) == 3
    assert [t.name for t in view.figures["loss"].data] == ["loss", "denoising loss", "structure loss"]
    assert list(view.figures["accuracy"].data[0].y) == [r["eval_accuracy_k1"] for r in evals]
    strip = Image.open(sorted((done.path / "samples").glob("step-*_k1.png"))[-1])  # the newest evaluation's
    shown = json.loads(sorted((done.path / "samples").glob("step-*_k1.json"))[-1].read_text())
    assert len(shown["prompts"]) == len(shown["followed"]) == 4  # its prompts, and which images follow them
    assert sum(shown["followed"]) == 4 * evals[-1]["eval_accuracy_k1"]  # 4 evaluation images: all in the strip
    header = sheet_header(strip.height)  # one step count: one row, its bars, and the columns' numbers under it
    assert view.samples.height == header + strip.height + sheet_bar(strip.height) + header
    assert view.prompts.startswith("Prompts by column: **1** ") and view.prompts.count("**") == 8
    ref = f"run:sadm-run/step-{done.checkpoints[-1]}"
    pipe = load_checkpoint_pipeline(backend.runs_root, ref, "cpu")
    base = load_model(str(tiny_pipeline_dir), "cpu")
    changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, base.unet.get_parameter(n))]
    assert changed  # the fine-tuned UNet, not the base one


def test_the_phase_is_the_newest_one_announced_since_the_last_launch(tmp_path):
    from finetuners.jobs import _phase

    log = tmp_path / "train.log"
    assert _phase(tmp_path) is None  # no log yet
    log.write_text("\n=== 2026-01-01 00:00:00 python -m finetuners sadm\nphase: loading the model\na warning\n"
                   "phase: rendering and encoding 64 real images of the shapes world\n")  # fmt: skip
    assert _phase(tmp_path) == "rendering and encoding 64 real images of the shapes world"
    with log.open("a") as f:  # a resume: the old launch's phases no longer apply
        f.write("\n=== 2026-01-01 00:05:00 python -m finetuners sadm --resume\n")
    assert _phase(tmp_path) is None


def test_a_short_run_has_whole_epoch_ticks():
    """Automatic ticks at half epochs, printed as whole numbers, read "1, 2, 2, 3, 3" on a 3-epoch run."""
    short = [{"event": "epoch", "epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)]
    assert curve_figure(short, "loss").layout.xaxis.dtick == 1
    long = [{"event": "epoch", "epoch": e, "loss": 1.0 / e} for e in range(1, 60)]
    assert curve_figure(long, "loss").layout.xaxis.dtick is None


def test_an_evaluation_without_accuracy_says_it_was_not_measured():
    """Prompts or images the probe cannot read: the accuracy plot says so instead of staying blank."""
    evals = [{"event": "eval", "epoch": e, "eval_reward_k1": -float(e)} for e in (0, 1)]
    fig = curve_figure(evals, "accuracy")
    assert not fig.data and fig.layout.annotations[0].text == "not measured for this run"
    fig = curve_figure([{**r, "eval_accuracy_k1": 0.5} for r in evals], "accuracy")
    assert list(fig.data[0].y) == [0.5, 0.5] and not fig.layout.annotations


def test_a_run_on_typed_prompts_says_so(tmp_path):
    """The live view's status names a run's own prompt list by its length; a run on Shapes captions says nothing."""
    from finetuners.runs import write_json, write_status
    from ui.finetune_tab import describe_status

    algo = {"reward": "jpeg-compressibility", "adapter": "lora", "num_epochs": 2, "train_sampler": "ddim"}
    for name, typed in (("typed-prompts", ["a red circle", "a cat"]), ("shapes-captions", None)):
        folder = tmp_path / "runs" / name  # a runs folder of its own: the app's is shared with other tests
        folder.mkdir(parents=True)
        config = {"method": "sdpo", "algo": algo} | ({"prompt_list": typed} if typed else {})
        write_json(folder / "config.json", {"config": config})
        write_status(folder, "finished", epoch=2)
    typed, shapes = (RunManager(tmp_path / "runs").info(n) for n in ("typed-prompts", "shapes-captions"))
    assert typed.prompts == 2 and shapes.prompts == 0
    assert "SDPO on jpeg-compressibility (lora, 2 typed prompts)" in describe_status(typed)
    assert "SDPO on jpeg-compressibility (lora) " in describe_status(shapes) + " "
