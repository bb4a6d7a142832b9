"""The Shapes world, its tokenizer, the probe maths and the Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetuners.metrics import frechet_distance
from finetuners.shapes import architecture as arch
from finetuners.shapes.probe import N_SHAPE_CLASSES, outcome, prompt_log_prob, read_prompts, read_scene
from finetuners.shapes.world import (
    COLOR_NAMES,
    N_CELLS,
    SHAPES,
    TEMPLATES,
    VOCABULARY,
    Obj,
    PromptSpec,
    caption,
    cell_targets,
    describe_scene,
    eval_prompts,
    make_dataset,
    parse_prompt,
    partial_captions,
    render,
    valid_placements,
)


def test_dataset_is_a_pure_function_of_the_seed():
    a, b, c = make_dataset(20, seed=3), make_dataset(20, seed=3), make_dataset(20, seed=4)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))
    assert a[0].image.shape == (32, 32, 3) and a[0].image.dtype == np.uint8


def test_every_sample_satisfies_its_caption_and_round_trips():
    for s in make_dataset(300, seed=0):
        assert parse_prompt(s.caption) == s.spec
        assert s.spec.satisfied_by(s.objects)
        assert caption(s.spec) == s.caption


def test_prompts_are_compositional():
    two = parse_prompt("a red circle above a blue square")
    one = parse_prompt("a blue square")
    assert two != one and len(two.objects) == 2 and two.relation == "above"
    red, blue = Obj("circle", "red", 1), Obj("square", "blue", 7)
    assert two.satisfied_by([red, blue]) and two.satisfied_by([blue, red])  # order of detection is irrelevant
    assert not two.satisfied_by([Obj("circle", "red", 7), Obj("square", "blue", 1)])  # relation violated
    assert not two.satisfied_by([red])  # missing object
    assert not one.satisfied_by([blue, red])  # an extra object
    assert parse_prompt("A Blue  Square.") == one
    three = parse_prompt("a red circle, a blue square and a green triangle")
    kinds = (one.template, parse_prompt("a blue square on the left").template, two.template, three.template)
    assert kinds == TEMPLATES
    assert parse_prompt("a zebra") is None and parse_prompt("a red circle near a cat") is None
    assert valid_placements(parse_prompt("a red circle in the center")) == [(4,)]
    assert len(valid_placements(parse_prompt("a red circle above a blue square"))) == 3 * 3 * 3  # rows 0<1<2 pairs


def test_a_prompt_is_shown_in_a_scene_that_holds_other_objects_too():
    """``shown_in``: the prompted objects, placed as the prompt says, among any others (what a superposition of two
    one-object prompts is asked for); ``satisfied_by`` stays exact."""
    left = parse_prompt("a red circle on the left")
    red_left, red_right, blue_bottom = Obj("circle", "red", 3), Obj("circle", "red", 5), Obj("square", "blue", 7)
    assert left.shown_in([blue_bottom, red_left]) and not left.satisfied_by([blue_bottom, red_left])
    assert not left.shown_in([red_right, blue_bottom])  # the circle is there, in the wrong place
    above = parse_prompt("a red circle above a blue square")
    assert above.shown_in([Obj("triangle", "green", 0), red_left, blue_bottom])
    assert not above.shown_in([Obj("circle", "red", 7), Obj("square", "blue", 1)])  # the relation is violated
    three = parse_prompt("a red circle, a blue square and a green triangle")
    assert not three.shown_in([red_left, blue_bottom, Obj("circle", "red", 0)])  # one object cannot stand for two
    assert three.shown_in([red_left, blue_bottom, Obj("triangle", "green", 0), Obj("circle", "white", 8)])
    assert describe_scene([blue_bottom, red_left]) == "red circle + blue square" and describe_scene([]) == "(empty)"


def test_outcome_says_what_a_scene_shows_of_one_prompt_or_two():
    a, b = parse_prompt("a red circle"), parse_prompt("a blue square")
    red, blue, green = Obj("circle", "red", 0), Obj("square", "blue", 4), Obj("triangle", "green", 8)
    scenes = ([red, blue], [red, green], [green, blue], [green], [])
    assert [outcome(s, [a, b]) for s in scenes] == ["both", "A only", "B only", "neither", "neither"]
    assert [outcome(s, [a]) for s in ([red], [red, blue], [blue])] == ["as the prompt says", "with other objects",
                                                                         "not shown"]  # fmt: skip


def test_read_prompts_reads_rendered_scenes_and_refuses_what_the_probe_cannot_read():
    rng = np.random.default_rng(0)
    scenes = [[Obj("circle", "red", 0), Obj("square", "blue", 8)], [Obj("square", "blue", 4)]]
    images = torch.from_numpy(np.stack([render(s, rng) for s in scenes])).permute(0, 3, 1, 2) / 255
    specs, found = read_prompts(images, ["a red circle", "a blue square"])
    assert [describe_scene(f) for f in found] == ["red circle + blue square", "blue square"]
    assert [outcome(f, specs) for f in found] == ["both", "B only"]
    assert read_prompts(images, ["a red circle", "a photo of a cat"]) is None  # not a Shapes caption
    assert read_prompts(torch.zeros(1, 3, 64, 64), ["a red circle"]) is None  # not a 32×32 Shapes image


def test_three_object_captions_parse_check_and_stay_out_of_the_default_mix():
    """The fourth template: three distinct objects in any cells, drawn only when asked for (``three_share``)."""
    spec = parse_prompt("A red circle, a blue square, and a green triangle.")  # the serial comma is accepted
    assert spec == parse_prompt("a red circle, a blue square and a green triangle") and spec.template == "three"
    assert caption(spec) == "a red circle, a blue square and a green triangle"
    assert parse_prompt("a red circle, a red circle and a blue square") is None  # the objects must differ
    assert parse_prompt("a red circle, a blue zebra and a green triangle") is None
    objs = [Obj("circle", "red", 8), Obj("square", "blue", 0), Obj("triangle", "green", 4)]
    assert spec.satisfied_by(objs) and spec.satisfied_by(objs[::-1])
    assert not spec.satisfied_by(objs[:2])  # a missing object
    assert not spec.satisfied_by([*objs, Obj("circle", "white", 2)])  # an extra one
    assert not spec.satisfied_by([*objs[:2], Obj("triangle", "red", 4)])  # a wrong colour
    assert len(valid_placements(spec)) == 9 * 8 * 7
    samples = make_dataset(400, seed=0, three_share=0.5)
    for s in samples:
        assert parse_prompt(s.caption) == s.spec and s.spec.satisfied_by(s.objects)
    assert 160 <= sum(s.spec.template == "three" for s in samples) <= 240
    # Outside the default mix: the default world's lists are what they always were, with no three-object caption.
    assert eval_prompts(4) == [
        "a green triangle",
        "a purple square to the right of a blue triangle",
        "a green circle on the left",
        "a white square to the right of a green triangle",
    ]
    assert eval_prompts(300) == eval_prompts(300, three_share=0.0)
    assert all(parse_prompt(c).template != "three" for c in eval_prompts(300))


def test_partial_captions_name_one_object_each():
    two = parse_prompt("a red circle to the left of a blue square")
    assert partial_captions(two) == ("a red circle", "a blue square")
    assert [parse_prompt(c) for c in partial_captions(two)] == [PromptSpec((o,)) for o in two.objects]
    assert partial_captions(parse_prompt("a green triangle at the top")) == ("a green triangle",)


def test_partial_caption_ids_decode_to_each_object_alone():
    from transformers import CLIPTokenizer

    from finetuners.models import ALIASES
    from finetuners.shapes.train import partial_caption_ids

    tokenizer = CLIPTokenizer.from_pretrained(ALIASES["shapes"] / "tokenizer")
    specs = [parse_prompt("a red circle above a blue square"), parse_prompt("a white triangle on the left")]
    ids = partial_caption_ids(specs, tokenizer)
    assert ids.shape == (2, 2, arch.MAX_TOKENS)
    decoded = [[tokenizer.decode(row, skip_special_tokens=True).strip() for row in pair] for pair in ids]
    assert decoded == [["a red circle", "a blue square"], ["a white triangle", "a white triangle"]]


def test_cell_targets():
    shape, color = cell_targets([Obj("triangle", "white", 8)])
    assert shape[8] == 1 + SHAPES.index("triangle") and color[8] == COLOR_NAMES.index("white")
    assert (shape[:8] == 0).all() and (color[:8] == -1).all()


def test_tokenizer_keeps_every_world_word_whole(tmp_path):
    tok = arch.make_tokenizer(tmp_path / "tok")
    for word in VOCABULARY:
        assert len(tok(word).input_ids) == 3, word  # BOS, the word, EOS
    assert len(tok("a yellow triangle to the right of a purple square").input_ids) == 12
    assert len(tok("a red circle, a blue square and a green triangle").input_ids) == 15  # "and": a, n, d
    assert len(tok("a zebra").input_ids) > 4  # unknown words still encode, character by character


def _logits_for(objects: list[Obj], confidence: float = 8.0):
    shape = torch.zeros(1, N_CELLS, N_SHAPE_CLASSES)
    color = torch.zeros(1, N_CELLS, len(COLOR_NAMES))
    shape[0, :, 0] = confidence
    for o in objects:
        shape[0, o.cell] = 0
        shape[0, o.cell, 1 + SHAPES.index(o.shape)] = confidence
        color[0, o.cell, COLOR_NAMES.index(o.color)] = confidence
    return shape, color


class _FixedProbe(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


def test_read_scene_and_log_prob_on_constructed_logits():
    objs = [Obj("circle", "red", 1), Obj("square", "blue", 7)]
    logits = _logits_for(objs)
    assert read_scene(*logits) == [objs]
    probe = _FixedProbe(logits)
    image = torch.zeros(1, 3, 32, 32)
    good = prompt_log_prob(probe, image, ["a red circle above a blue square"])
    bad = prompt_log_prob(probe, image, ["a red circle below a blue square"])
    # the true placement dominates: 9 cells right in shape, 2 in colour (confidence 8 against 0)
    log_true = 9 * np.log(np.exp(8) / (np.exp(8) + 3)) + 2 * np.log(np.exp(8) / (np.exp(8) + 5))
    assert good.item() == pytest.approx(log_true, rel=1e-3)
    assert bad.item() < -5
    # three objects: the same sum over 9 · 8 · 7 placements, dominated by the true one
    objs3 = [*objs, Obj("triangle", "green", 4)]
    caption3 = "a blue square, a green triangle and a red circle"
    three = prompt_log_prob(_FixedProbe(_logits_for(objs3)), image, [caption3])
    log_true3 = 9 * np.log(np.exp(8) / (np.exp(8) + 3)) + 3 * np.log(np.exp(8) / (np.exp(8) + 5))
    assert three.item() == pytest.approx(log_true3, rel=1e-3)
    # uniform logits: P(satisfy) = Σ_placements Π cells, computed by hand
    uniform = _FixedProbe((torch.zeros(1, N_CELLS, N_SHAPE_CLASSES), torch.zeros(1, N_CELLS, len(COLOR_NAMES))))
    p_empty, p_obj = 1 / N_SHAPE_CLASSES, 1 / N_SHAPE_CLASSES / len(COLOR_NAMES)
    n_place = len(valid_placements(PromptSpec((("circle", "red"),), position="on the left")))
    expected = np.log(n_place * p_obj * p_empty ** (N_CELLS - 1))
    got = prompt_log_prob(uniform, image, ["a red circle on the left"]).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_log_prob_is_differentiable_in_the_image():
    from finetuners.shapes.probe import ShapesProbe

    torch.manual_seed(0)
    probe = ShapesProbe()
    image = torch.rand(2, 3, 32, 32, requires_grad=True)
    lp = prompt_log_prob(probe, image, ["a red circle", "a green square to the left of a white circle"])
    lp.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_frechet_distance_closed_form_and_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    y = rng.normal(size=(4000, 3)) * 2.0 + 1.0
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-6)
    # N(0, I) vs N(1, 4I) in 3-D: ‖Δμ‖² + Σ(1 + 4 − 2·2) = 3 + 3 = 6 (sample estimates within a few %)
    assert frechet_distance(x, y) == pytest.approx(6.0, rel=0.08)
    # against a scipy sqrtm reference on exact covariances
    import scipy.linalg

    a, b = rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)


def test_training_loss_weight_closed_form():
    from finetuners.shapes.train import loss_weight

    snr = torch.tensor([100.0, 5.0, 2.0, 1.0, 0.5, 0.01, 0.001])
    # Min-SNR-5 above SNR 1: min(SNR, 5) / SNR; plain ε loss below it.
    assert torch.allclose(loss_weight(snr, 5.0), torch.tensor([0.05, 1, 1, 1, 1, 1, 1]))
    # With the high-noise cap, the x0 error's weight 1 / SNR below SNR 1, capped at 200.
    assert torch.allclose(loss_weight(snr, 5.0, 200.0), torch.tensor([0.05, 1, 1, 1, 2, 100, 200]))
    # A cap below 1 is no cap: the weight never falls under plain ε loss at high noise.
    assert torch.allclose(loss_weight(snr, 5.0, 0.5), loss_weight(snr, 5.0))


def test_training_script_smoke_with_relation_share_and_high_noise_weight(tmp_path):
    """The whole training script on its smoke preset: a loadable pipeline, the probe, and a report that
    records the relation share, high-noise weight and partial-caption share it ran with."""
    import json

    from diffusers import StableDiffusionPipeline

    from finetuners.shapes.train import main

    main(["--preset", "smoke", "--out", str(tmp_path), "--relation-share", "0.5", "--high-noise-weight", "200",
          "--partial-caption-share", "0.5", "--three-object-share", "0.25"])  # fmt: skip
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["config"]["relation_share"] == 0.5 and report["config"]["high_noise_weight"] == 200
    assert report["config"]["partial_caption_share"] == 0.5 and report["config"]["three_object_share"] == 0.25
    assert "three" in report["accuracy_by_template_cfg3"]  # the evaluation prompts hold three-object captions too
    assert report["unet_steps_done"] == 20 and 0 <= report["accuracy_4steps_cfg3"] <= 1
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "shapes-sd"), use_safetensors=True)
    assert pipe.unet.config.sample_size == 8
    assert (tmp_path / "shapes-probe").is_dir()

    # --resume keeps the probe byte for byte, unless asked to continue it (--resume-probe-steps)
    probe_bytes = (tmp_path / "shapes-probe" / "model.safetensors").read_bytes()
    for steps in (0, 5):
        out = tmp_path / f"resumed-{steps}"
        main(["--preset", "smoke", "--resume", str(tmp_path), "--out", str(out), "--resume-probe-steps", str(steps)])
        again = json.loads((out / "training.json").read_text())
        assert again["resumed_from"]["path"] == str(tmp_path) and again["config"]["resume_probe_steps"] == steps
        assert ((out / "shapes-probe" / "model.safetensors").read_bytes() == probe_bytes) == (steps == 0)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--relation-share", "1.5", "--relation-share must be between 0 and 1"),
     ("--partial-caption-share", "-0.1", "--partial-caption-share must be between 0 and 1"),
     ("--high-noise-weight", "0.5", "--high-noise-weight must be at least 1"),
     ("--unet-steps", "0", "--unet-steps must be at least 1"),
     ("--unet-lr", "0", "--unet-lr must be positive"),
     ("--three-object-share", "2", "--three-object-share must be between 0 and 1"),
     ("--resume-probe-steps", "-1", "--resume-probe-steps must be at least 0")],
)  # fmt: skip
def test_training_script_rejects_out_of_range_overrides(tmp_path, capsys, flag, value, message):
    from finetuners.shapes.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--preset", "smoke", "--out", str(tmp_path / "out"), flag, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written
