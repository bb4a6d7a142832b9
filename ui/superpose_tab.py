"""The Superpose tab: SuperDiff OR / AND of two prompts on one model, or of two models on one prompt.

``run_superpose`` is the handler proper (plain Python, raises ``UserError``); ``on_superpose`` adapts it to
Gradio: a bad input becomes a message in the tab and a warning toast, and the outputs stay as they were.
Every click samples the chosen mode and, with the same seeds, the baselines beside it: averaged predictions
(κ = ½) and the joint prompt through the ordinary sampler (two prompts) or each model alone (two models).
The chosen run's κ(t) and ℓ_i(t) are plotted; they stay in the session (``gr.State``), so the x axis can
switch between step and σ̃ without sampling again. Where the Shapes probe can read the prompts and images, each
image's caption says what it sees and a table counts, per sampler, which of the prompts the images show.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import gradio as gr

from finetuners.errors import UserError
from finetuners.generate import LIMITS, MAX_PROMPT_CHARS, SampleRequest, generate
from finetuners.shapes.world import describe_scene
from finetuners.superdiff import MIN_SD_STEPS, SuperDiffConfig, default_guidance, superpose_models, superpose_prompts

from .backend import Backend
from .common import DEMO_PAIR, attempt, error_markdown, random_seed
from .images import to_display
from .sample_tab import GalleryItem

log = logging.getLogger(__name__)

SOURCES = [("two prompts, one model", "prompts"), ("two models, one prompt", "models")]
SOURCE_NAMES = {value: label for label, value in SOURCES}
MODES = [("AND", "and"), ("OR", "or"), ("averaged (κ = ½)", "avg"), ("joint prompt", "joint")]
MODE_NAMES = {value: label for label, value in MODES}
GALLERY_LABELS = {"and": "AND", "or": "OR", "avg": "Averaged (κ = ½)", "joint": "Joint prompt"}
AXES = [("step", "step"), ("σ̃ (noise level)", "sigma")]
# ALGORITHMS.md §4.3 proposes 100 steps for SD in the UI and 200 for Shapes; 100 keeps a Shapes click (the chosen
# mode and both baselines) at a few seconds on a CPU. Fewer than MIN_SD_STEPS are refused: the estimator's error
# grows with the step size. 1000 is the paper's setting.
DEFAULT_STEPS = 100
SHAPES_BATCH = 8  # a first click on a Shapes model: seeds 0–7, about 25 s in the app on a 2-core CPU (one seed: 14 s)
COMPOSE_NOTE = "shapes-partial: captions that leave objects out, so AND can find both objects"
STEP_LIMITS = (MIN_SD_STEPS, 1000)
TEMPERATURE_LIMITS = (0.0, 1e6)  # OR: T > 0; 1e6 is the reference's hard-coded argmax
BIAS_LIMIT = 100.0  # nats
JOINT_ETA = 1.0  # the joint prompt runs DDIM with η = 1: stochastic, like the superposition's Euler–Maruyama sampler
MAX_TRACE_IMAGES = 4  # images of a batch whose κ / ℓ traces are plotted
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")


@dataclass(frozen=True)
class SuperposeRequest:
    """Validated widget values of one click."""

    source: str  # "prompts" (two prompts on model A) | "models" (model A and model B on one prompt)
    mode: str  # "and" | "or" | "avg" | "joint"
    models: tuple[str, ...]  # one name ("prompts") or two ("models")
    prompts: tuple[str, str]  # the prompts of A and B (the same prompt twice for two models)
    joint_prompt: str  # the joint-prompt baseline ("prompts" only)
    config: SuperDiffConfig  # the superposition that is plotted: the chosen mode's ("avg" for the joint prompt)
    seed: int
    batch: int


@dataclass
class Traces:
    """What the plots need, as plain lists: the weight κ_A of model A per step, [B][N]; ℓ_i per σ̃_k, [M][B][N+1]
    (ℓ = 0 at σ̃_0); σ̃_0 … σ̃_N = 0, [N+1]."""

    title: str
    names: list[str]  # "A: <prompt or model>", "B: …"
    captions: list[str]  # one per plotted image: "seed 0", …
    kappa: list[list[float]]
    log_q: list[list[list[float]]]
    sigmas: list[float]


@dataclass
class SuperposeView:
    """What one click shows."""

    images: list[GalleryItem]  # the chosen mode, one per image, captioned with its seed
    averaged: list[GalleryItem]  # κ = ½, same seeds
    baseline: list[GalleryItem]  # the joint prompt (two prompts) or each model alone (two models), same seeds
    baseline_label: str
    images_label: str
    traces: Traces
    info: str  # Markdown: times, UNet rows per step, final ℓ_A − ℓ_B


# -- handler ---------------------------------------------------------------------------------------------------


def _number(name: str, value, whole: bool = False) -> float | int:
    if value is None or value == "":
        raise UserError(f"{name} is empty: enter a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if whole:
        if not float(value).is_integer():
            raise UserError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _prompt(name: str, text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{name} is empty: type what the image should show")
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"{name} is too long ({len(text)} characters; at most {MAX_PROMPT_CHARS})")
    return text.strip()


def make_request(
    source,
    model_a,
    model_b,
    prompt_a,
    prompt_b,
    joint_prompt,
    mode,
    temperature,
    bias,
    steps,
    guidance,
    seed,
    batch,
    max_batch: int,
) -> SuperposeRequest:
    """Widget values → a validated ``SuperposeRequest`` (``UserError`` with a clear message otherwise). Nothing
    here needs a model, so bad input is refused before any is loaded."""
    if source not in SOURCE_NAMES:
        raise UserError(f"unknown source {source!r}: superpose two prompts or two models")
    if mode not in MODE_NAMES:
        raise UserError(f"unknown mode {mode!r}: choose one of {', '.join(MODE_NAMES)}")
    steps = _number("steps", steps, whole=True)
    lo, hi = STEP_LIMITS
    if not lo <= steps <= hi:
        raise UserError(
            f"steps must be between {lo} and {hi}, got {steps}: the density estimator needs many small "
            "steps (100 is the usual setting, 1000 the paper's)"
        )
    temperature = _number("temperature T", temperature)
    if not TEMPERATURE_LIMITS[0] < temperature <= TEMPERATURE_LIMITS[1]:
        raise UserError(f"temperature T must be > 0 and at most {TEMPERATURE_LIMITS[1]:g}, got {temperature:g}")
    bias = _number("bias", bias)
    if abs(bias) > BIAS_LIMIT:
        raise UserError(f"bias must be between −{BIAS_LIMIT:g} and {BIAS_LIMIT:g} nats, got {bias:g}")
    guidance = _number("guidance", guidance)
    if not LIMITS["guidance"][0] <= guidance <= LIMITS["guidance"][1]:
        raise UserError(
            f"guidance must be between {LIMITS['guidance'][0]:g} and {LIMITS['guidance'][1]:g}, got {guidance:g}"
        )
    seed = _number("seed", seed, whole=True)
    if not LIMITS["seed"][0] <= seed <= LIMITS["seed"][1]:
        raise UserError(f"seed must be between {LIMITS['seed'][0]} and {LIMITS['seed'][1]}, got {seed}")
    batch = _number("batch", batch, whole=True)
    if not 1 <= batch <= max_batch:
        raise UserError(f"batch must be between 1 and {max_batch} in this app, got {batch}")
    name_a = (model_a or "").strip()
    if not name_a:
        raise UserError("no model chosen: pick model A from the list")
    if source == "prompts":
        prompts = (_prompt("prompt A", prompt_a), _prompt("prompt B", prompt_b))
        joint = _prompt("the joint prompt", joint_prompt) if (joint_prompt or "").strip() else " and ".join(prompts)
        if len(joint) > MAX_PROMPT_CHARS:
            raise UserError(f"the joint prompt is too long ({len(joint)} characters; at most {MAX_PROMPT_CHARS})")
        models = (name_a,)
    else:
        if mode == "joint":
            raise UserError(
                "the joint prompt is a baseline for two prompts: with two models choose AND, OR or "
                "averaged (each model alone is shown beside it)"
            )
        name_b = (model_b or "").strip()
        if not name_b:
            raise UserError(
                "superposing two models needs model B: pick a second model (e.g. a fine-tuned "
                "checkpoint), or superpose two prompts on one model"
            )
        if name_b == name_a:
            raise UserError(
                "model A and model B are the same model: pick two different models, or superpose two "
                "prompts on one model"
            )
        prompt = _prompt("the prompt", prompt_a)
        prompts, joint, models = (prompt, prompt), "", (name_a, name_b)
    config = SuperDiffConfig(
        mode="avg" if mode == "joint" else mode,
        temperature=temperature,
        bias=(bias, 0.0),
        steps=steps,
        guidance=guidance,
    )
    return SuperposeRequest(source, mode, models, prompts, joint, config, seed, batch)


def run_superpose(
    backend: Backend,
    source,
    model_a,
    model_b,
    prompt_a,
    prompt_b,
    joint_prompt,
    mode,
    temperature,
    bias,
    steps,
    guidance,
    seed,
    batch,
    progress=None,
) -> SuperposeView:
    """Sample the chosen mode and the baselines, and convert for display. ``progress(…)`` is optional (gr.Progress)."""
    request = make_request(
        source,
        model_a,
        model_b,
        prompt_a,
        prompt_b,
        joint_prompt,
        mode,
        temperature,
        bias,
        steps,
        guidance,
        seed,
        batch,
        backend.settings.max_batch,
    )
    names = [backend.check_model(m) for m in request.models]
    if progress is not None:
        loaded = all(n in backend.loaded_models() for n in names)
        progress(0, desc="starting" if loaded else "loading model" + "s" * (len(names) > 1))
    runs = _Runs(request, progress)
    results = backend.run_with(names, runs)
    return build_view(request, results, backend.settings.display_px)


class _Runs:
    """The work of one click, on the locked pipelines: the chosen superposition, the averaged one (reused when it
    is the chosen one) and the ordinary-sampler baseline, all with the same seeds. Reports progress over all."""

    def __init__(self, request: SuperposeRequest, progress):
        self.request, self.progress, self.done = request, progress, 0
        n = request.config.steps
        baseline_steps = self.baseline_steps * (2 if request.source == "models" else 1)
        self.total = n * (1 if request.mode in ("avg", "joint") else 2) + baseline_steps

    @property
    def baseline_steps(self) -> int:  # the ordinary sampler allows at most LIMITS["steps"][1]
        return min(self.request.config.steps, LIMITS["steps"][1])

    def _tick(self, label: str, k: int, n: int) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress((self.done, self.total), desc=f"{label}: step {k + 1}/{n}", unit="steps")

    def _superpose(self, pipes, config: SuperDiffConfig, label: str):
        r = self.request
        on_step = lambda step: self._tick(label, step.k, config.steps)
        if r.source == "prompts":
            return superpose_prompts(pipes[0], *r.prompts, config, r.seed, r.batch, callback=on_step)
        return superpose_models(pipes[0], pipes[1], r.prompts[0], config, r.seed, r.batch, callback=on_step)

    def _ordinary(self, pipe, prompt: str, label: str):
        n = self.baseline_steps
        request = SampleRequest(
            prompt,
            steps=n,
            sampler="ddim",
            eta=JOINT_ETA,
            guidance=self.request.config.guidance,
            seed=self.request.seed,
            batch=self.request.batch,
            record_pred_x0=False,
        )
        return generate(pipe, request, callback=lambda i, t, x, out: self._tick(label, i, n))

    def __call__(self, *pipes) -> dict:
        r = self.request
        avg_config = replace(r.config, mode="avg")
        out = {}
        # the superposition runs first: it refuses few-step models and mismatched pipelines before anything else
        if r.mode not in ("avg", "joint"):
            out["chosen"] = self._superpose(pipes, r.config, MODE_NAMES[r.mode])
        out["avg"] = self._superpose(pipes, avg_config, "averaged κ = ½")
        if r.source == "prompts":
            out["baseline"] = [self._ordinary(pipes[0], r.joint_prompt, "joint prompt")]
        else:
            out["baseline"] = [self._ordinary(p, r.prompts[0], f"model {ab} alone") for p, ab in zip(pipes, "AB")]
        return out


def build_view(request: SuperposeRequest, results: dict, display_px: int) -> SuperposeView:
    seeds = [request.seed + i for i in range(request.batch)]
    columns = result_columns(request, results)
    specs, scenes = read_columns(request, columns) or (None, {})
    described = {name: [describe_scene(s) for s in found] for name, found in scenes.items()}

    def show(name: str, prefix: str = "") -> list[GalleryItem]:
        words = described.get(name, [None] * len(seeds))
        return [(to_display(img, display_px), f"{prefix}seed {s}" + (f" · {w}" if w else ""))
                for img, s, w in zip(columns[name], seeds, words)]  # fmt: skip

    averaged = show(MODE_NAMES["avg"])
    if request.source == "prompts":
        baseline = show(BASELINE_NAMES[0])
        baseline_label = "Joint prompt"
    else:
        baseline = [item for name, ab in zip(BASELINE_NAMES[1:], "AB") for item in show(name, f"{ab} · ")]
        baseline_label = "Each model alone"
    if request.mode == "joint":
        images, traced = baseline, results["avg"]
        title = "averaged κ = ½ (the joint prompt has no κ)"
    elif request.mode == "avg":
        images, traced, title = averaged, results["avg"], MODE_NAMES["avg"]
    else:
        images, traced, title = show(MODE_NAMES[request.mode]), results["chosen"], MODE_NAMES[request.mode]
    images_label = GALLERY_LABELS[request.mode]  # short: the label sits over the images; the info line says more
    info = describe(request, results, traced)
    if specs is not None:
        info += "\n\n" + reading_table(request, specs, scenes)
    return SuperposeView(
        images,
        averaged,
        baseline,
        baseline_label,
        images_label,
        traces(request, traced, title),
        info,
    )


BASELINE_NAMES = ("joint prompt", "model A alone", "model B alone")


def result_columns(request: SuperposeRequest, results: dict) -> dict[str, object]:
    """Each sampler's images [B, 3, H, W] by the name the table gives it: the chosen mode, averaged, the baselines."""
    columns = {MODE_NAMES[request.mode]: results["chosen"].images} if "chosen" in results else {}
    columns[MODE_NAMES["avg"]] = results["avg"].images
    names = BASELINE_NAMES[:1] if request.source == "prompts" else BASELINE_NAMES[1:]
    columns.update({name: res.images for name, res in zip(names, results["baseline"])})
    return columns


def read_columns(request: SuperposeRequest, columns: dict) -> tuple[list, dict[str, list]] | None:
    """The Shapes probe's reading of every column's images, where it can read them (Shapes captions, 32×32 images):
    (the prompts' specs, scenes by column); else None. Two prompts are read as two, one prompt (two models) as one."""
    import torch

    from finetuners.shapes.probe import read_prompts

    prompts = list(request.prompts) if request.prompts[0] != request.prompts[1] else [request.prompts[0]]
    names = list(columns)
    found = read_prompts(torch.cat([columns[n].float().cpu() for n in names]), prompts)
    if found is None:
        return None
    specs, scenes = found
    b = request.batch
    return specs, {name: scenes[i * b : (i + 1) * b] for i, name in enumerate(names)}


def reading_table(request: SuperposeRequest, specs: list, scenes: dict[str, list]) -> str:
    """Markdown: how many of each column's images show both prompts, one or neither (two prompts), or the prompt
    exactly, among other objects or not at all (one prompt), as the Shapes probe reads them."""
    from finetuners.shapes.probe import ONE_PROMPT_OUTCOMES, TWO_PROMPT_OUTCOMES, outcome

    kinds = ONE_PROMPT_OUTCOMES if len(specs) == 1 else TWO_PROMPT_OUTCOMES
    n = request.batch
    head = f"Shapes probe, of {n} image{'s' * (n > 1)}"
    lines = [f"| {head} | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, found in scenes.items():
        got = [outcome(s, specs) for s in found]
        lines.append(f"| {name} | " + " | ".join(str(got.count(k)) for k in kinds) + " |")
    return "\n".join(lines)


def traces(request: SuperposeRequest, result, title: str) -> Traces:
    """The κ_A and ℓ_i traces of the first ``MAX_TRACE_IMAGES`` images of a ``SuperDiffResult`` as plain lists."""
    b = min(request.batch, MAX_TRACE_IMAGES)
    if request.source == "prompts":
        names = [f"A: {request.prompts[0]}", f"B: {request.prompts[1]}"]
    else:
        names = [f"A: {request.models[0]}", f"B: {request.models[1]}"]
    return Traces(
        title=title,
        names=names,
        captions=[f"seed {request.seed + i}" for i in range(b)],
        kappa=result.kappa[:, :b, 0].T.tolist(),
        log_q=result.log_q[:, :b, :].permute(2, 1, 0).tolist(),
        sigmas=result.ladder.sigmas.tolist(),
    )


def describe(request: SuperposeRequest, results: dict, traced) -> str:
    """Markdown under the images: what ran, the traced run's final density gap and mean weight, and the times."""
    cfg, n = request.config, request.batch
    seeds = f"seed {request.seed}" if n == 1 else f"seeds {request.seed}–{request.seed + n - 1}"
    guidance = f"guidance {cfg.guidance:g}" if cfg.guidance > 1 else "no guidance"
    knobs = {"or": f" · T {cfg.temperature:g} · bias {cfg.bias[0]:g}", "and": f" · bias {cfg.bias[0]:g}"}
    baseline = results["baseline"]
    ordinary = f"{baseline[0].info['sampler']} η {JOINT_ETA:g}, {len(baseline[0].timesteps)} steps"
    rows = traced.info["unet_rows"] / (cfg.steps * n)
    gap = (traced.log_q[-1, :, 0] - traced.log_q[-1, :, 1]).mean().item()
    mean_kappa = traced.kappa[..., 0].mean().item()
    if request.mode == "joint":
        head = f"**joint prompt** “{request.joint_prompt}” through the ordinary sampler ({ordinary})"
    else:
        sep = " ∧ " if request.mode == "and" else " ∨ " if request.mode == "or" else " and "
        what = sep.join(f"“{x}”" for x in (request.prompts if request.source == "prompts" else request.models))
        head = f"**{MODE_NAMES[request.mode]}** {what} over {cfg.steps} Euler–Maruyama steps"
    times = [f"{MODE_NAMES[request.mode]} {results['chosen'].seconds:.2f} s"] if "chosen" in results else []
    times.append(f"averaged κ = ½ {results['avg'].seconds:.2f} s")
    if request.source == "prompts":
        times.append(f"joint prompt “{request.joint_prompt}” ({ordinary}) {baseline[0].seconds:.2f} s")
    else:
        times.append(f"each model alone ({ordinary}) {sum(r.seconds for r in baseline):.2f} s")
    if request.mode == "joint":
        times = times[::-1]
    lines = [
        f"{head} · {n} image{'s' * (n > 1)} · {guidance}{knobs.get(request.mode, '')} · {seeds}",
        f"plots: {MODE_NAMES[traced.info['mode']]} — final ℓ_A − ℓ_B {gap:+.3g} nats · mean κ_A {mean_kappa:.3f} · "
        f"{rows:g} UNet rows per step per image",
        "times: " + " · ".join(times),
    ]
    return "  \n".join(lines)


# -- plots -----------------------------------------------------------------------------------------------------


def _x(traces: Traces, n: int, axis: str) -> list[float]:
    return list(range(n)) if axis == "step" else traces.sigmas[:n]


def _layout(fig, title: str, y_title: str, axis: str):
    log_x = axis == "sigma"
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)),
        template="plotly_white",
        height=360,
        margin=dict(l=56, r=16, t=48, b=96),
        legend=dict(orientation="h", yanchor="top", y=-0.24, x=0),
        hovermode="x unified",
    )
    fig.update_xaxes(
        title_text="σ̃ (log scale, noisy → clean)" if log_x else "step (0 = pure noise)",
        type="log" if log_x else "linear",
        autorange="reversed" if log_x else True,
    )
    fig.update_yaxes(title_text=y_title)
    return fig


def kappa_figure(traces: Traces, axis: str = "step"):
    """κ_A(t), one line per image (κ_B = 1 − κ_A); a dotted line at ½. AND's κ is affine and not clipped."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (kappa, caption) in enumerate(zip(traces.kappa, traces.captions)):
        x = _x(traces, len(kappa), axis)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=kappa,
                mode="lines",
                name=caption,
                customdata=traces.sigmas[: len(kappa)],
                line=dict(color=PALETTE[i % len(PALETTE)], width=1.8),
                hovertemplate="κ_A %{y:.3f} (σ̃ %{customdata:.3g})",
            )
        )
    fig.add_hline(y=0.5, line=dict(dash="dot", color="#9ca3af", width=1))
    return _layout(fig, f"κ_A(t), the weight of {traces.names[0]} — {traces.title}", "κ_A", axis)


def log_q_figure(traces: Traces, axis: str = "step"):
    """ℓ_i(t) = log q_i(x_t) − log q_i(x_T) of each model along the trajectory: A solid, B dashed, a colour per image.

    On the σ̃ axis the last point (σ̃ = 0, where the deterministic last step adds nothing) is left out."""
    import plotly.graph_objects as go

    fig = go.Figure()
    n = len(traces.sigmas) if axis == "step" else len(traces.sigmas) - 1
    for m, per_image in enumerate(traces.log_q):
        for i, (ell, caption) in enumerate(zip(per_image, traces.captions)):
            fig.add_trace(
                go.Scatter(
                    x=_x(traces, n, axis),
                    y=ell[:n],
                    mode="lines",
                    name=caption,
                    legendgroup=caption,
                    showlegend=m == 0,  # one legend entry per image toggles its ℓ_A and ℓ_B
                    customdata=traces.sigmas[:n],
                    line=dict(color=PALETTE[i % len(PALETTE)], width=1.8, dash="solid" if m == 0 else "dash"),
                    hovertemplate=f"ℓ_{'AB'[m]} %{{y:.4g}} (σ̃ %{{customdata:.3g}})",
                )
            )
    return _layout(fig, f"log-density ℓ_i(t), A solid, B dashed — {traces.title}", "ℓ (nats)", axis)


# -- Gradio adapters -------------------------------------------------------------------------------------------


def on_superpose(
    backend: Backend,
    source,
    model_a,
    model_b,
    prompt_a,
    prompt_b,
    joint_prompt,
    mode,
    temperature,
    bias,
    steps,
    guidance,
    seed,
    batch,
    axis="step",
    progress=None,
) -> tuple:
    """Updates for (images, averaged, baseline, info, κ plot, ℓ plot, error, traces state). On failure only the
    error message changes, and a warning toast repeats it."""
    args = (source, model_a, model_b, prompt_a, prompt_b, joint_prompt, mode, temperature, bias, steps, guidance)
    view, message = attempt("superposition", run_superpose, backend, *args, seed, batch, progress)
    if message is None:
        columns = 2 if len(view.images) > 1 else 1
        return (
            gr.update(value=view.images, label=view.images_label, columns=columns),
            gr.update(value=view.averaged, columns=columns),
            gr.update(value=view.baseline, label=view.baseline_label, columns=2 if len(view.baseline) > 1 else 1),
            view.info,
            kappa_figure(view.traces, axis),
            log_q_figure(view.traces, axis),
            "",
            view.traces,
        )
    gr.Warning(message)
    return (*[gr.skip()] * 6, error_markdown(message, "Cannot superpose"), gr.skip())


def on_axis_change(traces: Traces | None, axis: str):
    """Redraw both plots from the session's traces with the other x axis."""
    if not traces:
        return gr.skip(), gr.skip()
    return kappa_figure(traces, axis), log_q_figure(traces, axis)


def on_source_change(source: str, mode: str):
    """Two prompts: prompt B and the joint prompt; two models: model B and one prompt (and no joint-prompt mode)."""
    prompts = source == "prompts"
    modes = MODES if prompts else [m for m in MODES if m[1] != "joint"]
    return (
        gr.update(label="Prompt A" if prompts else "Prompt"),
        gr.update(visible=prompts),
        gr.update(visible=prompts),
        gr.update(visible=not prompts),
        gr.update(choices=modes, value=mode if prompts or mode != "joint" else "and"),
        gr.update(label="Joint prompt" if prompts else "Each model alone"),
    )


# -- layout ----------------------------------------------------------------------------------------------------


def model0(backend: Backend) -> str:
    """Model A at start: shapes-partial beside the Shapes model, whose one-object captions never show a second object
    (so AND of two object prompts can only blend them); else the start-up model."""
    from finetuners.models import COMPOSE_MODEL

    return COMPOSE_MODEL if COMPOSE_MODEL in backend.embedded_choices() else backend.settings.model


def batch0(backend: Backend) -> int:
    """The batch at start: beside an embedded Shapes model ``SHAPES_BATCH`` images, so that a first click shows how
    often each sampler composes (one seed is an anecdote); one image of a real model, whose click takes longer."""
    from finetuners.models import ALIASES

    return min(SHAPES_BATCH, backend.settings.max_batch) if model0(backend) in ALIASES else 1


def guidance_for(backend: Backend, model) -> float:
    """SuperDiff's guidance for a model (``superdiff.default_guidance``), within the slider's range."""
    g = default_guidance(backend.pipeline(model))
    return min(max(g, LIMITS["guidance"][0]), LIMITS["guidance"][1])


def on_model_a_change(backend: Backend, model):
    """Guidance follows model A: the one it superposes with (shapes-partial: none), a checkpoint's: its run's."""
    found, message = attempt("loading the model", guidance_for, backend, model)
    if message is None:
        return found, ""
    return gr.skip(), error_markdown(message, "Cannot load the model")


def _gallery(label: str, elem_id: str) -> gr.Gallery:
    return gr.Gallery(
        label=label,
        columns=1,
        fit_columns=False,
        object_fit="contain",
        format="png",
        elem_id=elem_id,
        elem_classes=["pixel-gallery"],
        buttons=["download", "fullscreen"],
    )


def build_superpose_tab(backend: Backend) -> gr.Tab:
    """Add the Superpose tab to the enclosing ``gr.Blocks``."""
    settings = backend.settings
    choices = backend.model_choices()
    custom = dict(
        allow_custom_value=settings.custom_models,
        info="a pipeline folder or cached hub id may be typed in" if settings.custom_models else None,
    )
    with gr.Tab("Superpose", id="superpose", elem_id="superpose-tab") as tab:
        traces_state = gr.State(None)  # per session: the last run's κ / ℓ traces, to redraw with another x axis
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                source = gr.Radio(SOURCES, value="prompts", label="Superpose", elem_id="superpose-source")
                with gr.Row():
                    prompt_a = gr.Textbox(
                        value=DEMO_PAIR[0],
                        label="Prompt A",
                        lines=1,
                        max_lines=4,
                        elem_id="superpose-prompt-a",
                        placeholder=DEMO_PAIR[0],
                    )
                    prompt_b = gr.Textbox(
                        value=DEMO_PAIR[1],
                        label="Prompt B",
                        lines=1,
                        max_lines=4,
                        elem_id="superpose-prompt-b",
                        placeholder=DEMO_PAIR[1],
                    )
                joint = gr.Textbox(
                    label="Joint-prompt baseline",
                    lines=1,
                    max_lines=4,
                    elem_id="superpose-joint-prompt",
                    placeholder="empty: “A and B”, e.g. a red circle above a blue square",
                )
                with gr.Row():
                    first = model0(backend)
                    note = COMPOSE_NOTE if first != settings.model else None
                    model_a = gr.Dropdown(
                        choices=choices,
                        value=first,
                        label="Model A",
                        elem_id="superpose-model-a",
                        **{**custom, "info": " · ".join(filter(None, [note, custom["info"]])) or None},
                    )
                    model_b = gr.Dropdown(
                        choices=choices,
                        value=None,
                        label="Model B",
                        visible=False,
                        elem_id="superpose-model-b",
                        **custom,
                    )
                mode = gr.Radio(
                    MODES,
                    value="and",
                    label="Mode",
                    elem_id="superpose-mode",
                    info="AND: equal densities · OR: mixture, κ = softmax(T·ℓ + b)",
                )
                with gr.Row():
                    temperature = gr.Number(
                        value=1.0,
                        label="Temperature T (OR)",
                        minimum=0,
                        elem_id="superpose-T",
                        info="1: the mixture; large: the denser model wins",
                    )
                    bias = gr.Number(
                        value=0.0,
                        label="Bias (nats)",
                        elem_id="superpose-bias",
                        info="OR: log-odds of A over B; AND: final ℓ_A − ℓ_B",
                    )
                with gr.Row():
                    steps = gr.Slider(
                        *STEP_LIMITS,
                        value=DEFAULT_STEPS,
                        step=1,
                        precision=0,
                        label="Steps",
                        elem_id="superpose-steps",
                        info="≥ 20; 1000 in the paper",
                    )
                    guidance = gr.Slider(
                        *LIMITS["guidance"],
                        value=guidance_for(backend, model0(backend)),
                        step=0.5,
                        label="Guidance",
                        elem_id="superpose-guidance",
                        info="≤ 1 turns CFG off",
                    )
                with gr.Row(equal_height=False):
                    seed = gr.Number(
                        value=0,
                        precision=0,
                        label="Seed",
                        elem_id="superpose-seed",
                        scale=3,
                        info="image i uses seed + i",
                    )
                    dice = gr.Button("Random", scale=0, min_width=80, size="sm", elem_id="superpose-random-seed")
                    batch = gr.Slider(
                        1,
                        settings.max_batch,
                        value=batch0(backend),
                        step=1,
                        precision=0,
                        label="Batch",
                        scale=4,
                        elem_id="superpose-batch",
                    )
                run = gr.Button("Superpose", variant="primary", elem_id="superpose-run")
                error = gr.Markdown("", elem_id="superpose-error", elem_classes=["error-text"])
            with gr.Column(scale=3, min_width=480):
                with gr.Row(equal_height=True):
                    images = _gallery("Chosen mode", "superpose-gallery")
                    averaged = _gallery("Averaged (κ = ½)", "superpose-avg")
                    baseline = _gallery("Joint prompt", "superpose-baseline")
                info = gr.Markdown("", elem_id="superpose-info")
                axis = gr.Radio(AXES, value="step", label="x axis", elem_id="superpose-axis", container=False)
                with gr.Row(equal_height=True):
                    kappa_plot = gr.Plot(label="κ(t)", elem_id="superpose-kappa", show_label=False)
                    log_q_plot = gr.Plot(label="ℓ_i(t)", elem_id="superpose-logq", show_label=False)

        inputs = [
            source,
            model_a,
            model_b,
            prompt_a,
            prompt_b,
            joint,
            mode,
            temperature,
            bias,
            steps,
            guidance,
            seed,
            batch,
            axis,
        ]
        outputs = [images, averaged, baseline, info, kappa_plot, log_q_plot, error, traces_state]

        def superpose_fn(*values, progress=gr.Progress()):  # values: one per widget of `inputs`, in order
            return on_superpose(backend, *values, progress=progress)

        events = dict(concurrency_id="generate", concurrency_limit=settings.concurrency)
        run.click(superpose_fn, inputs, outputs, api_name="superpose", **events)
        source.change(
            on_source_change, [source, mode], [prompt_a, prompt_b, joint, model_b, mode, baseline], queue=False
        )
        axis.change(on_axis_change, [traces_state, axis], [kappa_plot, log_q_plot], queue=False)
        model_a.change(
            lambda m: on_model_a_change(backend, m), [model_a], [guidance, error], trigger_mode="always_last", **events
        )
        dice.click(random_seed, None, [seed], queue=False)
        # fine-tuning may have added checkpoints since the page loaded
        tab.select(lambda: [gr.update(choices=backend.model_choices())] * 2, None, [model_a, model_b], queue=False)
    return tab


if __name__ == "__main__":  # this tab alone: python -m ui.superpose_tab [model] [data_dir]
    from .common import launch_alone

    launch_alone(build_superpose_tab, "Superpose")
