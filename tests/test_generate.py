"""The sampling loop and ``generate`` against diffusers' own pipeline; seeds; re-evaluation; bad input."""

from __future__ import annotations

import pytest
import torch

from finetuners.denoisers import CFGDenoiser, CountingDenoiser, UNetDenoiser
from finetuners.errors import UserError
from finetuners.generate import SampleRequest, encode, generate, sampler_setup, schedule_tensors
from finetuners.models import load_model, resolve_device, resolve_model_path
from finetuners.sampling import initial_noise, reevaluate_log_probs, sample_loop

PROMPT = "a red circle above a blue square"


def _reference(pipe, steps, guidance, eta, seed, batch):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, eta=eta, generator=gens,
                output_type="pt").images  # fmt: skip


@pytest.mark.parametrize(("steps", "guidance", "eta"), [(1, 1.0, 0.0), (4, 3.0, 0.0), (8, 1.0, 0.0), (4, 3.0, 1.0)])
def test_generate_equals_diffusers_pipeline(random_pipe, steps, guidance, eta):
    ours = generate(random_pipe, SampleRequest(PROMPT, steps=steps, guidance=guidance, eta=eta, seed=11, batch=2))
    ref = _reference(random_pipe, steps, guidance, eta, seed=11, batch=2)
    assert torch.equal(ours.images, ref.float().cpu())
    assert ours.pred_x0_images.shape == (2, steps, 3, 32, 32)


def test_same_seed_same_image_and_batch_index_is_seed_offset(random_pipe):
    a = generate(random_pipe, SampleRequest(PROMPT, steps=3, eta=1.0, seed=5, batch=3, record_pred_x0=False))
    b = generate(random_pipe, SampleRequest(PROMPT, steps=3, eta=1.0, seed=5, batch=3, record_pred_x0=False))
    c = generate(random_pipe, SampleRequest(PROMPT, steps=3, eta=1.0, seed=6, batch=1, record_pred_x0=False))
    assert torch.equal(a.images, b.images)
    # same noise; only float summation order differs between batch sizes
    torch.testing.assert_close(a.images[1], c.images[0], atol=1e-4, rtol=0)
    assert not torch.equal(a.images[0], a.images[1])


def test_trajectory_records_dual_state_and_reevaluates_exactly(random_pipe):
    pipe = random_pipe
    cond, uncond = encode(pipe, [PROMPT] * 2, [""] * 2, True)
    ts, kind, _ = sampler_setup(pipe, "ddim", 4)
    alphas, final = schedule_tensors(pipe, "cpu")
    denoiser = CFGDenoiser(UNetDenoiser(pipe.unet), uncond, 3.0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = initial_noise((2, 4, 8, 8), gens, "cpu")
    seen = []
    final_x, traj = sample_loop(denoiser, x_T, cond, ts, alphas, eta=1.0, final_alpha_cumprod=final, generator=gens,
                                callback=lambda i, t, x, out: seen.append((i, t)))  # fmt: skip
    assert seen == list(enumerate(ts))
    assert traj.latents.shape == (2, 5, 4, 8, 8) and traj.pred_x0.shape == (2, 4, 4, 8, 8)
    assert torch.equal(traj.latents[:, 0], x_T) and torch.equal(traj.final, final_x)
    assert traj.log_probs.shape == (2, 4) and torch.isfinite(traj.log_probs).all()
    for i in range(4):  # unchanged weights ⇒ ratio exactly 1
        again = reevaluate_log_probs(denoiser, traj, cond, alphas, i, final_alpha_cumprod=final)
        assert torch.equal(again.log_prob, traj.log_probs[:, i])
    # a perturbed model gives a different log-prob for the same stored transition
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.05)
    try:
        moved = reevaluate_log_probs(denoiser, traj, cond, alphas, 1, final_alpha_cumprod=final)
        assert not torch.allclose(moved.log_prob, traj.log_probs[:, 1])
    finally:
        with torch.no_grad():
            pipe.unet.conv_out.bias.sub_(0.05)


def test_guidance_off_makes_one_unet_call_per_step(random_pipe):
    pipe = random_pipe
    cond, uncond = encode(pipe, [PROMPT], None, False)
    ts, _, _ = sampler_setup(pipe, "ddim", 5)
    alphas, final = schedule_tensors(pipe, "cpu")
    counted = CountingDenoiser(UNetDenoiser(pipe.unet))
    sample_loop(CFGDenoiser(counted, uncond, 1.0), torch.randn(1, 4, 8, 8), cond, ts, alphas, final_alpha_cumprod=final)
    assert counted.calls == 5 and counted.rows == 5


def test_lcm_and_trailing_samplers_run(random_pipe):
    lcm = generate(random_pipe, SampleRequest(PROMPT, steps=4, sampler="lcm", guidance=1.0))
    assert lcm.timesteps == [999, 759, 499, 259] and torch.isfinite(lcm.images).all()
    turbo = generate(random_pipe, SampleRequest(PROMPT, steps=2, sampler="ddim-trailing", guidance=0.0))
    assert turbo.timesteps == [999, 499]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "   "}, "empty"),
        ({"prompt": "x" * 5000}, "too long"),
        ({"steps": 0}, "steps must be between"),
        ({"steps": 1000}, "steps must be between"),
        ({"steps": 2.5}, "whole number"),
        ({"batch": 0}, "batch must be between"),
        ({"seed": -1}, "seed must be between"),
        ({"seed": 2**40}, "seed must be between"),
        ({"guidance": 100.0}, "guidance must be between"),
        ({"guidance": float("nan")}, "guidance must be a number"),
        ({"eta": 1.5}, "eta must be between"),
        ({"sampler": "euler"}, "unknown sampler"),
    ],
)
def test_bad_requests_are_user_errors(kwargs, message):
    args = {"prompt": PROMPT, **kwargs}
    with pytest.raises(UserError, match=message):
        SampleRequest(**args)


def test_prompt_longer_than_the_text_encoder_is_refused(random_pipe):
    with pytest.raises(UserError, match="too long for this model"):
        generate(random_pipe, SampleRequest(" ".join(["red"] * 40)))


def test_model_paths_and_devices(tmp_path, random_pipeline_dir):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_model_path("someone/not-downloaded-model")
    with pytest.raises(UserError, match="no model"):
        resolve_model_path("  ")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu-please")
    assert resolve_model_path(str(random_pipeline_dir)) == str(random_pipeline_dir)


def test_pickled_weights_are_never_loaded(tmp_path, random_pipeline_dir):
    """A pipeline folder whose UNet weights exist only as a pickle (.bin) is refused: safetensors only."""
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(random_pipeline_dir, folder)
    unet_dir = folder / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), unet_dir / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match="could not load"):
        load_model(str(folder), "cpu")
