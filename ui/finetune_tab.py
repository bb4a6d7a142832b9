"""The Fine-tune tab: SDPO, DDPO, RLR or a backprop baseline on a reward, or SADM-style structure-guided denoising
training, run in a process of its own, watched live.

The handlers proper (``make_config``, ``start_run``, ``stop_run``, ``resume_run``, ``run_view``) are plain Python
over the backend's ``RunManager`` and raise ``UserError`` for bad input; the ``on_*`` adapters turn that into a
message in the tab. A ``gr.Timer`` refreshes the selected run every ``REFRESH_S`` seconds: its status in words,
the curves from metrics.jsonl, the latest sample grid and the runs list. Training never runs in the app's
process, so nothing that happens to it can take the app down.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from finetuners.errors import UserError
from finetuners.generate import check_prompt_fits
from finetuners.jobs import RunInfo
from finetuners.rewards import check_reward_fits

from .backend import Backend
from .common import attempt, error_markdown, md_escape, typed_prompts

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # live view period
METHODS = {
    "SDPO": "sdpo",
    "DDPO": "ddpo",
    "RLR": "rlr",
    "DRaFT-K": "draft",
    "Full backprop": "bptt",
    "SADM-style": "sadm",
}
# The train steps K a method starts with when picked: K = 8 for the policy-gradient methods (ALGORITHMS.md's Shapes
# preset; it keeps 4 and 8 steps while 1 and 2 improve), K = 2 for those that backpropagate the reward (the CLI's
# default, and the K of the reward-per-minute figures in docs/BENCHMARKS.md: the gradient reaches the step from
# t = 999, the 1-step model's only one, with a quarter of K = 8's UNet calls). SADM samples no trajectories.
METHOD_STEPS = {"SDPO": 8, "DDPO": 8, "RLR": 2, "DRaFT-K": 2, "Full backprop": 2}
# The form as the tab opens (make_config's arguments; evaluation prompts follow the model: default_eval_prompts).
# lr 3e-4 for every method: at 1e-3 the backprop methods' curves swing and SDPO can lose 2-step accuracy, at 3e-3
# every method degrades within three minutes (docs/BENCHMARKS.md, "The form's learning rate").
FORM_DEFAULTS = dict(method="SDPO", reward="shapes-probe", learning_rate=3e-4, batch=4, epochs=30,
                     train_steps=METHOD_STEPS["SDPO"], eval_steps=[1, 2, 4, 8], adapter="LoRA", lora_rank=4,
                     batches_per_epoch=2, eval_every=1, seed=42, rlr_h=2, zo_mode="likelihood ratio", s_nu=1e-3,
                     truncation=1, structure_weight=0.1, domain="shapes",
                     init="fine-tune the model's UNet")  # fmt: skip
SADM_INITS = {"fine-tune the model's UNet": "pretrained", "from scratch": "scratch"}
ZO_MODES = {"likelihood ratio": "lr", "SPSA": "spsa", "off (biased)": "off"}
ADAPTERS = {"LoRA": "lora", "Full UNet": "full"}
EVAL_STEP_CHOICES = (1, 2, 4, 8, 16)
# Below this many UNet weights (the Shapes UNet has 1.5 M, SD's 860 M) an SDPO update's pairs go through the UNet as
# name in messages → (low, high, whole number, low end open); the widgets' ranges
LIMITS = {
    "learning rate": (0.0, 1.0, False, True),
    "batch": (1, 64, True, False),
    "sampling batches per epoch": (1, 64, True, False),
    "epochs": (1, 100_000, True, False),
    "train steps K": (1, 1000, True, False),
    "LoRA rank": (1, 256, True, False),
    "evaluation prompts": (1, 256, True, False),
    "evaluate every": (1, 100_000, True, False),
    "seed": (0, 2**32 - 1, True, False),
    "RLR h": (0, 1000, True, False),
    "ZO perturbation std": (0.0, 10.0, False, True),
    "DRaFT-K steps K'": (1, 1000, True, False),
    "SADM structure weight λ": (0.0, 1e4, False, False),
}
CONFIG_FIELDS = ("method", "reward", "learning_rate", "batch", "epochs", "train_steps", "eval_steps", "adapter",
                 "lora_rank", "weights", "batches_per_epoch", "eval_prompts", "eval_every", "seed", "rlr_h", "zo_mode",
                 "s_nu", "truncation", "structure_weight", "domain", "init", "prompts")  # fmt: skip
RUN_COLUMNS = ["run", "state", "method", "reward", "epoch", "checkpoints", "error"]
CURVES = {  # plot id → (title, y-axis label, metrics keys of the "epoch" records, or the eval keys' prefixes)
    "reward": ("Reward at each evaluation step count", "mean reward", ("eval_reward_k", "eval_fd_probe_k")),
    "accuracy": ("Shapes-probe accuracy at each evaluation step count", "accuracy", ("eval_accuracy_k",)),
    "loss": ("Loss", "loss", ("loss", "denoising_loss", "structure_loss")),
    "grad_norm": ("Gradient norm (before clipping)", "‖g‖", ("grad_norm",)),
    "memory": ("Peak memory", "MB", ("peak_memory_mb",)),
    "speed": ("Optimiser steps per second", "it/s", ("iterations_per_s",)),
}
EVAL_TITLES = {"eval_fd_probe_k": ("FD-probe at each evaluation step count (lower is better)", "FD-probe")}
DASHES = ("solid", "dash", "dot", "dashdot")  # the evaluation curves' line styles, by step count
SAMPLES_LABEL = "Latest samples, a row per step count; under each, green: follows its prompt, red: not"
NO_PROMPTS = ""  # the prompts line under the sample sheet when the run's sample files do not name them
SHEET_GAP = 6  # pixels between the sample sheet's rows, and around its row names
FOLLOWED_COLOURS = {True: "#16a34a", False: "#dc2626"}  # the bar under a sample: follows its prompt, or not
_SAMPLE = re.compile(r"^(epoch|step)-(\d+)_k(\d+)\.png$")  # trainer.py runs: epoch-N; SADM runs: step-N


@dataclass
class RunView:
    """What one refresh of the live view shows."""

    key: tuple  # changes whenever anything shown changes (so unchanged refreshes send nothing)
    status: str  # Markdown: the run's state and any error, in words
    figures: dict  # plot id → plotly figure
    samples: object  # PIL image: the latest evaluation's sample sheet (a row per step count), or None
    prompts: str  # Markdown: what each column of the sheet was asked for, by its number under the sheet
    points: int  # evaluation records plotted


# -- handlers ----------------------------------------------------------------------------------------------------
def number(name: str, value) -> float | int:
    """A widget's value checked against ``LIMITS[name]``; ``UserError`` in words otherwise."""
    lo, hi, whole, lo_open = LIMITS[name]
    if value is None or value == "":
        raise UserError(f"{name} is empty: enter a number")
    try:
        x = float(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{name} must be a number, got {value!r}") from e
    if math.isnan(x) or math.isinf(x):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if whole and x != int(x):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if x > hi or x < lo or (lo_open and x == lo):
        span = f"above {lo:g} and at most {hi:g}" if lo_open else f"from {lo:g} to {hi:g}"
        raise UserError(f"{name} must be {span}, got {value!r}")
    return int(x) if whole else x


def reward_choices(backend: Backend) -> list[tuple[str, str]]:
    """(label, reward name) for the dropdown: the registry, then the preference models learned from labels."""
    from finetuners.rewards import REGISTRY

    choices = [(f"{n} (needs downloaded weights)" if s.needs_weights else n, n) for n, s in REGISTRY.items()]
    preference = getattr(backend, "preference_rewards", None)  # the Label tab's learned rewards, when present
    for name in preference() if preference is not None else []:
        choices.append((f"preference model {Path(name.split(':', 1)[1]).name}", name))
    return choices


def check_reward(reward, weights) -> str:
    """The reward's name if it can be built here, offline; ``UserError`` saying what is missing otherwise."""
    from finetuners.rewards import make_reward, reward_spec

    name = (reward or "").strip()
    if not name:
        raise UserError("no reward chosen: pick one from the list")
    spec = reward_spec(name)  # unknown names: a UserError listing the choices
    if spec.needs_weights and not (weights or "").strip():
        raise UserError(f"reward {name!r} ({spec.description}) needs weights that are not on this machine: download "
                        "them yourself and enter their folder under “Reward weights”")  # fmt: skip
    make_reward(name, "cpu", (weights or "").strip() or None)
    return name


def small_unet(backend: Backend) -> bool:
    """Whether the app's model has a small UNet (``models.small_unet``, the Shapes model): per-call overhead, not
    arithmetic, bounds its speed, so it trains an update's pairs as one minibatch and evaluates more prompts."""
    from finetuners.models import small_unet as is_small

    return is_small(backend.pipeline(backend.settings.model))


def default_eval_prompts(backend: Backend) -> int:
    """The form's evaluation prompts: 32 on a small UNet (an evaluation at 1/2/4/8 steps costs about half an epoch
    there, and accuracy moves in steps of 1/32 rather than 1/8), 8 on a real model, whose evaluation is dear."""
    try:
        return 32 if small_unet(backend) else 8
    except UserError:  # the model does not load: starting a run will say so
        return 8


def make_config(backend: Backend, method, reward, learning_rate, batch, epochs, train_steps, eval_steps, adapter,
                lora_rank, weights="", batches_per_epoch=FORM_DEFAULTS["batches_per_epoch"], eval_prompts=8,
                eval_every=FORM_DEFAULTS["eval_every"], seed=FORM_DEFAULTS["seed"], rlr_h=FORM_DEFAULTS["rlr_h"],
                zo_mode=FORM_DEFAULTS["zo_mode"], s_nu=FORM_DEFAULTS["s_nu"], truncation=FORM_DEFAULTS["truncation"],
                structure_weight=FORM_DEFAULTS["structure_weight"], domain=FORM_DEFAULTS["domain"],
                init=FORM_DEFAULTS["init"], prompts=""):  # fmt: skip
    """Widget values → a validated ``TrainConfig`` (``SADMConfig`` for SADM) for the app's model (``UserError`` in
    words otherwise). ``prompts``: the prompts to train on, one per line; empty: the Shapes world's captions."""
    from finetuners.models import resolve_device
    from finetuners.rlr import RLRConfig
    from finetuners.sdpo import SDPOConfig, shapes_preset
    from finetuners.trainer import MAX_PROMPT_LIST, TrainConfig

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose {' or '.join(METHODS)}")
    if adapter not in ADAPTERS:
        raise UserError(f"unknown adapter {adapter!r}: choose {' or '.join(ADAPTERS)}")
    lr = number("learning rate", learning_rate)
    batch = number("batch", batch)
    batches = number("sampling batches per epoch", batches_per_epoch)
    epochs = number("epochs", epochs)
    k = number("train steps K", train_steps)
    rank = number("LoRA rank", lora_rank)
    n_eval = number("evaluation prompts", eval_prompts)
    every = number("evaluate every", eval_every)
    seed = number("seed", seed)
    if zo_mode not in ZO_MODES:
        raise UserError(f"unknown ZO mode {zo_mode!r}: choose {' or '.join(ZO_MODES)}")
    rlr = RLRConfig(h=number("RLR h", rlr_h), zo_mode=ZO_MODES[zo_mode], s_nu=number("ZO perturbation std", s_nu),
                    truncation=number("DRaFT-K steps K'", truncation))  # fmt: skip
    if not isinstance(eval_steps, list | tuple | set) or not all(s in EVAL_STEP_CHOICES for s in eval_steps):
        raise UserError(f"evaluation step counts must be some of {', '.join(map(str, EVAL_STEP_CHOICES))}, "
                        f"got {eval_steps!r}"[:300])  # fmt: skip
    steps = sorted({int(s) for s in eval_steps})
    if not steps:
        raise UserError("no evaluation step counts chosen: tick at least one")
    settings = backend.settings
    device = resolve_device(settings.device)
    # few-step evaluation (1/2/4/8 steps) needs trailing timesteps: leading spacing starts a 1-step sample at t = 1
    sampler = "lcm" if backend.defaults(settings.model).sampler == "lcm" else "ddim-trailing"
    prompt_list = tuple(typed_prompts(prompts, MAX_PROMPT_LIST, "prompts"))
    if METHODS[method] == "sadm":  # denoising training on Shapes images: no reward, no adapter
        from finetuners.sadm import SADMConfig
        from finetuners.shapes.world import DOMAINS

        if prompt_list:
            raise UserError("SADM-style training denoises Shapes images under their own captions: clear the prompts")

        if domain not in DOMAINS:
            raise UserError(f"unknown domain {domain!r}: choose {' or '.join(DOMAINS)}")
        if init not in SADM_INITS:
            raise UserError(f"unknown initialisation {init!r}: choose {' or '.join(SADM_INITS)}")
        return SADMConfig(model=settings.model, init=SADM_INITS[init], domain=domain, learning_rate=lr,
                          structure_weight=number("SADM structure weight λ", structure_weight), batch_size=batch,
                          epochs=epochs, steps_per_epoch=batches, seed=seed, device=str(device), eval_every=every,
                          eval_images=max(n_eval, 2), eval_steps=tuple(steps), checkpoint_every=every,
                          eval_sampler=sampler)  # fmt: skip
    reward = check_reward(reward, weights)
    pipe = backend.pipeline(settings.model)
    check_reward_fits(reward, pipe)
    for prompt in dict.fromkeys(prompt_list):  # before a process starts: the encoder would cut it off silently
        check_prompt_fits(pipe, prompt)
    precision = {"float16": "fp16", "bfloat16": "bf16"}.get(settings.dtype or "", "fp16")
    precision = "fp32" if device.type == "cpu" or settings.dtype in ("float32", "fp32") else precision
    per_prompt = next(k for k in (4, 2, 1) if batch % k == 0)  # pairs sharing a prompt (normalised together)
    pairs = batch * batches
    train_batch = 2 if pairs % 2 == 0 else 1  # minibatches must fill whole accumulation groups (§1.2(e))
    grad_accum = 2 if (pairs // train_batch) % 2 == 0 else 1
    if small_unet(backend):
        train_batch, grad_accum = train_batch * grad_accum, 1  # one minibatch per update: same update, less time
    spacing = "pipeline" if sampler == "lcm" else "trailing"
    algo = SDPOConfig.preset(
        shapes_preset(k), model=settings.model, precision=precision, reward=reward,
        learning_rate=lr, sample_batch_size=batch, num_batches_per_epoch=batches, num_epochs=epochs, num_steps=k,
        adapter=ADAPTERS[adapter], lora_rank=rank, eval_steps=tuple(steps), eval_sampler=sampler, seed=seed,
        train_batch_size=train_batch, grad_accum=grad_accum, timestep_spacing=spacing,
        pairs_per_prompt=per_prompt, min_count=min(2 * per_prompt, 8),
        # an LCM model trains as it samples (LCM steps as the policy) under SDPO and DDPO; the others use DDIM
        train_sampler="lcm" if sampler == "lcm" and METHODS[method] in ("sdpo", "ddpo") else "ddim",
    )  # fmt: skip
    return TrainConfig(method=METHODS[method], algo=algo, reward_weights=(weights or "").strip() or None,
                       device=str(device), eval_every=every, num_eval_prompts=n_eval, rlr=rlr,
                       prompt_list=prompt_list)  # fmt: skip


def method_steps(method, current):
    """The train steps K to show once ``method`` is picked: its ``METHOD_STEPS``, or ``current`` (SADM)."""
    return METHOD_STEPS.get(method, current)


def default_run_name(method: str) -> str:
    return f"{METHODS.get(method, 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_run(backend: Backend, name, **values) -> RunInfo:
    """Validate everything (``values``: ``make_config``'s arguments), then start the run in its own process.
    An empty name gets a dated one."""
    config = make_config(backend, **values)
    name = (name or "").strip() or default_run_name(values.get("method", ""))
    return backend.run_manager().start(name, config)


def stop_run(backend: Backend, name) -> RunInfo:
    return backend.run_manager().stop((name or "").strip())


def resume_run(backend: Backend, name) -> RunInfo:
    return backend.run_manager().resume((name or "").strip())


def runs_table(backend: Backend) -> list[list]:
    rows = []
    for info in backend.run_manager().list():
        epoch = f"{info.epoch if info.epoch is not None else '–'}/{info.num_epochs or '?'}"
        ckpts = ", ".join(f"step-{n}" for n in info.checkpoints[-3:])
        rows.append([info.name, info.state, info.method or "?", info.reward or "?", epoch, ckpts, info.error or ""])
    return rows


def describe_status(info: RunInfo) -> str:
    words = [f"**{info.name}: {info.state}**"]
    if info.phase:
        words.append(f"{info.phase}…")
    if info.epoch is not None and info.num_epochs:
        words.append(f"epoch {info.epoch} of {info.num_epochs}")
    if info.method:
        lcm = ", LCM steps" if info.train_sampler == "lcm" else ""
        on = f", {info.prompts} typed prompt{'s' * (info.prompts > 1)}" if info.prompts else ""
        words.append(f"{info.method.upper()} on {info.reward} ({info.adapter}{lcm}{on})")
    if info.checkpoints:
        words.append(f"last checkpoint step-{info.checkpoints[-1]}")
    text = " · ".join(words)
    if info.error:
        text += "  \n" + error_markdown(info.error, "Training failed" if info.state == "failed" else "Note")
    if info.config_error and not info.active:
        text += f"  \n(this run cannot be resumed: {info.config_error})"
    return text


NO_RUN_NOTE = "start a run, or pick one, to see it here"


def curve_figure(metrics: list[dict], plot: str, note: str = ""):
    """One live curve (plotly) from metrics.jsonl records: the evaluation plots have one line per step count (of
    the first of their metrics the run records), the others one line per metric the run records. ``note`` is
    written across an empty plot (no run shown yet)."""
    import plotly.graph_objects as go

    title, y_title, keys = CURVES[plot]
    fig = go.Figure()
    if note:
        fig.add_annotation(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font=dict(size=13, color="#888"))  # fmt: skip
    if keys[0].startswith("eval_"):
        evals = [r for r in metrics if r.get("event") == "eval"]
        prefix = next((p for p in keys if any(k.startswith(p) for r in evals for k in r)), keys[0])
        title, y_title = EVAL_TITLES.get(prefix, (title, y_title))
        ks = sorted({int(k[len(prefix) :]) for r in evals for k in r if k.startswith(prefix)})
        for i, k in enumerate(ks):
            rows = [r for r in evals if _finite(r.get(f"{prefix}{k}"))]
            # Step counts often score alike (4 and 8 steps both at 100 %): each later line is drawn thinner, with
            # smaller markers and its own dash, so that an earlier line it covers still shows around it.
            style = dict(marker=dict(size=max(3, 10 - 2 * i)), line=dict(width=max(1, 3 - i / 2), dash=DASHES[i % 4]))
            fig.add_trace(go.Scatter(x=[r["epoch"] for r in rows], y=[r[f"{prefix}{k}"] for r in rows],
                                     mode="lines+markers", name=f"{k} step{'s' * (k > 1)}", **style))  # fmt: skip
        if evals and not ks:  # e.g. probe accuracy of a run whose images or prompts the probe cannot read
            fig.add_annotation(text="not measured for this run", showarrow=False, xref="paper", yref="paper",
                               x=0.5, y=0.5, font=dict(size=13, color="#888"))  # fmt: skip
    else:
        epochs = [r for r in metrics if r.get("event") == "epoch"]
        present = [k for k in keys if any(_finite(r.get(k)) for r in epochs)] or list(keys[:1])
        for key in present:
            rows = [r for r in epochs if _finite(r.get(key))]
            fig.add_trace(go.Scatter(x=[r["epoch"] for r in rows], y=[r[key] for r in rows], mode="lines+markers",
                                     name=key.replace("_", " "), showlegend=len(present) > 1))  # fmt: skip
    fig.update_layout(title=dict(text=title, font=dict(size=14)), template="plotly_white", height=260,
                      margin=dict(l=50, r=10, t=40, b=40), xaxis_title="epoch", yaxis_title=y_title,
                      xaxis_tickformat="d", legend=dict(orientation="h", y=-0.3))  # fmt: skip
    last = max((x for trace in fig.data for x in (trace.x or ())), default=0)
    if note:  # an empty frame: no made-up axis ranges
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    elif last <= 10:  # a short run: whole epochs only (automatic ticks at 0.5 would print "1, 2, 2, 3, 3")
        fig.update_xaxes(dtick=1)
    return fig


def latest_samples(run_dir: Path) -> tuple[str | None, list[tuple[Path, int]]]:
    """("epoch N" or "step N", [(png, K)]) of the newest evaluation's sample grids in samples/. An evaluation
    writes its step counts' strips one after another: until its last is there, the one before it is shown whole."""
    found = {}
    for p in (run_dir / "samples").glob("*_k*.png"):
        m = _SAMPLE.match(p.name)
        if m:
            found.setdefault((int(m.group(2)), m.group(1)), []).append((p, int(m.group(3))))
    if not found:
        return None, []
    whole = max(len(strips) for strips in found.values())
    number, unit = max(key for key, strips in found.items() if len(strips) == whole)
    return f"{unit} {number}", sorted(found[number, unit], key=lambda x: x[1])


def run_view(backend: Backend, name, previous_key: tuple | None = None) -> RunView | None:
    """The live view of run ``name``; ``None`` when nothing changed since ``previous_key``."""
    manager = backend.run_manager()
    info = manager.info((name or "").strip())
    metrics_file = info.path / "metrics.jsonl"
    size = metrics_file.stat().st_size if metrics_file.exists() else 0
    when, samples = latest_samples(info.path)
    key = (info.name, info.state, info.phase, info.error, info.epoch, size, when, tuple(p.name for p, _ in samples))
    if key == previous_key:
        return None
    metrics = manager.metrics(info.name)
    figures = {plot: curve_figure(metrics, plot) for plot in CURVES}
    rows, prompts = [], None
    for path, k in samples:
        try:
            from PIL import Image

            with Image.open(path) as im:
                strip = im.convert("RGB")
        except OSError:  # being replaced right now: the next refresh shows it
            continue
        asked, followed = strip_notes(path)
        prompts = prompts or asked  # every step count of an evaluation draws the same prompts and seeds
        rows.append((f"{k} step{'s' * (k > 1)}", strip, followed))
    columns = len(prompts) if rows and prompts and all(len(f or prompts) == len(prompts) for *_, f in rows) else 0
    points = sum(1 for r in metrics if r.get("event") == "eval")
    sheet = sample_sheet(when, rows, columns)
    return RunView(key, describe_status(info), figures, sheet, prompts_line(prompts) if columns else NO_PROMPTS, points)


def strip_notes(strip: Path) -> tuple[list[str] | None, list[bool] | None]:
    """(prompts, followed) of a sample strip's images, from the ``.json`` the trainer writes beside it: what each
    image was asked for, and whether it follows it (the evaluation's Shapes-probe accuracy). None for what is not
    there (no accuracy measured, a run from before these files, a broken file)."""
    import json

    try:
        notes = json.loads(strip.with_suffix(".json").read_text())
        prompts, followed = notes.get("prompts"), notes.get("followed")
    except (OSError, ValueError, AttributeError):
        return None, None
    prompts = [str(p) for p in prompts] if isinstance(prompts, list) and prompts else None
    return prompts, [bool(f) for f in followed] if isinstance(followed, list) else None


def prompts_line(prompts: list[str]) -> str:
    """Markdown under the sample sheet: each column's number (drawn under the sheet) and its prompt."""
    return "Prompts by column: " + " · ".join(f"**{i}** {md_escape(p)}" for i, p in enumerate(prompts, 1))


def sample_sheet(title: str | None, rows: list[tuple], columns: int = 0):
    """The strips of one evaluation stacked into one image under a header that names the evaluation ("epoch 30",
    right-aligned, clear of the panel's label), each row named on its left ("1 step", "2 steps"…), so that the step
    counts read top to bottom at the panel's full width. A row is (name, strip, followed): where ``followed`` is a
    list, a bar under each image is green where it follows its prompt and red where not. With ``columns`` (the
    images in a strip), a footer numbers them 1, 2, … under their centres. None for no rows."""
    if not rows:
        return None
    from PIL import Image, ImageDraw, ImageFont

    height = max(im.height for _, im, _ in rows)
    bar = sheet_bar(height) if any(f is not None for *_, f in rows) else 0
    font = ImageFont.load_default(size=max(12, height // 5))
    margin = SHEET_GAP + max(int(font.getlength(name)) for name, *_ in rows) + SHEET_GAP
    header = sheet_header(height)
    footer = header if columns else 0
    width = margin + max(im.width for _, im, _ in rows)
    body = header + len(rows) * (height + bar + SHEET_GAP) - SHEET_GAP
    sheet = Image.new("RGB", (width, body + footer), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((width - SHEET_GAP, header // 2), title or "", fill="black", font=font, anchor="rm")
    for i, (name, im, followed) in enumerate(rows):
        top = header + i * (height + bar + SHEET_GAP)
        sheet.paste(im, (margin, top))
        draw.text((SHEET_GAP, top + height // 2), name, fill="black", font=font, anchor="lm")
        for j, ok in enumerate(followed or []):
            tile = im.width / len(followed)
            box = (
                margin + round(j * tile) + 1,
                top + height + 1,
                margin + round((j + 1) * tile) - 2,
                top + height + bar - 1,
            )
            draw.rectangle(box, fill=FOLLOWED_COLOURS[ok])
    tile = (width - margin) / max(columns, 1)
    for j in range(columns):
        draw.text((margin + (j + 0.5) * tile, body + footer // 2), str(j + 1), fill="black", font=font, anchor="mm")
    return sheet


def sheet_bar(row_height: int) -> int:
    """Height of the band under a sample row that holds its followed / not-followed bars, in pixels."""
    return max(4, row_height // 8)


def sheet_header(row_height: int) -> int:
    """Height of the sample sheet's header band, in pixels, for rows ``row_height`` tall."""
    return max(24, row_height * 3 // 5)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# -- Gradio adapters ---------------------------------------------------------------------------------------------
def _run_choices(backend: Backend, selected=None):
    names = backend.run_manager().names()
    value = selected if selected in names else (names[0] if names else None)
    return gr.update(choices=names, value=value)


def on_start(backend: Backend, name, *values) -> tuple:
    """Updates for (error, run picker, run name box); ``values`` in ``CONFIG_FIELDS`` order. A refused start
    changes nothing but the message."""
    info, message = attempt("starting the run", start_run, backend, name, **dict(zip(CONFIG_FIELDS, values)))
    if message is not None:
        gr.Warning(message)
        return error_markdown(message, "Cannot start"), gr.skip(), gr.skip()
    return "", _run_choices(backend, info.name), ""


def _message_of(action: str, title: str, fn, backend: Backend, name) -> str:
    """The error box's new text: "" when ``fn(backend, name)`` succeeded, else the message (and a toast)."""
    _, message = attempt(action, fn, backend, name)
    if message is None:
        return ""
    gr.Warning(message)
    return error_markdown(message, title)


def on_stop(backend: Backend, name) -> str:
    """The error box's new text ("" when the stop was asked for)."""
    return _message_of("stopping the run", "Cannot stop", stop_run, backend, name)


def on_resume(backend: Backend, name) -> str:
    """The error box's new text ("" when the run was started again)."""
    return _message_of("resuming the run", "Cannot resume", resume_run, backend, name)


def on_refresh(backend: Backend, name, shown: dict | None) -> tuple:
    """Updates for (status, table, run picker, *plots, samples, prompts, shown). ``shown`` (per session) remembers
    what the page holds, so an unchanged refresh sends nothing (and never resets the run picker while someone uses
    it)."""
    shown = shown or {}
    skip_view = [gr.skip()] * (len(CURVES) + 3)
    rows = runs_table(backend)
    names = backend.run_manager().names()
    table = gr.update(value=rows) if rows != shown.get("rows") else gr.skip()
    value = name if name in names else (names[0] if names else None)
    picker = gr.update(choices=names, value=value) if names != shown.get("names") or value != name else gr.skip()
    now = {"rows": rows, "names": names, "view": None}
    if not name:  # the curves' empty frames, titled, once per page; then nothing more until a run is picked
        status = "No run selected: start one, or pick one from the list." if not names else gr.skip()
        now["idle"] = True
        if shown.get("idle"):
            return status, table, picker, *skip_view[:-1], now
        return status, table, picker, *[curve_figure([], p, NO_RUN_NOTE) for p in CURVES], None, NO_PROMPTS, now
    view, message = attempt("reading the run", run_view, backend, name, shown.get("view"))
    if message is not None:
        return error_markdown(message, "Cannot show the run"), table, picker, *skip_view[:-1], now
    if view is None:
        return gr.skip(), table, picker, *skip_view[:-1], {**now, "view": shown.get("view")}
    figures = [view.figures[p] for p in CURVES]
    return view.status, table, picker, *figures, view.samples, view.prompts, {**now, "view": view.key}


# -- layout ------------------------------------------------------------------------------------------------------
def _curve_plot(key: str, elem_id: str) -> gr.Plot:
    """A live curve's plot, showing its titled empty frame until a run is shown."""
    return gr.Plot(curve_figure([], key, NO_RUN_NOTE), elem_id=elem_id, show_label=False)


def build_finetune_tab(backend: Backend) -> gr.Tab:
    """Add the Fine-tune tab to the enclosing ``gr.Blocks``."""
    settings = backend.settings
    form = FORM_DEFAULTS
    with gr.Tab("Fine-tune", id="finetune", elem_id="finetune-tab") as tab:
        view_key = gr.State(None)  # per session: what the live view and the runs list show now
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                gr.Markdown(f"Fine-tunes **{settings.model}**; runs are kept in `{backend.runs_root}`.")
                method = gr.Radio(list(METHODS), value=form["method"], label="Method", elem_id="finetune-method",
                                  info="SDPO: dense stepwise rewards; DDPO: the PPO baseline; RLR: first-, half- and "
                                       "zeroth-order gradient mix; DRaFT-K / full backprop: the reward "
                                       "backpropagated through the last K' / all steps (these three need a "
                                       "differentiable reward). Picking one sets train steps K to its own "
                                       "default. On the Shapes model, full backprop lifts the 1-step reward the "
                                       "most in minutes (docs/BENCHMARKS.md)")  # fmt: skip
                choices = reward_choices(backend)
                reward = gr.Dropdown(choices, value=form["reward"], label="Reward", elem_id="finetune-reward-name")
                weights = gr.Textbox(label="Reward weights", placeholder="folder of a downloaded scorer's weights",
                                     elem_id="finetune-weights", visible=settings.custom_models)  # fmt: skip
                prompts = gr.Textbox(label="Prompts, one per line", lines=2, max_lines=8, elem_id="finetune-prompts",
                                     placeholder="empty: the Shapes world's captions",
                                     info="training draws from them; each evaluation takes the first of them, as "
                                          "many as its evaluation prompts (cycled)")  # fmt: skip
                with gr.Row():
                    lr = gr.Number(
                        value=form["learning_rate"],
                        label="Learning rate",
                        elem_id="finetune-lr",
                        minimum=0,
                        maximum=1,
                    )
                    batch = gr.Number(value=form["batch"], precision=0, label="Batch (prompts per sampling batch)",
                                      elem_id="finetune-batch")  # fmt: skip
                with gr.Row():
                    epochs = gr.Number(value=form["epochs"], precision=0, label="Epochs", elem_id="finetune-epochs")
                    train_steps = gr.Number(
                        value=form["train_steps"],
                        precision=0,
                        label="Train steps K",
                        info="picking a method sets it: 8 for SDPO and DDPO (at least 2), 2 for the gradient methods",
                        elem_id="finetune-k",
                    )
                eval_steps = gr.CheckboxGroup(list(EVAL_STEP_CHOICES), value=form["eval_steps"],
                                              label="Evaluate at step counts",
                                              elem_id="finetune-eval-steps")  # fmt: skip
                with gr.Row():
                    adapter = gr.Radio(
                        list(ADAPTERS), value=form["adapter"], label="Adapter", elem_id="finetune-adapter"
                    )
                    rank = gr.Number(value=form["lora_rank"], precision=0, label="LoRA rank", elem_id="finetune-rank")
                with gr.Accordion("More settings", open=False):
                    with gr.Row():
                        batches = gr.Number(value=form["batches_per_epoch"], precision=0,
                                            label="Sampling batches per epoch", elem_id="finetune-batches")  # fmt: skip
                        eval_prompts = gr.Number(value=default_eval_prompts(backend), precision=0,
                                                 label="Evaluation prompts",
                                                 elem_id="finetune-eval-prompts")  # fmt: skip
                    with gr.Row():
                        eval_every = gr.Number(value=form["eval_every"], precision=0, label="Evaluate every (epochs)",
                                               elem_id="finetune-eval-every")  # fmt: skip
                        seed = gr.Number(value=form["seed"], precision=0, label="Seed", elem_id="finetune-seed")
                with gr.Accordion("SADM-style settings (denoising training on Shapes images)", open=False):
                    from finetuners.shapes.world import DOMAINS

                    with gr.Row():
                        structure_weight = gr.Number(value=form["structure_weight"], elem_id="finetune-sadm-lambda",
                                                     label="Structure weight λ (0: plain denoising)")  # fmt: skip
                        domain = gr.Dropdown(list(DOMAINS), value=form["domain"], label="Training images (domain)",
                                             elem_id="finetune-sadm-domain")  # fmt: skip
                        init = gr.Radio(list(SADM_INITS), value=form["init"], label="Start from",
                                        elem_id="finetune-sadm-init")  # fmt: skip
                with gr.Accordion("RLR and backprop settings", open=False):
                    with gr.Row():
                        rlr_h = gr.Number(value=form["rlr_h"], precision=0, label="RLR h (half-order sub-chain length)",
                                          elem_id="finetune-rlr-h")  # fmt: skip
                        zo_mode = gr.Radio(list(ZO_MODES), value=form["zo_mode"], label="RLR zeroth-order term",
                                           elem_id="finetune-zo-mode")  # fmt: skip
                    with gr.Row():
                        s_nu = gr.Number(value=form["s_nu"], label="ZO perturbation std s_ν", elem_id="finetune-s-nu")
                        truncation = gr.Number(value=form["truncation"], precision=0, elem_id="finetune-truncation",
                                               label="DRaFT-K: backprop through the last K' steps")  # fmt: skip
                name = gr.Textbox(label="Run name", placeholder="empty: a dated name, e.g. sdpo-20250101-120000",
                                  elem_id="finetune-name", max_lines=1)  # fmt: skip
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="finetune-start")
                    stop = gr.Button("Stop", variant="stop", elem_id="finetune-stop")
                    resume = gr.Button("Resume", elem_id="finetune-resume")
                error = gr.Markdown("", elem_id="finetune-error", elem_classes=["error-text"])
            with gr.Column(scale=3, min_width=420):
                run = gr.Dropdown([], label="Run", elem_id="finetune-run", interactive=True)
                status = gr.Markdown("", elem_id="finetune-status")
                plots = {}
                with gr.Row():
                    plots["reward"] = _curve_plot("reward", "finetune-curve-reward")
                    plots["accuracy"] = _curve_plot("accuracy", "finetune-curve-accuracy")
                with gr.Row():
                    plots["loss"] = _curve_plot("loss", "finetune-curve-loss")
                    plots["grad_norm"] = _curve_plot("grad_norm", "finetune-curve-grad-norm")
                with gr.Row():
                    plots["memory"] = _curve_plot("memory", "finetune-curve-memory")
                    plots["speed"] = _curve_plot("speed", "finetune-curve-speed")
                samples = gr.Image(label=SAMPLES_LABEL, type="pil", format="png", interactive=False,
                                   elem_id="finetune-samples", elem_classes=["pixel-gallery"],
                                   buttons=["download", "fullscreen"])  # fmt: skip
                sample_prompts = gr.Markdown(NO_PROMPTS, elem_id="finetune-sample-prompts")
        table = gr.Dataframe(headers=RUN_COLUMNS, value=[], label="Runs", interactive=False, elem_id="finetune-runs",
                             wrap=True)  # fmt: skip

        config_inputs = [method, reward, lr, batch, epochs, train_steps, eval_steps, adapter, rank, weights, batches,
                         eval_prompts, eval_every, seed, rlr_h, zo_mode, s_nu, truncation, structure_weight, domain,
                         init, prompts]  # fmt: skip
        view_outputs = [status, table, run, *plots.values(), samples, sample_prompts, view_key]
        fast = dict(concurrency_id="finetune", concurrency_limit=None)  # never behind a generation in the queue

        def start_fn(name, *values):  # values: one per widget of config_inputs, in CONFIG_FIELDS order
            return on_start(backend, name, *values)

        def refresh_fn(name, key):
            return on_refresh(backend, name, key)

        def select_fn(name):  # another run picked: redraw everything
            return on_refresh(backend, name, None)

        start.click(start_fn, [name, *config_inputs], [error, run, name], api_name="finetune_start", **fast).then(
            refresh_fn, [run, view_key], view_outputs, show_progress="hidden", **fast
        )
        stop.click(lambda n: on_stop(backend, n), [run], [error], api_name="finetune_stop", **fast)
        resume.click(lambda n: on_resume(backend, n), [run], [error], api_name="finetune_resume", **fast)
        run.change(select_fn, [run], view_outputs, show_progress="hidden", **fast)
        method.input(method_steps, [method, train_steps], [train_steps], show_progress="hidden", **fast)
        timer = gr.Timer(REFRESH_S)
        timer.tick(refresh_fn, [run, view_key], view_outputs, show_progress="hidden", **fast)
    return tab


if __name__ == "__main__":  # this tab alone: python -m ui.finetune_tab [model] [data_dir]
    from .common import launch_alone

    launch_alone(build_finetune_tab, "Fine-tune")
