"""The Sample tab: prompt and sampler settings in, images, the per-step x̂0 strip and timings out.

``run_sample`` is the handler proper (plain Python, raises ``UserError``); ``on_generate`` adapts it to Gradio:
a bad input becomes a message in the tab and a warning toast, and the outputs stay as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gradio as gr

from finetuners.errors import UserError
from finetuners.generate import LIMITS, SAMPLERS, SampleRequest

from .adaptive_tab import choose_for_prompt, policy_choices
from .backend import Backend
from .common import DEMO_PROMPT, attempt, error_markdown, random_seed
from .images import to_display

log = logging.getLogger(__name__)

MAX_STRIP_FRAMES = 24  # x̂0 frames shown per image; long schedules are subsampled evenly (last step kept)
MAX_STRIP_IMAGES = 4  # images of a batch whose x̂0 strip is kept in the session (memory per user)

GalleryItem = tuple  # (PIL.Image, caption)
ADAPTIVE_OFF = "off"  # the adaptive-steps picker's "use the Steps slider" choice
COMPARE_OFF = "off"  # the compare picker's "one model" choice


@dataclass
class SampleView:
    """What one Generate click shows."""

    images: list[GalleryItem]  # one per image of the batch, captioned with its seed; compared: pairs, model A first
    strips: list[tuple[str, list[GalleryItem]]]  # (label, x̂0 frames captioned with t) for the first images
    info: str  # Markdown: time per image, sampler, timesteps
    compared: bool = False  # images alternate between the two models, one pair per seed
    followed: list[bool] | None = None  # one model's images: whether each follows the prompt (None: probe can't read)


# -- handler ---------------------------------------------------------------------------------------------------


def make_request(prompt, negative_prompt, steps, sampler, eta, guidance, seed, batch, max_batch: int) -> SampleRequest:
    """Widget values → a validated ``SampleRequest`` (``UserError`` with a clear message otherwise)."""
    values = {"steps": steps, "eta": eta, "guidance": guidance, "seed": seed, "batch": batch}
    for name, value in values.items():
        if value is None or value == "":
            raise UserError(f"{name} is empty: enter a number")
    request = SampleRequest(
        prompt=prompt if prompt is not None else "",
        negative_prompt=negative_prompt or "",
        steps=steps,
        sampler=sampler,
        eta=eta,
        guidance=guidance,
        seed=seed,
        batch=batch,
        record_pred_x0=True,
    )
    if request.batch > max_batch:
        raise UserError(f"batch must be between 1 and {max_batch} in this app, got {request.batch}")
    return request


def run_sample(
    backend: Backend, model, prompt, negative_prompt, steps, sampler, eta, guidance, seed, batch, progress=None,
    adaptive=None, compare=None,
) -> SampleView:  # fmt: skip
    """Generate and convert for display. ``progress(fraction_or_(i, n), desc=…)`` is optional (gr.Progress).
    ``adaptive``: the name of an AdaDiff policy (Adaptive steps tab) that picks the step count instead of ``steps``.
    ``compare``: a second model or checkpoint, sampled with the very same request (seeds, steps, sampler, guidance),
    so that base and fine-tuned images of one seed sit side by side."""
    request = make_request(
        prompt, negative_prompt, steps, sampler, eta, guidance, seed, batch, backend.settings.max_batch
    )
    name = backend.check_model(model)
    other = None
    if compare and compare != COMPARE_OFF:
        other = backend.check_model(compare)
        if other == name:
            raise UserError(f"{name!r} is already the model: pick another one to compare with, or 'off'")
    if progress is not None:
        progress(0, desc="starting" if name in backend.loaded_models() else "loading model")
    chosen = ""
    if adaptive and adaptive != ADAPTIVE_OFF:  # an AdaDiff policy picks the step count
        request, chosen = choose_for_prompt(backend, name, adaptive, request)

    def on_step(label):
        def step(i, t, x, out):
            if progress is not None:
                desc = f"{label}step {i + 1}/{request.steps} (t={int(t)})"
                progress((i + 1, request.steps), desc=desc, unit="steps")

        return step

    result = backend.generate(name, request, callback=on_step(f"{name}: " if other else ""))
    view = build_view(result, request, backend.settings.display_px)
    if other is not None:
        if progress is not None and other not in backend.loaded_models():
            progress(0, desc=f"loading {other}")
        second = build_view(backend.generate(other, request, callback=on_step(f"{other}: ")), request,
                            backend.settings.display_px)  # fmt: skip
        view = side_by_side(name, view, other, second)
    elif view.followed is not None:
        n = len(view.followed)
        view.info += f"  \nShapes probe: the prompt is followed in **{sum(view.followed)} of {n}** image{'s' * (n > 1)}"
    if chosen:
        view.info += f"  \n{chosen}"
    return view


def side_by_side(name_a: str, a: SampleView, name_b: str, b: SampleView) -> SampleView:
    """Two views of one request merged pairwise: for each seed, model A's image, then model B's (captions "A · seed
    0", short enough to read whole; the info names A and B), with their x̂0 strips in the same order; both timings."""
    images = [(img, f"{tag} · {caption}") for pair in zip(a.images, b.images)
              for tag, (img, caption) in zip("AB", pair)]  # fmt: skip
    strips = [(f"{tag} · {label}", frames) for pair in zip(a.strips, b.strips)
              for tag, (label, frames) in zip("AB", pair)]  # fmt: skip
    timing_b = b.info.split("  \n")[0]  # the same request: only the time per image differs
    info = f"**A** = `{name_a}`: {a.info}  \n**B** = `{name_b}`: {timing_b}"
    if a.followed is not None and b.followed is not None:
        n, followed_a, followed_b = len(a.followed), sum(a.followed), sum(b.followed)
        info += f"  \nShapes probe, the prompt followed: **A {followed_a} of {n}** · **B {followed_b} of {n}**"
    return SampleView(images, strips[:MAX_STRIP_IMAGES], info, compared=True)


def read_followed(images, prompt: str) -> tuple[list[bool], list[str]] | None:
    """Where the Shapes probe can read the prompt and images: per image whether it follows the prompt exactly (the
    Fine-tune tab's accuracy) and a caption note, ✓ or ✗ with what the probe sees instead; else None."""
    from finetuners.shapes.probe import read_prompts
    from finetuners.shapes.world import describe_scene

    reading = read_prompts(images, [prompt])
    if reading is None:
        return None
    (spec,), scenes = reading
    followed = [spec.satisfied_by(scene) for scene in scenes]
    return followed, ["✓" if ok else f"✗ {describe_scene(scene)}" for ok, scene in zip(followed, scenes)]


def build_view(result, request: SampleRequest, display_px: int) -> SampleView:
    followed, notes = read_followed(result.images, request.prompt) or (None, None)
    images = [(to_display(img, display_px), f"seed {request.seed + i}" + (f" · {notes[i]}" if notes else ""))
              for i, img in enumerate(result.images)]  # fmt: skip
    strips = []
    if result.pred_x0_images is not None:
        k = result.pred_x0_images.shape[1]
        frames = strip_frames(k, MAX_STRIP_FRAMES)
        for per_image in result.pred_x0_images[:MAX_STRIP_IMAGES]:
            i = len(strips)
            frames_i = [(to_display(per_image[j], display_px // 2), f"t={result.timesteps[j]}") for j in frames]
            strips.append((strip_label(i, images[i][1]), frames_i))
    return SampleView(images, strips, describe(result, request), followed=followed)


def strip_frames(k: int, max_frames: int) -> list[int]:
    """Indices of at most ``max_frames`` of ``k`` steps, evenly spread, always including the first and last."""
    if k <= max_frames:
        return list(range(k))
    return sorted({round(j * (k - 1) / (max_frames - 1)) for j in range(max_frames)})


def describe(result, request: SampleRequest) -> str:
    n = result.images.shape[0]
    seeds = f"seed {request.seed}" if n == 1 else f"seeds {request.seed}–{request.seed + n - 1}"
    eta = f", η {request.eta:g}" if request.sampler != "lcm" else ""
    guidance = f"guidance {request.guidance:g}" if request.guidance > 1 else "no guidance"
    ts = result.timesteps
    shown = [str(t) for t in ts] if len(ts) <= 16 else [*map(str, ts[:8]), "…", *map(str, ts[-4:])]
    ts = " → ".join(shown)
    return (
        f"**{result.seconds_per_image:.2f} s per image** · {n} image{'s' * (n > 1)} · "
        f"{len(result.timesteps)} step{'s' * (len(result.timesteps) > 1)} of `{request.sampler}`{eta} · "
        f"{guidance} · {seeds}  \ntimesteps: {ts}"
    )


def defaults_for(backend: Backend, model) -> tuple[int, str, float]:
    """(steps, sampler, guidance) the model expects, clipped to the widgets' ranges."""
    d = backend.defaults(model)
    guidance = min(max(d.guidance, LIMITS["guidance"][0]), LIMITS["guidance"][1])
    return d.steps, d.sampler, guidance


# -- Gradio adapters -------------------------------------------------------------------------------------------


def on_generate(
    backend: Backend, model, prompt, negative_prompt, steps, sampler, eta, guidance, seed, batch, progress=None,
    adaptive=None, compare=None,
) -> tuple:  # fmt: skip
    """Updates for (gallery, strip, info, error, strips state). On failure only the error message changes,
    and a warning toast repeats it."""
    view, message = attempt(
        "generation", run_sample, backend, model, prompt, negative_prompt, steps, sampler, eta, guidance, seed, batch,
        progress, adaptive, compare,
    )  # fmt: skip
    if message is None:
        label, frames = view.strips[0] if view.strips else (strip_label(0), [])
        # an even number of columns keeps each compared pair on one row
        columns = 2 if len(view.images) <= (2 if view.compared else 4) else 4
        images = gr.update(value=view.images, columns=columns)
        return images, gr.update(value=frames, label=label), view.info, "", view.strips
    gr.Warning(message)
    return gr.skip(), gr.skip(), gr.skip(), error_markdown(message), gr.skip()


def strip_label(index: int, caption: str = "") -> str:
    return f"Predicted clean image x̂0 at each step — image {index + 1}" + (f" ({caption})" if caption else "")


def on_select_image(strips: list, evt: gr.SelectData):
    """Show the x̂0 strip of the image clicked in the gallery (kept for the first ``MAX_STRIP_IMAGES``)."""
    i = evt.index if isinstance(evt.index, int) else 0
    if not strips:
        return gr.skip()
    if i >= len(strips):
        return gr.update(value=[], label=f"x̂0 strips are kept for the first {MAX_STRIP_IMAGES} images only")
    label, frames = strips[i]
    return gr.update(value=frames, label=label)


def on_model_change(backend: Backend, model, progress=None):
    """Load the chosen model and set steps / sampler / guidance to what it expects."""
    if progress is not None:
        progress(0, desc="loading model")
    found, message = attempt("loading the model", defaults_for, backend, model)
    if message is None:
        return *found, ""
    gr.Warning(message)
    return gr.skip(), gr.skip(), gr.skip(), error_markdown(message, "Cannot load the model")


# -- layout ----------------------------------------------------------------------------------------------------


def build_sample_tab(backend: Backend) -> gr.Tab:
    """Add the Sample tab to the enclosing ``gr.Blocks``."""
    settings = backend.settings
    steps0, sampler0, guidance0 = defaults_for(backend, settings.model)
    with gr.Tab("Sample", id="sample", elem_id="sample-tab") as tab:
        strips_state = gr.State([])  # per session: x̂0 frames of the last batch, for clicking through images
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    max_lines=6,
                    elem_id="sample-prompt",
                    autofocus=True,
                    value=DEMO_PROMPT,  # a first click samples something
                    placeholder=DEMO_PROMPT,
                )
                negative = gr.Textbox(
                    label="Negative prompt",
                    lines=1,
                    elem_id="sample-negative",
                    placeholder="what to steer away from (used when guidance > 1)",
                )
                model = gr.Dropdown(
                    choices=backend.model_choices(),
                    value=settings.model,
                    label="Model / checkpoint",
                    allow_custom_value=settings.custom_models,
                    elem_id="sample-model",
                    info="a pipeline folder or cached hub id may be typed in" if settings.custom_models else None,
                )
                with gr.Row():
                    steps = gr.Slider(
                        *LIMITS["steps"], value=steps0, step=1, precision=0, label="Steps", elem_id="sample-steps"
                    )
                    sampler = gr.Radio(
                        list(SAMPLERS),
                        value=sampler0,
                        label="Sampler",
                        elem_id="sample-sampler",
                        info="ddim-trailing: SD-Turbo style; lcm: LCM models",
                    )
                with gr.Row():
                    guidance = gr.Slider(
                        *LIMITS["guidance"],
                        value=guidance0,
                        step=0.5,
                        label="Guidance",
                        info="≤ 1 turns classifier-free guidance off",
                        elem_id="sample-guidance",
                    )
                    eta = gr.Slider(
                        *LIMITS["eta"],
                        value=0.0,
                        step=0.05,
                        label="η (eta)",
                        info="DDIM noise: 0 deterministic, 1 DDPM-like",
                        elem_id="sample-eta",
                    )
                with gr.Row(equal_height=False):
                    seed = gr.Number(
                        value=0,
                        precision=0,
                        label="Seed",
                        elem_id="sample-seed",
                        scale=3,
                        info=f"0 … {LIMITS['seed'][1]}; image i uses seed + i",
                    )
                    dice = gr.Button("Random", scale=0, min_width=80, size="sm", elem_id="sample-random-seed")
                    batch = gr.Slider(
                        1,
                        settings.max_batch,
                        value=1,
                        step=1,
                        precision=0,
                        label="Batch",
                        scale=4,
                        elem_id="sample-batch",
                    )
                compare = gr.Dropdown(
                    choices=[COMPARE_OFF, *backend.model_choices()],
                    value=COMPARE_OFF,
                    label="Compare with",
                    info="model B, sampled with the same seeds and settings: each seed's pair side by side, A then B",
                    allow_custom_value=settings.custom_models,
                    elem_id="sample-compare",
                )
                adaptive = gr.Dropdown(
                    choices=[ADAPTIVE_OFF, *policy_choices(backend)],
                    value=ADAPTIVE_OFF,
                    label="Adaptive steps",
                    info="an AdaDiff policy (Adaptive steps tab) picks the step count per prompt",
                    elem_id="sample-adaptive",
                )
                generate = gr.Button("Generate", variant="primary", elem_id="sample-generate")
                error = gr.Markdown("", elem_id="sample-error", elem_classes=["error-text"])
            with gr.Column(scale=3, min_width=360):
                gallery = gr.Gallery(
                    label="Images",
                    columns=2,
                    fit_columns=False,
                    object_fit="contain",
                    format="png",
                    elem_id="sample-gallery",
                    buttons=["download", "fullscreen"],
                )
                info = gr.Markdown("", elem_id="sample-info")
                strip = gr.Gallery(
                    label="Predicted clean image x̂0 at each step",
                    columns=6,
                    fit_columns=False,
                    object_fit="contain",
                    format="png",
                    elem_id="sample-strip",
                    allow_preview=True,
                )

        inputs = [model, prompt, negative, steps, sampler, eta, guidance, seed, batch, adaptive, compare]
        outputs = [gallery, strip, info, error, strips_state]

        def generate_fn(model, prompt, negative, steps, sampler, eta, guidance, seed, batch, adaptive, compare,
                        progress=gr.Progress()):  # fmt: skip
            return on_generate(backend, model, prompt, negative, steps, sampler, eta, guidance, seed, batch, progress,
                               adaptive, compare)  # fmt: skip

        events = dict(concurrency_id="generate", concurrency_limit=settings.concurrency)
        generate.click(generate_fn, inputs, outputs, api_name="sample", **events)
        prompt.submit(generate_fn, inputs, outputs, api_visibility="private", **events)
        gallery.select(on_select_image, [strips_state], [strip], queue=False)
        dice.click(random_seed, None, [seed], queue=False)

        def model_fn(model, progress=gr.Progress()):
            return on_model_change(backend, model, progress)

        model.change(model_fn, [model], [steps, sampler, guidance, error], trigger_mode="always_last", **events)
        # checkpoints of runs that finished since the page loaded (the Fine-tune tab) join the model list
        tab.select(lambda: gr.update(choices=backend.model_choices()), None, [model], queue=False)
        tab.select(lambda: gr.update(choices=[COMPARE_OFF, *backend.model_choices()]), None, [compare], queue=False)
        tab.select(lambda: gr.update(choices=[ADAPTIVE_OFF, *policy_choices(backend)]), None, [adaptive], queue=False)
    return tab


if __name__ == "__main__":  # this tab alone: python -m ui.sample_tab [model] [data_dir]
    from .common import launch_alone

    launch_alone(build_sample_tab, "Sample")
