"""The training driver of SDPO, DDPO, RLR and the backprop baselines (ALGORITHMS.md §0–§2): a thin loop over the
shared pure core.

    train(run_dir, config, stop_event=None, on_metrics=None)   # a new run
    train(run_dir, resume=True)                                # continue from the last complete checkpoint

One epoch: sample (SDPO: pairs from one x_T, η = 1, CFG off; DDPO: single trajectories, η = 1), reward
(SDPO: dense rewards from 3 queries per trajectory; DDPO: the final image), advantages (per (prompt, step)
or per prompt FIFO), then updates (SDPO: step-shuffled columns, an optimiser step every ``grad_accum``
minibatches; DDPO: PPO over all K steps accumulated into one optimiser step). RLR, DRaFT-K ("draft"), full
backprop ("bptt") and REINFORCE sample and backpropagate in one pass per sampling batch (``rlr.py``; settings in
``TrainConfig.rlr``), an optimiser step every ``grad_accum`` batches. AdamW, gradient norm clipped.
Every ``eval_every`` epochs: mean reward (and Shapes probe accuracy) at ``eval_steps`` with the
deterministic sampler on fixed prompts and seeds. The run folder layout is in ``runs.py``.

Fault injection, for the tests of what the app shows when training fails: with the environment variable
``FINETUNERS_INJECT_NAN_LOSS=N`` set, every loss after the first N optimiser steps is replaced by NaN, so the
run fails the way a diverging one does. Unset (the default), nothing changes.

The same code runs in one process and under ``accelerate launch --num_processes N -m finetuners train …``:
each process samples its own prompts and noise, gradients are averaged before every optimiser step and
advantages normalised over all processes' samples (``distributed.py``); only the main process writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import runs
from .distributed import Dist
from .errors import UserError
from .rl import PerPromptStatTracker, ddpo_advantages, ppo_clip_loss, ratio_clip_fraction, transition_log_probs
from .rlr import GRADIENT_METHODS, RLRConfig
from .sdpo import (
    PairSteps,
    SDPOConfig,
    dense_rewards,
    discounted_returns,
    iter_minibatches,
    latent_reward,
    pair_generators,
    sample_pairs,
    sdpo_advantages,
    sdpo_minibatch_loss,
    shuffle_steps,
    step_tracker,
    step_weights,
    train_timesteps,
    training_reward,
)

log = logging.getLogger(__name__)
INJECT_NAN_ENV = "FINETUNERS_INJECT_NAN_LOSS"  # test hook: NaN losses after this many optimiser steps
METHODS = ("sdpo", "ddpo", *GRADIENT_METHODS)
PROMPT_SETS = ("shapes",)
MAX_PROMPT_LIST = 100_000  # TrainConfig.prompt_list
CONFIG_VERSION = 1


class TrainingFailed(RuntimeError):
    """The run cannot go on (e.g. a NaN loss); status.json says why."""


@dataclass(frozen=True)
class TrainConfig:
    """What ``train`` needs beyond the method's hyper-parameters (``algo``, an ``SDPOConfig``; DDPO uses the
    same keys: sample batches, K, η, lr, clip range, tracker, adv clip)."""

    method: str = "sdpo"
    algo: SDPOConfig = field(default_factory=lambda: SDPOConfig.preset("shapes"))
    reward_weights: str | None = None  # local path for rewards that need weights (and the Shapes probe)
    device: str = "cpu"
    eval_every: int = 5  # epochs between evaluations (also before the first and after the last epoch)
    num_eval_prompts: int = 8
    checkpoint_every: int = 1  # epochs between checkpoints (also at stop and at the end)
    keep_checkpoints: int = 3
    rlr: RLRConfig = field(default_factory=RLRConfig)  # the gradient methods' chain and estimator (rlr.py)
    # the user's prompts: training draws from them, evaluation takes the first num_eval_prompts (cycled); empty: the
    # Shapes world's captions (algo.prompts), random ones to train, world.eval_prompts to evaluate
    prompt_list: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.algo.prompts not in PROMPT_SETS:
            raise UserError(f"unknown prompt set {self.algo.prompts!r}: choose one of {', '.join(PROMPT_SETS)}")
        for name, lo, hi in [("eval_every", 1, 10**6), ("num_eval_prompts", 1, 4096),
                             ("checkpoint_every", 1, 10**6), ("keep_checkpoints", 1, 1000)]:  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise UserError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
        if self.method in GRADIENT_METHODS and self.algo.train_sampler != "ddim":
            raise UserError(f"{self.method.upper()} trains on the DDIM chain: LCM training steps are for SDPO and DDPO")
        if self.method == "sdpo" and self.algo.num_steps < 2:
            raise UserError("SDPO needs at least 2 training steps: a pair's two trajectories start from the same x_T, "
                            "so at one step their only x̂0 is the same image, every reward difference is 0 and "
                            "nothing trains. For a 1-step model train 2 steps (step 0 is the 1-step model's only "
                            "step), or train 1 step with DDPO or full backprop (bptt)")  # fmt: skip
        from .rewards import reward_spec

        spec = reward_spec(self.algo.reward)
        if self.method in GRADIENT_METHODS and not spec.differentiable:
            raise UserError(f"{self.method.upper()} backpropagates through the reward, and {self.algo.reward!r} is not "
                            "differentiable: choose shapes-probe or a preference:… reward, or SDPO / DDPO")  # fmt: skip
        if not isinstance(self.rlr, RLRConfig):
            raise UserError("rlr must be RLR settings")
        check_prompt_list(self.prompt_list, self.algo.reward)
        if self.method == "rlr" and self.rlr.c_fo == self.rlr.c_ho == self.rlr.c_zo == 0:
            raise UserError("RLR's coefficients c_fo, c_ho and c_zo are all 0: the gradient is 0 and nothing trains")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["algo"] = self.algo.to_dict()
        d["algo"]["adam_betas"] = list(d["algo"]["adam_betas"])
        d["algo"]["eval_steps"] = list(d["algo"]["eval_steps"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        algo = dict(d.pop("algo"))
        algo["adam_betas"] = tuple(algo["adam_betas"])
        algo["eval_steps"] = tuple(algo["eval_steps"])
        rlr = RLRConfig.from_dict(d.pop("rlr", None))  # runs from before RLR have none: the defaults
        prompts = d.pop("prompt_list", ())  # runs from before prompt lists have none
        if not isinstance(prompts, list | tuple):
            raise UserError(f"prompt_list must be a list of prompts, got {type(prompts).__name__}")
        return cls(algo=SDPOConfig(**algo), rlr=rlr, prompt_list=tuple(prompts), **d)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def check_prompt_list(prompts, reward: str) -> None:
    """A ``UserError`` in words unless ``prompts`` is a tuple of at most ``MAX_PROMPT_LIST`` prompts, each non-empty
    text without surrounding spaces, of at most ``MAX_PROMPT_CHARS`` characters, and a Shapes caption where the
    reward reads Shapes captions only (the shapes-* rewards; a preference model reads any prompt)."""
    from .generate import MAX_PROMPT_CHARS, is_text
    from .shapes.world import parse_prompt

    if not isinstance(prompts, tuple) or not all(isinstance(p, str) for p in prompts):
        raise UserError("the prompt list must be a list of texts")
    if len(prompts) > MAX_PROMPT_LIST:
        raise UserError(f"at most {MAX_PROMPT_LIST} prompts, got {len(prompts)}")
    for p in prompts:
        if not p.strip() or p != p.strip():
            raise UserError(f"every prompt must be non-empty text without surrounding spaces, got {p[:80]!r}")
        if len(p) > MAX_PROMPT_CHARS:
            raise UserError(f"the prompt {p[:80]!r}… is too long ({len(p)} characters; at most {MAX_PROMPT_CHARS})")
        if not is_text(p):
            raise UserError(f"the prompt {p[:80]!r} holds characters that are not valid text")
        if reward.startswith("shapes-") and parse_prompt(p) is None:
            raise UserError(f"the reward {reward} reads Shapes captions only, and {p[:80]!r} is not one: train on "
                            "other prompts with a preference model learned in the Label tab, or a scorer of real "
                            "images")  # fmt: skip


def training_prompts(cfg: SDPOConfig, epoch: int, batch: int, n: int, rank: int = 0,
                     prompt_list: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """The ``n`` prompts of one sampling batch, each repeated ``cfg.pairs_per_prompt`` times in consecutive rows
    (the last one fewer if that does not divide ``n``); process ``rank`` > 0 (``accelerate launch``) draws its own.
    Drawn uniformly from ``prompt_list`` when given, else random Shapes captions."""
    from .shapes.world import caption, random_spec

    rng = np.random.default_rng([cfg.seed, epoch, batch] + ([rank] if rank else []))
    unique_n = -(-n // cfg.pairs_per_prompt)
    if prompt_list:
        unique = [prompt_list[i] for i in rng.integers(len(prompt_list), size=unique_n)]
    else:
        unique = [caption(random_spec(rng)) for _ in range(unique_n)]
    return [p for p in unique for _ in range(cfg.pairs_per_prompt)][:n]


def reads_evaluation(pipe, prompts: list[str]) -> bool:
    """Whether the Shapes probe can score an evaluation: ``pipe`` draws Shapes-sized images and every prompt is a
    Shapes caption. Then every run reports prompt-following accuracy, whatever its reward (a JPEG reward can climb
    while the images stop following their prompts)."""
    from .rewards import check_reward_fits
    from .shapes.world import parse_prompt

    try:
        check_reward_fits("shapes-accuracy", pipe)
    except UserError:
        return False
    return all(parse_prompt(p) is not None for p in prompts)


def evaluation_prompts(config: TrainConfig) -> list[str]:
    """The fixed prompts of every evaluation (prompt i at seed ``eval_seed`` + i): the first ``num_eval_prompts`` of
    the prompt list (cycled where it is shorter), else the Shapes world's held-out captions."""
    from .shapes.world import eval_prompts

    n, prompts = config.num_eval_prompts, config.prompt_list
    return [prompts[i % len(prompts)] for i in range(n)] if prompts else eval_prompts(n)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _cat_steps(parts: list[PairSteps]) -> PairSteps:
    values = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(PairSteps)}
    values["pair_index"] = torch.arange(values["pair_index"].shape[0], device=values["pair_index"].device)
    return PairSteps(**values)


class _Stopper:
    def __init__(self, run_dir: Path, stop_event, dist: Dist):
        self.file, self.event, self.dist = run_dir / "STOP", stop_event, dist

    def __call__(self) -> bool:
        """Stop now? One answer for all processes (they call it at the same points of the loop)."""
        return self.dist.any((self.event is not None and self.event.is_set()) or self.file.exists())


class _Stopped(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, run_dir: Path, config: TrainConfig, pipe, reward_fn, accuracy_fn, dist: Dist | None = None):
        from .denoisers import unet_denoiser
        from .generate import schedule_tensors
        from .lora import add_lora

        self.run_dir, self.config, self.cfg, self.pipe = run_dir, config, config.algo, pipe
        self.dist = dist or Dist()
        self.reward_fn, self.accuracy_fn = reward_fn, accuracy_fn  # evaluation reports these
        self.train_reward_fn = training_reward(reward_fn, self.cfg.reward_variant)
        self.device = pipe.device
        unet = pipe.unet
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if self.cfg.adapter == "lora":
            torch.manual_seed(self.cfg.seed)  # LoRA A is initialised randomly: same config ⇒ same run
            self.params = add_lora(unet, self.cfg.lora_rank)
        else:
            unet.requires_grad_(True)
            self.params = [p for p in unet.parameters() if p.requires_grad]
        unet.train()
        self.denoiser = unet_denoiser(unet)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.learning_rate, betas=self.cfg.adam_betas,
                                           weight_decay=self.cfg.weight_decay, eps=self.cfg.adam_eps)  # fmt: skip
        if config.method == "sdpo":
            self.tracker = step_tracker(self.cfg.buffer_size, self.cfg.min_count)
        else:
            self.tracker = PerPromptStatTracker(self.cfg.buffer_size, self.cfg.min_count)
        self.shuffle_gen = torch.Generator().manual_seed(self.cfg.seed)
        self.alphas, self.final_alpha = schedule_tensors(pipe, self.device)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.step_kwargs: dict = {}
        if self.cfg.train_sampler == "lcm":  # the LCM scheduler's own timesteps, as the model samples
            from .generate import sampler_setup

            self.ts, _, self.step_kwargs = sampler_setup(pipe, "lcm", self.cfg.num_steps)
        else:
            self.ts = train_timesteps(pipe, self.cfg.num_steps, self.cfg.timestep_spacing)
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimiser steps taken
        self.reward_queries = 0  # over all processes (each makes the same number per epoch)
        self.zo_baseline: float | None = None  # running mean reward: the ZO baseline when one perturbation is shared
        self.in_epoch = False
        nan_after = os.environ.get(INJECT_NAN_ENV, "").strip()
        self.inject_nan_after = int(nan_after) if nan_after.isdigit() else None

    # -- state ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        from .lora import save_full_unet, save_lora

        def write(tmp: Path) -> None:
            if self.cfg.adapter == "lora":
                save_lora(self.pipe.unet, tmp / "lora")
            else:
                save_full_unet(self.pipe.unet, tmp / "unet")
            state = {
                "epoch": self.epoch, "global_step": self.global_step, "reward_queries": self.reward_queries,
                "zo_baseline": self.zo_baseline, "optimizer": self.optimizer.state_dict(),
                "tracker": self.tracker.state_dict(),
                "shuffle_rng": self.shuffle_gen.get_state(), "torch_rng": torch.get_rng_state(),
            }  # fmt: skip
            torch.save(state, tmp / runs.CHECKPOINT_STATE)

        return runs.write_checkpoint(self.run_dir, self.global_step, write, self.config.keep_checkpoints)

    def load_checkpoint(self, folder: Path) -> None:
        try:
            state = torch.load(folder / runs.CHECKPOINT_STATE, map_location="cpu", weights_only=True)
            if self.cfg.adapter == "lora":
                self._load_lora(folder / "lora")
            else:
                from diffusers import UNet2DConditionModel

                loaded = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
                self.pipe.unet.load_state_dict(loaded.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
            self.tracker.load_state_dict(state["tracker"])
            self.shuffle_gen.set_state(state["shuffle_rng"])
            torch.set_rng_state(state["torch_rng"])
            self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
            self.reward_queries = int(state["reward_queries"])
            self.zo_baseline = state.get("zo_baseline")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable piece means a corrupt checkpoint
            raise UserError(f"checkpoint {str(folder)!r} is corrupt: {type(e).__name__}: {e}") from e

    def _load_lora(self, folder: Path) -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from .lora import LORA_FILE

        sd = load_file(folder / LORA_FILE)
        sd = {k.removeprefix("unet."): v for k, v in sd.items()}
        result = set_peft_model_state_dict(self.pipe.unet, convert_unet_state_dict_to_peft(sd), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"checkpoint LoRA does not fit this model: unexpected keys {result.unexpected_keys[:3]}")

    # -- sampling and rewards -----------------------------------------------------------------------
    def _prompts(self, batch: int) -> list[str]:
        """The prompts of sampling batch ``batch`` of this epoch (this process's own under ``accelerate launch``)."""
        cfg = self.cfg
        return training_prompts(cfg, self.epoch, batch, cfg.sample_batch_size, self.dist.rank, self.config.prompt_list)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        from .generate import encode

        with torch.no_grad():
            return encode(self.pipe, prompts, None, False)[0].float()

    def _x_T(self, gens: list) -> torch.Tensor:
        from .sampling import initial_noise

        unet = self.pipe.unet
        shape = (len(gens), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        return initial_noise(shape, gens, self.device, dtype=torch.float32)

    def _seeds(self, batch: int, n: int) -> list[int]:
        base = (self.cfg.seed * 1_000_003 + self.epoch * 4096 + batch) * 4096
        offset = self.dist.rank * 1_000_000_007  # each process its own noise (0 in a single process)
        return [(base + i + offset) % (2**40) for i in range(n)]

    def _queried(self, n: int) -> None:
        """Count ``n`` reward queries of this process, and as many of each other one (same batch sizes)."""
        self.reward_queries += n * self.dist.world

    def _sdpo_epoch(self, stop) -> dict:
        cfg = self.cfg
        self.pipe.unet.eval()
        pairs, conds, prompts_all, exact, dense_list = [], [], [], [], []
        for b in range(cfg.num_batches_per_epoch):
            prompts = self._prompts(b)
            cond = self._encode(prompts)
            g_x, g_a, g_b = pair_generators(self._seeds(b, len(prompts)))
            pair = sample_pairs(self.denoiser, self._x_T(g_x), cond, self.ts, self.alphas, generators_a=g_a,
                                generators_b=g_b, eta=cfg.eta, prediction_type=self.prediction_type,
                                final_alpha_cumprod=self.final_alpha, reduction=cfg.log_prob_reduction,
                                step_kind=cfg.train_sampler, step_kwargs=self.step_kwargs)  # fmt: skip
            fn = latent_reward(self.pipe, self.train_reward_fn, prompts + prompts)
            dense = dense_rewards(pair.joint.pred_x0, fn, cosine_clamp=cfg.cosine_clamp)
            self._queried(dense.queries_per_trajectory * 2 * len(prompts))
            pairs.append(pair)
            conds.append(cond)
            prompts_all.append(prompts)
            exact.append(dense.exact[:, 2])
            dense_list.append(discounted_returns(dense.rewards, cfg.gamma))
            if stop():
                raise _Stopped
        flat_prompts = [p for ps in prompts_all for p in ps + ps]
        returns = torch.cat(dense_list)
        adv, adv_info = sdpo_advantages(self.tracker, self.dist.gather_objects(flat_prompts),
                                        self.dist.gather(returns), cfg.adv_clip)  # fmt: skip
        adv = adv[self.dist.rows(returns.shape[0])]  # this process's rows
        weights = step_weights(cfg.num_steps, cfg.lam, cfg.eta_s)
        parts, row = [], 0
        for pair, cond in zip(pairs, conds):
            p = pair.num_pairs
            parts.append(PairSteps.from_pair(pair, adv[row : row + p], adv[row + p : row + 2 * p], weights, cond))
            row += 2 * p
        steps_all = _cat_steps(parts)
        self.pipe.unet.train()
        losses, norms, clipfracs, kls, n_mb = [], [], [], [], 0
        t0 = time.perf_counter()
        updates0 = self.global_step
        for _ in range(cfg.inner_epochs):
            shuffled = shuffle_steps(steps_all, self.shuffle_gen)
            for _column, mb in iter_minibatches(shuffled, cfg.train_batch_size):
                loss, info = sdpo_minibatch_loss(self.denoiser, mb, self.alphas, clip_range=cfg.clip_range,
                                                 eta=cfg.eta, prediction_type=self.prediction_type,
                                                 final_alpha_cumprod=self.final_alpha,
                                                 reduction=cfg.log_prob_reduction, step_kind=cfg.train_sampler,
                                                 step_kwargs=self.step_kwargs)  # fmt: skip
                self._check_finite(loss)
                (loss / cfg.grad_accum).backward()
                losses.append(float(loss.detach()))
                clipfracs.append(info["clipfrac"])
                kls.append(info["approx_kl"])
                n_mb += 1
                if n_mb % cfg.grad_accum == 0:
                    norms.append(self._optimizer_step())
                if stop():
                    raise _Stopped
        seconds = time.perf_counter() - t0
        rewards = self.dist.gather(torch.cat(exact))
        return {
            "loss": _mean(losses), "grad_norm": _mean(norms), "clipfrac": _mean(clipfracs), "approx_kl": _mean(kls),
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "updates": self.global_step - updates0, "train_seconds": seconds,
            "iterations_per_s": (self.global_step - updates0) / max(seconds, 1e-9), **adv_info,
        }  # fmt: skip

    def _ddpo_epoch(self, stop) -> dict:
        from .generate import decode
        from .sampling import sample_loop

        cfg = self.cfg
        self.pipe.unet.eval()
        batches = []
        for b in range(cfg.num_batches_per_epoch):
            prompts = self._prompts(b)
            cond = self._encode(prompts)
            g_x, g_a, _ = pair_generators(self._seeds(b, len(prompts)))
            with torch.no_grad():
                final, traj = sample_loop(self.denoiser, self._x_T(g_x), cond, self.ts, self.alphas,
                                          step_kind=cfg.train_sampler, step_kwargs=self.step_kwargs,
                                          eta=cfg.eta, prediction_type=self.prediction_type,
                                          final_alpha_cumprod=self.final_alpha, generator=g_a, record=True,
                                          record_pred_x0=False, reduction=cfg.log_prob_reduction)  # fmt: skip
                rewards, _ = self.train_reward_fn(decode(self.pipe, final), prompts, [{} for _ in prompts])
            self._queried(len(prompts))
            batches.append((prompts, cond, traj, torch.as_tensor(rewards, dtype=torch.float32)))
            if stop():
                raise _Stopped
        prompts = [p for ps, *_ in batches for p in ps]
        local_rewards = torch.cat([r for *_, r in batches])
        rewards = self.dist.gather(local_rewards)
        adv, adv_info = ddpo_advantages(self.tracker, self.dist.gather_objects(prompts), rewards, cfg.adv_clip)
        adv = adv[self.dist.rows(local_rewards.shape[0])]  # this process's rows
        cond = torch.cat([c for _, c, _, _ in batches])
        latents = torch.cat([t.latents for _, _, t, _ in batches])
        old = torch.cat([t.log_probs for _, _, t, _ in batches])[:, : cfg.trained_steps]  # LCM: not the last step
        ts = torch.tensor(batches[0][2].timesteps, device=self.device)
        tn = torch.tensor(batches[0][2].next_timesteps, device=self.device)
        n, k = old.shape
        self.pipe.unet.train()
        losses, clipfracs, norms = [], [], []
        t0 = time.perf_counter()
        updates0 = self.global_step
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(n, generator=self.shuffle_gen)
            step_perm = torch.stack([torch.randperm(k, generator=self.shuffle_gen) for _ in range(n)])
            n_terms = k * math.ceil(n / cfg.train_batch_size)
            for j in range(k):
                for start in range(0, n, cfg.train_batch_size):
                    rows = perm[start : start + cfg.train_batch_size]
                    i = step_perm[rows, j]
                    lp = transition_log_probs(self.denoiser, latents[rows, i], latents[rows, i + 1], ts[i], tn[i],
                                              cond[rows], self.alphas, eta=cfg.eta,
                                              prediction_type=self.prediction_type,
                                              final_alpha_cumprod=self.final_alpha,
                                              reduction=cfg.log_prob_reduction, step_kind=cfg.train_sampler,
                                              step_kwargs=self.step_kwargs)  # fmt: skip
                    ratio = torch.exp(lp - old[rows, i].to(lp.device))
                    loss = ppo_clip_loss(adv[rows].to(lp.device), ratio, cfg.clip_range)
                    self._check_finite(loss)
                    (loss / n_terms).backward()
                    losses.append(float(loss.detach()))
                    clipfracs.append(ratio_clip_fraction(ratio.detach(), cfg.clip_range))
                    if stop():
                        raise _Stopped
            norms.append(self._optimizer_step())
        seconds = time.perf_counter() - t0
        return {
            "loss": _mean(losses), "grad_norm": _mean(norms), "clipfrac": _mean(clipfracs),
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "updates": self.global_step - updates0, "train_seconds": seconds,
            "iterations_per_s": (self.global_step - updates0) / max(seconds, 1e-9), **adv_info,
        }  # fmt: skip

    def _gradient_epoch(self, stop) -> dict:
        """RLR, DRaFT-K, full backprop or REINFORCE (``rlr.py``) on the DDIM chain of the training timesteps, with the
        reward backpropagated through the VAE decoder; one optimiser step every ``grad_accum`` sampling batches."""
        from .generate import decode_differentiable
        from .rlr import DiffusionChain, reinforce_backward, rlr_backward, truncated_backward

        cfg, rc, method = self.cfg, self.config.rlr, self.config.method
        self.pipe.unet.train()
        rewards, norms, calls = [], [], []
        t0 = time.perf_counter()
        updates0 = self.global_step
        n = cfg.num_batches_per_epoch
        for b in range(n):
            prompts = self._prompts(b)
            cond = self._encode(prompts)
            seeds = self._seeds(b, len(prompts))
            g_x, g_noise, _ = pair_generators(seeds)
            meta = [{} for _ in prompts]

            def reward(x_K, prompts=prompts, meta=meta):
                images = decode_differentiable(self.pipe, x_K)
                return torch.as_tensor(self.train_reward_fn(images, prompts, meta)[0]).to(x_K.device)

            chain = DiffusionChain(self.denoiser, cond, self.ts, self.alphas, self.params, eta=rc.eta,
                                   last_eta=rc.last_eta, prediction_type=self.prediction_type,
                                   final_alpha_cumprod=self.final_alpha)  # fmt: skip
            scale = 1.0 / cfg.grad_accum
            x_T = self._x_T(g_x)
            if method == "rlr":
                block_gen = torch.Generator().manual_seed(seeds[0] ^ 0x5EED)
                info = rlr_backward(chain, x_T, reward, rc, generator=block_gen, zo_seed=seeds[0] ^ 0x2E0,
                                    noise_generator=g_noise, scale=scale, zo_baseline=self.zo_baseline,
                                    dist=self.dist)  # fmt: skip
                self._queried(len(prompts) * (3 if rc.zo_mode == "spsa" and info["zo_steps"] else 1))
            elif method == "reinforce":
                info = reinforce_backward(chain, x_T, reward, noise_generator=g_noise, scale=scale, dist=self.dist)
                self._queried(len(prompts))
            else:
                keep = chain.num_steps if method == "bptt" else rc.truncation
                info = truncated_backward(chain, x_T, reward, keep, noise_generator=g_noise, scale=scale,
                                          checkpointing=rc.checkpointing)  # fmt: skip
                self._queried(len(prompts))
            r = info["reward_mean"]
            self._check_finite(torch.tensor(r))
            self.zo_baseline = r if self.zo_baseline is None else 0.9 * self.zo_baseline + 0.1 * r
            rewards.append(r)
            calls.append(info["grad_unet_calls"])
            if (b + 1) % cfg.grad_accum == 0 or b == n - 1:
                norms.append(self._optimizer_step())
            if stop():
                raise _Stopped
        seconds = time.perf_counter() - t0
        mean = self.dist.gather(torch.tensor(rewards))
        return {
            "loss": -float(mean.mean()), "grad_norm": _mean(norms), "reward_mean": float(mean.mean()),
            "grad_unet_calls": _mean(calls),
            "updates": self.global_step - updates0, "train_seconds": seconds,
            "iterations_per_s": (self.global_step - updates0) / max(seconds, 1e-9),
        }  # fmt: skip

    def _check_finite(self, loss: torch.Tensor) -> None:
        if self.inject_nan_after is not None and self.global_step >= self.inject_nan_after:
            loss = loss.detach() * float("nan")  # the documented fault-injection hook (module docstring)
        if self.dist.any(not torch.isfinite(loss).all()):  # every process fails together, none waits forever
            raise TrainingFailed(f"the loss became {float(loss.detach())} at epoch {self.epoch + 1} "
                                 f"(optimiser step {self.global_step}); try a lower learning rate")  # fmt: skip

    def _optimizer_step(self) -> float:
        self.dist.all_reduce_grads(self.params)  # the mean gradient of all processes (no-op in one process)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if not torch.isfinite(norm):
            raise TrainingFailed(f"the gradient norm became {float(norm)} at epoch {self.epoch + 1}; "
                                 "try a lower learning rate")  # fmt: skip
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(norm)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward (and probe accuracy) per K_eval, deterministic sampler, fixed prompts and seeds."""
        from .denoisers import CFGDenoiser
        from .generate import decode, encode, sampler_setup
        from .sampling import sample_loop

        cfg = self.cfg
        if not self.dist.is_main:  # evaluation and its sample files are the main process's
            return {}
        self.pipe.unet.eval()
        prompts = evaluation_prompts(self.config)
        guided = cfg.eval_guidance > 1.0
        cond, uncond = encode(self.pipe, prompts, [""] * len(prompts) if guided else None, guided)
        denoiser = CFGDenoiser(self.denoiser, uncond, cfg.eval_guidance)
        out = {}
        for k in cfg.eval_steps:
            ts, kind, kwargs = sampler_setup(self.pipe, cfg.eval_sampler, k)
            gens = [torch.Generator().manual_seed(cfg.eval_seed + i) for i in range(len(prompts))]
            final, _ = sample_loop(denoiser, self._x_T(gens), cond, ts, self.alphas, step_kind=kind, eta=cfg.eval_eta,
                                   prediction_type=self.prediction_type, final_alpha_cumprod=self.final_alpha,
                                   generator=gens, record=False, step_kwargs=kwargs)  # fmt: skip
            images = decode(self.pipe, final)
            rewards, _ = self.reward_fn(images, prompts, [{} for _ in prompts])
            out[f"eval_reward_k{k}"] = float(torch.as_tensor(rewards).mean())
            followed = None
            if self.accuracy_fn is not None:
                followed = torch.as_tensor(self.accuracy_fn(images, prompts, [{}] * len(prompts))[0])
                out[f"eval_accuracy_k{k}"] = float(followed.float().mean())
            runs.write_samples(self.run_dir, f"epoch-{self.epoch:05d}_k{k}", images, prompts, followed)
        self.pipe.unet.train()
        return out


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
def _prepare(run_dir: Path, config: TrainConfig | None, resume: bool) -> tuple[TrainConfig, dict, Path | None]:
    """Validate everything before writing anything. Returns (config, stored config dict, checkpoint)."""
    if not resume:
        if config is None:
            raise UserError("a new run needs a config")
        return config, runs.new_run_record(run_dir, config.algo.model, version=CONFIG_VERSION,
                                           config=config.to_dict()), None  # fmt: skip
    record = runs.read_run_record(run_dir)
    try:
        stored = TrainConfig.from_dict(record["config"])
        fingerprint = record["model_fingerprint"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot resume {str(run_dir)!r}: config.json is corrupt ({e})") from e
    if config is not None and config.to_dict() != stored.to_dict():
        a, b = config.to_dict(), stored.to_dict()
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        diff += sorted(f"algo.{k}" for k in set(a["algo"]) | set(b["algo"]) if a["algo"].get(k) != b["algo"].get(k))
        raise UserError(f"cannot resume {str(run_dir)!r} with a different config ({', '.join(diff)})")
    return stored, record, runs.resume_checkpoint(run_dir, stored.algo.model, fingerprint)


def check_resumable(run_dir: str | Path) -> TrainConfig:
    """The stored config of a run that ``train(run_dir, resume=True)`` can continue; ``UserError`` otherwise
    (no or corrupt config.json, a model changed since the run started, no complete checkpoint). Reads only."""
    return _prepare(Path(run_dir), None, True)[0]


def train(run_dir: str | Path, config: TrainConfig | None = None, *, resume: bool = False, stop_event=None,
          on_metrics=None) -> dict:  # fmt: skip
    """Run (or resume) training into ``run_dir``. Returns the final status dict.

    ``stop_event`` (a ``threading.Event``) or a ``STOP`` file in the run folder stops within one
    minibatch: a checkpoint is written and the status becomes "stopped". ``on_metrics(record)`` is
    called with every metrics line. Bad input raises ``UserError`` before anything is written.
    """
    from .generate import check_prompt_fits
    from .models import load_model
    from .rewards import check_reward_fits, make_reward

    run_dir = Path(run_dir)
    config, record, ckpt = _prepare(run_dir, config, resume)
    dist = Dist.from_environment(config.device)  # accelerate launch: one of several processes
    dist.barrier()  # every process has validated the folder before the main one writes to it
    device = dist.device(config.device)
    cfg = config.algo
    reward_fn = make_reward(cfg.reward, device, config.reward_weights)
    if dist.is_main:
        runs.announce_phase("loading the model")
    pipe = load_model(cfg.model, device, cfg.precision)
    check_reward_fits(cfg.reward, pipe)  # nothing is written yet
    accuracy_fn = None  # whatever the reward, the Shapes probe's accuracy where it can read the evaluation's images
    if reads_evaluation(pipe, evaluation_prompts(config)):
        probe = config.reward_weights if cfg.reward.startswith("shapes-") else None  # else: the scorer's weights
        accuracy_fn = make_reward("shapes-accuracy", device, probe)
    for prompt in dict.fromkeys(config.prompt_list):  # the encoder would cut a longer prompt off silently
        check_prompt_fits(pipe, prompt)
    if device.startswith("cuda") and cfg.tf32 == "on":
        torch.backends.cuda.matmul.allow_tf32 = True
    trainer = Trainer(run_dir, config, pipe, reward_fn, accuracy_fn, dist)
    main = dist.is_main
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)  # UserError on corruption; nothing written yet
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(run_dir / "config.json", record)
    if main:
        (run_dir / "samples").mkdir(exist_ok=True)
    stop = _Stopper(run_dir, stop_event, dist)

    def emit(rec: dict) -> None:
        if not main:  # one metrics file, written by the main process
            return
        rec = {"time": time.time(), **rec}
        runs.append_metrics(run_dir, rec)
        if on_metrics is not None:
            on_metrics(rec)

    def set_status(state: str, **extra) -> None:
        if main:
            runs.write_status(run_dir, state, **extra)

    set_status("running", pid=os.getpid(), epoch=trainer.epoch, processes=dist.world)
    if resume:
        emit({"event": "resumed", "epoch": trainer.epoch, "global_step": trainer.global_step})
    try:
        tracker_snapshot, epoch_start_step = None, trainer.global_step
        if trainer.epoch == 0 and not resume:
            emit({"event": "eval", "epoch": 0, **trainer.evaluate()})
        epoch_fn = {"sdpo": trainer._sdpo_epoch, "ddpo": trainer._ddpo_epoch}.get(
            config.method, trainer._gradient_epoch
        )
        while trainer.epoch < cfg.num_epochs:
            if stop():
                raise _Stopped
            if pipe.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pipe.device)
            t0 = time.perf_counter()
            tracker_snapshot = copy.deepcopy(trainer.tracker.state_dict())
            epoch_start_step, trainer.in_epoch = trainer.global_step, True
            stats = epoch_fn(stop)
            trainer.epoch += 1
            trainer.in_epoch = False
            emit({"event": "epoch", "epoch": trainer.epoch, "global_step": trainer.global_step,
                  "reward_queries": trainer.reward_queries, "seconds": time.perf_counter() - t0,
                  "peak_memory_mb": peak_memory_mb(pipe.device), **stats})  # fmt: skip
            last = trainer.epoch == cfg.num_epochs
            if trainer.epoch % config.eval_every == 0 or last:
                emit({"event": "eval", "epoch": trainer.epoch, **trainer.evaluate()})
            if (trainer.epoch % config.checkpoint_every == 0 or last) and main:
                trainer.save_checkpoint()
    except _Stopped:
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.in_epoch:
            if trainer.global_step > epoch_start_step:  # keep the updates taken; the epoch counts as done (truncated)
                trainer.epoch += 1
            else:  # nothing trained yet: undo the sampling's tracker updates, the epoch reruns on resume
                trainer.tracker.load_state_dict(tracker_snapshot)
        if main and not any(n == trainer.global_step for n, _ in runs.list_checkpoints(run_dir)):
            trainer.save_checkpoint()
        emit({"event": "stopped", "epoch": trainer.epoch, "global_step": trainer.global_step})
        dist.barrier()  # every process has seen the STOP file before it goes
        if main:
            (run_dir / "STOP").unlink(missing_ok=True)
        set_status("stopped", epoch=trainer.epoch)
        return _final(run_dir, dist, "stopped")
    except TrainingFailed as e:
        emit({"event": "failed", "epoch": trainer.epoch, "error": str(e)})
        set_status("failed", error=str(e), epoch=trainer.epoch)
        return _final(run_dir, dist, "failed", str(e))
    except BaseException as e:
        set_status("failed", error=f"{type(e).__name__}: {e}", epoch=trainer.epoch)
        raise
    set_status("finished", epoch=trainer.epoch)
    return _final(run_dir, dist, "finished")


def _final(run_dir: Path, dist: Dist, state: str, error: str | None = None) -> dict:
    """The status dict ``train`` returns: status.json's on the main process, the same words on the others."""
    return runs.read_status(run_dir) if dist.is_main else {"state": state, "error": error}


__all__ = ["METHODS", "TrainConfig", "Trainer", "TrainingFailed", "check_resumable", "train"]
