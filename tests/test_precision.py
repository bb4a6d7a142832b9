"""The CUDA path's branches, run on the CPU wherever they can be (issue 9; ALGORITHMS.md §0.5): a reduced-precision
UNet under fp32 step maths (bfloat16 is what a CPU can run), the dtype defaults, and the attention choice."""

from __future__ import annotations

import json

import pytest
import torch

from finetuners.errors import UserError
from finetuners.models import configure_attention, load_model, resolve_dtype

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_dtype_defaults_and_refusals():
    assert resolve_dtype(None, CUDA) == torch.float16 and resolve_dtype("auto", CUDA) == torch.float16
    assert resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16 and resolve_dtype("bfloat16", CUDA) == torch.bfloat16
    with pytest.raises(UserError, match="float16 is not supported on the CPU"):
        resolve_dtype("fp16", CPU)
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", CPU)


class _Pipe:
    """Stands in for a pipeline: records whether xformers was asked for, and can fail as a missing install does."""

    def __init__(self, error: Exception | None = None):
        self.error, self.calls = error, 0

    def enable_xformers_memory_efficient_attention(self):
        self.calls += 1
        if self.error is not None:
            raise self.error


def test_xformers_is_used_on_cuda_only_and_only_when_it_works():
    pipe = _Pipe()
    assert configure_attention(pipe, CUDA, "auto") is True and pipe.calls == 1
    pipe = _Pipe()
    assert configure_attention(pipe, CPU, "auto") is False and pipe.calls == 0
    pipe = _Pipe()
    assert configure_attention(pipe, CUDA, "sdpa") is False and pipe.calls == 0
    missing = ModuleNotFoundError("No module named 'xformers'")
    pipe = _Pipe(missing)
    assert configure_attention(pipe, CUDA, "auto") is False and pipe.calls == 1  # off, with the reason logged
    with pytest.raises(UserError, match="xformers was asked for but cannot be used: No module named 'xformers'"):
        configure_attention(_Pipe(missing), CUDA, "xformers")
    with pytest.raises(UserError, match="unknown attention backend 'flash'"):
        configure_attention(_Pipe(), CPU, "flash")


@pytest.fixture(scope="module")
def pipes():
    return load_model("shapes", "cpu", "float32"), load_model("shapes", "cpu", "bfloat16")


def test_a_bf16_unet_samples_close_to_fp32(pipes):
    from finetuners.generate import SampleRequest, generate

    fp32, bf16 = pipes
    assert bf16.unet.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    request = SampleRequest(prompt="a red circle above a blue square", steps=8, guidance=3.0, seed=3, batch=4)
    a, b = generate(fp32, request).images, generate(bf16, request).images
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    diff = (a - b).abs().mean()
    assert 0 < diff < 0.03, float(diff)  # a real reduced-precision run, close to fp32


def test_log_probs_stay_fp32_and_reevaluate_exactly_under_a_bf16_unet(pipes):
    """§0.5: with the UNet in bf16, step maths and log-probs run in fp32, and the ratio at θ_old is exactly 1."""
    from finetuners.denoisers import unet_denoiser
    from finetuners.generate import encode, schedule_tensors
    from finetuners.sampling import initial_noise, reevaluate_log_probs, sample_loop
    from finetuners.steps import timesteps

    _, pipe = pipes
    denoiser = unet_denoiser(pipe.unet)
    cond = encode(pipe, ["a green triangle", "a white square on the left"], None, False)[0]
    alphas, final = schedule_tensors(pipe, "cpu")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = initial_noise((2, 4, 8, 8), gens, "cpu", torch.float32)
    with torch.no_grad():
        _, traj = sample_loop(denoiser, x_T, cond, timesteps(4, "trailing"), alphas, eta=1.0,
                              final_alpha_cumprod=final, generator=gens)  # fmt: skip
        assert traj.latents.dtype == torch.float32 and traj.log_probs.dtype == torch.float32
        for i in range(3):  # steps 0 … K−2 (the last step may be deterministic)
            again = reevaluate_log_probs(denoiser, traj, cond, alphas, i, final_alpha_cumprod=final)
            assert again.log_prob.dtype == torch.float32
            assert torch.equal(again.log_prob, traj.log_probs[:, i])


def test_a_short_sdpo_run_with_a_bf16_unet_trains_fp32_lora(random_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    from finetuners.runs import list_checkpoints, read_metrics
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig, train

    algo = SDPOConfig.preset("shapes", model=str(random_pipeline_dir), reward="jpeg-compressibility", num_steps=2,
                             sample_batch_size=2, num_batches_per_epoch=1, train_batch_size=1, grad_accum=2,
                             num_epochs=2, eval_steps=(1,), buffer_size=4, min_count=2, precision="bf16")  # fmt: skip
    run = tmp_path / "bf16"
    assert train(run, TrainConfig(algo=algo, num_eval_prompts=2))["state"] == "finished"
    assert json.loads((run / "config.json").read_text())["config"]["algo"]["precision"] == "bf16"
    epochs = [r for r in read_metrics(run) if r["event"] == "epoch"]
    assert len(epochs) == 2 and all(r["grad_norm"] > 0 and r["loss"] == r["loss"] for r in epochs)
    weights = load_file(list_checkpoints(run)[-1][1] / "lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())  # LoRA trains in fp32
