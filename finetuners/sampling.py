"""The one sampling loop. Every method samples through ``sample_loop``; what differs is the step function
(DDIM with η, or LCM), the timesteps and the denoiser wrapped around the model.

The loop records the dual-state trajectory: the latent entering every step and the predicted clean
latent x̂0 at every step, plus each transition's log-prob, so RL methods can re-evaluate it later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

from .denoisers import Denoiser
from .steps import Reduction, StepOutput, ddim_step, lcm_step, next_timesteps

StepKind = Literal["ddim", "lcm"]


@dataclass
class Trajectory:
    """latents [B, K+1, C, H, W] (x^(0) = x_T … x^(K)); pred_x0 [B, K, C, H, W] or None;
    log_probs [B, K] (NaN where a step is deterministic); timesteps and next_timesteps [K]."""

    latents: torch.Tensor
    pred_x0: torch.Tensor | None
    log_probs: torch.Tensor
    timesteps: list[int]
    next_timesteps: list[int]
    eta: float
    step_kind: StepKind

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


StepCallback = Callable[[int, int, torch.Tensor, StepOutput], None]


def initial_noise(shape: tuple[int, ...], generator, device, dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I), drawn exactly as diffusers' pipelines draw it (one generator per image allowed)."""
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


def sample_loop(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    ts: list[int],
    alphas_cumprod: torch.Tensor,
    *,
    step_kind: StepKind = "ddim",
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    generator=None,
    record: bool = True,
    record_pred_x0: bool = True,
    reduction: Reduction = "mean",
    callback: StepCallback | None = None,
    step_kwargs: dict | None = None,
) -> tuple[torch.Tensor, Trajectory | None]:
    """Run the K steps ``ts`` from ``x_T``. Returns the final latent and (with ``record``) the trajectory.

    ``callback(i, t, x_i, out)`` is called after every step with the latent that entered it. Step maths
    runs in the dtype of ``x_T``; pass fp32 latents for RL log-probs (ALGORITHMS.md §0.5).
    """
    t_next = next_timesteps(ts)
    x = x_T
    latents, pred_x0s, log_probs = [x_T], [], []
    step = ddim_step if step_kind == "ddim" else lcm_step
    extra = {"eta": eta} if step_kind == "ddim" else {}
    extra.update(step_kwargs or {})
    for i, (t, tp) in enumerate(zip(ts, t_next)):
        model_output = denoiser(x, t, cond).to(x.dtype)
        out = step(model_output, t, tp, x, alphas_cumprod, prediction_type=prediction_type,
                   final_alpha_cumprod=final_alpha_cumprod, generator=generator, reduction=reduction,
                   **extra)  # fmt: skip
        if callback is not None:
            callback(i, t, x, out)
        x = out.prev_sample
        if record:
            latents.append(x)
            if record_pred_x0:
                pred_x0s.append(out.pred_x0)
            lp = out.log_prob if out.log_prob is not None else torch.full((x.shape[0],), float("nan"), device=x.device)
            log_probs.append(lp)
    if not record:
        return x, None
    traj = Trajectory(
        latents=torch.stack(latents, 1),
        pred_x0=torch.stack(pred_x0s, 1) if record_pred_x0 else None,
        log_probs=torch.stack(log_probs, 1),
        timesteps=list(ts),
        next_timesteps=t_next,
        eta=eta,
        step_kind=step_kind,
    )
    return x, traj


def reevaluate_log_probs(denoiser: Denoiser, traj: Trajectory, cond: torch.Tensor, alphas_cumprod: torch.Tensor,
                         step_index: int, *, prediction_type: str = "epsilon",
                         final_alpha_cumprod: float | torch.Tensor = 1.0,
                         reduction: Reduction = "mean") -> StepOutput:  # fmt: skip
    """Log-prob of the stored transition ``step_index`` under the denoiser's current weights.

    The denoiser must be wrapped exactly as at sampling time (same guidance and negative prompt).
    """
    i = step_index
    x, x_next = traj.latents[:, i], traj.latents[:, i + 1]
    t, tp = traj.timesteps[i], traj.next_timesteps[i]
    model_output = denoiser(x, t, cond).to(x.dtype)
    if traj.step_kind == "ddim":
        return ddim_step(model_output, t, tp, x, alphas_cumprod, eta=traj.eta, prediction_type=prediction_type,
                         final_alpha_cumprod=final_alpha_cumprod, prev_sample=x_next, reduction=reduction)  # fmt: skip
    return lcm_step(model_output, t, tp, x, alphas_cumprod, prediction_type=prediction_type,
                    final_alpha_cumprod=final_alpha_cumprod, prev_sample=x_next, reduction=reduction)  # fmt: skip
