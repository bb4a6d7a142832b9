"""SuperDiff: superposing diffusion models at sampling time with the Itô density estimator (ALGORITHMS.md §4).

The Superposition of Diffusion Models Using the Itô Density Estimator (arXiv 2412.17762; reference implementation
necludov/super-diffusion). Two or more ε-prediction models (two prompts on one UNet, or two UNets) are combined
with weights κ_i at every step of one Euler–Maruyama sampler in VE coordinates, x̃ = x/√ᾱ, σ̃ = √((1−ᾱ)/ᾱ):

    n = √(2σ̃_k|Δ|)·z  (drawn first),   dx = 2Δ·ĝ_mix + n,   ĝ_mix = Σ_i κ_i·ĝ_i,   Δ = σ̃_{k+1} − σ̃_k < 0
    Δℓ_i = −⟨dx, ε̂_i⟩/σ̃_k − |Δ|·‖ε̂_i‖²/σ̃_k            (Thm. 1: f = 0, score −ε̂/σ̃, matched g)

ε̂_i is the unguided conditional prediction of model i and ĝ_i = ε̂_∅ + w(ε̂_i − ε̂_∅) the stepped (guided) one.
OR mixes with κ = softmax(T·ℓ + b); AND solves for the κ that keeps the tracked densities equal (§4.2); "avg" uses
κ = 1/M and "single" κ = [1, 0, …]. N model evaluations make N − 1 stochastic steps and one deterministic last step
x̃ ← x̃ − σ̃_{N−1}·ĝ_mix to σ̃ = 0, which carries no Itô increment; its AND weight is the κ of the noise-free
balance (n = 0), i.e. the mean of the affine κ(n) over the noise.

Models are anything with the ``ModelSet`` interface, ``models(x_in, t) -> Predictions``, so the same sampler runs
the analytic mixtures of ``finetuners.toy`` and a Stable-Diffusion UNet (``superpose_prompts``,
``superpose_models``). The estimator needs the matched SDE noise: DDIM with η = 0, ODE samplers and few-step
models are out of scope (§4.5), and the Stable-Diffusion helpers refuse fewer than 20 steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np
import torch

from .denoisers import CountingDenoiser, Denoiser, unet_denoiser
from .errors import UserError
from .sampling import initial_noise

log = logging.getLogger(__name__)

Mode = Literal["or", "and", "avg", "single"]
MODES: tuple[str, ...] = ("or", "and", "avg", "single")
MIN_SD_STEPS = 20  # ALGORITHMS.md §4.3 (ours): the O(step) estimator error makes 1–8 steps meaningless
DEGENERATE = 1e-12  # ‖ε̂_1 − ε̂_2‖² below this: the models agree, AND uses κ = 1/M


@dataclass(frozen=True)
class SuperDiffConfig:
    """How to superpose ``num_models`` models. Validated on construction (``UserError`` with a clear message)."""

    mode: str = "and"  # "or" (mixture), "and" (equal densities), "avg" (κ = 1/M), "single" (κ = [1, 0, …])
    temperature: float = 1.0  # OR only: κ = softmax(T·ℓ + b); T = 1 is the mixture, T → ∞ routes to the densest model
    # Nats, one per model; None means zeros. OR: prior log-weights b_i = log ω_i (−inf switches a model off).
    # AND: the target final gap ℓ_i − ℓ_j = b_i − b_j, spread evenly over the N − 1 stochastic steps; for two
    # models ℓ_step = (b_1 − b_2)/(N − 1), so the paper's scalar AND bias is (bias, 0).
    bias: tuple[float, ...] | None = None
    steps: int = 100  # N model evaluations: N − 1 Euler–Maruyama steps and one deterministic last step
    guidance: float = 7.5  # CFG w: ĝ_i = ε̂_∅ + w(ε̂_i − ε̂_∅); ≤ 1 means no unconditional pass
    num_models: int = 2

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown superposition mode {self.mode!r}: choose one of {', '.join(MODES)}")
        for name in ("num_models", "steps"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"{name} must be a whole number, got {value!r}")
        if self.num_models < 2:
            raise UserError(f"superposition needs at least 2 models, got {self.num_models}")
        if self.steps < 2:
            raise UserError(f"steps must be at least 2 (one stochastic step and the final one), got {self.steps}")
        for name in ("temperature", "guidance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature:g}")
        if self.guidance < 0:
            raise UserError(f"guidance must be ≥ 0, got {self.guidance:g}")
        bias = (0.0,) * self.num_models if self.bias is None else self.bias
        try:
            bias = tuple(float(b) for b in bias)
        except (TypeError, ValueError) as e:
            raise UserError(f"bias must be a list of {self.num_models} numbers, got {self.bias!r}") from e
        if len(bias) != self.num_models:
            raise UserError(f"bias needs one value per model ({self.num_models}), got {len(bias)}")
        allow_minus_inf = self.mode == "or"
        if any(math.isnan(b) or b == math.inf or (b == -math.inf and not allow_minus_inf) for b in bias):
            raise UserError(f"bias values must be finite (−inf only switches a model off in OR), got {bias}")
        if all(b == -math.inf for b in bias):
            raise UserError("bias switches every model off: at least one value must be finite")
        object.__setattr__(self, "bias", bias)


# ---------------------------------------------------------------------------------------------------------------------
# The noise ladder and the Euler–Maruyama step


@dataclass(frozen=True)
class Ladder:
    """σ̃_0 > … > σ̃_{N−1} > σ̃_N = 0 (``sigmas`` [N+1], float64); the model time t_k of each σ̃_k (``timesteps`` [N])."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def euler_ladder(scheduler_config, steps: int, spacing: str = "trailing") -> Ladder:
    """The σ̃ ladder of diffusers' ``EulerDiscreteScheduler`` on a DDPM schedule, with σ̃ kept in float64.

    Timesteps come from Euler's ``set_timesteps``; σ̃ is its linear interpolation of √((1−ᾱ_t)/ᾱ_t), recomputed in
    float64 (diffusers stores float32). "trailing" starts at t = 999 (the prior) for every N ≤ 1000, where SD's
    "leading" with offset 1 would start at t = 991 for N = 100 and run off the table (t = 1000) at N = 1000.
    """
    from diffusers import EulerDiscreteScheduler

    config = dict(getattr(scheduler_config, "config", scheduler_config))
    n_train = config.get("num_train_timesteps", 1000)
    if not 2 <= steps <= n_train:
        raise UserError(f"steps must be between 2 and {n_train} for this noise schedule, got {steps}")
    sched = EulerDiscreteScheduler.from_config(config, timestep_spacing=spacing, interpolation_type="linear",
                                               use_karras_sigmas=False)  # fmt: skip
    sched.set_timesteps(steps)
    ts = sched.timesteps.double()
    if ts.max() > n_train - 1:
        raise UserError(f"{spacing!r} spacing at {steps} steps runs past t = {n_train - 1}: use 'trailing'")
    ac = sched.alphas_cumprod.double()
    table = ((1 - ac) / ac).sqrt().numpy()
    sigmas = np.append(np.interp(ts.numpy(), np.arange(len(table)), table), 0.0)
    return Ladder(sigmas=torch.from_numpy(sigmas), timesteps=ts)


def step_noise(x: torch.Tensor, sigma: float, sigma_next: float, generator) -> torch.Tensor:
    """n = √(2σ̃|Δ|)·z, z ~ N(0, I) from ``generator`` (one per image allowed); zero at the last step (σ̃' = 0)."""
    if sigma_next == 0:
        return torch.zeros_like(x)
    z = initial_noise(tuple(x.shape), generator, x.device, x.dtype)
    return math.sqrt(2 * sigma * abs(sigma_next - sigma)) * z


def em_step(x: torch.Tensor, g: torch.Tensor, sigma: float, sigma_next: float,
            noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Euler–Maruyama on the VE reverse SDE: dx = 2Δ·ĝ + n. The last step (σ̃' = 0) is deterministic, dx = −σ̃·ĝ.

    Returns (x + dx, dx). ``g`` is the (mixed, guided) ε-prediction at x̃, scaled as the score −ĝ/σ̃.
    """
    delta = sigma_next - sigma
    dx = delta * g if sigma_next == 0 else (2 * delta) * g + noise
    return x + dx, dx


# ---------------------------------------------------------------------------------------------------------------------
# The estimator and the weights


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ per sample over all non-batch dims, in float64: [B, …] × [B, …] → [B]."""
    return (a.double() * b.double()).flatten(1).sum(1)


def ito_increment(dx: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Δℓ = −⟨dx, ε̂⟩/σ̃ − |Δ|·‖ε̂‖²/σ̃ (float64, [B]): one Itô step of log q̃ for the model that predicted ε̂.

    The quadratic term's sign is minus (the reference's OR branch has it wrong, §4.5): for q = N(0, σ̃²I) the true
    first-order change is this increment plus the zero-mean −|Δ|(‖z‖² − D)/σ̃.
    """
    delta = abs(sigma_next - sigma)
    return -_dot(dx, eps) / sigma - delta * _dot(eps, eps) / sigma


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """ĝ_i = ε̂_∅ + w(ε̂_i − ε̂_∅) for ε̂_cond [M, B, …] and ε̂_∅ [B, …] (shared) or [M, B, …]; ε̂_i without ε̂_∅."""
    if eps_uncond is None:
        return eps_cond
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def or_kappa(log_q: torch.Tensor, temperature: float, bias: torch.Tensor) -> torch.Tensor:
    """OR: κ = softmax_i(T·ℓ_i + b_i), ℓ [B, M] → κ [B, M]. The reference's SD code uses T·(ℓ + b): equal at T = 1."""
    return torch.softmax(temperature * log_q + bias.to(log_q), dim=1)


def and_kappa_two(eps_1: torch.Tensor, eps_2: torch.Tensor, g_1: torch.Tensor, g_2: torch.Tensor, sigma: float,
                  sigma_next: float, noise: torch.Tensor, ell_step: float | torch.Tensor = 0.0,
                  ) -> torch.Tensor:  # fmt: skip
    """AND for two models, closed form: the κ (weight of model 1, [B], float64) that makes Δℓ_1 − Δℓ_2 = ℓ_step.

    κ = [⟨dx_ind, D_ε⟩ + |Δ|·⟨D_ε, ε̂_1 + ε̂_2⟩ + σ̃·ℓ_step] / (2|Δ|·⟨ĝ_1 − ĝ_2, D_ε⟩),  dx_ind = 2Δ·ĝ_2 + n,
    D_ε = ε̂_1 − ε̂_2 (unguided), ĝ the stepped (guided) predictions. κ is affine in n and not clipped; where
    ‖D_ε‖² < 1e−12 (or the denominator vanishes) κ = ½.
    """
    delta = sigma_next - sigma
    d_eps = eps_1.double() - eps_2.double()
    dx_ind = 2 * delta * g_2.double() + noise.double()
    num = _dot(dx_ind, d_eps) + abs(delta) * _dot(d_eps, eps_1.double() + eps_2.double()) + sigma * ell_step
    den = 2 * abs(delta) * _dot(g_1.double() - g_2.double(), d_eps)
    ok = (_dot(d_eps, d_eps) >= DEGENERATE) & (den != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, 0.5))


def and_kappa_system(eps_cond: torch.Tensor, guided: torch.Tensor, sigma: float, sigma_next: float,
                     noise: torch.Tensor, gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """AND for M models: solve [A −1; 1ᵀ 0]·[κ; δ] = [ℓ_gap − b; 1] per sample.

    Δℓ_i = Σ_j A_ij·κ_j + b_i with A_ij = −2Δ·⟨ĝ_j, ε̂_i⟩/σ̃ and b_i = −⟨n, ε̂_i⟩/σ̃ − |Δ|·‖ε̂_i‖²/σ̃, so the solution
    gives Δℓ_i = δ + ℓ_gap,i with Σκ = 1. ``eps_cond``, ``guided`` [M, B, …]; ``gap`` [M] (ℓ_gap,i = target
    Δℓ_i − Δℓ_1). Returns κ [B, M] and the common increment δ [B], float64. Where every pair of models agrees
    (‖ε̂_i − ε̂_j‖² < 1e−12) κ = 1/M; a singular system falls back to the minimum-norm (pseudo-inverse) solution.
    """
    m, b = eps_cond.shape[:2]
    delta = sigma_next - sigma
    e = eps_cond.double().flatten(2)  # [M, B, D]
    g = guided.double().flatten(2)
    a = -2 * delta * torch.einsum("ibd,jbd->bij", e, g) / sigma  # [B, M, M]
    bb = -torch.einsum("bd,ibd->bi", noise.double().flatten(1), e) / sigma - abs(delta) * (e**2).sum(-1).T / sigma
    mat = torch.zeros(b, m + 1, m + 1, dtype=torch.float64, device=e.device)
    mat[:, :m, :m] = a
    mat[:, :m, m] = -1.0
    mat[:, m, :m] = 1.0
    rhs = torch.cat([gap.to(bb)[None] - bb, torch.ones(b, 1, dtype=torch.float64, device=e.device)], dim=1)
    sol, info = torch.linalg.solve_ex(mat, rhs)
    bad = (info != 0) | ~torch.isfinite(sol).all(1)
    if bad.any():
        sol[bad] = (torch.linalg.pinv(mat[bad]) @ rhs[bad, :, None])[..., 0]
    pair = ((e[:, None] - e[None]) ** 2).sum(-1)  # [M, M, B]
    agree = (pair < DEGENERATE).all(0).all(0)
    kappa = torch.where(agree[:, None], torch.full_like(sol[:, :m], 1.0 / m), sol[:, :m])
    return kappa, sol[:, m]


class Combiner:
    """The stateful part of SuperDiff: tracks ℓ_i (float64 [B, M]) and turns each step's predictions into κ [B, M].

    ``kappa`` is called with the step noise already drawn (AND needs it); ``update`` adds the Itô increments of the
    step taken. ``stochastic_steps`` (N − 1) spreads the AND bias so that ℓ_i − ℓ_j ends at b_i − b_j.
    """

    def __init__(self, config: SuperDiffConfig, batch: int, stochastic_steps: int, device=None):
        self.config = config
        self.log_q = torch.zeros(batch, config.num_models, dtype=torch.float64, device=device)
        self.bias = torch.tensor(config.bias, dtype=torch.float64, device=device)
        # AND: the per-step target ℓ_gap,i = Δℓ_i − Δℓ_1 (unused by the other modes, whose bias may hold −inf)
        self.gap = torch.zeros_like(self.bias)
        if config.mode == "and":
            self.gap = (self.bias - self.bias[0]) / stochastic_steps

    def kappa(self, eps_cond: torch.Tensor, guided: torch.Tensor, sigma: float, sigma_next: float,
              noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """κ [B, M] for this step from ε̂_i [M, B, …] (unguided), ĝ_i [M, B, …] (guided) and the step noise n."""
        cfg, (b, m) = self.config, self.log_q.shape
        if cfg.mode == "or":
            return or_kappa(self.log_q, cfg.temperature, self.bias)
        if cfg.mode == "avg":
            return torch.full((b, m), 1.0 / m, dtype=torch.float64, device=self.log_q.device)
        if cfg.mode == "single":
            kappa = torch.zeros(b, m, dtype=torch.float64, device=self.log_q.device)
            kappa[:, 0] = 1.0
            return kappa
        if m == 2:
            k1 = and_kappa_two(eps_cond[0], eps_cond[1], guided[0], guided[1], sigma, sigma_next, noise,
                               -self.gap[1])  # fmt: skip
            return torch.stack([k1, 1 - k1], dim=1)
        return and_kappa_system(eps_cond, guided, sigma, sigma_next, noise, self.gap)[0]

    def update(self, dx: torch.Tensor, eps_cond: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """ℓ_i += Δℓ_i for the step dx [B, …] taken; returns Δℓ [B, M] (float64)."""
        inc = torch.stack([ito_increment(dx, e, sigma, sigma_next) for e in eps_cond], dim=1)
        self.log_q = self.log_q + inc
        return inc


def mix(kappa: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """ĝ_mix = Σ_i κ_i·ĝ_i, κ [B, M], ĝ [M, B, …] → [B, …] in ĝ's dtype. Summed in model order, so κ = [1, 0, …]
    returns ĝ_1 bit-for-bit."""
    k = kappa.to(guided.dtype).T.reshape(kappa.shape[1], kappa.shape[0], *([1] * (guided.ndim - 2)))
    out = k[0] * guided[0]
    for i in range(1, guided.shape[0]):
        out = out + k[i] * guided[i]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Models


EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ε̂(x_in, t): x_in [B, …] at VP scale → [B, …]


@dataclass
class Predictions:
    """One step's network outputs: ``cond`` [M, B, …] unguided ε̂_i; ``uncond`` [B, …] (shared ∅), [M, B, …] or None."""

    cond: torch.Tensor
    uncond: torch.Tensor | None


class ModelSet(Protocol):
    """M ε-prediction models evaluated together at (x_in, t); ``evals_per_step`` counts network rows per sample."""

    num_models: int
    evals_per_step: int

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> Predictions: ...


@dataclass
class EpsModels:
    """Any callables ε̂_i(x_in, t) (e.g. the analytic mixtures of ``finetuners.toy``), and optionally ε̂_∅(x_in, t)."""

    models: Sequence[EpsModel]
    uncond: EpsModel | None = None

    def __post_init__(self):
        if len(self.models) < 2:
            raise UserError(f"superposition needs at least 2 models, got {len(self.models)}")

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def evals_per_step(self) -> int:
        return len(self.models) + (self.uncond is not None)

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> Predictions:
        outs = [model(x_in, t) for model in self.models]
        for i, out in enumerate(outs):
            if out.shape != x_in.shape:
                raise UserError(f"model {i} returned shape {tuple(out.shape)}, expected {tuple(x_in.shape)}")
        return Predictions(torch.stack(outs), None if self.uncond is None else self.uncond(x_in, t))


@dataclass
class PromptModels:
    """One denoiser under M prompts sharing one unconditional pass: a single call of (M+1)·B rows with CFG, M·B without.

    ``conds`` are M [B, L, E] text embeddings; ``uncond`` [B, L, E] or None (no guidance).
    """

    denoiser: Denoiser
    conds: Sequence[torch.Tensor]
    uncond: torch.Tensor | None = None

    @property
    def num_models(self) -> int:
        return len(self.conds)

    @property
    def evals_per_step(self) -> int:
        return len(self.conds) + (self.uncond is not None)

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> Predictions:
        conds = ([] if self.uncond is None else [self.uncond]) + list(self.conds)
        out = self.denoiser(torch.cat([x_in] * len(conds)), t, torch.cat(conds)).unflatten(0, (len(conds), -1))
        return Predictions(out[-self.num_models :], None if self.uncond is None else out[0])


@dataclass
class DenoiserModels:
    """M different denoisers (two checkpoints, base and LoRA), each with its own prompt embedding and its own ∅.

    With CFG every model makes 2·B rows (conditional and unconditional) in one call.
    """

    denoisers: Sequence[Denoiser]
    conds: Sequence[torch.Tensor]
    unconds: Sequence[torch.Tensor] | None = None

    @property
    def num_models(self) -> int:
        return len(self.denoisers)

    @property
    def evals_per_step(self) -> int:
        return len(self.denoisers) * (1 if self.unconds is None else 2)

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> Predictions:
        cond, uncond = [], []
        for i, (den, c) in enumerate(zip(self.denoisers, self.conds)):
            if self.unconds is None:
                cond.append(den(x_in, t, c))
            else:
                u, e = den(torch.cat([x_in, x_in]), t, torch.cat([self.unconds[i], c])).chunk(2)
                cond.append(e)
                uncond.append(u)
        return Predictions(torch.stack(cond), torch.stack(uncond) if uncond else None)


# ---------------------------------------------------------------------------------------------------------------------
# The sampler


@dataclass
class SuperDiffStep:
    """What a per-step callback sees: step k from σ̃_k to σ̃_{k+1}; x̃ before and after; κ [B, M]; ℓ after [B, M]."""

    k: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    x_next: torch.Tensor
    kappa: torch.Tensor
    log_q: torch.Tensor


@dataclass
class SuperDiffResult:
    """sample [B, …]: the final x (at σ̃ = 0 VE and VP coordinates coincide); kappa [N, B, M] the weights of each step
    (the last: the deterministic step); log_q [N+1, B, M] ℓ_i at σ̃_0 … σ̃_N (ℓ = 0 at the start; the last step adds
    nothing), float64; nfe: network evaluations (rows) per sample; images [B, 3, H, W] in [0, 1] from the SD helpers."""

    sample: torch.Tensor
    kappa: torch.Tensor
    log_q: torch.Tensor
    nfe: int
    ladder: Ladder
    images: torch.Tensor | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def _predict(models: ModelSet, x_in: torch.Tensor, t: torch.Tensor) -> Predictions:
    preds = models(x_in, t)
    want = (models.num_models, *x_in.shape)
    if tuple(preds.cond.shape) != want:
        raise UserError(f"the models returned predictions of shape {tuple(preds.cond.shape)}, expected {want}")
    if preds.uncond is not None and tuple(preds.uncond.shape) not in (want, want[1:]):
        raise UserError(f"the unconditional prediction has shape {tuple(preds.uncond.shape)}, expected {want[1:]}")
    return preds


def superpose(models: ModelSet, x_T: torch.Tensor, ladder: Ladder, config: SuperDiffConfig, *, generator=None,
              callback: Callable[[SuperDiffStep], None] | None = None) -> SuperDiffResult:  # fmt: skip
    """Sample from the superposition of ``models`` from x_T ~ N(0, I) [B, …] (the VP prior; x̃ = √(1+σ̃_0²)·x_T).

    Step maths runs in x_T's dtype (fp32 for SD latents, fp64 for the toy), ℓ and κ in float64. The step noise
    comes from ``generator`` (one per image allowed), drawn before the models are called. CFG with
    ``config.guidance`` applies whenever the model set returns ε̂_∅ (the pipeline helpers ask for it only when
    w > 1); ℓ always tracks the unguided ε̂_i. ``callback(step)`` runs after every step.
    """
    if models.num_models != config.num_models:
        raise UserError(f"the config is for {config.num_models} models but {models.num_models} were given")
    if ladder.steps != config.steps:
        raise UserError(f"the ladder has {ladder.steps} steps but the config asks for {config.steps}")
    sigmas = [float(s) for s in ladder.sigmas]
    batch = x_T.shape[0]
    combiner = Combiner(config, batch, ladder.steps - 1, device=x_T.device)
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    log_qs, kappas = [combiner.log_q], []
    for k in range(ladder.steps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        # 1. the step noise first: AND's κ depends on it
        noise = step_noise(x, sigma, sigma_next, generator)
        # 2. unguided ε̂_i and guided ĝ_i at the VP-scaled input x̃/√(1+σ̃²), time t(σ̃)
        t = ladder.timesteps[k].to(x.device, x.dtype)
        preds = _predict(models, x / math.sqrt(1 + sigma**2), t)
        guided = guide(preds.cond, preds.uncond, config.guidance)
        # 3. weights, then the Euler–Maruyama step with the mixed drift
        kappa = combiner.kappa(preds.cond, guided, sigma, sigma_next, noise)
        x_next, dx = em_step(x, mix(kappa, guided), sigma, sigma_next, noise)
        # 4. Itô increments of every model's density along the step taken (none at the deterministic last step)
        if sigma_next > 0:
            combiner.update(dx, preds.cond, sigma, sigma_next)
        log_qs.append(combiner.log_q)
        kappas.append(kappa)
        if callback is not None:
            callback(SuperDiffStep(k, sigma, sigma_next, x, x_next, kappa, combiner.log_q))
        x = x_next
    return SuperDiffResult(sample=x, kappa=torch.stack(kappas), log_q=torch.stack(log_qs),
                           nfe=ladder.steps * models.evals_per_step, ladder=ladder)  # fmt: skip


def ve_sde_sample(model: EpsModel, x_T: torch.Tensor, ladder: Ladder, *, generator=None) -> torch.Tensor:
    """The same Euler–Maruyama sampler for one ε-model: the single-model baseline (same noise as ``superpose``)."""
    sigmas = [float(s) for s in ladder.sigmas]
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    for k in range(ladder.steps):
        noise = step_noise(x, sigmas[k], sigmas[k + 1], generator)
        eps = model(x / math.sqrt(1 + sigmas[k] ** 2), ladder.timesteps[k].to(x.device, x.dtype))
        x, _ = em_step(x, eps, sigmas[k], sigmas[k + 1], noise)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Stable-Diffusion-family pipelines


def default_guidance(pipe) -> float:
    """The guidance SuperDiff uses on a model unless told: the one its folder records for SuperDiff, else the one it
    samples with. shapes-partial records 1 (no guidance): there AND composes two objects more often than averaged
    predictions, while at its sampling guidance 3 the two tie (docs/BENCHMARKS.md, Superpose)."""
    from .models import model_defaults

    d = model_defaults(pipe)
    return d.guidance if d.superdiff_guidance is None else d.superdiff_guidance


def _check_pipe(pipe, config: SuperDiffConfig) -> None:
    from .models import model_defaults

    if config.num_models != 2:
        raise UserError(f"the pipeline helpers superpose exactly 2 models, the config has {config.num_models}")
    if config.steps < MIN_SD_STEPS:
        raise UserError(f"SuperDiff needs at least {MIN_SD_STEPS} steps (got {config.steps}): the density estimator's "
                        "error grows with the step size; use 100 steps (1000 for the paper's setting)")  # fmt: skip
    # an LCM scheduler, or a turbo model (trailing timesteps); a checkpoint is of its base model's family
    if model_defaults(pipe, checkpoint=False).sampler != "ddim":
        raise UserError("few-step models (SD-Turbo, LCM) cannot be superposed: the Itô density estimator needs "
                        "many small stochastic steps")  # fmt: skip
    pred = pipe.scheduler.config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise UserError(f"SuperDiff supports ε-prediction models only, this one predicts {pred!r}")


def check_compatible(pipe_a, pipe_b) -> None:
    """Two pipelines can be superposed only on the same latent space and the same noise schedule."""
    ua, ub = pipe_a.unet.config, pipe_b.unet.config
    for name in ("in_channels", "out_channels", "sample_size"):
        if getattr(ua, name) != getattr(ub, name):
            raise UserError(f"the two models have different latent shapes: unet {name} "
                            f"{getattr(ua, name)} vs {getattr(ub, name)}")  # fmt: skip
    if pipe_a.vae.config.latent_channels != pipe_b.vae.config.latent_channels:
        raise UserError("the two models have different latent channels (VAE)")
    ac_a, ac_b = pipe_a.scheduler.alphas_cumprod, pipe_b.scheduler.alphas_cumprod
    if ac_a.shape != ac_b.shape or not torch.allclose(ac_a.double(), ac_b.double(), rtol=1e-6, atol=0):
        raise UserError("the two models have different noise schedules (ᾱ_t): they cannot share one sampler")
    pa = pipe_a.scheduler.config.get("prediction_type", "epsilon")
    pb = pipe_b.scheduler.config.get("prediction_type", "epsilon")
    if pa != pb:
        raise UserError(f"the two models predict different things: {pa!r} vs {pb!r}")


def _counted(pipe) -> CountingDenoiser:
    return CountingDenoiser(unet_denoiser(pipe.unet))


@torch.no_grad()
def _run_pipeline(pipe, models: ModelSet, counters: list[CountingDenoiser], config: SuperDiffConfig, seed: int,
                  batch: int, spacing: str, callback) -> SuperDiffResult:  # fmt: skip
    from .generate import decode

    start = time.perf_counter()
    ladder = euler_ladder(pipe.scheduler, config.steps, spacing)
    unet = pipe.unet
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(batch)]
    x_T = initial_noise(shape, generators, pipe.device, dtype=torch.float32)
    result = superpose(models, x_T, ladder, config, generator=generators, callback=callback)
    images = decode(pipe, result.sample)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    info = {"mode": config.mode, "unet_calls": sum(c.calls for c in counters),
            "unet_rows": sum(c.rows for c in counters), "spacing": spacing}  # fmt: skip
    log.info("superdiff %s: %d steps, %d UNet rows", config.mode, config.steps, info["unet_rows"])
    return replace(result, images=images, seconds=time.perf_counter() - start, info=info)


def _check_batch(seed: int, batch: int) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UserError(f"batch must be a whole number ≥ 1, got {batch!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed must be a whole number ≥ 0, got {seed!r}")


def superpose_prompts(pipe, prompt_a: str, prompt_b: str, config: SuperDiffConfig, seed: int = 0, batch: int = 1, *,
                      negative_prompt: str = "", spacing: str = "trailing",
                      callback: Callable[[SuperDiffStep], None] | None = None) -> SuperDiffResult:  # fmt: skip
    """Superpose two prompts on one Stable-Diffusion pipeline (model 0 = ``prompt_a``).

    One UNet call per step with rows [∅, A, B] (3·B rows with CFG, 2·B without). Image i uses generator seed + i
    for x_T and all step noise, so a batch replays image by image. Returns images [B, 3, H, W] in [0, 1].
    """
    from .generate import check_prompt_fits, encode

    _check_pipe(pipe, config)
    _check_batch(seed, batch)
    for p in (prompt_a, prompt_b):
        if not isinstance(p, str) or not p.strip():
            raise UserError("both prompts must be non-empty text")
        check_prompt_fits(pipe, p)
    guided = config.guidance > 1.0
    cond_a, uncond = encode(pipe, [prompt_a] * batch, [negative_prompt] * batch if guided else None, guided)
    cond_b, _ = encode(pipe, [prompt_b] * batch, None, False)
    counter = _counted(pipe)
    models = PromptModels(counter, [cond_a, cond_b], uncond if guided else None)
    return _run_pipeline(pipe, models, [counter], config, seed, batch, spacing, callback)


def superpose_models(pipe_a, pipe_b, prompt: str, config: SuperDiffConfig, seed: int = 0, batch: int = 1, *,
                     prompt_b: str | None = None, negative_prompt: str = "", spacing: str = "trailing",
                     callback: Callable[[SuperDiffStep], None] | None = None) -> SuperDiffResult:  # fmt: skip
    """Superpose two pipelines (two checkpoints, or base and LoRA) under ``prompt`` (``prompt_b`` for B if given).

    Each model encodes with its own text encoder and has its own ∅: 4·B UNet rows per step with CFG. Decodes with
    ``pipe_a``'s VAE. The pipelines must share latent shape and noise schedule (``UserError`` otherwise).
    """
    from .generate import check_prompt_fits, encode

    check_compatible(pipe_a, pipe_b)
    if pipe_a.device != pipe_b.device:
        raise UserError(f"the two models must be on the same device, got {pipe_a.device} and {pipe_b.device}")
    _check_pipe(pipe_a, config)
    _check_pipe(pipe_b, config)
    _check_batch(seed, batch)
    prompts = (prompt, prompt if prompt_b is None else prompt_b)
    guided = config.guidance > 1.0
    conds, unconds, counters = [], [], []
    for pipe, p in zip((pipe_a, pipe_b), prompts):
        if not isinstance(p, str) or not p.strip():
            raise UserError("the prompt must be non-empty text")
        check_prompt_fits(pipe, p)
        c, u = encode(pipe, [p] * batch, [negative_prompt] * batch if guided else None, guided)
        conds.append(c.to(pipe_a.device))
        unconds.append(u.to(pipe_a.device) if guided else None)
        counters.append(_counted(pipe))
    models = DenoiserModels(counters, conds, unconds if guided else None)
    return _run_pipeline(pipe_a, models, counters, config, seed, batch, spacing, callback)
