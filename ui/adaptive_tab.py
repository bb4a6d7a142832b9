"""The Adaptive steps tab: AdaDiff (ALGORITHMS.md §3) — how many denoising steps each prompt needs.

Three panels over one saved policy (``<data_dir>/policies/<name>/``):
- **A prompt**: the policy's probabilities over the candidate step counts (a bar chart), the chosen count, and the
  image at every candidate count with its quality score (the policy's IQS, e.g. the Shapes probe's accuracy).
- **A prompt set**: a histogram of the chosen step counts, the average network evaluations, and quality against
  steps for the adaptive policy and every fixed step count (one ladder per prompt, same seeds everywhere).
- **Train**: render and score the training prompts' ladders (live progress), then REINFORCE on the cached table
  (milliseconds per epoch), and save the policy.

The handlers (``run_prompt``, ``run_prompt_set``, ``train_steps``) are plain Python raising ``UserError``; the
``on_*`` adapters turn errors into a message in the tab and a warning toast. The UI does no tensor math beyond
indexing the library's results.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from finetuners import adadiff as ad
from finetuners.errors import UserError
from finetuners.generate import LIMITS, SAMPLERS

from .backend import Backend
from .common import DEMO_PROMPT, attempt, count, error_markdown, random_seed, typed_prompt, typed_prompts
from .images import to_display

log = logging.getLogger(__name__)

POLICIES_DIR = "policies"
CHUNK = 32  # prompts per locked rendering call: other users' clicks get the model between chunks
MAX_SET_PROMPTS = 500
MAX_TRAIN_PROMPTS = 2000
COLORS = {"fixed": "#6b7280", "adaptive": "#2563eb", "chosen": "#2563eb", "other": "#93c5fd"}


def policies_root(backend: Backend):
    return backend.settings.data_dir / POLICIES_DIR


def policy_choices(backend: Backend) -> list[str]:
    return ad.list_policies(policies_root(backend))


def quality_choices(backend: Backend) -> list[tuple[str, str]]:
    """(label, IQS name) for the training form: the Shapes probe's exact accuracy (ALGORITHMS.md §3.2) or its
    probability (the shipped policy's), then the preference models learned in the Label tab (for any model)."""
    from finetuners.rewards import PREFERENCE_PREFIX

    from .finetune_tab import reward_choices

    learned = [c for c in reward_choices(backend) if c[1].startswith(PREFERENCE_PREFIX)]
    return [("Shapes probe: accuracy", "shapes-accuracy"), ("Shapes probe: probability", "shapes-probability"),
            *learned]  # fmt: skip


def default_policy(choices: list[str]) -> str | None:
    """The policy a page starts on: the last of the saved ones, else a shipped one."""
    saved = [c for c in choices if c not in ad.SHIPPED_POLICIES]
    return (saved or choices or [None])[-1]


def load_named(backend: Backend, name) -> tuple[ad.StepPolicy, ad.AdaDiffConfig, dict]:
    if not name:
        raise UserError("no policy chosen: train one below, or pick one from the list")
    return ad.load_policy(ad.find_policy(policies_root(backend), name))


def _whole(name: str, value, lo: int, hi: int) -> int:
    if value is None or value == "" or isinstance(value, bool):
        raise UserError(f"{name} is empty: enter a whole number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if not v.is_integer() or not lo <= v <= hi:
        raise UserError(f"{name} must be a whole number between {lo} and {hi}, got {value}")
    return int(v)


def _weight(value) -> float:
    if value is None or value == "" or isinstance(value, bool):
        raise UserError("the quality weight λ is empty: enter a number ≥ 0")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"the quality weight λ must be a number ≥ 0, got {value!r}") from None


def _guidance(value) -> float:
    lo, hi = LIMITS["guidance"]
    if value is None or value == "" or isinstance(value, bool):
        raise UserError(f"the guidance is empty: enter a number between {lo:g} and {hi:g}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"the guidance must be a number between {lo:g} and {hi:g}, got {value!r}") from None
    if not lo <= v <= hi:  # NaN fails too
        raise UserError(f"the guidance must be a number between {lo:g} and {hi:g}, got {value}")
    return v


def setup_for(backend: Backend, model) -> tuple[str, str, float]:
    """The training form's (candidates text, sampler, guidance) for a model: ``adadiff.suggested_setup`` (the Shapes
    set at trailing DDIM on Shapes; a fine-tuned checkpoint at its run's guidance; the paper's set on SD 1.x)."""
    candidates, sampler, guidance = ad.suggested_setup(backend.pipeline(backend.check_model(model)))
    return " ".join(map(str, candidates)), sampler, guidance


def parse_candidates(text) -> tuple[int, ...]:
    """'1 2 4 8' or '1, 2, 4, 8' → (1, 2, 4, 8), validated (``UserError`` for empty, non-positive or duplicates)."""
    parts = (text or "").replace(",", " ").split()
    values = []
    for p in parts:
        try:
            values.append(int(p))
        except ValueError:
            raise UserError(f"candidate step counts must be whole numbers, got {p!r}") from None
    return ad.AdaDiffConfig(candidates=tuple(values)).candidates


def _iqs(config: ad.AdaDiffConfig):
    """The policy's IQS, or None where its weights are missing (then images are shown without scores)."""
    try:
        return ad.make_iqs(config.quality)
    except UserError as e:
        log.info("no quality scores: %s", e)
        return None


def _score_table(iqs, images, prompts: list[str]):
    """Scores [P, N] of a one-seed ladder [P, 1, N, 3, H, W], or None without an IQS or when it cannot read these
    prompts (e.g. not Shapes captions)."""
    if iqs is None:
        return None
    try:
        return ad.score_images(images, prompts, iqs)[:, 0]
    except ValueError as e:
        log.info("no quality scores: %s", e)
        return None


def _ladder(backend: Backend, model, prompts: list[str], seeds, config: ad.AdaDiffConfig, progress=None):
    """Images [P, S, N, 3, H, W] at every candidate, rendered chunk by chunk under the model's lock; yields the
    fraction done after each chunk and returns the ladder (a generator: ``yield from``)."""
    import torch

    n_s = seeds.shape[1]
    images = None
    total = len(prompts) * n_s * sum(config.candidates)
    done = 0
    for j, u in enumerate(config.candidates):
        for lo in range(0, len(prompts), CHUNK):
            ps = [p for p in prompts[lo : lo + CHUNK] for _ in range(n_s)]
            ss = seeds[lo : lo + CHUNK].flatten().tolist()
            x, _ = backend.run_with([model], lambda pipe, ps=ps, ss=ss, u=u: ad.render(
                pipe, ps, ss, u, config.sampler, config.guidance))  # fmt: skip
            if images is None:
                images = torch.zeros(len(prompts), n_s, len(config.candidates), *x.shape[1:])
            images[lo : lo + CHUNK, :, j] = x.view(-1, n_s, *x.shape[1:])
            done += u * len(ps)
            yield done / total, f"{u} step{'s' * (u > 1)}: prompts {lo + 1}–{lo + len(ps) // n_s} of {len(prompts)}"
    return images


def _drain(gen, progress=None):
    """Run a ``_ladder`` generator to its return value, reporting to ``progress`` (gr.Progress) if given."""
    while True:
        try:
            fraction, text = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(fraction, desc=text)


def choose_for_prompt(backend: Backend, model: str, policy_name: str, request):
    """(``request`` at the policy's step count, sampler and guidance; a Markdown line saying so): adaptive steps
    for the Sample tab (``adadiff.adaptive_request``)."""
    policy, config, _ = load_named(backend, policy_name)
    steps, probs = backend.run_with([model], lambda pipe: ad.choose_steps(pipe, policy, [request.prompt]))
    p = ", ".join(f"{u}: {q:.2f}" for u, q in zip(policy.candidates, probs[0].tolist()))
    return ad.adaptive_request(request, steps[0], config), (
        f"adaptive steps: policy **{policy_name}** chose {steps[0]} (π = {p}), at its sampler `{config.sampler}` and "
        f"guidance {config.guidance:g}")  # fmt: skip


# -- a prompt ------------------------------------------------------------------------------------------------------


@dataclass
class PromptView:
    probs: list[float]
    candidates: tuple[int, ...]
    chosen: int
    images: list[tuple]  # (PIL, caption) per candidate
    scores: list[float] | None
    info: str


def run_prompt(backend: Backend, model, policy_name, prompt, seed, progress=None) -> PromptView:
    prompt = typed_prompt(prompt)
    seed = _whole("seed", seed, 0, 2**32 - 1)
    model = backend.check_model(model)
    policy, config, meta = load_named(backend, policy_name)
    if progress is not None:
        progress(0, desc="choosing steps")
    steps, probs = backend.run_with([model], lambda pipe: ad.choose_steps(pipe, policy, [prompt]))
    import torch

    ladder = _drain(_ladder(backend, model, [prompt], torch.tensor([[seed]]), config), progress)
    images = ladder[0, 0]  # [N, 3, H, W]
    table = _score_table(_iqs(config), ladder, [prompt])
    scores = table[0].tolist() if table is not None else None
    px = backend.settings.display_px // 2
    gallery = []
    for j, u in enumerate(config.candidates):
        mark = " ← chosen" if u == steps[0] else ""
        score = f" · q {scores[j]:.2f}" if scores is not None else ""
        gallery.append((to_display(images[j], px), f"{count(u, 'step')}{score}{mark}"))
    p = probs[0].tolist()
    info = (f"**Chosen: {count(steps[0], 'step')}** (π = {max(p):.2f}) · candidates {list(config.candidates)} · "
            f"sampler `{config.sampler}`, guidance {config.guidance:g}, seed {seed}")  # fmt: skip
    if meta.get("model"):
        info += f" · policy trained for `{meta['model']}`"
    if scores is None:
        info += f"  \nno quality scores: {config.quality} cannot score this prompt"
    return PromptView(p, config.candidates, steps[0], gallery, scores, info)


def probs_figure(view: PromptView):
    import plotly.graph_objects as go

    colors = [COLORS["chosen"] if u == view.chosen else COLORS["other"] for u in view.candidates]
    fig = go.Figure(go.Bar(x=[str(u) for u in view.candidates], y=view.probs, marker_color=colors,
                           hovertemplate="%{x} steps: π = %{y:.3f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=dict(text="π(steps | prompt)", font=dict(size=14)), template="plotly_white", height=300,
                      margin=dict(l=48, r=16, t=44, b=44), yaxis=dict(range=[0, 1], title="probability"),
                      xaxis=dict(title="steps", type="category"))  # fmt: skip
    return fig


# -- a prompt set --------------------------------------------------------------------------------------------------


@dataclass
class SetView:
    candidates: tuple[int, ...]
    histogram: list[int]  # prompts per candidate
    fixed_quality: list[float] | None  # mean IQS at every fixed u
    adaptive_quality: float | None
    mean_steps: float
    info: str
    # the Shapes probe's exact accuracy too, where the policy's IQS is another score (e.g. the shipped policy's
    # probability) and the probe can read the prompts and images: the measure docs/BENCHMARKS.md reports
    fixed_accuracy: list[float] | None = None
    adaptive_accuracy: float | None = None


def set_prompts(text, n) -> list[str]:
    """The prompts typed (one per line), or the first ``n`` Shapes evaluation prompts when none are (prompt i at
    seed i: images no training ladder renders, ``adadiff.TRAIN_SEED_BASE``)."""
    if lines := typed_prompts(text, MAX_SET_PROMPTS, "prompts"):
        return lines
    from finetuners.shapes.world import eval_prompts

    return eval_prompts(_whole("number of prompts", n, 1, MAX_SET_PROMPTS))


def _probe_accuracy(backend: Backend, model: str, config: ad.AdaDiffConfig, prompts: list[str]):
    """The Shapes probe's accuracy as a second IQS, where the policy's own is another score and the probe can read
    these prompts on this model's images; else None."""
    if config.quality == "shapes-accuracy":
        return None
    try:
        backend.run_with([model], lambda pipe: ad.check_quality("shapes-accuracy", prompts, pipe))
        return ad.make_iqs("shapes-accuracy")
    except UserError:
        return None


def _versus_fixed(what: str, candidates, fixed: list[float], adaptive: float, mean_steps: float) -> str:
    """One Markdown line: the adaptive score against every fixed count's, and the saving against the smallest fixed
    count within 0.01 (one point of accuracy) of it."""
    line = f"adaptive {what} {adaptive:.3f}; fixed: " + ", ".join(f"{u}→{q:.3f}" for u, q in zip(candidates, fixed))
    matched = next((u for u, q in zip(candidates, fixed) if q >= adaptive - 0.01), None)
    if matched is not None:
        saved = 1 - mean_steps / matched
        verdict = f"{100 * saved:.0f}% fewer steps" if saved >= 0 else f"{100 * -saved:.0f}% more steps"
        line += f"  \nsmallest fixed count within 0.01 of adaptive: **{matched}** → **{verdict}** at matched {what}"
    return line


def run_prompt_set(backend: Backend, model, policy_name, prompts_text, n, progress=None) -> SetView:
    import torch

    model = backend.check_model(model)
    policy, config, _ = load_named(backend, policy_name)
    prompts = set_prompts(prompts_text, n)
    steps, _ = backend.run_with([model], lambda pipe: ad.choose_steps(pipe, policy, prompts))
    idx = torch.tensor([config.candidates.index(s) for s in steps])
    hist = torch.bincount(idx, minlength=len(config.candidates)).tolist()
    mean_steps = sum(steps) / len(steps)
    nfe = mean_steps * (2 if config.guidance > 1 else 1)
    scorers = {config.quality: _iqs(config), "probe accuracy": _probe_accuracy(backend, model, config, prompts)}
    tables = {}
    if any(scorers.values()):
        images = _drain(_ladder(backend, model, prompts, torch.arange(len(prompts))[:, None], config), progress)
        tables = {what: table for what, iqs in scorers.items()
                  if (table := _score_table(iqs, images, prompts)) is not None}  # fmt: skip
    curves = {what: (table.mean(0).tolist(), float(table[torch.arange(len(prompts)), idx].mean()))
              for what, table in tables.items()}  # fmt: skip
    u_max = config.candidates[-1]
    info = (f"**{len(prompts)} prompts · mean {mean_steps:.2f} steps** ({nfe:.2f} network evaluations per image; "
            f"fixed {u_max} steps: {u_max * (2 if config.guidance > 1 else 1)}) · "
            f"{100 * (1 - mean_steps / u_max):.0f}% fewer steps than {u_max}")  # fmt: skip
    for what, (fixed, adaptive) in curves.items():
        info += "  \n" + _versus_fixed(what, config.candidates, fixed, adaptive, mean_steps)
    if config.quality not in curves:
        info += f"  \nno quality curve: {config.quality} cannot score these prompts"
    fixed, adaptive = curves.get(config.quality, (None, None))
    fixed_acc, adaptive_acc = curves.get("probe accuracy", (None, None))
    return SetView(config.candidates, hist, fixed, adaptive, mean_steps, info, fixed_acc, adaptive_acc)


def histogram_figure(view: SetView):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[str(u) for u in view.candidates], y=view.histogram, marker_color=COLORS["adaptive"],
                           hovertemplate="%{x} steps: %{y} prompts<extra></extra>"))  # fmt: skip
    fig.update_layout(title=dict(text="chosen step counts", font=dict(size=14)), template="plotly_white", height=300,
                      margin=dict(l=48, r=16, t=44, b=44), yaxis=dict(title="prompts"),
                      xaxis=dict(title="steps", type="category"))  # fmt: skip
    return fig


def quality_figure(view: SetView):
    import plotly.graph_objects as go

    fig = go.Figure()
    both = view.fixed_quality is not None and view.fixed_accuracy is not None
    for fixed, adaptive, what, dash, symbol in [
        (view.fixed_quality, view.adaptive_quality, "policy's score", "solid", "star"),
        (view.fixed_accuracy, view.adaptive_accuracy, "probe accuracy", "dot", "diamond"),
    ]:  # fmt: skip
        if fixed is None:
            continue
        tag = f" · {what}" if both else ""
        fig.add_trace(go.Scatter(x=list(view.candidates), y=fixed, mode="lines+markers", name=f"fixed steps{tag}",
                                 line=dict(color=COLORS["fixed"], dash=dash)))  # fmt: skip
        fig.add_trace(go.Scatter(x=[view.mean_steps], y=[adaptive], mode="markers", name=f"adaptive{tag}",
                                 marker=dict(color=COLORS["adaptive"], size=14, symbol=symbol)))  # fmt: skip
    fig.update_layout(title=dict(text="quality vs mean steps", font=dict(size=14)), template="plotly_white",
                      height=300, margin=dict(l=48, r=16, t=44, b=44), xaxis=dict(title="mean steps"),
                      yaxis=dict(title="quality"), legend=dict(orientation="h", y=-0.25))  # fmt: skip
    return fig


# -- training ------------------------------------------------------------------------------------------------------


def training_set(prompts_text, n) -> list[str]:
    """The training prompts typed (one per line, repeats dropped), or ``n`` Shapes captions in the world's mix."""
    if lines := typed_prompts(prompts_text, MAX_TRAIN_PROMPTS, "training prompts", distinct=True):
        return lines
    return ad.training_prompts(_whole("training prompts", n, 1, MAX_TRAIN_PROMPTS))


def train_steps(backend: Backend, model, name, n_prompts, seeds, candidates_text, epochs, quality_weight,
                sampler="ddim-trailing", guidance=3.0, quality="shapes-accuracy", prompts_text="",
                ) -> Iterator[tuple[str, list[dict] | None]]:  # fmt: skip
    """Render the ladders, train, save: yields (status Markdown, training history or None) as it goes. The prompts
    are ``prompts_text``'s lines, or ``n_prompts`` Shapes captions when it is empty."""
    model = backend.check_model(model)
    folder = ad.policy_path(policies_root(backend), (name or "").strip())
    if folder.exists() or folder.name in ad.SHIPPED_POLICIES:
        raise UserError(f"a policy named {folder.name!r} already exists: choose another name")
    prompts = training_set(prompts_text, n_prompts)
    config = ad.AdaDiffConfig(candidates=parse_candidates(candidates_text), quality=quality,
                              num_seeds=_whole("seeds per prompt", seeds, 1, 8),
                              epochs=_whole("epochs", epochs, 1, 5000),
                              quality_weight=_weight(quality_weight), sampler=sampler,
                              guidance=_guidance(guidance))  # fmt: skip
    iqs = ad.make_iqs(config.quality)

    def prepare(pipe):  # before the ladder is rendered: the model's images can be scored, every prompt fits it
        ad.check_quality(config.quality, prompts, pipe)
        return ad.text_features(pipe, prompts)  # the policy's input

    features = backend.run_with([model], prepare)
    seeds = ad.ladder_seeds(len(prompts), config.num_seeds, ad.TRAIN_SEED_BASE)
    size = f"{count(len(prompts), 'prompt')} × {count(config.num_seeds, 'seed')}"
    yield (f"rendering {size} at {list(config.candidates)} steps (`{config.sampler}`, guidance "
           f"{config.guidance:g})…"), None  # fmt: skip
    ladder_gen = _ladder(backend, model, prompts, seeds, config)
    while True:
        try:
            fraction, text = next(ladder_gen)
        except StopIteration as stop:
            images = stop.value
            break
        yield f"**ladder {100 * fraction:.0f}%** — {text}", None
    ladder = ad.Ladder(prompts, seeds, config.candidates, ad.score_images(images, prompts, iqs))
    rewards = ad.config_rewards(ladder.quality, config)
    yield "training the policy on the cached reward table…", None
    result = ad.train_policy(features, rewards, config)
    last = result.history[-1]
    meta = {"model": model, "prompts": len(prompts), "final": last}
    ad.save_policy(folder, result.policy, config, meta, ladder)
    yield (f"**saved {folder.name}** · {size} · expected reward "
           f"{last['expected_reward']:.3f} · mean steps {last['mean_steps']:.2f} on the training prompts"), \
        result.history  # fmt: skip


MIN_REWARD_SPAN = 0.05  # the expected-reward axis spans at least this much


def axis_range(values, span: float) -> list[float] | None:
    """A range centred on the finite ``values`` that spans at least ``span``, or None (plotly's own) when they
    already do: plotly zooms into a nearly constant line until its tick labels are rounding noise
    (0.9999999, 0.99999995, 1)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite or max(finite) - min(finite) >= span:
        return None
    mid = (max(finite) + min(finite)) / 2
    return [mid - span / 2, mid + span / 2]


def history_figure(history: list[dict]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x = [r["epoch"] for r in history]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=[r["expected_reward"] for r in history], name="expected reward",
                             line=dict(color=COLORS["adaptive"])), secondary_y=False)  # fmt: skip
    fig.add_trace(go.Scatter(x=x, y=[r["mean_steps"] for r in history], name="mean steps (argmax)",
                             line=dict(color=COLORS["fixed"], dash="dot")), secondary_y=True)  # fmt: skip
    fig.update_layout(title=dict(text="policy training", font=dict(size=14)), template="plotly_white", height=300,
                      margin=dict(l=48, r=48, t=44, b=44), legend=dict(orientation="h", y=-0.25))  # fmt: skip
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="E_π[R]", range=axis_range([r["expected_reward"] for r in history], MIN_REWARD_SPAN),
                     secondary_y=False)  # fmt: skip
    fig.update_yaxes(title_text="steps", secondary_y=True)
    return fig


# -- Gradio adapters -------------------------------------------------------------------------------------------


def on_prompt(backend: Backend, model, policy_name, prompt, seed, progress=None) -> tuple:
    """Updates for (bar chart, info, gallery, error)."""
    view, message = attempt("choosing steps", run_prompt, backend, model, policy_name, prompt, seed, progress)
    if message is None:
        return probs_figure(view), view.info, gr.update(value=view.images), ""
    gr.Warning(message)
    return gr.skip(), gr.skip(), gr.skip(), error_markdown(message, "Cannot choose steps")


def on_prompt_set(backend: Backend, model, policy_name, prompts_text, n, progress=None) -> tuple:
    """Updates for (histogram, quality plot, info, error)."""
    view, message = attempt("evaluating the policy", run_prompt_set, backend, model, policy_name, prompts_text, n,
                            progress)  # fmt: skip
    if message is None:
        return histogram_figure(view), quality_figure(view), view.info, ""
    gr.Warning(message)
    return gr.skip(), gr.skip(), gr.skip(), error_markdown(message, "Cannot evaluate")


def on_model(backend: Backend, model) -> tuple:
    """Updates for the training form's (candidates, sampler, guidance, error) when another model is picked."""
    found, message = attempt("loading the model", setup_for, backend, model)
    if message is None:
        return *found, ""
    return gr.skip(), gr.skip(), gr.skip(), error_markdown(message)


def on_train(backend: Backend, model, name, n_prompts, seeds, candidates, epochs, quality_weight,
             sampler="ddim-trailing", guidance=3.0, quality="shapes-accuracy", prompts_text=""):  # fmt: skip
    """A generator of updates for (status, training plot, error, policy picker)."""
    gen = train_steps(backend, model, name, n_prompts, seeds, candidates, epochs, quality_weight, sampler, guidance,
                      quality, prompts_text)  # fmt: skip
    while True:
        step, message = attempt("training the policy", next, gen, None)
        if message is None and step is None:
            return
        if message is not None:
            gr.Warning(message)
            yield gr.skip(), gr.skip(), error_markdown(message, "Cannot train"), gr.skip()
            return
        status, history = step
        if history is None:
            yield status, gr.skip(), "", gr.skip()
        else:
            choices = policy_choices(backend)
            yield status, history_figure(history), "", gr.update(choices=choices, value=(name or "").strip())
            return


# -- layout ----------------------------------------------------------------------------------------------------


def build_adaptive_tab(backend: Backend) -> gr.Tab:
    """Add the Adaptive steps tab to the enclosing ``gr.Blocks``."""
    settings = backend.settings
    choices = policy_choices(backend)
    candidates0, sampler0, guidance0 = setup_for(backend, settings.model)
    with gr.Tab("Adaptive steps", id="adaptive", elem_id="adaptive-tab") as tab:
        with gr.Row(equal_height=False):
            model = gr.Dropdown(choices=backend.model_choices(), value=settings.model, label="Model / checkpoint",
                                elem_id="adaptive-model")  # fmt: skip
            policy = gr.Dropdown(choices=choices, value=default_policy(choices), label="Policy",
                                 elem_id="adaptive-policy",
                                 info=f"{', '.join(ad.SHIPPED_POLICIES)}: shipped, for the Shapes model; yours are "
                                 f"saved in {policies_root(backend)}/; train one below")  # fmt: skip
        error = gr.Markdown("", elem_id="adaptive-error", elem_classes=["error-text"])
        with gr.Accordion("A prompt: the policy's choice and the image at every step count", open=True):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=300):
                    prompt = gr.Textbox(label="Prompt", lines=1, max_lines=4, elem_id="adaptive-prompt",
                                        value=DEMO_PROMPT, placeholder=DEMO_PROMPT)  # fmt: skip
                    with gr.Row(equal_height=False):
                        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="adaptive-seed", scale=3)
                        dice = gr.Button("Random", scale=0, min_width=80, size="sm", elem_id="adaptive-random-seed")
                    choose = gr.Button("Choose steps", variant="primary", elem_id="adaptive-choose")
                    info = gr.Markdown("", elem_id="adaptive-info")
                with gr.Column(scale=3, min_width=360):
                    probs_plot = gr.Plot(elem_id="adaptive-probs", show_label=False)
            ladder = gr.Gallery(label="The image at every candidate step count (same seed)", columns=4,
                                fit_columns=False, object_fit="contain", format="png", elem_id="adaptive-ladder",
                                elem_classes=["pixel-gallery"])  # fmt: skip
        with gr.Accordion("A prompt set: chosen steps, network evaluations, quality against fixed steps", open=False):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=300):
                    set_text = gr.Textbox(label="Prompts, one per line", lines=3, elem_id="adaptive-set-prompts",
                                          placeholder="empty: the Shapes evaluation prompts")  # fmt: skip
                    set_n = gr.Slider(8, MAX_SET_PROMPTS, value=64, step=8, precision=0, label="Evaluation prompts",
                                      elem_id="adaptive-set-n")  # fmt: skip
                    evaluate = gr.Button("Evaluate", elem_id="adaptive-evaluate")
                    set_info = gr.Markdown("", elem_id="adaptive-set-info")
                with gr.Column(scale=3, min_width=360):
                    with gr.Row():
                        hist_plot = gr.Plot(elem_id="adaptive-histogram", show_label=False)
                        quality_plot = gr.Plot(elem_id="adaptive-quality", show_label=False)
        with gr.Accordion("Train a policy (AdaDiff: REINFORCE on quality minus step cost)",
                          open=set(choices) <= set(ad.SHIPPED_POLICIES)):  # fmt: skip
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=300):
                    name = gr.Textbox(label="Name", value="my-policy", elem_id="adaptive-name")
                    candidates = gr.Textbox(label="Candidate step counts", value=candidates0,
                                            elem_id="adaptive-candidates")  # fmt: skip
                    with gr.Row():
                        sampler = gr.Dropdown(list(SAMPLERS), value=sampler0, label="Ladder sampler (deterministic)",
                                              elem_id="adaptive-sampler")  # fmt: skip
                        guidance = gr.Number(value=guidance0, label="Guidance", elem_id="adaptive-guidance",
                                             info="the model's; a fine-tuned checkpoint's is its run's")  # fmt: skip
                    train_text = gr.Textbox(label="Training prompts, one per line", lines=2, max_lines=8,
                                            elem_id="adaptive-train-text",
                                            placeholder="empty: Shapes captions in the world's mix, as many as "
                                            "below")  # fmt: skip
                    with gr.Row():
                        n_prompts = gr.Number(value=64, precision=0, label="Shapes captions (none typed)",
                                              elem_id="adaptive-train-prompts")  # fmt: skip
                        n_seeds = gr.Number(value=2, precision=0, label="Seeds per prompt", elem_id="adaptive-seeds")
                    quality = gr.Dropdown(quality_choices(backend), value="shapes-accuracy",
                                          label="Quality score (IQS)", elem_id="adaptive-iqs",
                                          info="what every ladder image is scored by")  # fmt: skip
                    with gr.Row():
                        epochs = gr.Number(value=300, precision=0, label="Epochs", elem_id="adaptive-epochs")
                        weight = gr.Number(value=1.0, label="Quality weight λ", elem_id="adaptive-lambda")
                    with gr.Row():
                        train = gr.Button("Train", variant="primary", elem_id="adaptive-train")
                        stop = gr.Button("Stop", elem_id="adaptive-stop")
                    status = gr.Markdown("", elem_id="adaptive-status")
                with gr.Column(scale=3, min_width=360):
                    train_plot = gr.Plot(elem_id="adaptive-train-plot", show_label=False)

        events = dict(concurrency_id="generate", concurrency_limit=settings.concurrency)

        def prompt_fn(model, policy, prompt, seed, progress=gr.Progress()):
            return on_prompt(backend, model, policy, prompt, seed, progress)

        def set_fn(model, policy, text, n, progress=gr.Progress()):
            return on_prompt_set(backend, model, policy, text, n, progress)

        def train_fn(model, name, n_prompts, n_seeds, candidates, epochs, weight, sampler, guidance, quality, text):
            yield from on_train(backend, model, name, n_prompts, n_seeds, candidates, epochs, weight, sampler, guidance,
                                quality, text)  # fmt: skip

        prompt_outputs = [probs_plot, info, ladder, error]
        choose.click(prompt_fn, [model, policy, prompt, seed], prompt_outputs, api_name="adaptive_steps", **events)
        prompt.submit(prompt_fn, [model, policy, prompt, seed], prompt_outputs, api_visibility="private", **events)
        evaluate.click(set_fn, [model, policy, set_text, set_n], [hist_plot, quality_plot, set_info, error],
                       api_name="adaptive_set", **events)  # fmt: skip
        training = train.click(train_fn, [model, name, n_prompts, n_seeds, candidates, epochs, weight, sampler,
                                          guidance, quality, train_text], [status, train_plot, error, policy],
                               api_name="adaptive_train", **events)  # fmt: skip
        model.change(lambda m: on_model(backend, m), [model], [candidates, sampler, guidance, error],
                     trigger_mode="always_last", **events)  # fmt: skip
        stop.click(lambda: "stopped", None, [status], cancels=[training], queue=False)
        dice.click(random_seed, None, [seed], queue=False)

        def refresh(current):  # new policies, checkpoints and preference models added since the page loaded
            found = policy_choices(backend)
            return (gr.update(choices=found, value=current if current in found else default_policy(found)),
                    gr.update(choices=backend.model_choices()),
                    gr.update(choices=quality_choices(backend)))  # fmt: skip

        tab.select(refresh, [policy], [policy, model, quality], queue=False)
    return tab


if __name__ == "__main__":  # this tab alone: python -m ui.adaptive_tab [model] [data_dir]
    from .common import launch_alone

    launch_alone(build_adaptive_tab, "Adaptive steps")
