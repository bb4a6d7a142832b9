"""Pieces every RL method shares (ALGORITHMS.md §0.2, DDPO; §1.2(c), SDPO).

- ``PerPromptStatTracker``: a FIFO of recent values per key (a prompt, or a (prompt, step) pair for
  SDPO) that turns values into normalised advantages, with batch statistics while a key is young.
  Its ``state_dict`` goes into checkpoints, so a resumed run normalises exactly as the original.
- ``ppo_clip_loss`` and ``ddpo_advantages``: the DDPO objective (arXiv 2305.13301), as pure functions.
- ``transition_log_probs``: the log-prob of stored DDIM transitions under the current weights when
  every row has its own timestep, as after a per-sample step shuffle. It calls the shared ``ddim_step``.

Adapted from kvablack/ddpo-pytorch (``stat_tracking.py``, the PPO loss in ``train.py``), as tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence

import torch

from .denoisers import Denoiser
from .steps import PredictionType, Reduction, ddim_step, lcm_step

ADV_EPS = 1e-6  # A = (x − μ)/(σ + 1e−6), as both reference implementations


class PerPromptStatTracker:
    """Per-key FIFO of the last ``buffer_size`` values, turning values into normalised advantages.

    ``advantages(keys, values)`` first appends each value to its key's FIFO (in row order), then
    normalises it as (x − μ)/(σ + 1e−6), with μ, σ (population std) of the key's FIFO once the key
    holds ``min_count`` values, and of the current batch before that. "The batch" is every row with
    the same ``groups`` entry (default: the whole batch; SDPO passes the step index, so a young
    (prompt, step) key falls back to the statistics of that step). This is the reference behaviour
    of ddpo-pytorch and sdpo. Keys must be hashable; prompts, ints and tuples of them survive a
    ``state_dict`` round trip through ``torch.save``/``torch.load(weights_only=True)``.

    With several processes, gather keys and values from all of them before calling, so that every
    process holds the same buffers (ALGORITHMS.md §1.2(c): the FIFO pools all processes).
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(f"need buffer_size ≥ 1 and 1 ≤ min_count ≤ buffer_size, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[Hashable, deque[float]] = {}

    def advantages(
        self, keys: Sequence[Hashable], values: torch.Tensor, groups: Sequence[Hashable] | None = None
    ) -> torch.Tensor:
        """values [N] → advantages [N] (float32, on the values' device); updates the FIFOs first."""
        values = torch.as_tensor(values)
        if values.ndim != 1 or len(keys) != values.shape[0]:
            raise ValueError(f"need one key per value: {len(keys)} keys for values of shape {tuple(values.shape)}")
        groups = [None] * len(keys) if groups is None else list(groups)
        x = values.detach().to("cpu", torch.float64)
        for key, v in zip(keys, x.tolist()):
            self.buffers.setdefault(key, deque(maxlen=self.buffer_size)).append(v)
        group_rows: dict[Hashable, list[int]] = {}
        for n, g in enumerate(groups):
            group_rows.setdefault(g, []).append(n)
        batch_stats = {g: _mean_std(x[rows]) for g, rows in group_rows.items()}
        key_stats = {
            k: _mean_std(torch.tensor(list(self.buffers[k]), dtype=torch.float64))
            for k in set(keys)
            if len(self.buffers[k]) >= self.min_count
        }
        out = torch.empty_like(x)
        for n, (key, g) in enumerate(zip(keys, groups)):
            mean, std = key_stats[key] if key in key_stats else batch_stats[g]
            out[n] = (x[n] - mean) / (std + ADV_EPS)
        return out.to(device=values.device, dtype=torch.float32)

    def stats(self) -> dict[Hashable, dict[str, float]]:
        """{key: {mean, std, count}} of the buffers, for logging."""
        out = {}
        for k, buf in self.buffers.items():
            mean, std = _mean_std(torch.tensor(list(buf), dtype=torch.float64))
            out[k] = {"mean": float(mean), "std": float(std), "count": len(buf)}
        return out

    def state_dict(self) -> dict:
        """Plain lists and numbers (no tuple-keyed dicts), loadable with ``torch.load(weights_only=True)``."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "keys": list(self.buffers),
            "values": [list(buf) for buf in self.buffers.values()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.buffers = {
            _hashable(k): deque((float(v) for v in vals), maxlen=self.buffer_size)
            for k, vals in zip(state["keys"], state["values"])
        }


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(), x.std(unbiased=False)


def _hashable(key):
    """Keys come back from some serialisers as lists; tuples again."""
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def clip_advantages(advantages: torch.Tensor, adv_clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """clip(A, −adv_clip, adv_clip), with the fraction clipped on each side (the reference logs only one)."""
    info = {
        "adv_clipfrac_low": float((advantages < -adv_clip).float().mean()),
        "adv_clipfrac_high": float((advantages > adv_clip).float().mean()),
    }
    return advantages.clamp(-adv_clip, adv_clip), info


def ddpo_advantages(
    tracker: PerPromptStatTracker, prompts: Sequence[str], rewards: torch.Tensor, adv_clip: float = 5.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """DDPO: A_b = clip((r_b − μ_c)/(σ_c + 1e−6), ±adv_clip), per-prompt statistics. rewards [B] → A [B]."""
    return clip_advantages(tracker.advantages(list(prompts), rewards), adv_clip)


def ppo_clip_loss(advantages: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """L = mean max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) over all entries (PPO's pessimistic bound, as in DDPO)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def ratio_clip_fraction(ratio: torch.Tensor, clip_range: float) -> float:
    """Fraction of ratios outside [1−ε, 1+ε] (logged as ``clipfrac``)."""
    return float(((ratio - 1.0).abs() > clip_range).float().mean())


def transition_log_probs(
    denoiser: Denoiser,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    next_timesteps: torch.Tensor,
    cond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float,
    prediction_type: PredictionType = "epsilon",
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    reduction: Reduction = "mean",
    step_kind: str = "ddim",
    step_kwargs: dict | None = None,
) -> torch.Tensor:
    """log π_θ(x'|x, c) [B] of stored DDIM (``step_kind="lcm"``: LCM) transitions; row b goes from ``timesteps[b]``
    to ``next_timesteps[b]``.

    latents, next_latents [B, C, H, W]; timesteps, next_timesteps [B] (−1: the final state). The same
    maths as ``sampling.reevaluate_log_probs`` (``ddim_step`` at the stored ``prev_sample``), for rows
    that need not share a step. The denoiser must be wrapped as at sampling time. Gradients flow
    through the denoiser; run it in fp32 or cast its output, as ALGORITHMS.md §0.5 asks.
    """
    model_output = denoiser(latents, timesteps, cond).to(latents.dtype)
    step, extra = (lcm_step, {}) if step_kind == "lcm" else (ddim_step, {"eta": eta})
    out = step(model_output, timesteps, next_timesteps, latents, alphas_cumprod, prediction_type=prediction_type,
               final_alpha_cumprod=final_alpha_cumprod, prev_sample=next_latents, reduction=reduction,
               **extra, **(step_kwargs or {}))  # fmt: skip
    if out.log_prob is None:
        raise ValueError("a deterministic step (η = 0, or std 0 after the last step) has no log-prob")
    return out.log_prob
