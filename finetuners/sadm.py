"""SADM-style structure-guided adversarial training of the denoiser (ALGORITHMS.md §5; arXiv 2402.17563).

The paper publishes the structure of the game but no code and no concrete loss. This module implements the
SADM-*style* objective proposed in ALGORITHMS.md §5.2 and labels it as such:

    real x0^(1..B), t_b ~ U{0..999}, ε_b;  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε;  x̂0 = (x_t − √(1−ᾱ_t)·ε_θ(x_t, t, c))/√ᾱ_t
    h_b = E_φ(x)/‖E_φ(x)‖ ∈ ℝ^m;  S = H·Hᵀ (B×B cosine matrix), for the real batch and for the fake batch
    d_φ(θ) = Σ_{b≠b'} w_bb'·(S^real_bb' − S^fake_bb')² / Σ_{b≠b'} w_bb',   w_bb' = √(ω(t_b)·ω(t_b')),  ω(t) = ᾱ_t
    discriminator: max_φ d_φ(sg θ) − ρ_φ‖φ‖²  (n_D steps, fakes detached)
    denoiser:      min_θ L_ε(θ) + λ·d_φ(θ)      (φ frozen)

Choices the paper leaves open, made here (each is a ``SADMConfig`` field, recorded in the run's config.json):

- **Structure space.** ``structure_space="pixels"`` (default, Shapes): the fake batch is the VAE decoding of
  x̂0 (gradients flow through the frozen decoder into θ); the real batch is the VAE decoding of the real
  latents' posterior mean, precomputed once. Both pass the same decoder, so the discriminator cannot win on
  the VAE's own reconstruction error. ``"latents"`` feeds x̂0 and the real latents straight to the encoder
  (the choice for large SD models; no VAE decoder in the loop: a pixel-space SADM step measured 2.9 plain steps).
- **Centring (a deviation from h = E/‖E‖, ``centering="weighted"``).** Each batch's ω-weighted mean feature is
  removed before the cosines (a centred kernel, as in CKA). Uncentred, a random conv encoder maps every
  Shapes image (mostly the same dark background) to nearly one direction: all cosines ≈ 1, d ≈ 1e−10, and
  the penalty ρ_φ‖φ‖² outweighs d's gradient, so φ never learns (measured: d fell from 4e−10 to 2e−14 over
  60 discriminator steps at lr 1e−3; centred, d ≈ 0.1–0.5 from the first steps). ``"none"`` keeps the plain
  form. Weighting the mean by ω keeps blurry high-t predictions from moving the centre.
- **Encoder.** ``StructureEncoder``: three stride-2 3×3 convolutions (width w, 2w, 2w) with SiLU, global
  average pooling and a linear map to m = 64; no normalisation layers, so a batch's rows never interact
  inside E_φ and S depends on the batch only through the pairs.
- **Pairs and time weighting.** Fake b and real b share the index b (fake b is the prediction from the noised
  real b). ω(t) = ᾱ_t (``time_weighting="alpha_bar"``) or 1 (``"none"``); the diagonal never counts. With all
  weights zero, d = 0.
- **Which batches.** Each discriminator step draws its own batch (real images, t, ε, caption dropout) from
  the discriminator's own ``torch.Generator`` and runs the UNet without gradients; the denoiser step draws
  its batch from the denoiser's generator exactly as the plain trainer does, so λ = 0 reproduces the plain
  trainer parameter for parameter (ALGORITHMS.md §5.5, RNG streams). The denoiser's structure term uses the
  same batch, the same forward pass and the same t as its ε loss.
- **Losses and optimisers.** L_ε is the ε-MSE with Min-SNR-γ weighting (γ = 5), as the shipped model was
  trained (``shapes/train.py``), with 10 % empty captions (keeps the unconditional branch for guidance). θ:
  AdamW (β = 0.9, 0.999, weight decay 1e-2), gradient norm clipped at 1. φ: Adam with β = (0.5, 0.999) at θ's
  learning rate and the explicit penalty ρ_φ‖φ‖² (ρ_φ = 1e-4) in its loss, not clipped. No EMA: runs are a
  few hundred steps and the checkpoint holds the live weights.
- **λ schedule.** λ rises linearly from 0 over the first ``warmup_fraction`` (10 %) of the steps, then stays.
  During warm-up the discriminator still trains.
- **What trains.** The UNet only (fully); VAE and text encoder are frozen, and the text states of the training
  captions are computed once. ``init="scratch"`` replaces the UNet by a fresh one of the same architecture.
- **Data.** ``n_images`` real images of ``domain`` (``shapes.world.DOMAINS``: "shapes", or the shifted
  "large" for cross-domain fine-tuning) rendered from seed 1 000 000 + seed (not the shipped model's own
  training images), VAE-encoded once; each draw samples the latent posterior, as ``shapes/train.py`` does.
- **Evaluation.** ``eval_sampler`` with η = 0 (default DDIM on the pipeline's spacing; the Fine-tune tab uses
  "ddim-trailing", as for the RL methods), guidance 3, ``eval_images`` captions from ``world.eval_prompts``
  with seeds eval_seed + i; probe accuracy, and FD-probe against as many fresh real
  images of the target domain for the same captions (render seed 777, shared by every run so that runs are
  compared on one reference set).

The run folder has the layout of ``trainer.py`` runs (``runs.py``); config.json stores ``{"method": "sadm",
"algo": SADMConfig.to_dict()}`` under "config", so checkpoints load in the Sample tab as whole UNets.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import runs
from .errors import UserError
from .steps import x0_and_eps

log = logging.getLogger(__name__)
METHOD = "sadm"
CONFIG_VERSION = 1
INITS = ("pretrained", "scratch")
SPACES = ("pixels", "latents")
TIME_WEIGHTINGS = ("alpha_bar", "none")
CENTERINGS = ("weighted", "none")
DATA_SEED_OFFSET = 1_000_000  # training images come from seed + this: never the shipped model's own images
EVAL_REAL_SEED = 777  # the real reference set of FD-probe, the same for every run


# ---------------------------------------------------------------------------------------------------
# The structure discriminator: pure functions and the encoder
# ---------------------------------------------------------------------------------------------------
def structure_matrix(features: torch.Tensor, center_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, m] encoder outputs → [B, B] cosine matrix S = H·Hᵀ, h_b = f_b/‖f_b‖ (unit diagonal, entries in [−1, 1]).

    With ``center_weights`` [B] (ω), f_b = E(x_b) − Σ_b' ω_b'·E(x_b')/Σ_b' ω_b': the batch's ω-weighted mean is
    removed first (a centred, CKA-style kernel), so a component common to every image cannot make all
    cosines ≈ 1, and a sample of weight 0 does not move the centre.
    """
    f = features.flatten(1)
    if center_weights is not None:
        w = center_weights.to(f).clamp(min=0)
        f = f - (w[:, None] * f).sum(0, keepdim=True) / w.sum().clamp(min=torch.finfo(f.dtype).tiny)
    h = F.normalize(f, dim=1, eps=1e-8)
    return h @ h.T


def time_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, kind: str = "alpha_bar") -> torch.Tensor:
    """ω(t_b) [B]: ᾱ_t ("alpha_bar"; high-t predictions are blurry and must not dominate) or 1 ("none")."""
    if kind == "alpha_bar":
        return alphas_cumprod.to(t.device)[t].float()
    if kind == "none":
        return torch.ones(t.shape, device=t.device)
    raise ValueError(f"unknown time weighting {kind!r}")


def pair_weights(omega: torch.Tensor) -> torch.Tensor:
    """[B] ω → [B, B] w_bb' = √(ω_b·ω_b'), zero on the diagonal."""
    w = (omega[:, None] * omega[None, :]).clamp(min=0).sqrt()
    return w * (1 - torch.eye(len(omega), device=w.device, dtype=w.dtype))


def structure_distance(real_features: torch.Tensor, fake_features: torch.Tensor, omega: torch.Tensor | None = None,
                       centering: str = "weighted") -> torch.Tensor:  # fmt: skip
    """d = Σ_{b≠b'} w_bb'(S^real_bb' − S^fake_bb')² / Σ_{b≠b'} w_bb' (a scalar ≥ 0; 0 when every weight is 0).

    ``real_features``, ``fake_features``: [B, m], row b of each from the same sample; ``omega``: [B] ω(t_b)
    (default 1); ``centering``: "weighted" (each batch's ω-weighted mean removed before the cosines) or "none"
    (the plain h = E/‖E‖). B must be at least 2: the structure of a single sample is undefined.
    """
    b = real_features.shape[0]
    if b < 2 or fake_features.shape[0] != b:
        raise UserError(f"the batch structure needs at least 2 samples in matching real and fake batches "
                        f"(got {b} real, {fake_features.shape[0]} fake)")  # fmt: skip
    if centering not in CENTERINGS:
        raise ValueError(f"unknown centering {centering!r}")
    omega = torch.ones(b, device=real_features.device) if omega is None else omega.to(real_features.device).float()
    c = omega if centering == "weighted" else None
    w = pair_weights(omega)
    diff2 = (structure_matrix(real_features.float(), c) - structure_matrix(fake_features.float(), c)) ** 2
    total = w.sum()
    return (w * diff2).sum() / total.clamp(min=torch.finfo(total.dtype).tiny)


class StructureEncoder(nn.Module):
    """E_φ: images [B, C, H, W] (pixels in [−1, 1], or latents) → [B, m] (unnormalised)."""

    def __init__(self, in_channels: int = 3, dim: int = 64, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def penalty(self) -> torch.Tensor:
        """‖φ‖²: the squared norm of every parameter."""
        return sum(p.pow(2).sum() for p in self.parameters())


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SADMConfig:
    """Every setting of a SADM run (ALGORITHMS.md §5.2 defaults; "ours" where the paper is silent)."""

    model: str = "shapes"  # pipeline folder, hub id in the local cache, or 'shapes'
    init: str = "pretrained"  # "pretrained": fine-tune the pipeline's UNet; "scratch": a fresh UNet, same architecture
    domain: str = "shapes"  # real images: "shapes" (in-domain) or a shifted world (shapes.world.DOMAINS)
    adapter: str = "full"  # the whole UNet trains (the only choice; recorded for the checkpoint loader)
    # -- the game --------------------------------------------------------------------------------
    structure_weight: float = 0.1  # λ; 0 is the plain denoising baseline (same code path)
    warmup_fraction: float = 0.1  # λ rises linearly from 0 over this fraction of all steps
    disc_steps: int = 1  # n_D discriminator steps before each denoiser step (0 only with λ = 0)
    disc_penalty: float = 1e-4  # ρ_φ, weight of ‖φ‖² in the discriminator's loss
    disc_learning_rate: float | None = None  # None: the denoiser's learning rate
    disc_betas: tuple[float, float] = (0.5, 0.999)  # Adam β of φ
    encoder_dim: int = 64  # m, the manifold dimension
    encoder_width: int = 32  # channels of the first convolution
    structure_space: str = "pixels"  # "pixels": decoded x̂0 (through the frozen VAE); "latents": x̂0 itself
    time_weighting: str = "alpha_bar"  # ω(t) = ᾱ_t, or "none" (ω = 1)
    centering: str = "weighted"  # remove each batch's ω-weighted mean feature before the cosines, or "none"
    # -- the denoiser ----------------------------------------------------------------------------
    batch_size: int = 32  # B ≥ 2 (structure needs pairs; ALGORITHMS.md suggests ≥ 16)
    learning_rate: float = 1e-4  # AdamW
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 5.0  # Min-SNR-γ weighting of the ε loss (0 = plain ε-MSE)
    caption_dropout: float = 0.1  # P(empty caption): keeps the unconditional branch for guidance
    n_images: int = 4096  # real training images rendered once
    epochs: int = 20
    steps_per_epoch: int = 10  # denoiser steps per epoch (one metrics line per epoch)
    seed: int = 0
    device: str = "cpu"
    # -- evaluation and checkpoints --------------------------------------------------------------
    eval_every: int = 5  # epochs between evaluations (and before the first, after the last); 0 = only at the end
    eval_images: int = 64  # generated images (and fresh real ones) for FD-probe and accuracy
    eval_steps: tuple[int, ...] = (20,)  # DDIM step counts evaluated
    eval_guidance: float = 3.0
    eval_sampler: str = "ddim"  # the pipeline's spacing; "ddim-trailing" for meaningful 1–4-step evaluations
    eval_seed: int = 0
    checkpoint_every: int = 5  # epochs (also at stop and at the end)
    keep_checkpoints: int = 3

    def __post_init__(self):
        from .shapes.world import DOMAINS

        for name in ("eval_steps", "disc_betas"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        choices = {"init": INITS, "domain": tuple(DOMAINS), "adapter": ("full",), "structure_space": SPACES,
                   "time_weighting": TIME_WEIGHTINGS, "centering": CENTERINGS,
                   "eval_sampler": ("ddim", "ddim-trailing", "lcm")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("no model given: pass a pipeline folder, a hub id, or 'shapes'")
        if not isinstance(self.device, str) or not self.device.strip():
            raise UserError("no device given: use cpu, cuda or cuda:N")
        ints = [("batch_size", 1, 4096), ("disc_steps", 0, 100), ("encoder_dim", 1, 4096), ("encoder_width", 1, 1024),
                ("n_images", 1, 10**6), ("epochs", 1, 10**6), ("steps_per_epoch", 1, 10**6), ("seed", 0, 2**32 - 1),
                ("eval_every", 0, 10**6), ("eval_images", 2, 10**5), ("eval_seed", 0, 2**32 - 1),
                ("checkpoint_every", 1, 10**6), ("keep_checkpoints", 1, 1000)]  # fmt: skip
        for name, lo, hi in ints:
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                object.__setattr__(self, name, int(v))
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise UserError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
        if self.batch_size < 2:
            raise UserError(
                f"batch_size must be at least 2 for SADM, got {self.batch_size}: the structure of a batch is the "
                "similarity between pairs of its samples, undefined for a single sample"
            )
        floats = [("structure_weight", 0.0, 1e4, True), ("warmup_fraction", 0.0, 1.0, True),
                  ("disc_penalty", 0.0, 1e3, True), ("learning_rate", 0.0, 1.0, False),
                  ("weight_decay", 0.0, 10.0, True), ("max_grad_norm", 0.0, 1e6, False),
                  ("min_snr_gamma", 0.0, 1e6, True), ("caption_dropout", 0.0, 1.0, True),
                  ("eval_guidance", 0.0, 30.0, True)]  # fmt: skip
        if self.disc_learning_rate is not None:
            floats.append(("disc_learning_rate", 0.0, 1.0, False))
        for name, lo, hi, closed in floats:
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
                raise UserError(f"{name} must be a number, got {v!r}")
            if not (lo <= v <= hi if closed else lo < v <= hi):
                raise UserError(f"{name} must be in {'[' if closed else '('}{lo:g}, {hi:g}], got {v:g}")
        if len(self.disc_betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in self.disc_betas):
            raise UserError(f"disc_betas must be two numbers in [0, 1), got {self.disc_betas!r}")
        if not self.eval_steps or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 200
                                          for k in self.eval_steps):  # fmt: skip
            raise UserError(f"eval_steps must be step counts from 1 to 200, got {self.eval_steps!r}")
        if self.disc_steps == 0 and self.structure_weight > 0:
            raise UserError("disc_steps is 0 but structure_weight (λ) is not: the structure term needs a trained "
                            "discriminator; set λ = 0 for plain denoising, or disc_steps ≥ 1")  # fmt: skip

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def structure_weight_at(self, step: int) -> float:
        """λ at denoiser step ``step`` (0-based): linear warm-up over ``warmup_fraction`` of all steps."""
        warm = self.warmup_fraction * self.total_steps
        return self.structure_weight * (min(1.0, step / warm) if warm > 0 else 1.0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_steps"], d["disc_betas"] = list(self.eval_steps), list(self.disc_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SADMConfig:
        """From a plain dict (JSON, a UI form): unknown keys and bad values raise ``UserError``."""
        if not isinstance(d, dict):
            raise UserError(f"a SADM config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown SADM setting(s): {', '.join(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------
# Data and the two updates
# ---------------------------------------------------------------------------------------------------
@dataclass
class ShapesData:
    """Real training data in the pipeline's latent space, computed once.

    latent_mean, latent_std [N, C, h, w] (VAE posterior, unscaled); hidden [N, L, D] text states of the
    captions, empty_hidden [1, L, D]; real_pixels [N, 3, H, W] in [−1, 1]: the decoding of the posterior mean
    (only for ``structure_space="pixels"``).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    hidden: torch.Tensor
    empty_hidden: torch.Tensor
    real_pixels: torch.Tensor | None
    scaling: float

    def __len__(self) -> int:
        return self.latent_mean.shape[0]


@torch.no_grad()
def make_shapes_data(pipe, n_images: int, seed: int, domain: str = "shapes", with_pixels: bool = True,
                     chunk: int = 256) -> ShapesData:  # fmt: skip
    from .generate import encode
    from .shapes.world import make_dataset

    dev, vae = pipe.device, pipe.vae
    samples = make_dataset(n_images, seed, domain)
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
    means, stds, pixels, hidden = [], [], [], []
    for i in range(0, n_images, chunk):
        x = images[i : i + chunk].to(dev, vae.dtype) / 127.5 - 1
        post = vae.encode(x).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
        if with_pixels:
            pixels.append(vae.decode(post.mean).sample.float())
        hidden.append(encode(pipe, [s.caption for s in samples[i : i + chunk]], None, False)[0].float())
    empty = encode(pipe, [""], None, False)[0].float()
    return ShapesData(torch.cat(means), torch.cat(stds), torch.cat(hidden), empty,
                      torch.cat(pixels) if with_pixels else None, float(vae.config.scaling_factor))  # fmt: skip


@dataclass
class Batch:
    """One training batch: index [B] into the data, z0 [B, C, h, w] (scaled latents), eps, t [B], cond."""

    index: torch.Tensor
    z0: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor


def draw_batch(data: ShapesData, batch_size: int, caption_dropout: float, generator: torch.Generator) -> Batch:
    """Draw a batch as ``shapes/train.py`` does: images, posterior sample, ε, t ~ U{0..999}, caption dropout."""
    dev = data.latent_mean.device
    idx = torch.randint(0, len(data), (batch_size,), generator=generator, device=dev)
    mean, std = data.latent_mean[idx], data.latent_std[idx]
    z0 = (mean + std * torch.randn(mean.shape, generator=generator, device=dev)) * data.scaling
    eps = torch.randn(z0.shape, generator=generator, device=dev)
    t = torch.randint(0, 1000, (batch_size,), generator=generator, device=dev)
    drop = torch.rand(batch_size, generator=generator, device=dev) < caption_dropout
    cond = torch.where(drop[:, None, None], data.empty_hidden, data.hidden[idx])
    return Batch(idx, z0, eps, t, cond)


def noised(batch: Batch, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε."""
    a = alphas_cumprod[batch.t].view(-1, 1, 1, 1)
    return a.sqrt() * batch.z0 + (1 - a).sqrt() * batch.eps


def denoising_loss(eps_hat: torch.Tensor, batch: Batch, alphas_cumprod: torch.Tensor,
                   min_snr_gamma: float) -> torch.Tensor:  # fmt: skip
    """E‖ε − ε_θ‖², each sample weighted by min(SNR, γ)/SNR (ε-form of Min-SNR-γ; γ = 0: unweighted)."""
    per_sample = (eps_hat.float() - batch.eps).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        a = alphas_cumprod[batch.t].float()
        snr = a / (1 - a)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()


def predict_x0(eps_hat: torch.Tensor, x_t: torch.Tensor, batch: Batch, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (scaled latents)."""
    return x0_and_eps(eps_hat.float(), x_t, alphas_cumprod[batch.t], "epsilon")[0]


@dataclass
class SADMModels:
    """What ``sadm_step`` updates and reads. ``unet`` (θ) and ``encoder`` (φ) train; ``vae`` is frozen."""

    unet: nn.Module
    encoder: StructureEncoder
    vae: nn.Module | None
    opt_unet: torch.optim.Optimizer
    opt_encoder: torch.optim.Optimizer
    alphas_cumprod: torch.Tensor  # [1000] fp32 on the training device


def make_optimizers(unet: nn.Module, encoder: nn.Module, cfg: SADMConfig):
    opt_unet = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999),
                                 weight_decay=cfg.weight_decay)  # fmt: skip
    lr_d = cfg.disc_learning_rate if cfg.disc_learning_rate is not None else cfg.learning_rate
    opt_encoder = torch.optim.Adam(encoder.parameters(), lr=lr_d, betas=cfg.disc_betas)
    return opt_unet, opt_encoder


def to_structure_space(m: SADMModels, latents: torch.Tensor, space: str, data: ShapesData) -> torch.Tensor:
    """Scaled latents → the encoder's input: decoded pixels in [−1, 1] (differentiable) or the latents."""
    if space == "latents":
        return latents
    return m.vae.decode(latents.to(m.vae.dtype) / data.scaling, return_dict=False)[0].float()


def real_structure_input(batch: Batch, data: ShapesData, space: str) -> torch.Tensor:
    return data.real_pixels[batch.index] if space == "pixels" else data.latent_mean[batch.index] * data.scaling


def _unet_eps(unet: nn.Module, x_t: torch.Tensor, batch: Batch) -> torch.Tensor:
    dtype = next(unet.parameters()).dtype
    return unet(x_t.to(dtype), batch.t, encoder_hidden_states=batch.cond.to(dtype), return_dict=False)[0].float()


def structure_inputs(m: SADMModels, data: ShapesData, cfg: SADMConfig, batch: Batch, x_t: torch.Tensor,
                     eps_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(real, fake, ω): the encoder inputs of the real batch and of the predictions x̂0 (differentiable in
    ``eps_hat`` when it carries a graph), and ω(t_b) [B]."""
    fake = to_structure_space(m, predict_x0(eps_hat, x_t, batch, m.alphas_cumprod), cfg.structure_space, data)
    real = real_structure_input(batch, data, cfg.structure_space)
    return real, fake, time_weights(m.alphas_cumprod, batch.t, cfg.time_weighting)


@torch.no_grad()
def measure_structure(m: SADMModels, data: ShapesData, cfg: SADMConfig, batch: Batch) -> float:
    """d_φ(θ) on one batch under the current weights (no update)."""
    x_t = noised(batch, m.alphas_cumprod)
    real, fake, omega = structure_inputs(m, data, cfg, batch, x_t, _unet_eps(m.unet, x_t, batch))
    return float(structure_distance(m.encoder(real), m.encoder(fake), omega, cfg.centering))


def discriminator_step(m: SADMModels, data: ShapesData, cfg: SADMConfig, generator: torch.Generator) -> dict:
    """One φ update on its own batch: maximise d_φ(sg θ) − ρ_φ‖φ‖². θ receives no gradient."""
    batch = draw_batch(data, cfg.batch_size, cfg.caption_dropout, generator)
    with torch.no_grad():  # fakes detached: the UNet and the decoder run without a graph
        x_t = noised(batch, m.alphas_cumprod)
        real, fake, omega = structure_inputs(m, data, cfg, batch, x_t, _unet_eps(m.unet, x_t, batch))
    d = structure_distance(m.encoder(real), m.encoder(fake), omega, cfg.centering)
    loss = -d + cfg.disc_penalty * m.encoder.penalty()
    m.opt_encoder.zero_grad(set_to_none=True)
    loss.backward()
    m.opt_encoder.step()
    m.opt_encoder.zero_grad(set_to_none=True)
    return {"disc_structure": float(d.detach()), "disc_loss": float(loss.detach())}


def denoiser_step(m: SADMModels, data: ShapesData, cfg: SADMConfig, generator: torch.Generator,
                  structure_weight: float, measure: bool = True) -> dict:  # fmt: skip
    """One θ update: minimise L_ε + λ·d_φ(θ) with φ frozen. With λ = 0 this is the plain denoising step, and
    the structure distance (if ``measure``) is only measured, without a graph."""
    batch = draw_batch(data, cfg.batch_size, cfg.caption_dropout, generator)
    x_t = noised(batch, m.alphas_cumprod)
    eps_hat = _unet_eps(m.unet, x_t, batch)
    loss_eps = denoising_loss(eps_hat, batch, m.alphas_cumprod, cfg.min_snr_gamma)
    loss, d = loss_eps, None
    if structure_weight > 0 or measure:
        m.encoder.requires_grad_(False)  # φ frozen: no gradient reaches it
        try:
            with torch.set_grad_enabled(structure_weight > 0):
                real, fake, omega = structure_inputs(m, data, cfg, batch, x_t, eps_hat)
                d = structure_distance(m.encoder(real), m.encoder(fake), omega, cfg.centering)
        finally:
            m.encoder.requires_grad_(True)
        if structure_weight > 0:
            loss = loss_eps + structure_weight * d
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the denoiser loss became {float(loss)}")
    m.opt_unet.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(m.unet.parameters(), cfg.max_grad_norm)
    m.opt_unet.step()
    m.opt_unet.zero_grad(set_to_none=True)
    out = {"loss": float(loss.detach()), "denoising_loss": float(loss_eps.detach()), "grad_norm": float(norm),
           "structure_weight": structure_weight}  # fmt: skip
    if d is not None:
        out["structure_loss"] = float(d.detach())
    return out


def denoising_step(m: SADMModels, data: ShapesData, cfg: SADMConfig, generator: torch.Generator) -> dict:
    """The plain denoising trainer's step (the λ = 0 baseline): no discriminator, no structure term."""
    return denoiser_step(m, data, cfg, generator, 0.0, measure=False)


def sadm_step(m: SADMModels, data: ShapesData, cfg: SADMConfig, step: int, gen_denoiser: torch.Generator,
              gen_disc: torch.Generator) -> dict:  # fmt: skip
    """n_D discriminator steps (fakes detached, ``gen_disc``), then one denoiser step (φ frozen, ``gen_denoiser``)
    with λ = ``cfg.structure_weight_at(step)``. Returns the metrics of both."""
    disc = [discriminator_step(m, data, cfg, gen_disc) for _ in range(cfg.disc_steps)]
    out = denoiser_step(m, data, cfg, gen_denoiser, cfg.structure_weight_at(step),
                        measure=cfg.disc_steps > 0)  # fmt: skip
    if disc:
        out["disc_structure"] = float(np.mean([r["disc_structure"] for r in disc]))
        out["disc_loss"] = float(np.mean([r["disc_loss"] for r in disc]))
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation: probe accuracy and FD-probe against fresh real images of the target domain
# ---------------------------------------------------------------------------------------------------
class ProbeEvaluator:
    """Generates ``n`` images for ``world.eval_prompts(n)`` (seeds eval_seed + i, ``eval_sampler`` with η = 0) and
    scores them."""

    def __init__(self, pipe, probe, cfg: SADMConfig, chunk: int = 64):
        from .shapes.world import eval_prompts, make_sample, parse_prompt

        self.pipe, self.probe, self.cfg, self.chunk = pipe, probe, cfg, chunk
        self.prompts = eval_prompts(cfg.eval_images)
        rng = np.random.default_rng(EVAL_REAL_SEED)
        real = np.stack([make_sample(rng, parse_prompt(p), cfg.domain).image for p in self.prompts])
        with torch.no_grad():
            self.real_features = probe.features(torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255).cpu()

    @torch.no_grad()
    def images(self, steps: int) -> torch.Tensor:
        """[n, 3, H, W] in [0, 1] on the CPU."""
        from .denoisers import CFGDenoiser, unet_denoiser
        from .generate import decode, encode, sampler_setup, schedule_tensors
        from .sampling import initial_noise, sample_loop

        pipe, cfg = self.pipe, self.cfg
        unet = pipe.unet
        alphas, final_alpha = schedule_tensors(pipe, pipe.device)
        ts, kind, kwargs = sampler_setup(pipe, cfg.eval_sampler, steps)
        guided = cfg.eval_guidance > 1.0
        out = []
        for s in range(0, len(self.prompts), self.chunk):
            prompts = self.prompts[s : s + self.chunk]
            cond, uncond = encode(pipe, prompts, [""] * len(prompts) if guided else None, guided)
            gens = [torch.Generator().manual_seed(cfg.eval_seed + s + i) for i in range(len(prompts))]
            shape = (len(prompts), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            x_T = initial_noise(shape, gens, pipe.device, dtype=torch.float32)
            denoiser = CFGDenoiser(unet_denoiser(unet), uncond, cfg.eval_guidance)
            final, _ = sample_loop(denoiser, x_T, cond, ts, alphas, step_kind=kind, eta=0.0,
                                   prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
                                   final_alpha_cumprod=final_alpha, generator=gens, record=False,
                                   step_kwargs=kwargs)  # fmt: skip
            out.append(decode(pipe, final))
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, steps: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(metrics, the images [n, 3, H, W], per image whether it follows its prompt [n] bool)."""
        from .metrics import frechet_distance
        from .shapes.probe import prompt_accuracy

        images = self.images(steps)
        device = next(self.probe.parameters()).device
        feats = self.probe.features(images.to(device)).cpu()
        acc = prompt_accuracy(self.probe, images.to(device), self.prompts)
        metrics = {f"eval_accuracy_k{steps}": float(acc.mean()),
                   f"eval_fd_probe_k{steps}": frechet_distance(feats, self.real_features)}  # fmt: skip
        return metrics, images, acc.bool().cpu()


# ---------------------------------------------------------------------------------------------------
# The run: a run folder with the layout of trainer.py runs
# ---------------------------------------------------------------------------------------------------
class _Stopped(Exception):
    pass


class SADMRun:
    """The models, optimisers, generators and counters of one run, built from a loaded pipeline."""

    def __init__(self, pipe, cfg: SADMConfig, data: ShapesData | None = None):
        self.pipe, self.cfg = pipe, cfg
        dev = pipe.device
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if cfg.init == "scratch":
            from diffusers import UNet2DConditionModel

            with torch.random.fork_rng(devices=[]):  # module initialisation without touching the global RNG
                torch.manual_seed(cfg.seed)
                unet = UNet2DConditionModel.from_config(pipe.unet.config)
            pipe.register_modules(unet=unet.to(device=dev, dtype=pipe.unet.dtype))
        pipe.unet.requires_grad_(True).train()
        in_channels = 3 if cfg.structure_space == "pixels" else pipe.unet.config.in_channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            encoder = StructureEncoder(in_channels, cfg.encoder_dim, cfg.encoder_width).to(dev)
        alphas = pipe.scheduler.alphas_cumprod.to(device=dev, dtype=torch.float32)
        self.models = SADMModels(pipe.unet, encoder, pipe.vae, *make_optimizers(pipe.unet, encoder, cfg), alphas)
        self.data = (
            data
            if data is not None
            else make_shapes_data(
                pipe, cfg.n_images, DATA_SEED_OFFSET + cfg.seed, cfg.domain, cfg.structure_space == "pixels"
            )
        )
        self.gen_denoiser = torch.Generator(dev).manual_seed(cfg.seed)
        self.gen_disc = torch.Generator(dev).manual_seed(cfg.seed + 2**31)  # its own stream (§5.5)
        self.global_step = 0  # denoiser steps taken

    @property
    def epoch(self) -> int:
        return self.global_step // self.cfg.steps_per_epoch

    def step(self) -> dict:
        try:
            out = sadm_step(self.models, self.data, self.cfg, self.global_step, self.gen_denoiser, self.gen_disc)
        except FloatingPointError as e:
            from .trainer import TrainingFailed

            raise TrainingFailed(f"{e} at step {self.global_step + 1}; try a lower learning rate or λ") from e
        self.global_step += 1
        return out

    def save_checkpoint(self, run_dir: Path) -> Path:
        from .lora import save_full_unet

        m = self.models

        def write(tmp: Path) -> None:
            save_full_unet(m.unet, tmp / "unet")
            state = {"global_step": self.global_step, "encoder": m.encoder.state_dict(),
                     "opt_unet": m.opt_unet.state_dict(), "opt_encoder": m.opt_encoder.state_dict(),
                     "gen_denoiser": self.gen_denoiser.get_state(), "gen_disc": self.gen_disc.get_state()}  # fmt: skip
            torch.save(state, tmp / runs.CHECKPOINT_STATE)

        return runs.write_checkpoint(run_dir, self.global_step, write, self.cfg.keep_checkpoints)

    def load_checkpoint(self, folder: Path) -> None:
        m = self.models
        try:
            from diffusers import UNet2DConditionModel

            state = torch.load(folder / runs.CHECKPOINT_STATE, map_location="cpu", weights_only=True)
            loaded = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
            m.unet.load_state_dict(loaded.state_dict())
            m.encoder.load_state_dict(state["encoder"])
            m.opt_unet.load_state_dict(state["opt_unet"])
            m.opt_encoder.load_state_dict(state["opt_encoder"])
            self.gen_denoiser.set_state(state["gen_denoiser"])
            self.gen_disc.set_state(state["gen_disc"])
            self.global_step = int(state["global_step"])
        except Exception as e:  # noqa: BLE001 - any unreadable piece means a corrupt checkpoint
            raise UserError(f"checkpoint {str(folder)!r} is corrupt: {type(e).__name__}: {e}") from e


def _prepare(run_dir: Path, config: SADMConfig | None, resume: bool) -> tuple[SADMConfig, dict, Path | None]:
    """Validate everything before writing anything. Returns (config, config.json record, checkpoint)."""
    if not resume:
        if config is None:
            raise UserError("a new run needs a config")
        return config, runs.new_run_record(run_dir, config.model, version=CONFIG_VERSION, method=METHOD,
                                           config={"method": METHOD, "algo": config.to_dict()}), None  # fmt: skip
    record = runs.read_run_record(run_dir)
    try:
        if record["config"]["method"] != METHOD:
            raise UserError(f"cannot resume {str(run_dir)!r} as SADM: it is a {record['config']['method']!r} run")
        stored = SADMConfig.from_dict(record["config"]["algo"])
        fingerprint = record["model_fingerprint"]
    except (KeyError, TypeError) as e:
        raise UserError(f"cannot resume {str(run_dir)!r}: config.json is corrupt ({type(e).__name__}: {e})") from e
    if config is not None and config.to_dict() != stored.to_dict():
        a, b = config.to_dict(), stored.to_dict()
        raise UserError(f"cannot resume {str(run_dir)!r} with a different config "
                        f"({', '.join(sorted(k for k in a if a[k] != b[k]))})")  # fmt: skip
    return stored, record, runs.resume_checkpoint(run_dir, stored.model, fingerprint)


def check_resumable(run_dir: str | Path) -> SADMConfig:
    """The stored config of a SADM run that ``train_sadm(run_dir, resume=True)`` can continue; ``UserError``
    otherwise. Reads only."""
    return _prepare(Path(run_dir), None, True)[0]


def train_sadm(run_dir: str | Path, config: SADMConfig | dict | None = None, stop_event=None, resume: bool = False,
               on_metrics=None, pipe=None, data: ShapesData | None = None) -> dict:  # fmt: skip
    """Run (or resume) SADM training into ``run_dir``; returns the final status dict (status.json).

    ``config``: a ``SADMConfig`` or a plain dict (``SADMConfig.from_dict``). ``stop_event`` (a
    ``threading.Event``) or a ``STOP`` file in the run folder stops within one step: a checkpoint is written
    and the status becomes "stopped". ``on_metrics(record)`` sees every metrics line. ``pipe`` and ``data``
    let a caller (a benchmark) reuse a loaded pipeline and rendered data; the pipeline's UNet is trained in
    place. Bad input raises ``UserError`` before anything is written.
    """
    from .models import PROBE_PATH, load_model
    from .shapes.probe import ShapesProbe
    from .trainer import TrainingFailed, peak_memory_mb

    run_dir = Path(run_dir)
    if isinstance(config, dict):
        config = SADMConfig.from_dict(config)
    cfg, record, ckpt = _prepare(run_dir, config, resume)
    if pipe is None:
        runs.announce_phase("loading the model")
        pipe = load_model(cfg.model, cfg.device, "float32")
    if not (Path(PROBE_PATH) / "model.safetensors").is_file():
        raise UserError(f"the Shapes probe is missing ({PROBE_PATH}): it gives the evaluation metrics")
    probe = ShapesProbe.load(PROBE_PATH, pipe.device)
    if data is None:
        runs.announce_phase(f"rendering and encoding {cfg.n_images} real images of the {cfg.domain} world")
    run = SADMRun(pipe, cfg, data)
    if ckpt is not None:
        run.load_checkpoint(ckpt)  # UserError on corruption; nothing written yet
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(run_dir / "config.json", record)
    (run_dir / "samples").mkdir(exist_ok=True)
    evaluator = ProbeEvaluator(pipe, probe, cfg)
    stop_file = run_dir / "STOP"

    def stop() -> bool:
        return (stop_event is not None and stop_event.is_set()) or stop_file.exists()

    def emit(rec: dict) -> None:
        rec = {"time": time.time(), **rec}
        runs.append_metrics(run_dir, rec)
        if on_metrics is not None:
            on_metrics(rec)

    def evaluate() -> None:
        pipe.unet.eval()
        rec = {"event": "eval", "epoch": run.epoch, "global_step": run.global_step}
        for k in cfg.eval_steps:
            metrics, images, followed = evaluator.evaluate(k)
            rec.update(metrics)
            runs.write_samples(run_dir, f"step-{run.global_step:06d}_k{k}", images, evaluator.prompts, followed)
        pipe.unet.train()
        emit(rec)

    runs.write_status(run_dir, "running", pid=os.getpid(), epoch=run.epoch)
    if resume:
        emit({"event": "resumed", "epoch": run.epoch, "global_step": run.global_step})
    try:
        if run.global_step == 0 and not resume and cfg.eval_every > 0:
            evaluate()
        while run.global_step < cfg.total_steps:
            if stop():
                raise _Stopped
            t0, steps0, records = time.perf_counter(), run.global_step, []
            while True:  # one epoch: up to the next multiple of steps_per_epoch
                records.append(run.step())
                if run.global_step % cfg.steps_per_epoch == 0:
                    break
                if stop():  # mid-epoch: the steps are kept (checkpoint), the epoch line comes after resume
                    raise _Stopped
            _emit_epoch(emit, run, records, t0, steps0, peak_memory_mb(pipe.device))
            last = run.global_step >= cfg.total_steps
            if (cfg.eval_every and run.epoch % cfg.eval_every == 0) or last:
                evaluate()
            if run.epoch % cfg.checkpoint_every == 0 or last:
                run.save_checkpoint(run_dir)
    except _Stopped:
        if not any(n == run.global_step for n, _ in runs.list_checkpoints(run_dir)):
            run.save_checkpoint(run_dir)
        emit({"event": "stopped", "epoch": run.epoch, "global_step": run.global_step})
        stop_file.unlink(missing_ok=True)
        runs.write_status(run_dir, "stopped", epoch=run.epoch)
        return runs.read_status(run_dir)
    except TrainingFailed as e:
        emit({"event": "failed", "epoch": run.epoch, "error": str(e)})
        runs.write_status(run_dir, "failed", error=str(e), epoch=run.epoch)
        return runs.read_status(run_dir)
    except BaseException as e:
        runs.write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}", epoch=run.epoch)
        raise
    runs.write_status(run_dir, "finished", epoch=run.epoch)
    return runs.read_status(run_dir)


def _emit_epoch(emit, run: SADMRun, records: list[dict], t0: float, steps0: int, memory_mb: float) -> None:
    seconds = time.perf_counter() - t0
    keys = sorted({k for r in records for k in r})
    means = {k: float(np.mean([r[k] for r in records if k in r])) for k in keys}
    emit({"event": "epoch", "epoch": run.epoch, "global_step": run.global_step, "seconds": seconds,
          "iterations_per_s": (run.global_step - steps0) / max(seconds, 1e-9), "peak_memory_mb": memory_mb,
          **means})  # fmt: skip


__all__ = [
    "SADMConfig", "SADMModels", "SADMRun", "ShapesData", "StructureEncoder", "check_resumable", "denoising_step",
    "discriminator_step", "denoiser_step", "draw_batch", "make_shapes_data", "measure_structure", "pair_weights",
    "sadm_step", "structure_distance", "structure_matrix", "time_weights", "train_sadm",
]  # fmt: skip
