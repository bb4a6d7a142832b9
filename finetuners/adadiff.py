"""AdaDiff: a per-prompt choice of the number of denoising steps (ALGORITHMS.md §3, arXiv 2311.14768).

A small policy reads the prompt's frozen text-encoder features and picks a step count u from a candidate set U
before sampling (a contextual bandit). The reward of choosing u for prompt p (§3.2, with the "ours" choices):

    Q_p(u) = IQS(x_u, p), averaged over S seeds shared across u, then min–max normalised over U into [0, 1]
    T_p    = the top-k of Q_p over U (ties go to fewer steps)
    R_p(u) = O(u) + λ·Q_p(u)   if u ∈ T_p,   −γ otherwise;      O(u) = (u_N − u)/(u_N − u_1)

**Training from a cache.** The reward of every (prompt, u) is known once each prompt's ladder — its images at every
candidate u, for S seeds — is rendered and scored (``build_quality_table``: one sampling pass per candidate).
REINFORCE on that table is the same objective as sampling images on the fly: an on-the-fly run would draw u ~ π,
render x_u with the same seeds and score it, i.e. look up R_p(u). So policy training (``train_policy``) never calls
the generator, costs milliseconds per epoch, and — because the table is complete — can use the exact baseline
b(p) = Σ_u π(u|p)·R_p(u) or the exact expected gradient ∇ Σ_u π(u|p)·R_p(u) (loss "expected", zero variance in u).
Sampled REINFORCE ("reinforce", "reinforce_baseline") stays for parity with the paper.

The policy is an MLP over [mean-pooled hidden states ‖ EOS hidden state] of the pipeline's own text encoder,
standardised with the training prompts' statistics (the paper's three self-attention layers are replaced by these
two poolings: the Shapes prompts are short, and the text encoder already attends over them). Inference takes the
argmax. A trained policy is a folder: ``config.json`` + ``policy.safetensors`` (+ ``table.safetensors``, the
training ladder, for inspection); nothing else is ever loaded.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .names import check_name, child_folder, is_valid_name, typed_path

log = logging.getLogger(__name__)

CANDIDATE_SETS: dict[str, tuple[int, ...]] = {
    "few-step": (1, 2, 4, 8),  # SD-Turbo / LCM (§3.2)
    "shapes": (1, 2, 3, 4, 6, 8),  # the embedded Shapes model (§3.2)
    "standard": (5, 10, 15, 20, 25, 30, 35, 40, 45, 50),  # SD 1.x / 2.x, the paper's set
}
LOSSES = ("expected", "reinforce_baseline", "reinforce")
BASELINES = ("exact", "moving-average")
FLAT_ROWS = ("fewest", "skip")
MAX_STEPS = 200  # as SampleRequest's limit
FORMAT = "finetuners.adadiff/1"
POLICY_FILE, CONFIG_FILE, TABLE_FILE = "policy.safetensors", "config.json", "table.safetensors"
MAX_POLICY_NAME = 64
TRAIN_SEED_BASE = 10**6  # training ladders' seeds start here; evaluation renders prompt i at seed i
# policies that ship in assets/, by the name the app lists them under (a saved policy of the same name wins)
SHIPPED_POLICIES = {"shapes": "shapes-policy"}  # trained for the "shapes" model: docs/BENCHMARKS.md, Adaptive steps


def _check_candidates(candidates) -> tuple[int, ...]:
    try:
        values = tuple(candidates)
    except TypeError:
        raise UserError(f"candidate step counts must be a list of whole numbers, got {candidates!r}") from None
    if not values:
        raise UserError("the candidate set of step counts is empty: give at least two, e.g. 1 2 4 8")
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise UserError(f"candidate step counts must be whole numbers, got {v!r}")
        if v <= 0:
            raise UserError(f"candidate step counts must be positive, got {v}")
        if v > MAX_STEPS:
            raise UserError(f"candidate step counts must be at most {MAX_STEPS}, got {v}")
        out.append(v)
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})
        raise UserError(f"candidate step counts must be distinct: {', '.join(map(str, dup))} given more than once")
    if len(out) < 2:
        raise UserError(f"the candidate set needs at least two step counts to choose between, got {out}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class AdaDiffConfig:
    """Everything one AdaDiff policy run uses; validated on construction (``UserError`` otherwise)."""

    candidates: tuple[int, ...] = CANDIDATE_SETS["few-step"]  # U, step counts (sorted on construction)
    top_k: int | None = None  # |T_p|; None: 3, or 2 when |U| < 8 (§3.2, ours)
    quality_weight: float = 1.0  # λ: weight of the normalised quality Q inside the top-k (O(u) has weight 1)
    penalty: float = 1.0  # γ: reward −γ of any choice outside the top-k
    flat_rows: str = "fewest"  # a prompt whose Q has no spread over U: "fewest" (§3.2 tie-break: top-k = fewest
    # steps) or "skip" (reward 0 for every u: no gradient; it says nothing about which u renders it better)
    quality: str = "shapes-accuracy"  # IQS: a reward name from finetuners.rewards (per image, higher is better)
    num_seeds: int = 2  # S: seeds per prompt, shared across u (a noisy IQS needs the average, §3.5)
    sampler: str = "ddim-trailing"  # deterministic sampler of the ladder (and of adaptive generation)
    guidance: float = 3.0  # CFG scale of the ladder
    loss: str = "expected"  # "expected" (exact gradient), "reinforce_baseline", "reinforce" (§3.6)
    baseline: str = "exact"  # for reinforce_baseline: "exact" Σπ·R, or "moving-average" of sampled rewards
    baseline_momentum: float = 0.9  # moving-average baseline: b ← m·b + (1 − m)·mean(R)
    entropy_bonus: float = 0.01  # sampled losses only: + β·H(π) keeps exploring
    hidden: int = 64  # MLP width
    lr: float = 3e-3  # Adam
    weight_decay: float = 1e-4
    epochs: int = 300  # passes over the cached table
    batch_size: int = 64  # prompts per policy update
    seed: int = 0  # policy initialisation, minibatch order and sampled actions

    def __post_init__(self):
        object.__setattr__(self, "candidates", _check_candidates(self.candidates))
        for name in ("quality_weight", "penalty", "entropy_bonus"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise UserError(f"{name} must be a number ≥ 0, got {v!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k <= len(self.candidates)):
            raise UserError(f"top_k must be between 1 and {len(self.candidates)} (the number of candidates)")
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.flat_rows not in FLAT_ROWS:
            raise UserError(f"unknown flat_rows {self.flat_rows!r}: choose one of {', '.join(FLAT_ROWS)}")
        if self.baseline not in BASELINES:
            raise UserError(f"unknown baseline {self.baseline!r}: choose one of {', '.join(BASELINES)}")
        if not 0 <= self.baseline_momentum < 1:
            raise UserError(f"baseline_momentum must be in [0, 1), got {self.baseline_momentum!r}")
        for name, lo, hi in (("num_seeds", 1, 64), ("hidden", 1, 4096), ("epochs", 1, 100_000),
                             ("batch_size", 1, 1_000_000)):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise UserError(f"{name} must be a whole number between {lo} and {hi}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 1):
            raise UserError(f"lr must be in (0, 1], got {self.lr!r}")
        from .generate import LIMITS, SAMPLERS

        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if not LIMITS["guidance"][0] <= self.guidance <= LIMITS["guidance"][1]:
            raise UserError(f"guidance must be between {LIMITS['guidance'][0]:g} and {LIMITS['guidance'][1]:g}")

    @property
    def k(self) -> int:
        return self.top_k if self.top_k is not None else (3 if len(self.candidates) >= 8 else 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdaDiffConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown AdaDiff settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "candidates" in d and isinstance(d["candidates"], list):
            d["candidates"] = tuple(d["candidates"])
        return cls(**d)


def suggested_setup(pipe, candidates: Sequence[int] | None = None) -> tuple[tuple[int, ...], str, float]:
    """(candidates, sampler, guidance) for a loaded pipeline (§3.2, ours). Candidates, unless given: the Shapes set
    on a small UNet (Shapes and its checkpoints), the few-step set on a model whose default is at most 8 steps
    (SD-Turbo, LCM, a few-step checkpoint), else the paper's standard set. The ladder samples deterministically:
    LCM on an LCM model, trailing DDIM when a candidate is under 5 steps (leading spacing starts a 1-step sample at
    t = 1), else the model's own DDIM spacing; at the model's default guidance (a fine-tuned checkpoint's is its
    run's)."""
    from .models import model_defaults, small_unet

    d = model_defaults(pipe)
    if candidates is None:
        candidates = CANDIDATE_SETS["shapes" if small_unet(pipe) else "few-step" if d.steps <= 8 else "standard"]
    candidates = _check_candidates(candidates)
    sampler = "lcm" if d.sampler == "lcm" else "ddim-trailing" if candidates[0] < 5 else d.sampler
    return candidates, sampler, d.guidance


# -- reward (§3.2) ------------------------------------------------------------------------------------------------


def step_saving(candidates: Sequence[int]) -> torch.Tensor:
    """O(u) = (u_N − u)/(u_N − u_1) ∈ [0, 1], [N]: 1 for the fewest steps, 0 for the most."""
    u = torch.tensor(_check_candidates(candidates), dtype=torch.float32)
    return (u[-1] - u) / (u[-1] - u[0])


def normalise_quality(quality: torch.Tensor) -> torch.Tensor:
    """Per-prompt min–max over U: [P, N] → [P, N] in [0, 1]. A row with no spread (every u equally good or bad)
    carries no information about u and becomes all zeros, so the top-k falls to the fewest steps."""
    lo, hi = quality.min(-1, keepdim=True).values, quality.max(-1, keepdim=True).values
    spread = hi - lo
    return torch.where(spread > 0, (quality - lo) / spread.clamp_min(1e-12), torch.zeros_like(quality))


def top_k_mask(q: torch.Tensor, k: int) -> torch.Tensor:
    """[P, N] bool: the k best u per prompt by q; ties go to fewer steps (columns are in increasing u)."""
    order = torch.sort(q, dim=-1, descending=True, stable=True).indices[:, :k]  # stable: lower index first on ties
    return torch.zeros_like(q, dtype=torch.bool).scatter_(-1, order, True)


def reward_table(quality: torch.Tensor, candidates: Sequence[int], k: int, quality_weight: float = 1.0,
                 penalty: float = 1.0, flat_rows: str = "fewest") -> torch.Tensor:  # fmt: skip
    """R_p(u) = O(u) + λ·Q_p(u) on the top-k of Q_p, −γ elsewhere. ``quality`` [P, N] is the seed-averaged IQS
    (raw; normalised here), columns in the order of ``candidates`` (increasing). Returns [P, N]. With
    ``flat_rows="skip"`` a row without spread gets 0 everywhere (no gradient) instead of the tie-break's reward."""
    if quality.ndim != 2 or quality.shape[1] != len(candidates):
        raise UserError(f"quality table must be [prompts, {len(candidates)}], got {list(quality.shape)}")
    q = normalise_quality(quality.float())
    inside = step_saving(candidates) + quality_weight * q
    r = torch.where(top_k_mask(q, k), inside, torch.full_like(q, -penalty))
    if flat_rows == "skip":
        r[quality.max(-1).values == quality.min(-1).values] = 0.0
    return r


def config_rewards(quality: torch.Tensor, config: AdaDiffConfig) -> torch.Tensor:
    """``reward_table`` with the config's k, λ, γ and flat-row rule."""
    return reward_table(quality, config.candidates, config.k, config.quality_weight, config.penalty, config.flat_rows)


# -- policy -------------------------------------------------------------------------------------------------------


class StepPolicy(nn.Module):
    """π_w(u | p) = softmax(MLP(standardise(f(p)))): features [P, D] → logits [P, N]."""

    def __init__(self, in_dim: int, candidates: Sequence[int], hidden: int = 64):
        super().__init__()
        self.candidates = _check_candidates(candidates)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, len(self.candidates)))  # fmt: skip

    @property
    def in_dim(self) -> int:
        return self.feature_mean.numel()

    def set_feature_stats(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-4) if features.shape[0] > 1 else torch.ones_like(
            self.feature_std))  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.feature_mean) / self.feature_std)

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward(features).softmax(-1)


@torch.no_grad()
def text_features(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """[P, 2·D] float32 on CPU: [mean over the prompt's tokens ‖ EOS token] of the text encoder's last hidden state
    (the states the UNet is conditioned on). Padding is excluded from the mean."""
    from .generate import check_prompt_fits

    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise UserError("a prompt is empty: type what the image should show")
        check_prompt_fits(pipe, p)
    tok = pipe.tokenizer
    enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")  # fmt: skip
    ids = enc.input_ids
    te = pipe.text_encoder
    hidden = te(ids.to(te.device), return_dict=False)[0].float().cpu()  # [P, L, D]
    eos = (ids == tok.eos_token_id).int().argmax(-1)  # first EOS (SD's pad token is EOS too)
    mask = (torch.arange(ids.shape[1])[None] <= eos[:, None]).float()  # BOS … EOS
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.cat([mean, hidden[torch.arange(len(ids)), eos]], -1)


# -- losses (§3.2, §3.6) ------------------------------------------------------------------------------------------


def expected_reward_loss(logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """−mean_p Σ_u π(u|p)·R_p(u): the exact objective, its gradient is the expectation of REINFORCE's."""
    return -(logits.softmax(-1) * rewards).sum(-1).mean()


def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                   baseline: torch.Tensor | float = 0.0, entropy_bonus: float = 0.0) -> torch.Tensor:  # fmt: skip
    """−mean_p [(R_p(u_p) − b_p)·log π(u_p|p) + β·H(π(·|p))] for sampled actions ``u_p`` [P] (indices) and their
    rewards [P]; the baseline ([P] or scalar) is held constant."""
    log_pi = logits.log_softmax(-1)
    advantages = rewards - torch.as_tensor(baseline, dtype=rewards.dtype).detach()
    chosen = log_pi.gather(-1, actions[:, None])[:, 0]
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    return -(advantages.detach() * chosen + entropy_bonus * entropy).mean()


def policy_gradient_loss(
    logits: torch.Tensor,
    rewards: torch.Tensor,
    config: AdaDiffConfig,
    generator: torch.Generator | None = None,
    state: dict | None = None,
) -> torch.Tensor:
    """The configured loss on a minibatch: logits and full reward rows [P, N]. ``state`` carries the moving-average
    baseline between calls."""
    if config.loss == "expected":
        return expected_reward_loss(logits, rewards)
    probs = logits.detach().softmax(-1)
    actions = torch.multinomial(probs, 1, generator=generator)[:, 0]
    r = rewards.gather(-1, actions[:, None])[:, 0]
    if config.loss == "reinforce":
        return reinforce_loss(logits, actions, r, 0.0, config.entropy_bonus)
    if config.baseline == "exact":
        b = (probs * rewards).sum(-1)
    else:
        state = state if state is not None else {}
        b = torch.as_tensor(state.get("baseline", float(r.mean())))
        state["baseline"] = config.baseline_momentum * float(b) + (1 - config.baseline_momentum) * float(r.mean())
    return reinforce_loss(logits, actions, r, b, config.entropy_bonus)


# -- training on the cached table ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    policy: StepPolicy
    history: list[dict] = field(default_factory=list)  # one record per epoch: loss, expected reward, mean steps


def train_policy(features: torch.Tensor, rewards: torch.Tensor, config: AdaDiffConfig,
                 callback: Callable[[dict], bool | None] | None = None) -> TrainResult:  # fmt: skip
    """REINFORCE on a cached reward table: features [P, D], rewards [P, N] (``reward_table``). Pure: no generator
    calls. ``callback(record)`` after every epoch; returning True stops early."""
    if features.shape[0] != rewards.shape[0] or rewards.shape[1] != len(config.candidates):
        raise UserError(f"features {list(features.shape)} and rewards {list(rewards.shape)} do not match "
                        f"{len(config.candidates)} candidates")  # fmt: skip
    if features.shape[0] == 0:
        raise UserError("no training prompts")
    gen = torch.Generator().manual_seed(config.seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)  # nn.Linear initialisation; the global state is restored below
    policy = StepPolicy(features.shape[1], config.candidates, config.hidden)
    torch.random.set_rng_state(torch_state)
    policy.set_feature_stats(features)
    opt = torch.optim.Adam(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    u = torch.tensor(config.candidates, dtype=torch.float32)
    n, state, history = features.shape[0], {}, []
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        losses = []
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = policy_gradient_loss(policy(features[idx]), rewards[idx], config, gen, state)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            probs = policy.probs(features)
            chosen = probs.argmax(-1)
            record = {
                "epoch": epoch + 1,
                "loss": sum(losses) / len(losses),
                "expected_reward": float((probs * rewards).sum(-1).mean()),
                "argmax_reward": float(rewards.gather(-1, chosen[:, None]).mean()),
                "mean_steps": float(u[chosen].mean()),
            }
        history.append(record)
        if callback is not None and callback(record):
            break
    policy.eval()
    return TrainResult(policy, history)


# -- the ladder: images at every candidate u, scored once ---------------------------------------------------------


@dataclass
class Ladder:
    """Per prompt, seed and candidate: the IQS of the image. ``scores`` [P, S, N]; ``images`` [P, S, N, 3, H, W]
    when kept."""

    prompts: list[str]
    seeds: torch.Tensor  # [P, S] int64
    candidates: tuple[int, ...]
    scores: torch.Tensor
    images: torch.Tensor | None = None
    seconds: float = 0.0
    nfe: int = 0  # UNet rows evaluated (a CFG step counts 2 per image)

    @property
    def quality(self) -> torch.Tensor:
        """Seed-averaged IQS [P, N]."""
        return self.scores.mean(1)


@torch.no_grad()
def render(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, sampler: str, guidance: float,
           negative_prompt: str = "") -> tuple[torch.Tensor, int]:  # fmt: skip
    """One deterministic (η = 0) sample per (prompt, seed) pair, prompts may differ → (images [B, 3, H, W] in
    [0, 1], UNet rows evaluated). Image b equals ``generate(SampleRequest(prompts[b], steps, seed=seeds[b],
    …)).images[0]``."""
    from .denoisers import CFGDenoiser, CountingDenoiser, unet_denoiser
    from .generate import decode, encode, sampler_setup, schedule_tensors
    from .sampling import initial_noise, sample_loop

    guided = guidance > 1.0
    cond, uncond = encode(pipe, list(prompts), [negative_prompt] * len(prompts) if guided else None, guided)
    ts, kind, kwargs = sampler_setup(pipe, sampler, steps)
    alphas, final_alpha = schedule_tensors(pipe, pipe.device)
    unet = pipe.unet
    shape = (len(prompts), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x_T = initial_noise(shape, gens, pipe.device, dtype=torch.float32)
    counter = CountingDenoiser(unet_denoiser(unet))
    denoiser = CFGDenoiser(counter, uncond, guidance)
    final, _ = sample_loop(denoiser, x_T, cond, ts, alphas, step_kind=kind, eta=0.0,
                           prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
                           final_alpha_cumprod=final_alpha, generator=gens, record=False,
                           step_kwargs=kwargs)  # fmt: skip
    return decode(pipe, final), counter.rows


def build_quality_table(pipe, prompts: Sequence[str], candidates: Sequence[int], iqs: Callable, *,
                        seeds: torch.Tensor, sampler: str = "ddim-trailing", guidance: float = 3.0,
                        batch_size: int = 64, keep_images: bool = False,
                        progress: Callable[[int, int, str], None] | None = None) -> Ladder:  # fmt: skip
    """Render every prompt's ladder (``seeds`` [P, S] shared across u) and score each image with
    ``iqs(images, prompts) -> [B]``. One sampling pass per candidate; ``progress(done, total, text)`` after each
    chunk, in network evaluations."""
    candidates = _check_candidates(candidates)
    prompts = list(prompts)
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if seeds.ndim != 2 or seeds.shape[0] != len(prompts):
        raise UserError(f"seeds must be [prompts, seeds per prompt], got {list(seeds.shape)}")
    n_p, n_s = seeds.shape
    flat_prompts = [p for p in prompts for _ in range(n_s)]
    flat_seeds = seeds.flatten().tolist()
    scores = torch.zeros(n_p * n_s, len(candidates))
    images = None
    total, done, nfe = sum(candidates) * len(flat_prompts), 0, 0
    start = time.perf_counter()
    for j, u in enumerate(candidates):
        for lo in range(0, len(flat_prompts), batch_size):
            ps, ss = flat_prompts[lo : lo + batch_size], flat_seeds[lo : lo + batch_size]
            x, rows = render(pipe, ps, ss, u, sampler, guidance)
            nfe += rows
            scores[lo : lo + len(ps), j] = torch.as_tensor(iqs(x, ps), dtype=torch.float32).flatten().cpu()
            if keep_images:
                if images is None:
                    images = torch.zeros(n_p * n_s, len(candidates), *x.shape[1:])
                images[lo : lo + len(ps), j] = x
            done += u * len(ps)
            if progress is not None:
                progress(done, total, f"{u} step{'s' * (u > 1)}: {lo + len(ps)}/{len(flat_prompts)} images")
    return Ladder(prompts, seeds, candidates, scores.view(n_p, n_s, -1),
                  images.view(n_p, n_s, *images.shape[1:]) if images is not None else None,
                  time.perf_counter() - start, nfe)  # fmt: skip


def score_images(images: torch.Tensor, prompts: Sequence[str], iqs: Callable, chunk: int = 2048) -> torch.Tensor:
    """IQS [P, S, N] of a rendered ladder's images [P, S, N, 3, H, W] (prompt p's images all scored against
    ``prompts[p]``), ``chunk`` images per call."""
    p, s, n = images.shape[:3]
    flat = images.flatten(0, 2)
    flat_prompts = [q for q in prompts for _ in range(s * n)]
    out = [torch.as_tensor(iqs(flat[i : i + chunk], flat_prompts[i : i + chunk]), dtype=torch.float32).flatten().cpu()
           for i in range(0, len(flat_prompts), chunk)]  # fmt: skip
    return torch.cat(out).view(p, s, n)


# IQS names beyond the reward registry: (registry reward, transform of its value)
IQS_ALIASES = {"shapes-probability": ("shapes-probe", torch.exp)}  # P(image satisfies prompt) ∈ [0, 1]: a soft accuracy


def make_iqs(name: str, device=None, weights=None) -> Callable:
    """A reward from the registry (or an ``IQS_ALIASES`` name) as an IQS ``fn(images, prompts) -> [B]``, no
    gradients. "shapes-probability" is the probe's probability that the image satisfies the prompt: exact accuracy
    made continuous, so that few seeds do not leave every u tied (§3.5, noisy IQS). ``weights``: the reward's weights
    folder (for the Shapes rewards, another probe than the shipped one)."""
    from .rewards import make_reward

    base, transform = IQS_ALIASES.get(name, (name, None))
    reward = make_reward(base, device=device, weights=weights)

    @torch.no_grad()
    def iqs(images, prompts):
        r, _ = reward(images, list(prompts), [{} for _ in prompts])
        r = torch.as_tensor(r).detach().float().cpu()
        return transform(r) if transform is not None else r

    return iqs


def check_quality(quality: str, prompts: Sequence[str], pipe=None) -> None:
    """A ``UserError`` before anything is rendered when the IQS cannot score the ladder: the Shapes probe's scores
    read Shapes captions only, on images of the Shapes world's size (``pipe``: the model that would draw them)."""
    from .rewards import check_reward_fits
    from .shapes.world import parse_prompt

    base = IQS_ALIASES.get(quality, (quality,))[0]
    if not base.startswith("shapes-"):
        return
    if bad := next((p for p in prompts if parse_prompt(p) is None), None):
        raise UserError(f"the quality score {quality} reads Shapes captions only, and {bad[:80]!r} is not one: "
                        "score other prompts with a preference model learned in the Label tab")  # fmt: skip
    if pipe is not None:
        check_reward_fits(base, pipe)


def ladder_seeds(n_prompts: int, num_seeds: int, base: int = 0) -> torch.Tensor:
    """[P, S]: prompt i uses seeds base + i·S … base + i·S + S − 1 (distinct across prompts, shared across u)."""
    return base + torch.arange(n_prompts * num_seeds, dtype=torch.int64).view(n_prompts, num_seeds)


# -- inference -----------------------------------------------------------------------------------------------------


def check_policy_fits(pipe, policy: StepPolicy) -> None:
    d = 2 * pipe.text_encoder.config.hidden_size
    if d != policy.in_dim:
        raise UserError(f"this policy reads {policy.in_dim} text features but the model's text encoder gives {d}: "
                        "it was trained for another model")  # fmt: skip


def choose_steps(pipe, policy: StepPolicy, prompts: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """u* = argmax_u π(u|p) per prompt, and the probabilities [P, N] (columns: ``policy.candidates``)."""
    check_policy_fits(pipe, policy)
    with torch.no_grad():
        probs = policy.probs(text_features(pipe, prompts))
    return [policy.candidates[i] for i in probs.argmax(-1).tolist()], probs


def adaptive_request(request, steps: int, config: AdaDiffConfig | None = None):
    """``request`` at the policy's step count and, given the policy's ``config``, with the sampler and guidance its
    ladder was rendered with: its choice of step count was learned for those (trailing DDIM at 4 steps is not
    leading DDIM at 4 steps)."""
    if config is None:
        return replace(request, steps=steps)
    return replace(request, steps=steps, sampler=config.sampler, guidance=config.guidance)


def generate_adaptive(pipe, policy: StepPolicy, request, callback=None, config: AdaDiffConfig | None = None):
    """``generate`` with the step count chosen by the policy for ``request.prompt`` (``request.steps`` is ignored;
    with ``config``, the policy's sampler and guidance too: ``adaptive_request``). The result's ``info`` holds
    ``adaptive_steps`` and ``adaptive_probs`` (one per candidate)."""
    from .generate import generate

    steps, probs = choose_steps(pipe, policy, [request.prompt])
    result = generate(pipe, adaptive_request(request, steps[0], config), callback=callback)
    result.info.update(adaptive_steps=steps[0], adaptive_probs=probs[0].tolist(),
                       adaptive_candidates=list(policy.candidates))  # fmt: skip
    return result


# -- persistence ---------------------------------------------------------------------------------------------------


def validate_policy_name(name: str) -> str:
    return check_name(name, "policy", MAX_POLICY_NAME)


def policy_path(root: str | Path, name: str) -> Path:
    """``root/name``, refusing any name that could leave ``root``."""
    return child_folder(root, name, "policy", MAX_POLICY_NAME, "policies")


def shipped_policy(name) -> Path | None:
    """The folder of the shipped policy ``name`` (``SHIPPED_POLICIES``), or None."""
    from .models import ASSETS

    return ASSETS / SHIPPED_POLICIES[name] if name in SHIPPED_POLICIES else None


def _is_policy(folder: Path) -> bool:
    return (folder / POLICY_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def find_policy(root: str | Path, name: str) -> Path:
    """The folder of the policy ``name``: the one saved in ``root``, else the shipped one of that name, else
    ``root/name`` (which ``load_policy`` reports as missing). Names that could leave ``root`` are refused."""
    folder = policy_path(root, name)
    if not folder.exists() and (shipped := shipped_policy(folder.name)) is not None:
        return shipped
    return folder


def list_policies(root: str | Path) -> list[str]:
    """Names of the saved policies in ``root`` (folders holding both files) and of the shipped ones, sorted."""
    root = Path(root)
    folders = root.iterdir() if root.is_dir() else ()
    saved = {f.name for f in folders if is_valid_name(f.name, MAX_POLICY_NAME) and _is_policy(f)}
    return sorted(saved | set(SHIPPED_POLICIES))


def policy_arg(text: str | Path) -> Path:
    """The CLI's ``--adaptive``: a policy folder, or the name of a shipped policy when no such folder exists."""
    path = Path(text)
    if not path.exists() and (shipped := shipped_policy(str(text))) is not None:
        return shipped
    return path


def save_policy(folder: str | Path, policy: StepPolicy, config: AdaDiffConfig, meta: dict | None = None,
                ladder: Ladder | None = None) -> Path:  # fmt: skip
    """Write ``config.json`` and ``policy.safetensors`` (and the training ladder), each atomically."""
    from safetensors.torch import save as save_bytes

    from .imageio import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if ladder is not None:
        tensors = {"scores": ladder.scores.contiguous(), "seeds": ladder.seeds.contiguous()}
        atomic_write_bytes(folder / TABLE_FILE, save_bytes(tensors, metadata={"prompts": json.dumps(ladder.prompts)}))
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    atomic_write_bytes(folder / POLICY_FILE, save_bytes(state))
    record = {"format": FORMAT, "config": config.to_dict(), "in_dim": policy.in_dim, "meta": meta or {}}
    atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return folder


def load_policy(folder: str | Path) -> tuple[StepPolicy, AdaDiffConfig, dict]:
    """(policy, config, meta) from a folder written by ``save_policy``. Only safetensors weights are read; anything
    else (a pickle, a missing or foreign file) is a ``UserError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"policy folder {str(folder)!r} does not exist")
    if not (folder / POLICY_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{str(folder)!r} is not an AdaDiff policy: it needs {CONFIG_FILE} and {POLICY_FILE} "
                        "(only safetensors weights are loaded)")  # fmt: skip
    try:
        record = json.loads((folder / CONFIG_FILE).read_text())
        if record.get("format") != FORMAT:
            raise UserError(f"{str(folder)!r} holds format {record.get('format')!r}, not {FORMAT!r}")
        config = AdaDiffConfig.from_dict(record["config"])
        in_dim = int(record["in_dim"])
        state = load_file(folder / POLICY_FILE)
        policy = StepPolicy(in_dim, config.candidates, config.hidden)
        policy.load_state_dict(state)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise UserError(f"the policy in {str(folder)!r} is corrupt ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e  # fmt: skip
    return policy.eval().requires_grad_(False), config, record.get("meta", {})


def load_ladder(folder: str | Path) -> Ladder | None:
    """The training ladder saved beside a policy (scores only), or None."""
    from safetensors import safe_open

    path = Path(folder) / TABLE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        scores, seeds = f.get_tensor("scores"), f.get_tensor("seeds")
    _, config, _ = load_policy(folder)
    return Ladder(prompts, seeds, config.candidates, scores)


# -- the driver: ladder → reward table → policy --------------------------------------------------------------------


def training_prompts(n: int, seed: int = 1, three_share: float = 0.0) -> list[str]:
    """``n`` Shapes captions drawn from the world's training mix (``random_spec``), repeats allowed, so that the
    templates keep the world's shares. Distinct captions would not: the world has 18 single-object captions and
    thousands of relations, and every single-object caption is among the evaluation prompts, so distinct captions
    outside them are almost all relations. Render them at ``TRAIN_SEED_BASE`` onwards: the images are then never
    the evaluation's (prompt i of ``eval_prompts`` at seed i), though their captions may be. The draws are
    ``eval_prompts``' own, from another seed."""
    from .shapes.world import eval_prompts

    return eval_prompts(n, seed=seed, three_share=three_share)


def fit(pipe, prompts: Sequence[str], config: AdaDiffConfig, iqs: Callable, *, ladder: Ladder | None = None,
        seed_base: int = TRAIN_SEED_BASE, progress: Callable[[str, float, dict], bool | None] | None = None,
        batch_size: int = 64) -> tuple[TrainResult, Ladder, torch.Tensor]:  # fmt: skip
    """The whole AdaDiff training: render and score the ladder (unless given), build R, train π on it.
    ``progress(phase, fraction, info)`` reports ("ladder" | "policy"); returning True during "policy" stops.
    Returns (result, ladder, rewards [P, N])."""
    if ladder is None:
        seeds = ladder_seeds(len(prompts), config.num_seeds, seed_base)

        def on_chunk(done, total, text):
            if progress is not None:
                progress("ladder", done / total, {"text": text})

        ladder = build_quality_table(pipe, prompts, config.candidates, iqs, seeds=seeds, sampler=config.sampler,
                                     guidance=config.guidance, batch_size=batch_size, progress=on_chunk)  # fmt: skip
    rewards = config_rewards(ladder.quality, config)
    features = text_features(pipe, ladder.prompts)

    def on_epoch(record):
        if progress is not None:
            return progress("policy", record["epoch"] / config.epochs, record)
        return None

    result = train_policy(features, rewards, config, on_epoch)
    return result, ladder, rewards


def split_policy_arg(path: str | Path) -> Path:
    """``--out policies/NAME``: the parent is the policies folder and the last part the validated name."""
    p = typed_path(path, "--out folder")  # an over-long or NUL-holding path: a message, not an OSError
    return policy_path(p.parent, p.name)
