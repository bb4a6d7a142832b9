"""An analytic Gaussian mixture with exact scores and densities: the ground truth for SuperDiff (ALGORITHMS.md §4.6).

In VE coordinates (x̃ = x/√ᾱ, σ̃ = √((1−ᾱ)/ᾱ)) a mixture q_0 = Σ_k π_k N(μ_k, s²I) diffuses to
q̃_σ̃ = Σ_k π_k N(μ_k, (s² + σ̃²)I), so its score, its ε-prediction ε̂ = −σ̃·∇log q̃ and its log-density are closed
forms. ``MixtureModel`` wraps a mixture as an ε-prediction "model" with the sampler's calling convention
``eps(x_in, t)``: x_in = x̃/√(1+σ̃²) is the VP input, and t is mapped to σ̃ by a schedule: the continuous VP
schedule with linear β (β₀ = 0.1, β₁ = 20) or a discrete DDPM schedule (SD's scaled-linear betas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .superdiff import Ladder

# The two models of the tests: A has its components at (±2, +2), B at (±2, −2), all with s = 0.3.
MEANS_A = ((-2.0, 2.0), (2.0, 2.0))
MEANS_B = ((-2.0, -2.0), (2.0, -2.0))
TOY_STD = 0.3


def _col(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ̃ as a scalar tensor, or [B] → [B, 1], in x's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma[:, None] if sigma.ndim == 1 else sigma


@dataclass(frozen=True)
class GaussianMixture:
    """q_0 = Σ_k π_k N(μ_k, s²I) in D dims; ``weights`` None means equal weights."""

    means: tuple[tuple[float, ...], ...]
    std: float = TOY_STD
    weights: tuple[float, ...] | None = None

    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = torch.tensor(self.means, dtype=like.dtype, device=like.device)  # [K, D]
        w = torch.tensor(self.weights or [1.0] * len(self.means), dtype=like.dtype, device=like.device)
        return mu, (w / w.sum()).log()

    def _terms(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component log π_k N(x; μ_k, vI) [B, K], the offsets x − μ_k [B, K, D] and the variance v."""
        mu, log_pi = self._params(x)
        var = self.std**2 + _col(sigma, x) ** 2  # scalar or [B, 1]
        diff = x[:, None, :] - mu[None]
        d = x.shape[-1]
        logp = log_pi - (diff**2).sum(-1) / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)
        return logp, diff, var

    def log_density(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log q̃_σ̃(x̃) for x̃ [B, D] and σ̃ ≥ 0 (a scalar or one per row, [B]); returns [B]."""
        logp, _, _ = self._terms(x, sigma)
        return torch.logsumexp(logp, dim=1)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """∇log q̃_σ̃(x̃) = Σ_k r_k(x̃)·(μ_k − x̃)/(s² + σ̃²), r_k the posterior responsibilities; [B, D]."""
        logp, diff, var = self._terms(x, sigma)
        r = torch.softmax(logp, dim=1)
        return -(r[..., None] * diff).sum(1) / var

    def eps(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact ε-prediction ε̂ = −σ̃·∇log q̃_σ̃(x̃); [B, D]."""
        return -_col(sigma, x) * self.score(x, sigma)


@dataclass(frozen=True)
class VPSchedule:
    """Continuous VP schedule with linear β(t) = β₀ + (β₁ − β₀)t on t ∈ [0, 1]: α_t² = exp(−∫β), σ̃ = √(e^{∫β} − 1)."""

    beta_0: float = 0.1
    beta_1: float = 20.0

    def sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        integral = self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t**2
        return torch.expm1(integral).sqrt()


@dataclass(frozen=True)
class DiscreteSchedule:
    """DDPM discrete schedule: σ̃(t) = √((1−ᾱ_t)/ᾱ_t), linearly interpolated between integer t as diffusers' Euler."""

    alphas_cumprod: torch.Tensor  # [T] ᾱ_t, t = 0 … T−1

    def sigma(self, t) -> torch.Tensor:
        ac = self.alphas_cumprod.double()
        table = ((1 - ac) / ac).sqrt()
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(table) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(table) - 1)
        return table[lo] + (t - lo) * (table[hi] - table[lo])


@dataclass(frozen=True)
class MixtureModel:
    """A mixture as an ε-prediction model: ``model(x_in, t)`` with x_in = x̃/√(1+σ̃(t)²), as a UNet would see it."""

    mixture: GaussianMixture
    schedule: VPSchedule | DiscreteSchedule

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        sigma = self.schedule.sigma(t).to(x_in.device)
        x = x_in.double() * (1 + sigma**2).sqrt()
        return self.mixture.eps(x, sigma).to(x_in.dtype)


def vp_ladder(steps: int, beta_0: float = 0.1, beta_1: float = 20.0, t_min: float = 1e-3) -> Ladder:
    """N model times t uniform on [t_min, 1] (dt ≈ 1e−3 at N = 1000, as the paper's toy) and their σ̃, then σ̃ = 0."""
    ts = torch.linspace(1.0, t_min, steps, dtype=torch.float64)
    sigmas = torch.cat([VPSchedule(beta_0, beta_1).sigma(ts), torch.zeros(1, dtype=torch.float64)])
    return Ladder(sigmas=sigmas, timesteps=ts)


class LinearGaussianChain:
    """A K-step linear-Gaussian chain with a closed-form objective: the ground truth for RLR (ALGORITHMS.md §2.6).

    x^(0) ~ N(μ₀, v₀I) in D dims; step i: x' = (a_i + θ₀)·x + (b_i + θ₁)·u + s_i·z; r(x) = −‖x − y‖². The last
    step has s = 0. With per-step copies θ_i, the mean and variance recursions μ' = (a_i + θ_i0)μ + (b_i + θ_i1)u,
    v' = (a_i + θ_i0)²v + s_i² give J = −‖μ_K − y‖² − D·v_K exactly; autograd of it gives every ∂J/∂θ_i.
    Implements the chain protocol of ``finetuners.rlr`` (``num_steps``, ``params``, ``mean_std``).
    """

    def __init__(self, a=(0.9, 0.8, 1.1, 0.7), b=(0.5, -0.3, 0.2, 0.4), s=(0.6, 0.5, 0.4, 0.0), u=(1.0, -0.5),
                 y=(1.0, 2.0), theta=(0.1, 0.3), mu0=(0.5, -0.5), v0=1.0) -> None:  # fmt: skip
        f = torch.float64
        self.a, self.b, self.s = (torch.tensor(v, dtype=f) for v in (a, b, s))
        self.u, self.y, self.mu0 = (torch.tensor(v, dtype=f) for v in (u, y, mu0))
        self.v0 = float(v0)
        self.theta = torch.tensor(theta, dtype=f, requires_grad=True)
        self.params = [self.theta]

    @property
    def num_steps(self) -> int:
        return len(self.a)

    def initial(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.u.shape[0], generator=generator, dtype=torch.float64)
        return self.mu0 + math.sqrt(self.v0) * z

    def mean_std(self, x, i, rows, nu=None, groups=None):
        th = self.theta.expand(x.shape[0], -1) if nu is None else self.theta + nu[0][groups]
        mean = (self.a[i] + th[:, :1]) * x + (self.b[i] + th[:, 1:2]) * self.u
        return mean, torch.full((x.shape[0], 1), float(self.s[i]), dtype=x.dtype)

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.y) ** 2).sum(1)

    def objective(self, thetas: torch.Tensor) -> torch.Tensor:
        """J(θ_0, …, θ_{K−1}) for per-step parameters ``thetas`` [K, 2]."""
        mu, v = self.mu0, torch.tensor(self.v0, dtype=torch.float64)
        for i in range(self.num_steps):
            gain = self.a[i] + thetas[i, 0]
            mu = gain * mu + (self.b[i] + thetas[i, 1]) * self.u
            v = gain**2 * v + self.s[i] ** 2
        return -((mu - self.y) ** 2).sum() - self.u.shape[0] * v

    def step_gradients(self) -> torch.Tensor:
        """∂J/∂θ_i for every step, [K, 2]; their sum is ∇J of the shared θ."""
        thetas = self.theta.detach().expand(self.num_steps, -1).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.objective(thetas), thetas)
        return grad
