"""The app without a browser: the Sample handler on good and bad input, the backend's cache, the CLI flags."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from finetuners.errors import UserError
from ui.backend import Backend, Settings
from ui.sample_tab import on_generate, on_model_change, run_sample, strip_frames

REPO = Path(__file__).resolve().parent.parent
GOOD = dict(model="fake", prompt="a red circle", negative_prompt="", steps=2, sampler="ddim", eta=0.0,
            guidance=3.0, seed=0, batch=1)  # fmt: skip


def _no_load(*args):
    raise AssertionError("bad input must be refused before any model is loaded")


@pytest.fixture
def offline_backend() -> Backend:
    """A backend whose loader must never run: input validation comes first."""
    return Backend(Settings(model="fake", device="cpu"), loader=_no_load)


@pytest.fixture(scope="module")
def app_backend(tiny_pipeline_dir) -> Backend:
    return Backend(Settings(model=str(tiny_pipeline_dir), device="cpu", max_batch=4))


BAD_INPUT = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="x" * 5000), "prompt is too long"),
    (dict(steps=0), "steps must be between 1 and 200, got 0"),
    (dict(steps=999), "steps must be between 1 and 200, got 999"),
    (dict(steps=None), "steps is empty"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(batch=0), "batch must be between 1 and 64, got 0"),
    (dict(batch=17), "batch must be between 1 and 16 in this app"),
    (dict(seed=-1), "seed must be between 0 and 4294967295, got -1"),
    (dict(guidance=100), "guidance must be between 0 and 30, got 100"),
    (dict(eta=float("nan")), "eta must be a number"),
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(model=""), "no model chosen"),
]


@pytest.mark.parametrize("change, message", BAD_INPUT, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))[:12]
                                                          for c, _ in BAD_INPUT])  # fmt: skip
def test_bad_input_is_refused_with_a_clear_message(offline_backend, change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run_sample(offline_backend, **{**GOOD, **change})
    assert offline_backend.loaded_models() == []


def test_the_gradio_handler_shows_the_message_and_changes_nothing_else(offline_backend):
    with pytest.warns(UserWarning, match="prompt is empty"):  # gr.Warning outside a request is a warning
        gallery, strip, info, error, state = on_generate(offline_backend, **{**GOOD, "prompt": ""})
    skip = {"__type__": "update"}  # gr.skip(): the component keeps its value
    assert gallery == strip == info == state == skip
    assert "Cannot generate" in error and "prompt is empty" in error


def test_missing_model_path(tmp_path):
    backend = Backend(Settings(model="shapes", device="cpu"))
    with pytest.raises(UserError, match="does not exist"):
        run_sample(backend, **{**GOOD, "model": str(tmp_path / "no-such-model")})
    with pytest.warns(UserWarning, match="does not exist"):
        _, _, _, error, _ = on_generate(backend, **{**GOOD, "model": str(tmp_path / "no-such-model")})
    assert "does not exist" in error and "Traceback" not in error
    assert backend.loaded_models() == []


def test_choosing_a_missing_model_keeps_the_settings(tmp_path):
    backend = Backend(Settings(model="shapes", device="cpu"))
    with pytest.warns(UserWarning, match="does not exist"):
        steps, sampler, guidance, error = on_model_change(backend, str(tmp_path / "nope"))
    assert steps == sampler == guidance == {"__type__": "update"}
    assert error.startswith("⚠️ **Cannot load the model:**")


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "unet").mkdir()
    backend = Backend(Settings(model="shapes", device="cpu"))
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        run_sample(backend, **{**GOOD, "model": str(tmp_path)})


def test_broken_pipeline_folder_is_a_message_not_a_traceback(tmp_path):
    (tmp_path / "model_index.json").write_text("{ not json")
    backend = Backend(Settings(model="shapes", device="cpu"))
    with pytest.warns(UserWarning, match="could not load"):
        _, _, _, error, _ = on_generate(backend, **{**GOOD, "model": str(tmp_path)})
    assert error.startswith("⚠️") and "Traceback" not in error


def test_a_shared_app_serves_only_its_own_models(tmp_path):
    backend = Backend(Settings(model="fake", custom_models=False), loader=_no_load)
    with pytest.raises(UserError, match="not one of this app's models"):
        run_sample(backend, **{**GOOD, "model": str(tmp_path)})


def test_sample_end_to_end_on_the_tiny_model(app_backend):
    calls = []
    progress = lambda value, desc=None, **kw: calls.append((value, desc))
    view = run_sample(app_backend, **{**GOOD, "model": app_backend.settings.model, "steps": 3, "batch": 2},
                      progress=progress)  # fmt: skip
    # each caption: the seed, then ✓ where the Shapes probe reads the prompt in the image, ✗ and what it sees if not
    assert [caption.split(" · ")[0] for _, caption in view.images] == ["seed 0", "seed 1"]
    image = view.images[0][0]
    assert image.size[0] >= 128 and image.size[0] == image.size[1]  # 32 px upscaled for display
    assert [f"image {i + 1} (seed {i}" in label for i, (label, _) in enumerate(view.strips)] == [True] * 2
    frames = view.strips[0][1]
    ts = [int(caption.removeprefix("t=")) for _, caption in frames]
    assert len(ts) == 3 and ts == sorted(ts, reverse=True) and " → ".join(map(str, ts)) in view.info
    assert "s per image" in view.info and "timesteps:" in view.info
    assert [v for v, _ in calls[1:]] == [(1, 3), (2, 3), (3, 3)]
    again = run_sample(app_backend, **{**GOOD, "model": app_backend.settings.model, "steps": 3, "seed": 1})
    assert again.images[0][0].tobytes() == view.images[1][0].tobytes()  # image i of a batch = seed + i


def test_the_probe_reading_matches_the_accuracy_of_the_same_images(app_backend, tmp_path, capsys):
    """On Shapes captions, the count of images that follow the prompt is the probe's exact accuracy on the very images
    the tab drew (sampled again here through the library), and each ✗ says what the probe sees instead."""
    import torch

    from finetuners.generate import SampleRequest, generate
    from finetuners.shapes.probe import prompt_accuracy, read_images, shipped_probe
    from finetuners.shapes.world import describe_scene

    prompt, n = "a red circle above a blue square", 8
    view = run_sample(app_backend, **{**GOOD, "model": app_backend.settings.model, "prompt": prompt, "steps": 2,
                                      "sampler": "ddim-trailing", "batch": 4})  # fmt: skip
    view_b = run_sample(app_backend, **{**GOOD, "model": app_backend.settings.model, "prompt": prompt, "steps": 2,
                                        "sampler": "ddim-trailing", "batch": 4, "seed": 4})  # fmt: skip
    requests = [SampleRequest(prompt, steps=2, sampler="ddim-trailing", guidance=3.0, seed=s, batch=4) for s in (0, 4)]
    draw = lambda pipe: torch.cat([generate(pipe, r).images for r in requests])
    images = app_backend.run_with([app_backend.settings.model], draw)
    probe = shipped_probe()
    followed = prompt_accuracy(probe, images, [prompt] * n).bool().tolist()
    assert 0 < sum(followed) < n  # 2 steps: some images follow the relation and some do not, so the count means it
    captions = [c for _, c in view.images + view_b.images]
    assert [c.endswith(" · ✓") for c in captions] == followed
    for caption, scene, ok in zip(captions, read_images(probe, images), followed):
        assert ok or caption.endswith(f" · ✗ {describe_scene(scene)}")
    assert f"Shapes probe: the prompt is followed in **{sum(followed[:4])} of 4** images" in view.info
    # the CLI prints the same count for the same request
    from finetuners.__main__ import main

    argv = ["sample", "--model", app_backend.settings.model, "--prompt", prompt, "--steps", "2", "--sampler",
            "ddim-trailing", "--guidance", "3", "--batch", "4", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    assert f"Shapes probe: the prompt is followed in {sum(followed[:4])} of 4 images" in capsys.readouterr().err
    # a prompt the probe cannot read leaves the captions as they were
    other = run_sample(app_backend, **{**GOOD, "model": app_backend.settings.model, "prompt": "a red blob"})
    assert [c for _, c in other.images] == ["seed 0"] and "Shapes probe" not in other.info


def test_backend_loads_each_model_once_and_does_not_cache_failures():
    loads = []

    def loader(name, device, dtype):
        loads.append(name)
        if name == "broken":
            raise UserError("broken model")
        return object()

    backend = Backend(Settings(model="base", max_cached_models=2), loader=loader)
    threads = [threading.Thread(target=backend.pipeline, args=("base",)) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert loads == ["base"]
    for _ in range(2):
        with pytest.raises(UserError):
            backend.pipeline("broken")
    assert loads.count("broken") == 2 and backend.loaded_models() == ["base"]
    backend.pipeline("a")
    backend.pipeline("b")  # evicts "a", never the start-up model
    assert backend.loaded_models() == ["base", "b"]


def test_strip_frames_keep_first_and_last():
    assert strip_frames(4, 24) == [0, 1, 2, 3]
    frames = strip_frames(200, 24)
    assert len(frames) == 24 and frames[0] == 0 and frames[-1] == 199


# -- the command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--auth", "nopassword"], "--auth must look like USER:PASSWORD"),
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--device", "tpu"], "unknown device"),
    (["--dtype", "int3"], "unknown dtype"),
])  # fmt: skip
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    import app

    assert app.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_port_in_use_is_said_before_any_model_loads(capsys, monkeypatch):
    import socket

    import app
    import ui.backend

    monkeypatch.setattr(ui.backend, "Backend", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot listen on 127.0.0.1:{port}: the port is in use (another app?); choose another with " \
                  "--port"  # fmt: skip
    app.check_port_free("127.0.0.1", port)  # free again once the other socket is closed


def test_unknown_flag_exits_2_with_one_line(capsys):
    import app

    with pytest.raises(SystemExit) as exc:
        app.parse_args(["--bogus"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_defaults_bind_localhost_and_allow_custom_models_only_when_private():
    import app

    args = app.parse_args([])
    assert args.host == "127.0.0.1" and not args.share and args.auth == []
    assert app.settings_from_args(app.parse_args(["--model", "shapes"])).custom_models
    assert not app.settings_from_args(app.parse_args(["--host", "0.0.0.0"])).custom_models
    assert not app.settings_from_args(app.parse_args(["--share"])).custom_models
    assert app.parse_auth(["ann:pw1", "bob:pw:2"]) == [("ann", "pw1"), ("bob", "pw:2")]


def test_build_app_composes_the_sample_tab(app_backend):
    import app

    demo = app.build_app(app_backend)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"sample-tab", "sample-prompt", "sample-generate", "sample-gallery", "sample-strip"} <= ids


def test_layers_library_never_imports_gradio():
    for path in (REPO / "finetuners").rglob("*.py"):
        assert "import gradio" not in path.read_text(), f"{path} imports gradio"
