"""The shipped Shapes assets: standard diffusers layout, safetensors only, and they do what docs/SHAPES.md says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ASSET_PIPELINE, ASSET_PROBE

from finetuners import adadiff as ad
from finetuners.generate import SampleRequest, generate
from finetuners.shapes.probe import prompt_accuracy
from finetuners.shapes.world import eval_prompts, make_dataset, parse_prompt


def test_pipeline_folder_is_standard_and_safetensors_only():
    index = json.loads((ASSET_PIPELINE / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (ASSET_PIPELINE / part).is_dir(), part
    files = [p for p in ASSET_PIPELINE.rglob("*") if p.is_file()] + list(ASSET_PROBE.rglob("*"))
    files += list(ad.shipped_policy("shapes").iterdir())
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20  # a few MB


def test_loads_with_plain_diffusers_from_pretrained():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ASSET_PIPELINE), use_safetensors=True)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    out = pipe("a red circle", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)


def test_probe_reads_fresh_shapes_images(shapes_probe):
    data = make_dataset(500, seed=424242)  # seeds never used in training (0) or its held-out set (10000)
    x = torch.from_numpy(np.stack([s.image for s in data])).permute(0, 3, 1, 2).float() / 255
    acc = prompt_accuracy(shapes_probe, x, [s.caption for s in data]).mean().item()
    assert acc >= 0.97


def test_model_follows_prompts_with_enough_steps(shapes_pipe, shapes_probe):
    """A small sample of the 20-step accuracy in docs/BENCHMARKS.md (seeded, so it replays exactly)."""
    prompts = eval_prompts(48, seed=999)
    images = torch.cat(
        [
            generate(shapes_pipe, SampleRequest(p, steps=20, guidance=3.0, seed=i, record_pred_x0=False)).images
            for i, p in enumerate(prompts)
        ]  # fmt: skip
    )
    acc20 = prompt_accuracy(shapes_probe, images, prompts).mean().item()
    images1 = torch.cat(
        [
            generate(shapes_pipe, SampleRequest(p, steps=1, guidance=3.0, seed=i, record_pred_x0=False)).images
            for i, p in enumerate(prompts)
        ]  # fmt: skip
    )
    acc1 = prompt_accuracy(shapes_probe, images1, prompts).mean().item()
    assert acc20 >= 0.6, acc20
    assert acc1 < acc20  # one step is clearly worse: the room the fine-tuning methods use


PARTIAL_PIPELINE = ASSET_PIPELINE.parent / "shapes-partial-sd"


def test_shapes_partial_is_the_same_world_with_its_own_unet():
    """shapes-partial shares the shipped model's VAE, tokenizer and scheduler byte for byte (one latent space, so the
    probe and the two-models superposition apply) and has its own UNet and text encoder, trained on partial captions
    on top of the shipped weights (assets/training-partial.json)."""
    from finetuners.models import ALIASES, COMPOSE_MODEL, model_defaults

    assert ALIASES[COMPOSE_MODEL] == PARTIAL_PIPELINE
    files = {p.relative_to(PARTIAL_PIPELINE) for p in PARTIAL_PIPELINE.rglob("*") if p.is_file()}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert files == {p.relative_to(ASSET_PIPELINE) for p in ASSET_PIPELINE.rglob("*") if p.is_file()}
    for rel in files:
        same = (PARTIAL_PIPELINE / rel).read_bytes() == (ASSET_PIPELINE / rel).read_bytes()
        weights = rel.suffix == ".safetensors" and rel.parts[0] in ("unet", "text_encoder")
        own = weights or rel.name == "finetuners.json"
        assert same != own, rel
    report = json.loads((ASSET_PIPELINE.parent / "training-partial.json").read_text())
    assert report["config"]["partial_caption_share"] == 0.3
    shipped = json.loads((ASSET_PIPELINE.parent / "training.json").read_text())
    assert report["resumed_from"]["config"] == shipped["config"]

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(PARTIAL_PIPELINE), use_safetensors=True)
    pipe.finetuners_folder = str(PARTIAL_PIPELINE)
    d = model_defaults(pipe)
    assert (d.sampler, d.steps, d.guidance, d.superdiff_guidance) == ("ddim", 20, 3.0, 1.0)


def test_shapes_partial_draws_a_second_object_under_a_one_object_caption(shapes_pipe, shapes_probe):
    """What the partial captions teach (docs/SHAPES.md): "a red circle" sometimes shows a second object beside the red
    circle on shapes-partial (about a third of the time), never on the shipped model, where AND of two object prompts
    therefore has nothing to find."""
    from finetuners.models import load_model
    from finetuners.shapes.probe import read_scene

    def readings(pipe):
        req = SampleRequest("a red circle", steps=20, guidance=3.0, seed=0, batch=24, record_pred_x0=False)
        with torch.no_grad():
            return read_scene(*shapes_probe(generate(pipe, req).images))

    shipped = readings(shapes_pipe)
    partial = readings(load_model("shapes-partial", "cpu"))
    red_circle = lambda objs: any((o.color, o.shape) == ("red", "circle") for o in objs)  # noqa: E731
    assert sum(len(objs) >= 2 for objs in shipped) == 0
    assert 3 <= sum(len(objs) >= 2 for objs in partial) <= 16
    assert sum(red_circle(objs) for objs in partial) >= 22


def test_the_shipped_policy_gives_relations_the_most_steps_on_the_evaluation_prompts(shapes_pipe):
    """``assets/shapes-policy`` (docs/SHAPES.md): AdaDiff trained for this model on 1000 prompts in the world's mix at
    2 seeds from 10^6, IQS the probe's probability. On the 1000 evaluation prompts it chooses what
    docs/BENCHMARKS.md measured (mean 4.34 steps: objects 4, positions 3, relations 5.66; 95.5 % accuracy there).
    Only text features are computed here: no image is rendered."""
    policy, config, meta = ad.load_policy(ad.shipped_policy("shapes"))
    assert meta["model"] == "shapes" and config.candidates == (1, 2, 3, 4, 6, 8)
    assert (config.sampler, config.guidance, config.quality) == ("ddim-trailing", 3.0, "shapes-probability")
    table = ad.load_ladder(ad.shipped_policy("shapes"))
    assert table.prompts == ad.training_prompts(1000) and table.scores.shape == (1000, 2, 6)
    assert torch.equal(table.seeds, ad.ladder_seeds(1000, 2, ad.TRAIN_SEED_BASE))
    prompts = eval_prompts(1000)
    chosen, probs = ad.choose_steps(shapes_pipe, policy, prompts)
    steps = torch.tensor(chosen, dtype=torch.float32)
    kinds = [parse_prompt(p).template for p in prompts]
    mean = {t: steps[torch.tensor([k == t for k in kinds])].mean().item() for t in ("object", "position", "relation")}
    assert steps.mean().item() == pytest.approx(4.341, abs=1e-3), mean
    assert mean["relation"] == pytest.approx(5.660, abs=1e-3) and mean["relation"] > mean["object"] > mean["position"]
