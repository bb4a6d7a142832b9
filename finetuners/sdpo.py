"""SDPO: dense reward difference learning for few-step diffusion models (arXiv 2411.11727; ALGORITHMS.md §1).

The pure core of the method; the training driver composes it:

1. ``sample_pairs``: two trajectories per prompt from one x_T (η = 1, CFG off), both states recorded.
2. ``dense_rewards``: a reward for every step's x̂0 from 3 reward queries per trajectory, interpolated
   by latent cosine similarity to the first, anchor and last x̂0 (§1.2(b)).
3. ``discounted_returns`` and ``sdpo_advantages``: G_i = R̂_i + γ·G_{i+1}, normalised per (prompt, step)
   with a ``PerPromptStatTracker`` keyed by (prompt, step) and clipped at ±5 (§1.2(c)).
4. ``PairSteps`` / ``shuffle_steps`` / ``iter_minibatches``: pairs shuffled, one step permutation per
   pair shared by a and b, columns trained in order (§1.2(e)).
5. ``sdpo_loss``: max of the unclipped and clipped squared regressions of weighted log-ratio differences
   onto advantage differences (§1.2(d)); ``sdpo_minibatch_loss`` evaluates it for one minibatch.

Reference implementation: ZiyiZhang27/sdpo (``scripts/train_sdpo.py``, ``pipeline_with_logprob_sdpo.py``).
Deviations, all documented where they occur: the dense-reward denominator is guarded (max(·, 1e−6));
the anchor is searched among interior steps only; K ≤ 2 reuses an end's reward instead of re-querying.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .denoisers import Denoiser
from .errors import UserError
from .rl import PerPromptStatTracker, clip_advantages, transition_log_probs
from .sampling import Trajectory, sample_loop
from .steps import PredictionType, Reduction, timesteps

SPACINGS = ("leading", "trailing", "pipeline")
EVAL_SAMPLERS = ("ddim", "ddim-trailing", "lcm")
TRAIN_SAMPLERS = ("ddim", "lcm")  # the training policy's step (ALGORITHMS.md §0.2, few-step models)
ADAPTERS = ("lora", "full")
PRECISIONS = ("fp32", "fp16", "bf16")
TF32 = ("on", "off")
COSINE_CLAMPS = ("none", "nonnegative")
REDUCTIONS = ("mean", "sum")
DENOMINATOR_FLOOR = 1e-6  # §1.5: the reference divides by s_f + s_a + s_l unguarded


# ---------------------------------------------------------------------------------------------------
# Configuration (§1.3)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SDPOConfig:
    """Every SDPO setting. Defaults are the "paper" preset (aesthetic reward, §1.3, P); see ``PRESETS``."""

    # -- model ------------------------------------------------------------------------------------
    model: str = "stabilityai/sd-turbo"  # pipeline folder, hub id in the local cache, or "shapes"
    adapter: str = "lora"  # "lora": LoRA on every UNet attention projection; "full": all UNet weights
    lora_rank: int = 4  # LoRA rank r (the reference: 4)
    precision: str = "fp16"  # dtype of the frozen UNet forward; step maths and log-probs always run in fp32 (§0.5)
    tf32: str = "on"  # TF32 matmuls on Ampere+ GPUs, as the reference ("off" for bit-stable comparisons)

    # -- sampling (training trajectories) ---------------------------------------------------------
    num_steps: int = 50  # K_train. The paper trains a 1–4-step model on 50-step trajectories (§1.5)
    timestep_spacing: str = "leading"  # the reference's old DDIMScheduler: leading + offset 1, t_0 = 981;
    # "pipeline" takes the loaded scheduler's own spacing
    eta: float = 1.0  # DDIM η of the training sampler: 1 makes every step a Gaussian policy with σ > 0
    train_sampler: str = "ddim"  # "lcm": LCM steps as the policy (LCM / LCM-LoRA; RLCM's log π, §0.2) on the LCM
    # scheduler's timesteps; its last step returns f_θ deterministically, so K − 1 steps train
    guidance_scale: float = 1.0  # CFG off (≤ 1: one conditional pass); the pair estimator assumes it (§1.2(a))
    prompts: str = "simple_animals"  # prompt set: 45 simple animal names in the paper
    sample_batch_size: int = 8  # pairs per sampling batch, per process; each row gives one pair (a, b)
    pairs_per_prompt: int = 1  # consecutive rows of a sampling batch that share a prompt (each its own x_T;
    # the last prompt gets fewer if it does not divide). With min_count ≤ 2·pairs_per_prompt every (prompt,
    # step) key is normalised by its own statistics from the first epoch
    num_batches_per_epoch: int = 4  # sampling batches per epoch, per process → 32 pairs per process
    seed: int = 42  # seeds prompts, x_T and step noise (per-pair generators; see ``pair_generators``)

    # -- reward -----------------------------------------------------------------------------------
    reward: str = "aesthetic"  # reward registry name (ALGORITHMS.md §6), applied to decoded x̂0
    reward_variant: str = "standard"  # e.g. "raw" ImageReward as the paper used it; recorded with every run.
    # "probability" trains on exp(reward) of a log-prob reward (shapes-probe); evaluation reports the reward itself
    cosine_clamp: str = "none"  # "nonnegative" clamps the latent cosines at 0 (an ours deviation, §1.5)

    # -- returns and advantages (§1.2(c)) ----------------------------------------------------------
    gamma: float = 0.99  # discount of the dense rewards along sampling order
    buffer_size: int = 32  # FIFO of returns per (prompt, step); pools a, b and all processes, across epochs
    min_count: int = 16  # below this many entries a (prompt, step) key uses the batch statistics of its step
    adv_clip: float = 5.0  # advantages clipped to ±adv_clip

    # -- loss (§1.2(d)) ----------------------------------------------------------------------------
    lam: float = 0.99  # step weight w_i = λ^i/η_s: 1 at the first (noisiest) step, 0.99^49 ≈ 0.61 at K = 50
    eta_s: float = 1.0  # log-ratio scale η_s (the reference's ``log_scale``)
    clip_range: float = 1e-4  # ε on mean-reduced log-probs (±ε around log π_old); needs fp32 re-evaluation
    log_prob_reduction: str = "mean"  # "mean" (÷D, the convention ε assumes) or "sum" (the true log-density)

    # -- optimisation (§1.2(e)) --------------------------------------------------------------------
    train_batch_size: int = 2  # pairs per minibatch, per process
    grad_accum: int = 8  # minibatches per optimiser step, inside one step column
    learning_rate: float = 1e-4  # AdamW
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # gradient-norm clip before every optimiser step
    num_epochs: int = 100  # one epoch: sample, compute advantages, train on every step column
    inner_epochs: int = 1  # passes over one epoch's samples

    # -- evaluation (§1.2(f)): the model's native deterministic sampler on fixed prompts and seeds --
    eval_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 50)
    eval_sampler: str = "ddim-trailing"  # a ``generate`` sampler name (SD-Turbo: trailing)
    eval_eta: float = 0.0  # deterministic evaluation
    eval_guidance: float = 0.0  # SD-Turbo's "guidance 0" is the conditional prediction (no CFG)
    eval_seed: int = 0

    def __post_init__(self):
        _choice(self, "adapter", ADAPTERS)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "tf32", TF32)
        _choice(self, "timestep_spacing", SPACINGS)
        _choice(self, "cosine_clamp", COSINE_CLAMPS)
        _choice(self, "log_prob_reduction", REDUCTIONS)
        _choice(self, "eval_sampler", EVAL_SAMPLERS)
        _choice(self, "train_sampler", TRAIN_SAMPLERS)
        for name in ("model", "prompts", "reward", "reward_variant"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise UserError(f"{name} must be a non-empty name, got {getattr(self, name)!r}")
        for name, lo, hi in [
            ("lora_rank", 1, 1024), ("num_steps", 1, 1000), ("sample_batch_size", 1, 4096),
            ("num_batches_per_epoch", 1, 4096), ("seed", 0, 2**63 - 1), ("buffer_size", 1, 10**6),
            ("min_count", 1, 10**6), ("train_batch_size", 1, 4096), ("grad_accum", 1, 4096),
            ("num_epochs", 1, 10**6), ("inner_epochs", 1, 1000), ("eval_seed", 0, 2**63 - 1),
            ("pairs_per_prompt", 1, 4096),
        ]:  # fmt: skip
            _integer(self, name, lo, hi)
        for name, lo, hi, lo_open in [
            ("eta", 0.0, 1.0, True), ("guidance_scale", 0.0, 1.0, False), ("gamma", 0.0, 1.0, False),
            ("adv_clip", 0.0, math.inf, True), ("lam", 0.0, 1.0, True), ("eta_s", 0.0, math.inf, True),
            ("clip_range", 0.0, math.inf, True), ("learning_rate", 0.0, 1.0, True),
            ("weight_decay", 0.0, math.inf, False), ("adam_eps", 0.0, 1.0, True),
            ("max_grad_norm", 0.0, math.inf, True), ("eval_eta", 0.0, 1.0, False), ("eval_guidance", 0.0, 30.0, False),
        ]:  # fmt: skip
            _number(self, name, lo, hi, lo_open)
        if self.reward_variant == "probability" and self.reward != "shapes-probe":
            object.__setattr__(self, "reward_variant", "standard")  # exp() is for the probe's log-prob only
        if self.min_count > self.buffer_size:
            raise UserError(f"min_count ({self.min_count}) cannot exceed buffer_size ({self.buffer_size})")
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise UserError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in betas))
        steps = tuple(self.eval_steps)
        if not steps or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 1000 for k in steps):
            raise UserError(f"eval_steps must be whole numbers from 1 to 1000, got {self.eval_steps!r}")
        object.__setattr__(self, "eval_steps", steps)
        if self.trained_steps < 1:
            raise UserError("LCM training needs at least 2 steps: the last LCM step returns f_θ deterministically "
                            "and has no log-prob to train")  # fmt: skip
        updates_per_epoch(self.trained_steps, self.pairs_per_process, self.train_batch_size, self.grad_accum)

    @property
    def pairs_per_process(self) -> int:
        return self.sample_batch_size * self.num_batches_per_epoch

    @property
    def updates_per_epoch(self) -> int:
        """Optimiser steps per epoch (§1.2(e)); the paper preset gives 50·32/(2·8) = 100."""
        return updates_per_epoch(self.trained_steps, self.pairs_per_process, self.train_batch_size, self.grad_accum,
                                 self.inner_epochs)  # fmt: skip

    @property
    def trained_steps(self) -> int:
        """Steps with a log-prob, which the policy-gradient methods train: all K under DDIM, K − 1 under LCM."""
        return self.num_steps - (self.train_sampler == "lcm")

    @classmethod
    def preset(cls, name: str, **overrides) -> SDPOConfig:
        """A named preset (``PRESETS``) with ``overrides`` on top; unknown names or keys are ``UserError``s."""
        if name not in PRESETS:
            raise UserError(f"unknown SDPO preset {name!r}: choose one of {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown SDPO setting(s): {', '.join(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The method config overrides the base config (§1.3). "paper" is the aesthetic column; the other paper
# columns change the reward, optimiser batch and lr. "shapes" is ours: a CPU-sized run on the embedded model.
PRESETS: dict[str, dict] = {
    "paper": {},
    "paper-imagereward": dict(
        reward="imagereward",
        reward_variant="raw",
        train_batch_size=1,
        grad_accum=32,
        learning_rate=5e-5,
        num_epochs=200,
    ),
    "paper-hpsv2": dict(reward="hpsv2", train_batch_size=1, grad_accum=32, learning_rate=5e-5, num_epochs=200),
    "paper-pickscore": dict(
        reward="pickscore",
        reward_variant="cosine",
        train_batch_size=1,
        grad_accum=16,
        learning_rate=6e-5,
        num_epochs=200,
    ),
    "shapes": dict(
        model="shapes",
        adapter="lora",  # the CLI and app default; "shapes-full" (all 1.49 M UNet weights) is the measured one
        precision="fp32",  # CPU
        tf32="off",
        num_steps=2,  # K_train = 2 (ours, §1.5): step 0 from t = 999 is the 1-step model's only step
        timestep_spacing="trailing",  # the pipeline's leading spacing would start a 1-step sample at t = 1
        prompts="shapes",
        sample_batch_size=16,
        num_batches_per_epoch=1,  # 16 pairs per epoch
        pairs_per_prompt=4,  # 4 pairs (8 trajectories) per prompt: with min_count 8 each (prompt, step) key is
        # normalised by its own statistics, not by a batch whose spread is mostly between prompts
        min_count=8,
        reward="shapes-probe",  # the probe's prompt log-prob (ALGORITHMS.md §6) ...
        reward_variant="probability",  # ... trained as P(prompt satisfied) = exp(log-prob), in [0, 1]
        lam=0.1,  # w = (1, 0.1): the last step's noise (σ ≈ 0.03) barely moves the image, yet the scale of its
        # log-prob gradient, |c_ε|/σ, is ~6× step 0's; down-weighted so step 0 (t = 999) leads
        train_batch_size=8,  # 8 pairs per optimiser step in one minibatch: the same update as 2 × 4 accumulated
        grad_accum=1,  # (tests/test_trainer.py) in 2/3 of the time on CPU; 2·16/(8·1) = 4 updates per epoch
        learning_rate=3e-4,  # LoRA (not re-measured at these settings); full UNet: see "shapes-full"
        num_epochs=60,
        eval_steps=(1, 2, 4, 8),
        eval_sampler="ddim-trailing",  # deterministic DDIM on trailing timesteps, as trained
        eval_guidance=1.0,  # SDPO trains the conditional prediction (CFG off); evaluate what was trained
    ),
}
# The configuration bench/sdpo_vs_ddpo.py measures: "shapes" with every UNet weight trained.
PRESETS["shapes-full"] = dict(
    PRESETS["shapes"],
    adapter="full",
    learning_rate=3e-5,  # 1e-4 degraded the 2-step model within 3 minutes (SDPO and DDPO alike)
)
# K_train = 8 on trailing timesteps, which hold every timestep of the 1/2/4/8-step evaluation samplers, with the
# paper's λ = 0.99 (0.1 would leave steps 2…7 almost no weight). In 20 minutes it raised the probe reward at every
# step count without losing 4- or 8-step accuracy, where K = 2 traded them for 1-step gains (docs/BENCHMARKS.md).
PRESETS["shapes-k8"] = dict(PRESETS["shapes"], num_steps=8, lam=0.99)


def shapes_preset(num_steps: int | None) -> str:
    """The Shapes preset for K_train = ``num_steps``: "shapes" (λ = 0.1, chosen for K = 2) up to 2 steps, else
    "shapes-k8" (λ = 0.99). The Fine-tune tab and the CLI (without ``--preset``) start from it."""
    return "shapes" if num_steps is None or num_steps <= 2 else "shapes-k8"


def training_reward(reward_fn, variant: str):
    """The reward the policy is trained on: ``reward_fn`` itself, or for ``variant="probability"`` exp(reward)
    of a log-prob reward (the Shapes probe's P(image satisfies prompt), bounded in [0, 1] like accuracy)."""
    if variant != "probability":
        return reward_fn

    def fn(images, prompts, metadata):
        rewards, info = reward_fn(images, prompts, metadata)
        return torch.as_tensor(rewards, dtype=torch.float32).exp(), info

    return fn


def _choice(cfg, name: str, options: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in options:
        raise UserError(f"{name} must be one of {', '.join(options)}, got {getattr(cfg, name)!r}")


def _integer(cfg, name: str, lo: int, hi: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
        object.__setattr__(cfg, name, value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise UserError(f"{name} must be between {lo} and {hi}, got {value}")


def _number(cfg, name: str, lo: float, hi: float, lo_open: bool) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise UserError(f"{name} must be a number, got {value!r}")
    if value > hi or value < lo or (lo_open and value == lo):
        low = f"above {lo:g}" if lo_open else f"at least {lo:g}"
        raise UserError(f"{name} must be {low} and at most {hi:g}, got {value:g}")


def updates_per_epoch(num_steps: int, pairs_per_process: int, train_batch_size: int, grad_accum: int,
                      inner_epochs: int = 1) -> int:  # fmt: skip
    """K·pairs/(train_bs·grad_accum) optimiser steps per epoch (§1.2(e)), times ``inner_epochs``.

    Optimiser steps fall inside a step column, so a column's minibatches (pairs/train_bs) must be a
    whole number of accumulation groups; otherwise a ``UserError`` says so.
    """
    if pairs_per_process % train_batch_size:
        raise UserError(f"the pairs per process ({pairs_per_process}: prompts per sampling batch × sampling batches "
                        f"per epoch) must be a multiple of the train batch size ({train_batch_size}): raise the "
                        f"first or lower the second")  # fmt: skip
    minibatches = pairs_per_process // train_batch_size
    if minibatches % grad_accum:
        raise UserError(f"each step column has {minibatches} minibatches, not a multiple of grad_accum "
                        f"({grad_accum}): choose sizes with pairs = train_batch_size·grad_accum·n")  # fmt: skip
    return num_steps * (minibatches // grad_accum) * inner_epochs


def train_timesteps(pipe, num_steps: int, spacing: str = "leading") -> list[int]:
    """Training timesteps t_0 > … > t_{K−1} on the pipeline's schedule; "pipeline" uses its own spacing."""
    cfg = pipe.scheduler.config
    n_train = cfg.get("num_train_timesteps", 1000)
    if spacing == "pipeline":
        spacing = cfg.get("timestep_spacing", "leading")
    offset = cfg.get("steps_offset", 1) if spacing == "leading" else 0
    return timesteps(num_steps, spacing, num_train_timesteps=n_train, steps_offset=offset)


# ---------------------------------------------------------------------------------------------------
# (a) Dual-state pairs
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrajectoryPair:
    """Trajectories a and b of P pairs, stored jointly: rows [0, P) are a, rows [P, 2P) are b.

    ``joint`` is what ``sample_loop`` recorded for the 2P rows, so re-evaluating it with the 2P-row
    conditioning (``torch.cat([cond, cond])``) reproduces its log-probs exactly.
    """

    joint: Trajectory

    @property
    def num_pairs(self) -> int:
        return self.joint.latents.shape[0] // 2

    @property
    def a(self) -> Trajectory:
        return _rows(self.joint, slice(0, self.num_pairs))

    @property
    def b(self) -> Trajectory:
        return _rows(self.joint, slice(self.num_pairs, None))

    @property
    def x_T(self) -> torch.Tensor:
        return self.joint.latents[: self.num_pairs, 0]


def _rows(traj: Trajectory, rows: slice) -> Trajectory:
    return dataclasses.replace(traj, latents=traj.latents[rows], log_probs=traj.log_probs[rows],
                               pred_x0=None if traj.pred_x0 is None else traj.pred_x0[rows])  # fmt: skip


def pair_generators(seeds: Sequence[int], device="cpu") -> tuple[list, list, list]:
    """Per-pair generators (x_T, step noise of a, step noise of b) from one seed each: 3s, 3s+1, 3s+2."""
    make = lambda s: torch.Generator(device=device).manual_seed(s)
    return [make(3 * s) for s in seeds], [make(3 * s + 1) for s in seeds], [make(3 * s + 2) for s in seeds]


@torch.no_grad()
def sample_pairs(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    ts: list[int],
    alphas_cumprod: torch.Tensor,
    *,
    generators_a: list[torch.Generator],
    generators_b: list[torch.Generator],
    eta: float = 1.0,
    prediction_type: PredictionType = "epsilon",
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    reduction: Reduction = "mean",
    step_kind: str = "ddim",
    step_kwargs: dict | None = None,
) -> TrajectoryPair:
    """Two stochastic DDIM trajectories per row of ``x_T`` [P, C, H, W], both starting at that x_T (§1.2(a)).

    ``cond`` [P, …] is the conditioning of each pair. Both trajectories record the noisy latents (for
    log-probs) and x̂0 at every step (for the dense reward). Step noise of trajectory a (b) in row p
    comes from ``generators_a[p]`` (``generators_b[p]``), so a pair replays from its generators whatever
    the batch. Runs as one ``sample_loop`` over 2P rows. ``step_kind="lcm"`` takes LCM steps (``step_kwargs``:
    their ``timestep_scaling``), whose re-noising is the policy's noise; ``eta`` is then unused. The denoiser
    must not apply CFG (SDPO samples with guidance off; a ``CFGDenoiser`` with scale ≤ 1 is fine). x_T and the
    step maths should be fp32.
    """
    p = x_T.shape[0]
    if len(generators_a) != p or len(generators_b) != p:
        raise ValueError(f"need one generator per pair and trajectory: {p} pairs, "
                         f"{len(generators_a)} and {len(generators_b)} generators")  # fmt: skip
    if not eta > 0:
        raise ValueError("SDPO pairs need stochastic steps (η > 0): with η = 0 both trajectories coincide")
    if getattr(denoiser, "guided", False):
        raise ValueError("SDPO samples with CFG off: pass guidance ≤ 1 (one conditional pass)")
    _, traj = sample_loop(denoiser, torch.cat([x_T, x_T]), torch.cat([cond, cond]), ts, alphas_cumprod,
                          step_kind=step_kind, eta=eta, prediction_type=prediction_type, step_kwargs=step_kwargs,
                          final_alpha_cumprod=final_alpha_cumprod, generator=list(generators_a) + list(generators_b),
                          record=True, record_pred_x0=True, reduction=reduction)  # fmt: skip
    return TrajectoryPair(traj)


# ---------------------------------------------------------------------------------------------------
# (b) Dense reward from latent similarity
# ---------------------------------------------------------------------------------------------------
@dataclass
class DenseRewards:
    """rewards [B, K]: R̂_i; anchor [B]: i*; exact [B, 3]: the queried rewards (R_f, R_a, R_l), with the
    reused value where an end doubles as the anchor (K ≤ 2); queries_per_trajectory: reward queries spent."""

    rewards: torch.Tensor
    anchor: torch.Tensor
    exact: torch.Tensor
    queries_per_trajectory: int
    info: dict = field(default_factory=dict)


def _cosines(flat: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """flat [B, K, D], ref [B, D] → cos(x̂0^i, ref) [B, K]."""
    return F.cosine_similarity(flat, ref[:, None, :], dim=-1)


def anchor_index(pred_x0: torch.Tensor) -> torch.Tensor:
    """i* = argmin_i [cos(x̂0^i, x̂0^0) + cos(x̂0^i, x̂0^{K−1})] [B], for pred_x0 [B, K, C, H, W] (§1.2(b)).

    For K ≥ 3 the search runs over interior steps 1…K−2 only: the two ends tie at 1 + cos(x̂0^0, x̂0^{K−1})
    and beat every point of a path without a detour (2·cos(θ/2) ≥ 1 + cos θ), so the reference's argmin
    over all steps can re-query an end. For K ≤ 2 the anchor is step 0 (its reward is reused).
    """
    b, k = pred_x0.shape[:2]
    if k <= 2:
        return torch.zeros(b, dtype=torch.long, device=pred_x0.device)
    flat = pred_x0.flatten(2).float()
    score = _cosines(flat, flat[:, 0]) + _cosines(flat, flat[:, -1])
    return score[:, 1:-1].argmin(dim=1) + 1


@torch.no_grad()
def dense_rewards(
    pred_x0_latents: torch.Tensor,
    reward_fn_on_latents: Callable[[torch.Tensor], torch.Tensor],
    *,
    cosine_clamp: str = "none",
) -> DenseRewards:
    """Dense rewards R̂ [B, K] for x̂0 latents [B, K, C, H, W], from 3 reward queries per trajectory (§1.2(b)).

    ``reward_fn_on_latents(latents [B, Q, C, H, W]) -> rewards [B, Q]`` is called once, with the query
    latents of each trajectory in its row: Q = 3 (first, anchor, last) for K ≥ 3, 2 for K = 2 (the
    anchor is an end), 1 for K = 1 (first = last). ``latent_reward`` builds it from an image reward.
        s_f, s_a, s_l = cos(x̂0^i, x̂0^0), cos(x̂0^i, x̂0^{i*}), cos(x̂0^i, x̂0^{K−1})   (flattened latents)
        R̂_i = (s_f·R_f + s_a·R_a + s_l·R_l)/max(s_f + s_a + s_l, 1e−6),  then R̂ = R exactly at 0, i*, K−1.
    ``cosine_clamp="nonnegative"`` clamps the cosines at 0 first (ours), keeping R̂ within [min R, max R].
    """
    if cosine_clamp not in COSINE_CLAMPS:
        raise ValueError(f"cosine_clamp must be one of {COSINE_CLAMPS}, got {cosine_clamp!r}")
    b, k = pred_x0_latents.shape[:2]
    rows = torch.arange(b, device=pred_x0_latents.device)
    anchor = anchor_index(pred_x0_latents)
    query_steps = [0] if k == 1 else [0, k - 1] if k == 2 else None
    if query_steps is None:
        queries = torch.stack([pred_x0_latents[:, 0], pred_x0_latents[rows, anchor], pred_x0_latents[:, -1]], 1)
    else:
        queries = pred_x0_latents[:, query_steps]
    q = queries.shape[1]
    got = torch.as_tensor(reward_fn_on_latents(queries))
    if got.shape != (b, q):
        raise ValueError(f"the reward function returned shape {tuple(got.shape)} for {q} queries of {b} "
                         f"trajectories; expected ({b}, {q})")  # fmt: skip
    got = got.detach().float().to(pred_x0_latents.device)
    if k == 1:
        exact = got.repeat(1, 3)
        return DenseRewards(got.clone(), anchor, exact, 1)
    if k == 2:
        exact = torch.stack([got[:, 0], got[:, 0], got[:, 1]], 1)
        return DenseRewards(got.clone(), anchor, exact, 2)
    r_f, r_a, r_l = got.unbind(1)
    flat = pred_x0_latents.flatten(2).float()
    s_f, s_a, s_l = _cosines(flat, flat[:, 0]), _cosines(flat, flat[rows, anchor]), _cosines(flat, flat[:, -1])
    if cosine_clamp == "nonnegative":
        s_f, s_a, s_l = s_f.clamp(min=0), s_a.clamp(min=0), s_l.clamp(min=0)
    denominator = s_f + s_a + s_l
    dense = (s_f * r_f[:, None] + s_a * r_a[:, None] + s_l * r_l[:, None]) / denominator.clamp(min=DENOMINATOR_FLOOR)
    dense[:, 0], dense[rows, anchor], dense[:, -1] = r_f, r_a, r_l
    info = {"denominator_min": float(denominator.min()), "anchor_mean": float(anchor.float().mean())}
    return DenseRewards(dense, anchor, got, 3, info)


def latent_reward(pipe, reward_fn, prompts: Sequence[str], metadata: Sequence[dict] | None = None):
    """Adapt an image reward ``reward_fn(images, prompts, metadata) -> (rewards, info)`` (§6) to latents.

    Returns ``fn(latents [B, Q, C, H, W]) -> rewards [B, Q]`` for ``dense_rewards``: it decodes all B·Q
    latents with the pipeline's VAE (``generate.decode``) and scores row b's queries with ``prompts[b]``.
    """
    from .generate import decode

    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]

    def fn(latents: torch.Tensor) -> torch.Tensor:
        b, q = latents.shape[:2]
        if b != len(prompts):
            raise ValueError(f"{b} trajectories but {len(prompts)} prompts")
        images = decode(pipe, latents.flatten(0, 1))
        rewards, _ = reward_fn(images, [p for p in prompts for _ in range(q)], [m for m in metadata for _ in range(q)])
        return torch.as_tensor(rewards, dtype=torch.float32).reshape(b, q)

    return fn


# ---------------------------------------------------------------------------------------------------
# (c) Returns and advantages
# ---------------------------------------------------------------------------------------------------
def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_i = R̂_i + γ·G_{i+1}, G_K = 0, backwards over sampling order. rewards [B, K] → returns [B, K]."""
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for i in reversed(range(rewards.shape[1])):
        running = rewards[:, i] + gamma * running
        returns[:, i] = running
    return returns


def step_tracker(buffer_size: int = 32, min_count: int = 16) -> PerPromptStatTracker:
    """The SDPO tracker: a ``PerPromptStatTracker`` that ``sdpo_advantages`` keys by (prompt, step)."""
    return PerPromptStatTracker(buffer_size, min_count)


def sdpo_advantages(
    tracker: PerPromptStatTracker, prompts: Sequence[str], returns: torch.Tensor, adv_clip: float = 5.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """A_i = clip((G_i − μ_{c,i})/(σ_{c,i} + 1e−6), ±adv_clip) for returns [N, K] of N trajectories (§1.2(c)).

    Statistics per (prompt, step) key from the tracker's FIFO; before ``min_count`` entries, the batch
    statistics of step i (all N rows). Pass both trajectories of every pair, from every process,
    in one call, so that the FIFO pools them. Returns the clipped advantages [N, K] and clip fractions.
    """
    n, k = returns.shape
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} trajectories")
    keys = [(p, i) for p in prompts for i in range(k)]
    steps = [i for _ in prompts for i in range(k)]
    raw = tracker.advantages(keys, returns.reshape(-1), groups=steps).reshape(n, k)
    return clip_advantages(raw, adv_clip)


# ---------------------------------------------------------------------------------------------------
# (d) Loss
# ---------------------------------------------------------------------------------------------------
def step_weights(num_steps: int, lam: float = 0.99, eta_s: float = 1.0) -> torch.Tensor:
    """w_i = λ^i/η_s [K], i = 0 the first (noisiest) step."""
    return torch.tensor([lam**i / eta_s for i in range(num_steps)], dtype=torch.float32)


def _loss_terms(log_prob_a, log_prob_b, old_a, old_b, adv_a, adv_b, weights, clip_range):
    old_a, old_b = old_a.detach(), old_b.detach()
    adv_diff = adv_a - adv_b
    ratio_diff = (log_prob_a - old_a) - (log_prob_b - old_b)
    clipped_a = torch.clamp(log_prob_a, old_a - clip_range, old_a + clip_range) - old_a
    clipped_b = torch.clamp(log_prob_b, old_b - clip_range, old_b + clip_range) - old_b
    unclipped = (weights * ratio_diff - adv_diff) ** 2
    clipped = (weights * (clipped_a - clipped_b) - adv_diff) ** 2
    return unclipped, clipped


def sdpo_loss(
    log_prob_a: torch.Tensor,
    log_prob_b: torch.Tensor,
    old_a: torch.Tensor,
    old_b: torch.Tensor,
    adv_a: torch.Tensor,
    adv_b: torch.Tensor,
    weights: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """L = mean_pairs max{(w(ρ^a − ρ^b) − ΔA)², (w(ρ̃^a − ρ̃^b) − ΔA)²} (§1.2(d)); all inputs [B].

    ρ^j = log π_θ − log π_old; ρ̃^j = clip(log π_θ, log π_old ± ε) − log π_old; ΔA = A^a − A^b (already
    clipped). At ρ = 0 it equals mean ΔA² and ∂L/∂ρ^a = −2w·ΔA/B: the better transition gains likelihood.
    """
    unclipped, clipped = _loss_terms(log_prob_a, log_prob_b, old_a, old_b, adv_a, adv_b, weights, clip_range)
    return torch.maximum(unclipped, clipped).mean()


def sdpo_clip_fraction(log_prob_a, log_prob_b, old_a, old_b, adv_a, adv_b, weights, clip_range) -> float:
    """Fraction of pairs where the clipped term is the larger (the reference's ``clipfrac``)."""
    unclipped, clipped = _loss_terms(log_prob_a, log_prob_b, old_a, old_b, adv_a, adv_b, weights, clip_range)
    return float((clipped > unclipped).float().mean())


# ---------------------------------------------------------------------------------------------------
# (e) Step-shuffled updates
# ---------------------------------------------------------------------------------------------------
_PER_PAIR = ("cond", "pair_index")


@dataclass
class PairSteps:
    """Training rows of P pairs × K steps: the unit ``shuffle_steps`` permutes.

    Per step, [P, K, …]: ``step_index`` (original i), ``timesteps`` / ``next_timesteps`` (t_i, t_{i+1};
    −1 = final), ``latents_*`` / ``next_latents_*`` [P, K, C, H, W] (x^{(i)}, x^{(i+1)}), ``log_probs_*``
    (log π_old), ``advantages_*`` (clipped) and ``weights`` (w_i). Per pair: ``cond`` [P, …] and
    ``pair_index`` [P] (the pair's row before shuffling).
    """

    step_index: torch.Tensor
    timesteps: torch.Tensor
    next_timesteps: torch.Tensor
    latents_a: torch.Tensor
    next_latents_a: torch.Tensor
    latents_b: torch.Tensor
    next_latents_b: torch.Tensor
    log_probs_a: torch.Tensor
    log_probs_b: torch.Tensor
    advantages_a: torch.Tensor
    advantages_b: torch.Tensor
    weights: torch.Tensor
    cond: torch.Tensor
    pair_index: torch.Tensor

    @classmethod
    def from_pair(cls, pair: TrajectoryPair, advantages_a: torch.Tensor, advantages_b: torch.Tensor,
                  weights: torch.Tensor, cond: torch.Tensor) -> PairSteps:  # fmt: skip
        """Rows from sampled pairs, advantages [P, K] per trajectory, step weights [K] and cond [P, …]. Under LCM
        steps the last, deterministic step (no log-prob) is left out: K − 1 columns."""
        a, b = pair.a, pair.b
        p, k = a.log_probs.shape
        k -= pair.joint.step_kind == "lcm"
        device = a.latents.device
        expand = lambda v: torch.as_tensor(v, device=device)[:k].expand(p, k).clone()
        return cls(
            step_index=expand(torch.arange(k)),
            timesteps=expand(a.timesteps),
            next_timesteps=expand(a.next_timesteps),
            latents_a=a.latents[:, :k], next_latents_a=a.latents[:, 1 : k + 1],
            latents_b=b.latents[:, :k], next_latents_b=b.latents[:, 1 : k + 1],
            log_probs_a=a.log_probs[:, :k], log_probs_b=b.log_probs[:, :k],
            advantages_a=advantages_a[:, :k], advantages_b=advantages_b[:, :k],
            weights=expand(weights.to(device)),
            cond=cond,
            pair_index=torch.arange(p, device=device),
        )  # fmt: skip

    @property
    def num_pairs(self) -> int:
        return self.step_index.shape[0]

    @property
    def num_steps(self) -> int:
        return self.step_index.shape[1]

    def minibatch(self, column: int, rows: slice) -> PairSteps:
        """Column ``column`` of the pairs in ``rows``, as PairSteps with K = 1."""
        values = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[rows] if f.name in _PER_PAIR else v[rows, column : column + 1]
        return PairSteps(**values)


def shuffle_steps(steps: PairSteps, generator: torch.Generator) -> PairSteps:
    """Shuffle the pairs, then permute each pair's K steps with one permutation shared by a and b (§1.2(e)).

    Every per-step field (step index, timesteps, latents, next latents, log-probs, advantages, w) moves
    together; ``generator`` is a CPU generator, so the permutations replay from its seed.
    """
    p, k = steps.num_pairs, steps.num_steps
    pair_perm = torch.randperm(p, generator=generator)
    step_perm = torch.stack([torch.randperm(k, generator=generator) for _ in range(p)])
    values = {}
    for f in dataclasses.fields(steps):
        v = getattr(steps, f.name)
        pp = pair_perm.to(v.device)
        if f.name in _PER_PAIR:
            values[f.name] = v[pp]
        else:
            values[f.name] = v[pp][torch.arange(p, device=v.device)[:, None], step_perm.to(v.device)]
    return PairSteps(**values)


def iter_minibatches(steps: PairSteps, train_batch_size: int) -> Iterator[tuple[int, PairSteps]]:
    """(column, minibatch) in training order: ``for column in 0..K−1: for minibatch: …`` (§1.2(e)).

    The caller accumulates gradients and steps the optimiser every ``grad_accum`` minibatches; with
    ``updates_per_epoch``'s divisibility, those steps fall inside columns.
    """
    for column in range(steps.num_steps):
        for start in range(0, steps.num_pairs, train_batch_size):
            yield column, steps.minibatch(column, slice(start, start + train_batch_size))


def sdpo_minibatch_loss(
    denoiser: Denoiser,
    batch: PairSteps,
    alphas_cumprod: torch.Tensor,
    *,
    clip_range: float,
    eta: float = 1.0,
    prediction_type: PredictionType = "epsilon",
    final_alpha_cumprod: float | torch.Tensor = 1.0,
    reduction: Reduction = "mean",
    step_kind: str = "ddim",
    step_kwargs: dict | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``sdpo_loss`` of one minibatch (K = 1 column of ``iter_minibatches``), re-evaluating a and b
    in one denoiser call of 2B rows. Returns the loss and {clipfrac, approx_kl, ratio_abs_max}."""
    flat = lambda v: v[:, 0]
    bsz = batch.num_pairs
    log_probs = transition_log_probs(
        denoiser,
        torch.cat([flat(batch.latents_a), flat(batch.latents_b)]),
        torch.cat([flat(batch.next_latents_a), flat(batch.next_latents_b)]),
        torch.cat([flat(batch.timesteps)] * 2),
        torch.cat([flat(batch.next_timesteps)] * 2),
        torch.cat([batch.cond, batch.cond]),
        alphas_cumprod,
        eta=eta, prediction_type=prediction_type, final_alpha_cumprod=final_alpha_cumprod, reduction=reduction,
        step_kind=step_kind, step_kwargs=step_kwargs,
    )  # fmt: skip
    lp_a, lp_b = log_probs[:bsz], log_probs[bsz:]
    args = (lp_a, lp_b, flat(batch.log_probs_a), flat(batch.log_probs_b), flat(batch.advantages_a),
            flat(batch.advantages_b), flat(batch.weights), clip_range)  # fmt: skip
    loss = sdpo_loss(*args)
    with torch.no_grad():
        log_ratio = log_probs - torch.cat([flat(batch.log_probs_a), flat(batch.log_probs_b)])
        info = {
            "clipfrac": sdpo_clip_fraction(*(a.detach() if torch.is_tensor(a) else a for a in args)),
            "approx_kl": float(0.5 * (log_ratio**2).mean()),
            "ratio_abs_max": float(log_ratio.abs().max()),
        }
    return loss, info
