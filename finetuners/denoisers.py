"""Denoisers: callables ``(x, t, cond) -> model_output`` built by wrapping, never by editing a sampler.

``cond`` is whatever the wrapped model needs (for a UNet: the text encoder's hidden states). The
classifier-free-guidance wrapper batches the unconditional and conditional passes into one call, as
diffusers' pipelines do, and makes exactly one (conditional) call when guidance ≤ 1 (arXiv 2207.12598).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...


@dataclass
class CastDenoiser:
    """Run the inner denoiser in ``dtype`` (fp16/bf16 on a GPU) while the step maths stays in fp32."""

    inner: Denoiser
    dtype: torch.dtype

    def __call__(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype), t, cond.to(self.dtype)).float()


def unet_denoiser(unet: torch.nn.Module) -> CastDenoiser:
    """A UNet as a denoiser in its own dtype, returning fp32: what every sampler and trainer runs."""
    return CastDenoiser(UNetDenoiser(unet), unet.dtype)


@dataclass
class UNetDenoiser:
    """A diffusers ``UNet2DConditionModel`` as a denoiser; ``t`` is an int or a [B] tensor."""

    unet: torch.nn.Module

    def __call__(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]


@dataclass
class CFGDenoiser:
    """ε̂ = ε̂_∅ + w·(ε̂_c − ε̂_∅). ``uncond`` has the shape of ``cond``; w ≤ 1 means one conditional pass."""

    inner: Denoiser
    uncond: torch.Tensor | None
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def __call__(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.inner(x, t, cond)
        t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t
        out_uncond, out_cond = self.inner(torch.cat([x, x]), t2, torch.cat([self.uncond, cond])).chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)


@dataclass
class CountingDenoiser:
    """Counts network evaluations (calls and rows) of the wrapped denoiser: NFE bookkeeping for benches and tests."""

    inner: Denoiser
    calls: int = 0
    rows: int = 0

    def __call__(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner(x, t, cond)
