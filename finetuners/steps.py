"""Timestep spacings and the stochastic transitions every method shares (ALGORITHMS.md §0.2).

``ddim_step`` is the stochastic DDIM step of Song et al. (arXiv 2010.02502, Eqs. 12/16) as a Gaussian
policy: it returns the transition's mean, std and log-probability along with the sample. Passing a
stored ``prev_sample`` re-evaluates that transition under the current model output instead of drawing
a new one, so one function serves sampling and training. ``lcm_step`` is the same for Latent
Consistency Models (arXiv 2310.04378). Both are pure tensor maths: device, dtype and randomness come
from the caller (an injected ``noise`` or a ``generator``, drawn as diffusers draws it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

Spacing = Literal["leading", "trailing", "linspace"]
Reduction = Literal["mean", "sum"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]


def timesteps(num_steps: int, spacing: Spacing = "leading", *, num_train_timesteps: int = 1000,
              steps_offset: int = 1) -> list[int]:  # fmt: skip
    """Sampling timesteps t_0 > … > t_{K−1}, computed by diffusers' own ``DDIMScheduler.set_timesteps``.

    leading (SD 1.x, offset 1): K = 50 gives 981, …, 1; trailing (SD-Turbo): K = 1, 2, 4 give [999],
    [999, 499], [999, 749, 499, 249].
    """
    sched = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing,
                          steps_offset=steps_offset if spacing == "leading" else 0)  # fmt: skip
    sched.set_timesteps(num_steps)
    return [int(t) for t in sched.timesteps]


def next_timesteps(ts: list[int]) -> list[int]:
    """The timestep after each entry: the next schedule entry, and −1 (the final state) after the last.

    Equals diffusers' ``t − ⌊1000/K⌋`` only when K divides 1000 (trailing K = 3: 999 → 666 → 332).
    """
    return list(ts[1:]) + [-1]


@dataclass
class StepOutput:
    """One transition x_t → x_p. Tensors are [B, C, H, W] except ``std`` (broadcastable) and ``log_prob`` [B]."""

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None  # None where std = 0 (deterministic step)
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


def alpha_at(
    alphas_cumprod: torch.Tensor, t: int | torch.Tensor, final_alpha_cumprod: float | torch.Tensor
) -> torch.Tensor:
    """ᾱ_t, with t < 0 meaning the state after the last step (ᾱ = ``final_alpha_cumprod``)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    final = torch.as_tensor(final_alpha_cumprod, dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], final)


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = a.to(device=like.device, dtype=like.dtype)
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


def x0_and_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor,
               prediction_type: PredictionType) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Model output → (x̂0, ε̂) by prediction type (ALGORITHMS.md §0.2)."""
    a = _bcast(alpha_t, sample)
    if prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt(), model_output
    if prediction_type == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output, a.sqrt() * model_output + (1 - a).sqrt() * sample
    if prediction_type == "sample":
        return model_output, (sample - a.sqrt() * model_output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """log N(x; mean, std² I) per sample, summed over all non-batch dims or averaged over them ("mean")."""
    std = std.expand_as(mean)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def ddim_step(
    model_output: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    prediction_type: PredictionType = "epsilon",
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Stochastic DDIM step from timestep ``t`` to ``t_prev`` (−1: the final state).

    ``t``/``t_prev`` are ints or [B] tensors. ``final_alpha_cumprod`` is ᾱ after the last step: 1
    (``set_alpha_to_one=True``) or ᾱ_0 (SD's ``set_alpha_to_one=False``, the RL reference code's clamp).
    With ``prev_sample`` the transition is not sampled: its log-prob is evaluated at ``prev_sample``.
    """
    a_t = _bcast(alpha_at(alphas_cumprod, t, final_alpha_cumprod), sample)
    a_p = _bcast(alpha_at(alphas_cumprod, t_prev, final_alpha_cumprod), sample)
    # 1. x̂0 and ε̂ from the model output
    pred_x0, pred_eps = x0_and_eps(model_output, sample, a_t, prediction_type)
    # 2. σ_t(η), formula (16): η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p)
    variance = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = eta * variance.clamp(min=0).sqrt()
    # 3. mean, formula (12): √ᾱ_p·x̂0 + √(1−ᾱ_p−σ²)·ε̂
    mean = a_p.sqrt() * pred_x0 + (1 - a_p - std**2).clamp(min=0).sqrt() * pred_eps
    # 4. draw (or take) the next sample
    if prev_sample is None:
        if eta > 0:
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)  # fmt: skip
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction) if bool((std > 0).all()) else None
    return StepOutput(prev_sample, mean, std.expand(sample.shape[0], *([1] * (sample.ndim - 1))), log_prob,
                      pred_x0, pred_eps)  # fmt: skip


def lcm_step(
    model_output: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction_type: PredictionType = "epsilon",
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Multistep LCM step: f_θ = c_skip·x + c_out·x̂0; x' = √ᾱ_p·f_θ + √(1−ᾱ_p)·z, and f_θ at the last step.

    As a policy (arXiv 2404.03673): log π = log N(x'; √ᾱ_p·f_θ, (1−ᾱ_p)I); no log-prob at the last step
    (``t_prev < 0``), whose output is f_θ itself. ``pred_x0`` is f_θ, the consistency prediction.
    """
    a_t = _bcast(alpha_at(alphas_cumprod, t, final_alpha_cumprod), sample)
    pred_x0, pred_eps = x0_and_eps(model_output, sample, a_t, prediction_type)
    st = _bcast(torch.as_tensor(t, dtype=torch.float64) * timestep_scaling, sample)
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    denoised = c_out * pred_x0 + c_skip * sample
    last = bool((torch.as_tensor(t_prev) < 0).all())
    if last:
        zero = torch.zeros(sample.shape[0], *([1] * (sample.ndim - 1)), dtype=sample.dtype, device=sample.device)
        return StepOutput(denoised if prev_sample is None else prev_sample, denoised, zero, None, denoised, pred_eps)
    a_p = _bcast(alpha_at(alphas_cumprod, t_prev, final_alpha_cumprod), sample)
    mean = a_p.sqrt() * denoised
    std = (1 - a_p).sqrt()
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=denoised.dtype)  # fmt: skip
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    return StepOutput(prev_sample, mean, std.expand(sample.shape[0], *([1] * (sample.ndim - 1))), log_prob,
                      denoised, pred_eps)  # fmt: skip
