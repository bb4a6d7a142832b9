"""RLR, the recursive likelihood-ratio optimizer (ALGORITHMS.md §2), and the backprop baselines on the same chain.

The reward gradient of a K-step sampler is a sum of per-step terms, ∇J = Σ_i g_i, and RLR estimates each with the
cheapest unbiased estimator:

    FO  (step K−1)      pathwise through the last step into the differentiable reward: 1 UNet call with gradients
    HO  (block B)       pathwise inside a random h-step sub-chain from the stored sg(x^(j)), closed by the likelihood
                        ratio of the stored x^(j+h): Â·∇_θ log N(sg x^(j+h); M(θ), s²I)   h UNet calls with gradients
    ZO  (C = rest)      steps sampled with θ + ν_i, ν_i ~ N(0, s_ν² I):  Â·Σ_{i∈C} ν_i / s_ν²  no extra UNet calls

Every step is covered exactly once, so ĝ = g_FO + g_B + g_ZO is unbiased (ZO: for the Gaussian-smoothed objective,
O(s_ν²) from J) whatever block is drawn. ``h = 1`` makes HO the REINFORCE term of step j; ``h = 0`` is FO + ZO, the
pure zeroth-order estimator at the least memory.

Choices the paper leaves open (ours, recorded in every run's config):
- **Advantages.** HO uses leave-one-out baselines over the (global) batch: sample b's baseline is the mean reward of
  the others, which do not depend on its noise, so the term stays unbiased. ZO perturbations are shared by a *group*
  of rows (one UNet call per group and step); its baseline is the mean reward of the other groups (leave-one-group-
  out), or with one group, ``zo_baseline`` given by the caller (an average of earlier batches), never a statistic of
  the same perturbation, which would cancel the signal.
- **Log-density.** HO uses the true (summed) log-density, so its gradient is exactly Â·(D_θM)ᵀz/s.
- **Coefficients.** c_FO = c_HO = c_ZO = 1 (the unbiased combination); other values reweight the steps, as the
  released code does (c_FO = 0.05), and the estimate is then biased. Losses are minimised: ``.grad`` receives −ĝ.
- **SPSA** (``zo_mode="spsa"``): one ν ~ N(0, I) per group over all steps of C, two extra chains at θ ± εν with the
  main chain's noise; (r₊ − r₋)/(2ε)·ν is the directional derivative times ν, unbiased as ε → 0.
- **ho_rescale**: B is one of the ⌊(K−1)/h⌋ non-overlapping tiles, its term scaled by the tile count; steps outside
  every tile stay zeroth-order, so the estimate stays unbiased without ZO on the tiled steps.

Chains. ``DiffusionChain`` is the DDIM sampler of the shared core (η on the stochastic steps, ``last_eta`` on the
last) over a denoiser; ``finetuners.toy.LinearGaussianChain`` has a closed-form objective for the tests. Any object
with ``num_steps``, ``params`` and ``mean_std(x, i, rows, nu=None, groups=None) -> (mean, std)`` is a chain.

Baselines on the same chain: ``truncated_backward`` (DRaFT-K: pathwise through the last K' steps; K' = K is full
backprop, with gradient checkpointing of every step on request) and ``reinforce_backward`` (FO plus the likelihood
ratio of every stochastic step, DDPO's on-policy gradient).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UserError

ZO_MODES = ("lr", "spsa", "off")
GRADIENT_METHODS = ("rlr", "draft", "bptt", "reinforce")
RewardOfLatent = Callable[[torch.Tensor], torch.Tensor]  # x^(K) → rewards [B], differentiable


@dataclass(frozen=True)
class RLRConfig:
    """The estimator's budgets and weights (ALGORITHMS.md §2.3 "ours"), plus the baselines' truncation."""

    h: int = 2  # HO sub-chain length; 0 = no HO (FO + ZO)
    c_fo: float = 1.0
    c_ho: float = 1.0
    c_zo: float = 1.0
    zo_mode: str = "lr"  # "lr" (likelihood ratio on ν), "spsa" (two extra chains) or "off" (biased: drops C)
    s_nu: float = 1e-3  # std of the ZO parameter perturbations
    spsa_eps: float = 1e-3
    zo_groups: int = 0  # independent perturbations per step across a batch; 0 = one per row
    zo_budget: int = -1  # ZO steps per estimate: −1 every step of C; n: n random steps of C, scaled by |C|/n
    ho_rescale: bool = False
    eta: float = 1.0  # DDIM η on steps 0 … K−2
    last_eta: float = 0.0  # η of the last step (0: deterministic, as the paper)
    truncation: int = 1  # DRaFT-K's K' (method "draft")
    checkpointing: bool = False  # gradient checkpointing of every UNet call kept for backward (baselines)

    def __post_init__(self):
        def number(name, lo, hi, integer=False):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if not ok or isinstance(v, bool) or not (lo <= v <= hi) or (not integer and not math.isfinite(v)):
                kind = "a whole number" if integer else "a number"
                raise UserError(f"RLR {name} must be {kind} from {lo} to {hi}, got {v!r}")

        number("h", 0, 1000, integer=True)
        number("zo_groups", 0, 10**6, integer=True)
        number("zo_budget", -1, 10**6, integer=True)
        number("truncation", 1, 1000, integer=True)
        for name in ("c_fo", "c_ho", "c_zo"):
            number(name, 0.0, 1e6)
        number("s_nu", 1e-8, 10.0)
        number("spsa_eps", 1e-8, 10.0)
        number("eta", 0.0, 1.0)
        number("last_eta", 0.0, 1.0)
        if self.zo_mode not in ZO_MODES:
            raise UserError(f"RLR zo_mode must be one of {', '.join(ZO_MODES)}, got {self.zo_mode!r}")
        if not isinstance(self.ho_rescale, bool) or not isinstance(self.checkpointing, bool):
            raise UserError("RLR ho_rescale and checkpointing must be true or false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> RLRConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown RLR settings: {', '.join(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def perturbed(params: list[torch.Tensor], deltas: list[torch.Tensor]):
    """Parameters temporarily θ + δ (in place, no graph); restored bit-for-bit on exit."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


class DiffusionChain:
    """The DDIM sampler as a chain: step i's mean and std (§0.2) from ``denoiser(x, t_i, cond[rows])``."""

    def __init__(self, denoiser, cond: torch.Tensor, ts: list[int], alphas_cumprod: torch.Tensor,
                 params: list[torch.Tensor], *, eta: float = 1.0, last_eta: float = 0.0,
                 prediction_type: str = "epsilon", final_alpha_cumprod=1.0) -> None:  # fmt: skip
        from .steps import next_timesteps

        self.denoiser, self.cond, self.ts, self.t_next = denoiser, cond, list(ts), next_timesteps(list(ts))
        self.alphas, self.params = alphas_cumprod, params
        self.eta, self.last_eta = eta, last_eta
        self.prediction_type, self.final_alpha = prediction_type, final_alpha_cumprod

    @property
    def num_steps(self) -> int:
        return len(self.ts)

    def _mean_std(self, x: torch.Tensor, i: int, rows) -> tuple[torch.Tensor, torch.Tensor]:
        from .steps import ddim_step

        eta = self.last_eta if i == self.num_steps - 1 else self.eta
        cond = self.cond if rows is None else self.cond[rows]
        out = self.denoiser(x, self.ts[i], cond).to(x.dtype)
        step = ddim_step(out, self.ts[i], self.t_next[i], x, self.alphas, eta=eta, prediction_type=self.prediction_type,
                         final_alpha_cumprod=self.final_alpha, prev_sample=x.detach(), reduction="sum")  # fmt: skip
        return step.mean, step.std

    def mean_std(self, x, i, rows, nu=None, groups=None):
        if nu is None:
            return self._mean_std(x, i, rows)
        rows = torch.arange(x.shape[0]) if rows is None else torch.as_tensor(rows)
        means = torch.empty_like(x)
        stds = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), dtype=x.dtype, device=x.device)
        for g in torch.unique(groups).tolist():
            sel = (groups == g).nonzero().flatten()
            with perturbed(self.params, [n[g] for n in nu]):
                means[sel], stds[sel] = self._mean_std(x[sel], i, rows[sel])
        return means, stds


# ---------------------------------------------------------------------------------------------------
# Sampling the chain
# ---------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One sampled batch: latents x^(0..K) (detached), the noises z_i (None on deterministic steps), the HO block and
    the ZO set and seeds."""

    latents: list[torch.Tensor]
    noises: list[torch.Tensor | None]
    block: tuple[int, ...]  # HO steps j … j+h−1 (empty: none)
    ho_scale: float
    zo_steps: tuple[int, ...]
    zo_scale: float  # |C| / budget when only some steps of C are perturbed
    zo_seed: int
    groups: torch.Tensor  # [B] row → ZO group
    num_groups: int


def plan_steps(num_steps: int, cfg: RLRConfig, generator: torch.Generator) -> tuple[tuple, float, tuple, float]:
    """The HO block (j uniform, or a tile with ``ho_rescale``) and its scale; the ZO steps C = {0…K−2} \\ B (or
    ``zo_budget`` of them drawn uniformly) and their scale."""
    stochastic = num_steps - 1
    h = min(cfg.h, stochastic)
    block, scale = (), 1.0
    if h > 0:
        if cfg.ho_rescale:
            tiles = stochastic // h
            j = h * int(torch.randint(tiles, (1,), generator=generator))
            block, scale = tuple(range(j, j + h)), float(tiles)
            covered = set(range(tiles * h))
        else:
            j = int(torch.randint(stochastic - h + 1, (1,), generator=generator))
            block = tuple(range(j, j + h))
            covered = set(block)
    else:
        covered = set()
    zo = tuple(i for i in range(stochastic) if i not in covered) if cfg.zo_mode != "off" else ()
    zo_scale = 1.0
    if 0 <= cfg.zo_budget < len(zo):
        pick = torch.randperm(len(zo), generator=generator)[: cfg.zo_budget].sort().values.tolist()
        zo, zo_scale = tuple(zo[k] for k in pick), (len(zo) / cfg.zo_budget if cfg.zo_budget else 1.0)
    return block, scale, zo, zo_scale


def zo_noise(params: list[torch.Tensor], seed: int, steps: tuple[int, ...], num_groups: int, std: float):
    """ν for every (step in ``steps``, group): {step: [[G, *p.shape] per parameter]}, replayable from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return {i: [torch.randn((num_groups, *p.shape), generator=gen, dtype=torch.float32).mul_(std).to(p.device)
                for p in params] for i in steps}  # fmt: skip


def row_groups(batch: int, zo_groups: int) -> tuple[torch.Tensor, int]:
    g = batch if zo_groups <= 0 else min(zo_groups, batch)
    return torch.arange(batch) * g // batch, g


@torch.no_grad()
def sample_chain(chain, x_T: torch.Tensor, cfg: RLRConfig, *, generator: torch.Generator, zo_seed: int,
                 noise_generator=None) -> Rollout:  # fmt: skip
    """Sample the chain from x_T: unperturbed θ on the HO block and the last step, θ + ν_i on the ZO steps (LR mode).

    ``generator`` draws the block; ``noise_generator`` (a generator or one per row) the transition noise.
    """
    from diffusers.utils.torch_utils import randn_tensor

    K, B = chain.num_steps, x_T.shape[0]
    block, scale, zo_steps, zo_scale = plan_steps(K, cfg, generator)
    groups, G = row_groups(B, cfg.zo_groups)
    nus = zo_noise(chain.params, zo_seed, zo_steps, G, cfg.s_nu) if cfg.zo_mode == "lr" else {}
    latents, noises, x = [x_T.detach()], [], x_T.detach()
    for i in range(K):
        mean, std = chain.mean_std(x, i, None, nus.get(i), groups if i in nus else None)
        z = randn_tensor(x.shape, generator=noise_generator, device=x.device, dtype=x.dtype)
        stochastic = bool((std > 0).all())
        x = mean + std * z if stochastic else mean
        latents.append(x)
        noises.append(z if stochastic else None)
    return Rollout(latents, noises, block, scale, zo_steps, zo_scale, zo_seed, groups, G)


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------
def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """r_b − mean_{b'≠b} r_{b'} (r itself for a batch of one)."""
    n = rewards.shape[0]
    if n < 2:
        return rewards.clone()
    return rewards - (rewards.sum() - rewards) / (n - 1)


def leave_group_out(rewards: torch.Tensor, groups: torch.Tensor, baseline: float | None = None) -> torch.Tensor:
    """r_b minus the mean reward of the rows outside b's group; with one group, minus ``baseline`` (or 0)."""
    groups = groups.to(rewards.device)
    ids = torch.unique(groups)
    if len(ids) < 2:
        return rewards - (0.0 if baseline is None else baseline)
    onehot = (groups[:, None] == ids[None, :]).to(rewards.dtype)  # [B, G]
    sums, counts = onehot.T @ rewards, onehot.sum(0)
    own = (onehot @ sums, onehot @ counts)
    return rewards - (rewards.sum() - own[0]) / (rewards.shape[0] - own[1])


# ---------------------------------------------------------------------------------------------------
# The estimator's terms (each adds −c·ĝ_term to .grad through backward, scaled by ``scale``)
# ---------------------------------------------------------------------------------------------------
def first_order(chain, rollout: Rollout, reward: RewardOfLatent) -> tuple[torch.Tensor, torch.Tensor]:
    """x^(K) = m_{K−1}(sg x^(K−1); θ) (+ s·z, noise fixed) with its graph, and r(x^(K)) [B] with the graph."""
    K = chain.num_steps
    mean, std = chain.mean_std(rollout.latents[K - 1], K - 1, None)
    x_K = mean + std * rollout.noises[K - 1] if rollout.noises[K - 1] is not None else mean
    return x_K, reward(x_K)


def half_order_log_prob(chain, rollout: Rollout) -> torch.Tensor:
    """log N(sg x^(j+h); M(θ), s²I) [B] with x^(j+1 … j+h−1) recomputed pathwise from sg x^(j) and the stored noises."""
    from .steps import gaussian_log_prob

    j, last = rollout.block[0], rollout.block[-1]
    x = rollout.latents[j]
    for i in range(j, last):
        mean, std = chain.mean_std(x, i, None)
        x = mean + std * rollout.noises[i]
    mean, std = chain.mean_std(x, last, None)
    return gaussian_log_prob(rollout.latents[last + 1], mean, std, "sum")


def zo_gradients(params, rollout: Rollout, advantages: torch.Tensor, s_nu: float) -> list[torch.Tensor]:
    """ĝ_ZO = mean_b Â_b·Σ_{i∈C} ν_{g(b),i} / s_ν² for every parameter (ν replayed from the rollout's seed)."""
    nus = zo_noise(params, rollout.zo_seed, rollout.zo_steps, rollout.num_groups, s_nu)
    weight = torch.zeros(rollout.num_groups, dtype=torch.float32)
    weight.index_add_(0, rollout.groups, advantages.detach().float().cpu())
    weight *= rollout.zo_scale / (advantages.shape[0] * s_nu**2)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in rollout.zo_steps:
        for g, nu in zip(grads, nus[i]):
            g += torch.tensordot(weight.to(nu.device), nu, dims=1)
    return grads


def spsa_gradients(chain, rollout: Rollout, x_T: torch.Tensor, reward: RewardOfLatent,
                   eps: float) -> list[torch.Tensor]:  # fmt: skip
    """SPSA on C: ν ~ N(0, I) per group, two chains at θ ± εν on the steps of C with the rollout's noise.

    ĝ = mean_b (r₊ − r₋)_b/(2ε)·ν_{g(b)} per parameter; the difference needs no baseline.
    """
    if not rollout.zo_steps:
        return [torch.zeros_like(p, dtype=torch.float32) for p in chain.params]
    gen = torch.Generator().manual_seed(int(rollout.zo_seed))
    nu = [torch.randn((rollout.num_groups, *p.shape), generator=gen).to(p.device) for p in chain.params]
    rewards = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            deltas = [sign * eps * n for n in nu]
            x = x_T
            for i in range(chain.num_steps):
                pert = i in rollout.zo_steps
                mean, std = chain.mean_std(x, i, None, deltas if pert else None, rollout.groups if pert else None)
                x = mean + std * rollout.noises[i] if rollout.noises[i] is not None else mean
            rewards.append(reward(x).float().cpu())
    diff = (rewards[0] - rewards[1]) / (2 * eps)
    weight = torch.zeros(rollout.num_groups)
    weight.index_add_(0, rollout.groups, diff)
    weight *= rollout.zo_scale / diff.shape[0]
    return [torch.tensordot(weight.to(n.device), n, dims=1) for n in nu]


def global_advantages(advantage_fn, rewards: torch.Tensor, dist) -> torch.Tensor:
    """Advantages from every process's rewards, indexed back to this process's rows (§2.5: HO on several GPUs)."""
    if dist is None:
        return advantage_fn(rewards)
    return advantage_fn(dist.gather(rewards))[dist.rows(rewards.shape[0])]


def rlr_backward(chain, x_T: torch.Tensor, reward: RewardOfLatent, cfg: RLRConfig, *, generator: torch.Generator,
                 zo_seed: int, noise_generator=None, scale: float = 1.0, zo_baseline: float | None = None,
                 dist=None) -> dict:  # fmt: skip
    """One RLR estimate for a batch, accumulated into ``.grad`` as the gradient of the loss −J (times ``scale``).

    FO is backpropagated first and freed, then HO, so at most max(1, h) UNet graphs are alive. Returns metrics:
    the rewards, the block, the ZO steps, the UNet calls made with gradients.
    """
    params = chain.params
    rollout = sample_chain(chain, x_T, cfg, generator=generator, zo_seed=zo_seed, noise_generator=noise_generator)
    if rollout.block and any(rollout.noises[i] is None for i in rollout.block):
        raise UserError("RLR's half-order term needs stochastic steps: set eta > 0 (or h = 0)")
    grad_calls = 0
    _, r = first_order(chain, rollout, reward)
    grad_calls += 1
    (-cfg.c_fo * scale * r.mean()).backward()
    r = r.detach()
    info = {"reward_mean": float(r.mean()), "block": rollout.block, "zo_steps": rollout.zo_steps}
    if rollout.block:
        adv = global_advantages(leave_one_out, r, dist)
        lp = half_order_log_prob(chain, rollout)
        grad_calls += len(rollout.block)
        (-cfg.c_ho * rollout.ho_scale * scale * (adv.to(lp.device) * lp).mean()).backward()
        info["ho_log_prob"] = float(lp.detach().mean())
    if rollout.zo_steps and cfg.c_zo > 0:
        if cfg.zo_mode == "lr":
            baseline = lambda rr: leave_group_out(rr, _global_groups(rollout, dist, rr), zo_baseline)  # noqa: E731
            adv_zo = global_advantages(baseline, r, dist)
            grads = zo_gradients(params, rollout, adv_zo, cfg.s_nu)
        else:
            grads = spsa_gradients(chain, rollout, x_T, reward, cfg.spsa_eps)
        for p, g in zip(params, grads):
            g = (-cfg.c_zo * scale) * g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
    info["grad_unet_calls"] = grad_calls
    return info


def _global_groups(rollout: Rollout, dist, rewards_all: torch.Tensor) -> torch.Tensor:
    """ZO groups over the gathered batch: each process's groups are its own (offset by rank)."""
    if dist is None or rewards_all.shape[0] == rollout.groups.shape[0]:
        return rollout.groups
    n = rollout.groups.shape[0]
    world = rewards_all.shape[0] // n
    return torch.cat([rollout.groups + k * rollout.num_groups for k in range(world)])


# ---------------------------------------------------------------------------------------------------
# Baselines on the same chain
# ---------------------------------------------------------------------------------------------------
def truncated_backward(chain, x_T: torch.Tensor, reward: RewardOfLatent, keep: int, *, noise_generator=None,
                       scale: float = 1.0, c: float = 1.0, checkpointing: bool = False) -> dict:  # fmt: skip
    """DRaFT-K (arXiv 2309.17400): sample without gradients down to step K−keep, then pathwise through the last
    ``keep`` steps into the reward; ``keep`` = K is full backprop (BPTT). Accumulates −c·∇r into ``.grad``."""
    from diffusers.utils.torch_utils import randn_tensor
    from torch.utils.checkpoint import checkpoint

    K = chain.num_steps
    keep = min(max(int(keep), 1), K)
    x = x_T.detach()
    for i in range(K):
        z = randn_tensor(x.shape, generator=noise_generator, device=x.device, dtype=x.dtype)
        with torch.set_grad_enabled(i >= K - keep):
            if checkpointing and torch.is_grad_enabled():
                mean, std = checkpoint(chain.mean_std, x, i, None, use_reentrant=False)
            else:
                mean, std = chain.mean_std(x, i, None)
            x = mean + std * z if bool((std > 0).all()) else mean
    r = reward(x)
    (-c * scale * r.mean()).backward()
    return {"reward_mean": float(r.detach().mean()), "grad_unet_calls": keep}


def reinforce_backward(chain, x_T: torch.Tensor, reward: RewardOfLatent, *, noise_generator=None, scale: float = 1.0,
                       c: float = 1.0, dist=None) -> dict:  # fmt: skip
    """FO through the last step plus the likelihood ratio of every stochastic step (leave-one-out advantages): the
    score-function gradient of all K−1 noisy steps, K UNet calls with gradients."""
    from .steps import gaussian_log_prob

    cfg = RLRConfig(h=0, zo_mode="off")  # no HO block, no ZO step: the rollout alone
    rollout = sample_chain(chain, x_T, cfg, generator=torch.Generator(), zo_seed=0, noise_generator=noise_generator)
    _, r = first_order(chain, rollout, reward)
    (-c * scale * r.mean()).backward()
    r = r.detach()
    adv = global_advantages(leave_one_out, r, dist)
    calls = 1
    for i in range(chain.num_steps - 1):
        if rollout.noises[i] is None:
            continue
        mean, std = chain.mean_std(rollout.latents[i], i, None)
        lp = gaussian_log_prob(rollout.latents[i + 1], mean, std, "sum")
        (-c * scale * (adv.to(lp.device) * lp).mean()).backward()
        calls += 1
    return {"reward_mean": float(r.mean()), "grad_unet_calls": calls}


__all__ = [
    "GRADIENT_METHODS", "ZO_MODES", "DiffusionChain", "RLRConfig", "Rollout", "first_order", "half_order_log_prob",
    "leave_group_out", "leave_one_out", "perturbed", "plan_steps", "reinforce_backward", "rlr_backward", "row_groups",
    "sample_chain", "spsa_gradients", "truncated_backward", "zo_gradients", "zo_noise",
]  # fmt: skip
