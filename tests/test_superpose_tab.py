"""The Superpose tab without a browser: its handler on good and bad input, the plots, and the CLI ``superpose``."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest

from finetuners.errors import UserError
from finetuners.shapes.world import parse_prompt
from ui.backend import Backend, Settings
from ui.superpose_tab import (
    batch0,
    guidance_for,
    kappa_figure,
    log_q_figure,
    model0,
    on_axis_change,
    on_model_a_change,
    on_source_change,
    on_superpose,
    reading_table,
    run_superpose,
)

GOOD = dict(source="prompts", model_a="fake", model_b=None, prompt_a="a red circle", prompt_b="a blue square",
            joint_prompt="", mode="and", temperature=1.0, bias=0.0, steps=20, guidance=3.0, seed=0,
            batch=1)  # fmt: skip
TWO_MODELS = dict(source="models", model_a="base", model_b="tuned")


def _no_load(*args):
    raise AssertionError("bad input must be refused before any model is loaded")


@pytest.fixture
def offline_backend() -> Backend:
    return Backend(Settings(model="fake", device="cpu", max_batch=4), loader=_no_load)


@pytest.fixture(scope="module")
def app_backend(tiny_pipeline_dir) -> Backend:
    return Backend(Settings(model=str(tiny_pipeline_dir), device="cpu", max_batch=4))


BAD_INPUT = [
    (dict(prompt_a=""), "prompt A is empty"),
    (dict(prompt_b="  "), "prompt B is empty"),
    (dict(prompt_a="x" * 5000), "prompt A is too long"),
    (dict(temperature=0), "temperature T must be > 0"),
    (dict(temperature=-1.0), "temperature T must be > 0"),
    (dict(temperature=None), "temperature T is empty"),
    (dict(steps=4), "steps must be between 20 and 1000, got 4: the density estimator needs many small steps"),
    (dict(steps=2000), "steps must be between 20 and 1000"),
    (dict(steps=25.5), "steps must be a whole number"),
    (dict(bias=float("nan")), "bias must be a finite number"),
    (dict(bias=1e4), "bias must be between"),
    (dict(guidance=100), "guidance must be between 0 and 30"),
    (dict(seed=-1), "seed must be between 0 and"),
    (dict(batch=5), "batch must be between 1 and 4 in this app"),
    (dict(mode="xor"), "unknown mode 'xor'"),
    (dict(model_a=""), "no model chosen"),
    ({**TWO_MODELS, "model_b": None}, "superposing two models needs model B"),
    ({**TWO_MODELS, "model_b": " base "}, "model A and model B are the same model"),
    ({**TWO_MODELS, "mode": "joint"}, "the joint prompt is a baseline for two prompts"),
    ({**TWO_MODELS, "prompt_a": ""}, "the prompt is empty"),
]


@pytest.mark.parametrize("change, message", BAD_INPUT, ids=[",".join(f"{k}={v!r}"[:16] for k, v in c.items())
                                                          for c, _ in BAD_INPUT])  # fmt: skip
def test_bad_input_is_refused_with_a_clear_message(offline_backend, change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run_superpose(offline_backend, **{**GOOD, **change})
    assert offline_backend.loaded_models() == []


def test_the_gradio_handler_shows_the_message_and_changes_nothing_else(offline_backend):
    with pytest.warns(UserWarning, match="temperature T must be > 0"):
        *outputs, error, state = on_superpose(offline_backend, **{**GOOD, "mode": "or", "temperature": 0})
    assert outputs == [{"__type__": "update"}] * 6 and state == {"__type__": "update"}  # gr.skip(): kept as is
    assert error.startswith("⚠️ **Cannot superpose:**") and "Traceback" not in error


def _backend_over(pipes: dict) -> Backend:
    return Backend(Settings(model="base", device="cpu"), loader=lambda name, device, dtype: pipes[name])


def test_models_the_estimator_cannot_handle_are_refused(random_pipe):
    from diffusers import LCMScheduler

    lcm = copy.copy(random_pipe)
    lcm.scheduler = LCMScheduler.from_config(random_pipe.scheduler.config)
    unet16 = SimpleNamespace(config=SimpleNamespace(in_channels=4, out_channels=4, sample_size=16))
    bigger = SimpleNamespace(unet=unet16, vae=random_pipe.vae, scheduler=random_pipe.scheduler)
    backend = _backend_over({"base": random_pipe, "lcm": lcm, "bigger": bigger})
    with pytest.raises(UserError, match="few-step models .* cannot be superposed"):
        run_superpose(backend, **{**GOOD, "model_a": "lcm"})
    with pytest.raises(UserError, match="different latent shapes: unet sample_size 8 vs 16"):
        run_superpose(backend, **{**GOOD, **TWO_MODELS, "model_b": "bigger"})
    with pytest.warns(UserWarning, match="few-step models"):
        *_, error, _ = on_superpose(backend, **{**GOOD, "model_a": "lcm"})
    assert "few-step models" in error and "Traceback" not in error


def test_a_model_path_that_does_not_exist(tmp_path):
    backend = Backend(Settings(model="shapes", device="cpu"))
    with pytest.raises(UserError, match="does not exist"):
        run_superpose(backend, **{**GOOD, "model_a": str(tmp_path / "nope")})
    with pytest.warns(UserWarning, match="does not exist"):
        *_, error, _ = on_superpose(backend, **{**GOOD, **TWO_MODELS, "model_a": str(tmp_path / "a"),
                                                "model_b": str(tmp_path / "b")})  # fmt: skip
    assert "does not exist" in error and backend.loaded_models() == []


def test_and_on_two_prompts_end_to_end(app_backend):
    steps, batch = 20, 2
    calls = []
    progress = lambda value, desc=None, **kw: calls.append((value, desc))
    view = run_superpose(app_backend, **{**GOOD, "model_a": app_backend.settings.model, "batch": batch},
                         progress=progress)  # fmt: skip
    for items in (view.images, view.averaged, view.baseline):
        # each caption: the seed, then what the Shapes probe sees (Shapes captions on 32×32 images)
        assert [caption.split(" · ")[0] for _, caption in items] == ["seed 0", "seed 1"]
        assert all(len(caption.split(" · ")) == 2 for _, caption in items)
        assert items[0][0].size[0] >= 128  # 32 px upscaled for display
    assert (view.images_label, view.baseline_label) == ("AND", "Joint prompt")
    # the table under it counts, per sampler, the images that show both prompts, one or neither, as the captions say
    table = view.info.split("\n\n")[1].splitlines()
    assert table[0] == "| Shapes probe, of 2 images | both | A only | B only | neither |"
    a, b = parse_prompt("a red circle"), parse_prompt("a blue square")
    rows = [row.strip("| ").split(" | ") for row in table[2:]]
    assert [r[0] for r in rows] == ["AND", "averaged (κ = ½)", "joint prompt"]
    for row, items in zip(rows, (view.images, view.averaged, view.baseline), strict=True):
        found = [_scene(caption.split(" · ")[1]) for _, caption in items]
        counts = [sum((a.shown_in(f), b.shown_in(f)) == want for f in found)
                  for want in ((True, True), (True, False), (False, True), (False, False))]  # fmt: skip
        assert list(map(int, row[1:])) == counts
    assert "**AND** “a red circle” ∧ “a blue square” over 20 Euler–Maruyama steps" in view.info
    assert "3 UNet rows per step per image" in view.info and "times: AND" in view.info
    assert "joint prompt “a red circle and a blue square”" in view.info  # "A and B" when none is given
    # progress: a first "starting"/"loading", then one tick per step of AND, averaged and the joint prompt
    ticks = [v for v, _ in calls[1:]]
    assert ticks == [(i, 3 * steps) for i in range(1, 3 * steps + 1)]
    # traces: κ_A per step [N], ℓ_A and ℓ_B per σ̃ [N+1], per image; AND keeps ℓ_A = ℓ_B
    t = view.traces
    assert len(t.kappa) == batch and all(len(k) == steps for k in t.kappa)
    assert len(t.log_q) == 2 and all(len(ell) == steps + 1 for per in t.log_q for ell in per)
    assert len(t.sigmas) == steps + 1 and t.sigmas[-1] == 0 and t.sigmas == sorted(t.sigmas, reverse=True)
    assert max(abs(a - b) for a, b in zip(t.log_q[0][0], t.log_q[1][0])) < 1e-3 * max(map(abs, t.log_q[0][0]))
    kappa = kappa_figure(t)
    assert [len(tr.x) for tr in kappa.data] == [steps] * batch and list(kappa.data[0].x) == list(range(steps))
    ell = log_q_figure(t)
    assert [len(tr.x) for tr in ell.data] == [steps + 1] * 4
    assert [(tr.name, tr.line.dash) for tr in ell.data] == [("seed 0", "solid"), ("seed 1", "solid"),
                                                             ("seed 0", "dash"), ("seed 1", "dash")]  # fmt: skip
    kappa_s, ell_s = on_axis_change(t, "sigma")
    assert kappa_s.layout.xaxis.type == "log" and list(kappa_s.data[0].x) == t.sigmas[:steps]
    assert [len(tr.x) for tr in ell_s.data] == [steps] * 4  # σ̃ = 0 has no place on a log axis
    # image i of a batch is image 0 at seed + i (up to float rounding of batched convolutions: one grey level)
    alone = run_superpose(app_backend, **{**GOOD, "model_a": app_backend.settings.model, "seed": 1})
    for got, want in ((alone.images[0][0], view.images[1][0]), (alone.baseline[0][0], view.baseline[1][0])):
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def _scene(words: str) -> list:
    """A caption's scene back as objects (cells made up: only shapes and colours are checked here)."""
    from finetuners.shapes.world import Obj

    return [] if words == "(empty)" else [Obj(*reversed(o.split()), cell=i) for i, o in enumerate(words.split(" + "))]


def test_the_reading_table_counts_outcomes_per_sampler():
    from finetuners.shapes.world import Obj

    red, blue, green = Obj("circle", "red", 0), Obj("square", "blue", 4), Obj("triangle", "green", 8)
    request = SimpleNamespace(batch=3)
    two = [parse_prompt("a red circle"), parse_prompt("a blue square")]
    table = reading_table(request, two, {"AND": [[red, blue], [blue], []], "joint prompt": [[red], [red], [red]]})
    assert table.splitlines() == ["| Shapes probe, of 3 images | both | A only | B only | neither |",
                                  "|---|---|---|---|---|",
                                  "| AND | 1 | 0 | 1 | 1 |",
                                  "| joint prompt | 0 | 3 | 0 | 0 |"]  # fmt: skip
    one = reading_table(request, two[:1], {"model B alone": [[red], [red, green], [green]]})
    assert one.splitlines()[2] == "| model B alone | 1 | 1 | 1 |" and "as the prompt says" in one.splitlines()[0]


def test_or_joint_and_averaged_modes(app_backend):
    model = app_backend.settings.model
    joint = run_superpose(app_backend, **{**GOOD, "model_a": model, "mode": "joint",
                                          "joint_prompt": "a red circle above a blue square"})  # fmt: skip
    assert joint.images_label == "Joint prompt" and "“a red circle above a blue square”" in joint.info
    assert [i.tobytes() for i, _ in joint.images] == [i.tobytes() for i, _ in joint.baseline]
    assert joint.traces.title.startswith("averaged") and set(joint.traces.kappa[0]) == {0.5}
    avg = run_superpose(app_backend, **{**GOOD, "model_a": model, "mode": "avg"})
    assert avg.images[0][0].tobytes() == avg.averaged[0][0].tobytes() == joint.averaged[0][0].tobytes()
    images, averaged, baseline, info, kappa, ell, error, traces = on_superpose(
        app_backend, **{**GOOD, "model_a": model, "mode": "or", "temperature": 2.0, "bias": 1.0}
    )
    assert error == "" and "**OR**" in info and "T 2 · bias 1" in info and "times: OR" in info
    assert traces.kappa[0][0] == pytest.approx(1 / (1 + 2.718281828459045**-1))  # κ = softmax(T·0 + b) at ℓ = 0
    assert len(kappa.data) == 1 and len(ell.data) == 2 and images["label"] == "OR"


def test_two_models_on_one_prompt(tiny_pipeline_dir):
    from finetuners.models import load_model

    pipes = {name: load_model(str(tiny_pipeline_dir), "cpu") for name in ("base", "tuned")}
    backend = _backend_over(pipes)
    view = run_superpose(backend, **{**GOOD, **TWO_MODELS, "prompt_b": "ignored", "batch": 2})
    captions = [" · ".join(c.split(" · ")[:2]) for _, c in view.baseline]  # then what the probe sees
    assert captions == ["A · seed 0", "A · seed 1", "B · seed 0", "B · seed 1"]
    assert view.baseline_label == "Each model alone" and "**AND** “base” ∧ “tuned”" in view.info
    assert "4 UNet rows per step per image" in view.info  # each model makes 2 rows (CFG)
    assert view.traces.names == ["A: base", "B: tuned"]
    # one prompt, read as one: exactly as it says, among other objects, or not shown; a row per sampler
    table = view.info.split("\n\n")[1].splitlines()
    assert table[0] == "| Shapes probe, of 2 images | as the prompt says | with other objects | not shown |"
    rows = [r.split(" | ")[0][2:] for r in table[2:]]
    assert rows == ["AND", "averaged (κ = ½)", "model A alone", "model B alone"]
    assert all(sum(map(int, r.strip("| ").split(" | ")[1:])) == 2 for r in table[2:])
    # equal weights twice are one model: AND keeps κ = ½ (the library's degenerate case)
    assert {k for per in view.traces.kappa for k in per} == {0.5}


def test_switching_source_shows_the_right_inputs():
    prompt_a, prompt_b, joint, model_b, mode, baseline = on_source_change("models", "joint")
    assert prompt_a["label"] == "Prompt" and prompt_b["visible"] is False and joint["visible"] is False
    assert model_b["visible"] is True and mode["value"] == "and" and "joint" not in [v for _, v in mode["choices"]]
    assert baseline["label"] == "Each model alone"
    prompt_a, prompt_b, joint, model_b, mode, _ = on_source_change("prompts", "or")
    assert prompt_b["visible"] is True and model_b["visible"] is False and mode["value"] == "or"
    assert on_axis_change(None, "sigma") == ({"__type__": "update"},) * 2


def test_build_app_composes_the_superpose_tab(app_backend):
    import app

    demo = app.build_app(app_backend)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"superpose-tab", "superpose-prompt-a", "superpose-run", "superpose-gallery", "superpose-kappa",
            "superpose-logq", "sample-tab"} <= ids  # fmt: skip


def test_beside_the_shapes_model_the_tab_starts_on_shapes_partial_without_guidance():
    """The Shapes model never draws two objects under a one-object caption, so the tab starts on shapes-partial,
    at the guidance it records for SuperDiff (1); picking a model sets its own; a bad one says so."""
    backend = Backend(Settings(model="shapes", device="cpu", max_batch=4))
    assert backend.model_choices()[:2] == ["shapes", "shapes-partial"]
    assert model0(backend) == "shapes-partial" and guidance_for(backend, "shapes-partial") == 1.0
    assert on_model_a_change(backend, "shapes") == (3.0, "")
    guidance, error = on_model_a_change(backend, "nowhere")
    assert guidance == {"__type__": "update"} and "model path 'nowhere' does not exist" in error
    other = Backend(Settings(model="shapes-partial", device="cpu"))
    assert other.model_choices()[:2] == ["shapes-partial", "shapes"] and model0(other) == "shapes-partial"
    # a first click on a Shapes model samples 8 seeds, within the app's batch limit
    assert (batch0(other), batch0(backend)) == (8, 4)


def test_a_model_folder_is_offered_alone(app_backend):
    assert app_backend.embedded_choices() == [] and model0(app_backend) == app_backend.settings.model
    assert guidance_for(app_backend, app_backend.settings.model) == 3.0  # its sampling guidance: none recorded
    assert batch0(app_backend) == 1  # a model folder may be a real model: one image a click


# -- the command line ------------------------------------------------------------------------------------------


def test_cli_superpose_writes_images_and_traces(tiny_pipeline_dir, tmp_path, capsys):
    from finetuners.__main__ import main

    out = tmp_path / "out"
    argv = ["superpose", "--model", str(tiny_pipeline_dir), "--prompt-a", "a red circle", "--prompt-b",
            "a blue square", "--mode", "or", "--steps", "20", "--batch", "2", "--seed", "3",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["or_seed3.png", "or_seed3_traces.json", "or_seed4.png"]
    traces = json.loads((out / "or_seed3_traces.json").read_text())
    assert traces["prompts"] == ["a red circle", "a blue square"] and traces["config"]["mode"] == "or"
    n, b = 20, 2
    assert len(traces["kappa"]) == n and len(traces["kappa"][0]) == b and len(traces["kappa"][0][0]) == 2
    assert len(traces["log_q"]) == n + 1 and len(traces["sigmas"]) == n + 1 and len(traces["timesteps"]) == n
    assert traces["unet_rows"] == 3 * n * b  # CFG: rows [∅, A, B]
    assert "UNet rows per step" in capsys.readouterr().err


def test_cli_superpose_defaults_to_shapes_partial_without_guidance(tmp_path, capsys):
    from finetuners.__main__ import main

    out = tmp_path / "out"
    argv = ["superpose", "--prompt-a", "a red circle", "--prompt-b", "a blue square", "--steps", "20",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    traces = json.loads((out / "and_seed0_traces.json").read_text())
    assert traces["models"] == ["shapes-partial"] and traces["config"]["guidance"] == 1.0
    assert traces["unet_rows"] == 2 * 20  # no guidance: rows [A, B]
    # what the Shapes probe sees in the image, and which of the two prompts it shows, in the JSON and on stderr
    [scene], [found] = traces["probe"]["scenes"], traces["probe"]["outcomes"]
    a, b = parse_prompt("a red circle"), parse_prompt("a blue square")
    objects = [] if scene == "(empty)" else [o.split() for o in scene.split(" + ")]
    has = lambda spec: [spec.objects[0][1], spec.objects[0][0]] in objects
    assert found == {(True, True): "both", (True, False): "A only", (False, True): "B only"}.get((has(a), has(b)),
                                                                                                "neither")  # fmt: skip
    counts = ", ".join(f"{k} {int(k == found)}" for k in ("both", "A only", "B only", "neither"))
    assert f"Shapes probe, of 1 image: {counts}" in capsys.readouterr().err
    assert main([*argv, "--model", "shapes", "--out", str(tmp_path / "shapes")]) == 0
    traces = json.loads((tmp_path / "shapes" / "and_seed0_traces.json").read_text())
    assert traces["models"] == ["shapes"] and traces["config"]["guidance"] == 3.0 and traces["unet_rows"] == 3 * 20


@pytest.mark.parametrize("extra, message", [
    (["--prompt-a", "a red circle", "--prompt-b", "a blue square", "--temperature", "0"], "temperature must be > 0"),
    (["--prompt-a", "", "--prompt-b", "a blue square"], "the prompt is empty"),
    (["--prompt-a", "a red circle"], "pass --prompt-b"),
    (["--prompt-a", "a red circle", "--prompt-b", "a blue square", "--steps", "4"], "at least 20 steps"),
    (["--prompt-a", "a red circle", "--prompt-b", "a blue square", "--mode", "or", "--bias", "nan"], "finite"),
])  # fmt: skip
def test_cli_superpose_bad_input_exits_2_with_one_line(tiny_pipeline_dir, tmp_path, capsys, extra, message):
    from finetuners.__main__ import main

    out = tmp_path / "out"
    assert main(["superpose", "--model", str(tiny_pipeline_dir), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing written
