"""RLR's estimator measured (issue 5, ALGORITHMS.md §2.4 "ours"): bias and variance, memory, time per update.

    python bench/rlr_shapes.py --repeats 32 --batch 8 --steps 4 --memory-steps 8

1. **Linear-Gaussian chain** (``toy.LinearGaussianChain``, J in closed form): the Monte-Carlo mean of every estimator
   against the exact ∇J (z = distance in standard errors), the std of one estimate, and its cost in chain
   evaluations with gradients (memory) and in all chain evaluations (compute). Variance × evaluations compares
   estimators at equal cost.
2. **Shapes model** (the shipped pipeline, LoRA rank 4, probe reward through the VAE decoder, K trailing DDIM steps,
   η = 1, last step η = 0): ``--repeats`` estimates at a fixed θ for each estimator, at K = ``--steps`` and at K = 2
   (where RLR with h = 1 has no zeroth-order step). The table gives each estimator's total variance (trace of the
   covariance of one estimate), the norm of its mean, and the cosine of its mean with full backprop's (unbiased,
   with the least variance), with the cosine of two independent halves of the full-backprop estimates as the
   ceiling that noise allows.
3. **Memory and time** at ``--memory-steps`` K: the peak bytes of tensors saved for backward (counted with
   ``torch.autograd.graph.saved_tensors_hooks``, shared storages once, freed at each backward) and seconds per
   update, for RLR (h = 1, 2), DRaFT-1, full backprop with and without gradient checkpointing. CPU here: the saved
   tensors are what a GPU would hold as activations.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from finetuners.rlr import (  # noqa: E402
    DiffusionChain,
    RLRConfig,
    reinforce_backward,
    rlr_backward,
    truncated_backward,
)
from finetuners.toy import LinearGaussianChain  # noqa: E402


def estimators(k: int, s_nu: float) -> dict:
    """name → (estimate(chain, x_T, reward, gen, seed), UNet calls with gradients, all UNet calls)."""

    def rlr(**kw):
        cfg = RLRConfig(s_nu=s_nu, **kw)
        return lambda c, x, r, g, s: rlr_backward(c, x, r, cfg, generator=g, zo_seed=s, noise_generator=g)

    h_eff = lambda h: min(h, k - 1)  # noqa: E731
    return {
        "BPTT": (lambda c, x, r, g, s: truncated_backward(c, x, r, k, noise_generator=g), k, 2 * k),
        "DRaFT-1 (biased)": (lambda c, x, r, g, s: truncated_backward(c, x, r, 1, noise_generator=g), 1, k + 1),
        "REINFORCE (FO + LR on all steps)": (
            lambda c, x, r, g, s: reinforce_backward(c, x, r, noise_generator=g),
            k,
            2 * k,
        ),  # fmt: skip
        "FO + ZO (h = 0)": (rlr(h=0), 1, k + 1),
        "RLR h = 1": (rlr(h=1), 1 + h_eff(1), k + 1 + h_eff(1)),
        "RLR h = 2": (rlr(h=2), 1 + h_eff(2), k + 1 + h_eff(2)),
        "RLR h = 2, SPSA": (rlr(h=2, zo_mode="spsa"), 1 + h_eff(2), 3 * k + 1 + h_eff(2)),
    }


def grads_of(params) -> torch.Tensor:
    return -torch.cat([p.grad.flatten() for p in params])


def toy_table(repeats: int, batch: int) -> str:
    chain = LinearGaussianChain()
    exact = chain.step_gradients().sum(0)
    lines = [f"exact ∇J = {exact.numpy().round(3).tolist()} (K = {chain.num_steps}, batch {batch}, {repeats} "
             "estimates each)\n", "| estimator | mean | z (SE) | std of one estimate | evals with grad / all | "
             "variance × all evals |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, (fn, grad_calls, calls) in estimators(chain.num_steps, 0.05).items():
        est = []
        for r in range(repeats):
            chain.theta.grad = None
            gen = torch.Generator().manual_seed(r)
            fn(chain, chain.initial(batch, gen), chain.reward, gen, r)
            est.append(grads_of(chain.params))
        est = torch.stack(est)
        z = (est.mean(0) - exact) / (est.std(0) / repeats**0.5)
        var = float(est.var(0).sum())
        lines.append(f"| {name} | {est.mean(0).numpy().round(2).tolist()} | {z.numpy().round(1).tolist()} | "
                     f"{var**0.5:.2f} | {grad_calls} / {calls} | {var * calls:.0f} |")  # fmt: skip
    return "\n".join(lines)


def shapes_setup(k: int, batch: int):
    from finetuners.denoisers import unet_denoiser
    from finetuners.generate import decode_differentiable, encode, schedule_tensors
    from finetuners.lora import add_lora
    from finetuners.models import load_model
    from finetuners.rewards import make_reward
    from finetuners.shapes.world import eval_prompts
    from finetuners.steps import timesteps

    pipe = load_model("shapes", "cpu")
    torch.manual_seed(0)
    params = add_lora(pipe.unet, 4)
    with torch.no_grad():  # a LoRA B that is not zero, so that θ is a generic point
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    prompts = eval_prompts(batch, seed=777)
    cond = encode(pipe, prompts, None, False)[0].detach()
    alphas, final = schedule_tensors(pipe, "cpu")
    chain = DiffusionChain(unet_denoiser(pipe.unet), cond, timesteps(k, "trailing"), alphas, params, eta=1.0,
                           final_alpha_cumprod=final)  # fmt: skip
    probe = make_reward("shapes-probe")
    reward = lambda x: probe(decode_differentiable(pipe, x), prompts, [{}] * len(prompts))[0]  # noqa: E731
    return pipe, chain, reward


def shapes_table(repeats: int, batch: int, k: int, s_nu: float) -> str:
    _, chain, reward = shapes_setup(k, batch)
    names = estimators(k, s_nu)
    if k == 2:  # RLR h = 2 is h = 1 there, and SPSA has no step to perturb
        names = {n: v for n, v in names.items() if n not in ("RLR h = 2", "RLR h = 2, SPSA")}
    results = {}
    for name, (fn, grad_calls, calls) in names.items():
        est, t0 = [], time.perf_counter()
        for r in range(repeats):
            for p in chain.params:
                p.grad = None
            gen = torch.Generator().manual_seed(1000 + r)
            x_T = torch.randn(batch, 4, 8, 8, generator=gen)
            fn(chain, x_T, reward, gen, r)
            est.append(grads_of(chain.params))
        results[name] = (torch.stack(est), grad_calls, calls, (time.perf_counter() - t0) / repeats)
    bptt = results["BPTT"][0]
    ref = bptt.mean(0)
    half = bptt.shape[0] // 2
    ceiling = float(torch.nn.functional.cosine_similarity(bptt[:half].mean(0), bptt[half:].mean(0), dim=0))
    lines = [f"K = {k}, batch {batch}, {repeats} estimates each, LoRA parameters d = {ref.numel()}, s_ν = {s_nu}; "
             f"cosine of two halves of the BPTT estimates: {ceiling:.3f}\n",
             "| estimator | total variance | ‖mean‖ | cos(mean, BPTT mean) | UNet calls with grad / all | "
             "s per estimate |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, (est, grad_calls, calls, sec) in results.items():
        mean = est.mean(0)
        var = float(est.var(0).sum())
        cos = float(torch.nn.functional.cosine_similarity(mean, ref, dim=0))
        lines.append(f"| {name} | {var:.3g} | {float(mean.norm()):.3g} | {cos:.3f} | {grad_calls} / {calls} | "
                     f"{sec:.2f} |")  # fmt: skip
    return "\n".join(lines)


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward; a storage counts once; ``backward_done`` frees the graph's."""

    def __init__(self):
        self.current, self.peak, self.seen = 0, 0, set()

    def pack(self, t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self.seen:
            self.seen.add(key)
            self.current += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.current)
        return t

    def backward_done(self):
        self.current, self.seen = 0, set()


def memory_table(k: int, batch: int) -> str:
    pipe, chain, reward = shapes_setup(k, batch)
    params = chain.params
    meter = SavedTensorMeter()
    original = torch.Tensor.backward

    def counted_backward(self, *a, **kw):  # every estimator frees its graph at each backward
        out = original(self, *a, **kw)
        meter.backward_done()
        return out

    latent_shape = (batch, 4, 8, 8)

    def decoder_only(x, g):  # the VAE decoder and the reward alone: what every method here backpropagates
        leaf = x.clone().requires_grad_(True)
        (-reward(leaf).mean()).backward()

    rows = {
        "decoder + reward alone": decoder_only,
        "RLR h = 1": lambda x, g: rlr_backward(
            chain, x, reward, RLRConfig(h=1), generator=g, zo_seed=0, noise_generator=g
        ),  # fmt: skip
        "RLR h = 2": lambda x, g: rlr_backward(
            chain, x, reward, RLRConfig(h=2), generator=g, zo_seed=0, noise_generator=g
        ),  # fmt: skip
        "DRaFT-1": lambda x, g: truncated_backward(chain, x, reward, 1, noise_generator=g),
        "full backprop": lambda x, g: truncated_backward(chain, x, reward, k, noise_generator=g),
        "full backprop + checkpointing": lambda x, g: truncated_backward(
            chain, x, reward, k, noise_generator=g, checkpointing=True
        ),  # fmt: skip
    }
    lines = [
        f"K = {k}, batch {batch}; saved-for-backward peak in MB; seconds per update (mean of 3)\n",
        "| method | peak saved tensors (MB) | ratio to full backprop | s per update |",
        "|---|---|---|---|",
    ]
    out = {}
    torch.Tensor.backward = counted_backward
    try:
        for name, fn in rows.items():
            meter.peak = 0
            times = []
            for r in range(3):
                for p in params:
                    p.grad = None
                gen = torch.Generator().manual_seed(r)
                x_T = torch.randn(latent_shape, generator=gen)
                t0 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                    fn(x_T, gen)
                times.append(time.perf_counter() - t0)
                meter.backward_done()
            out[name] = (meter.peak / 2**20, sum(times) / len(times))
    finally:
        torch.Tensor.backward = original
    full = out["full backprop"][0]
    for name, (mb, sec) in out.items():
        lines.append(f"| {name} | {mb:.1f} | {mb / full:.2f} | {sec:.2f} |")
    del pipe
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=32)
    p.add_argument("--toy-repeats", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="K of the variance table")
    p.add_argument("--memory-steps", type=int, default=8, help="K of the memory table")
    p.add_argument("--s-nu", type=float, default=1e-3, help="ZO perturbation std on the Shapes model")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Command: `python bench/rlr_shapes.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`\n")
    t0 = time.time()
    print("### Linear-Gaussian chain: bias and variance against the closed form\n")
    print(toy_table(args.toy_repeats, 64))
    print("\n### Shapes model: gradient estimates at a fixed θ\n")
    print(shapes_table(args.repeats, args.batch, args.steps, args.s_nu))
    print()
    print(shapes_table(args.repeats, args.batch, 2, args.s_nu))
    print("\n### Memory and time per update\n")
    print(memory_table(args.memory_steps, args.batch))
    print(f"\nTotal {time.time() - t0:.0f} s, torch threads {args.threads}")


if __name__ == "__main__":
    main()
