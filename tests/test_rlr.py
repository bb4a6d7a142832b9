"""RLR and the backprop baselines (ALGORITHMS.md §2.6): unbiasedness against a closed-form objective, each term
against its own closed form, seed replay, the memory bound in UNet calls, the distributed advantages, and runs."""

from __future__ import annotations

import json

import pytest
import torch

from finetuners.errors import UserError
from finetuners.rlr import (
    DiffusionChain,
    RLRConfig,
    first_order,
    global_advantages,
    half_order_log_prob,
    leave_group_out,
    leave_one_out,
    reinforce_backward,
    rlr_backward,
    sample_chain,
    spsa_gradients,
    truncated_backward,
    zo_noise,
)
from finetuners.toy import LinearGaussianChain

REPEATS, BATCH = 400, 64


def _estimates(chain, estimate, repeats=REPEATS, batch=BATCH) -> torch.Tensor:
    """[repeats, 2]: ĝ of J (= −grad of the loss) from independent batches."""
    out = []
    for r in range(repeats):
        chain.theta.grad = None
        gen = torch.Generator().manual_seed(r)
        estimate(chain.initial(batch, gen), gen, r)
        out.append(-chain.theta.grad.clone())
    return torch.stack(out)


def _z(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """How many standard errors the Monte-Carlo mean lies from ``exact``, per component."""
    return (estimates.mean(0) - exact) / (estimates.std(0) / estimates.shape[0] ** 0.5)


ESTIMATORS = {
    "bptt": lambda c, x, g, r: truncated_backward(c, x, c.reward, c.num_steps, noise_generator=g),
    "reinforce": lambda c, x, g, r: reinforce_backward(c, x, c.reward, noise_generator=g),
    "rlr-h1": lambda c, x, g, r: rlr_backward(
        c, x, c.reward, RLRConfig(h=1, s_nu=0.05), generator=g, zo_seed=r, noise_generator=g
    ),  # fmt: skip
    "rlr-h2": lambda c, x, g, r: rlr_backward(
        c, x, c.reward, RLRConfig(h=2, s_nu=0.05), generator=g, zo_seed=r, noise_generator=g
    ),  # fmt: skip
    "rlr-h2-spsa": lambda c, x, g, r: rlr_backward(
        c, x, c.reward, RLRConfig(h=2, zo_mode="spsa"), generator=g, zo_seed=r, noise_generator=g
    ),  # fmt: skip
    "rlr-h1-budget1": lambda c, x, g, r: rlr_backward(
        c, x, c.reward, RLRConfig(h=1, s_nu=0.05, zo_budget=1), generator=g, zo_seed=r, noise_generator=g
    ),  # fmt: skip
    "rlr-h2-rescale": lambda c, x, g, r: rlr_backward(
        c, x, c.reward, RLRConfig(h=1, ho_rescale=True, zo_mode="off"), generator=g, zo_seed=r, noise_generator=g
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unbiased_estimators_match_the_exact_gradient(name):
    chain = LinearGaussianChain()
    exact = chain.step_gradients().sum(0)
    est = _estimates(chain, lambda x, g, r: ESTIMATORS[name](chain, x, g, r))
    z = _z(est, exact)
    assert z.abs().max() < 4, f"{name}: mean {est.mean(0).tolist()} vs exact {exact.tolist()} (z = {z.tolist()})"
    assert (est.std(0) > 0).all()  # a real Monte-Carlo estimate, not a constant


@pytest.mark.parametrize("name, estimate", [
    ("DRaFT-1", lambda c, x, g, r: truncated_backward(c, x, c.reward, 1, noise_generator=g)),
    ("RLR without ZO", lambda c, x, g, r: rlr_backward(c, x, c.reward, RLRConfig(h=1, zo_mode="off"), generator=g,
                                                       zo_seed=r, noise_generator=g)),
])  # fmt: skip
def test_truncated_estimators_are_detectably_biased(name, estimate):
    chain = LinearGaussianChain()
    exact = chain.step_gradients().sum(0)
    z = _z(_estimates(chain, lambda x, g, r: estimate(chain, x, g, r), repeats=100), exact)
    assert z.abs().max() > 10, f"{name} should miss the steps it drops (z = {z.tolist()})"


def test_first_order_alone_estimates_the_last_step_gradient():
    chain = LinearGaussianChain()
    per_step = chain.step_gradients()
    cfg = RLRConfig(h=0, zo_mode="off")
    est = _estimates(chain, lambda x, g, r: rlr_backward(chain, x, chain.reward, cfg, generator=g, zo_seed=r,
                                                         noise_generator=g))  # fmt: skip
    assert _z(est, per_step[-1]).abs().max() < 4
    assert _z(est, per_step.sum(0)).abs().max() > 10


def _rollout(chain, cfg, seed=0, batch=16):
    gen = torch.Generator().manual_seed(seed)
    return sample_chain(chain, chain.initial(batch, gen), cfg, generator=gen, zo_seed=seed, noise_generator=gen)


def test_half_order_with_h1_is_the_reinforce_score_of_its_step():
    """∇_θ log N(x'; m, s²) with m = (a + θ₀)x + (b + θ₁)u is [Σ x·(x' − m), Σ u·(x' − m)]/s², in closed form."""
    chain = LinearGaussianChain()
    roll = _rollout(chain, RLRConfig(h=1, zo_mode="off"), seed=3)
    (j,) = roll.block
    lp = half_order_log_prob(chain, roll)
    (grad,) = torch.autograd.grad(lp.sum(), chain.theta)
    x, x_next, s = roll.latents[j], roll.latents[j + 1], chain.s[j]
    m = (chain.a[j] + chain.theta[0]) * x + (chain.b[j] + chain.theta[1]) * chain.u
    expected = torch.stack([(x * (x_next - m)).sum(), (chain.u * (x_next - m)).sum()]).detach() / s**2
    torch.testing.assert_close(grad, expected)


def test_the_pathwise_block_gradient_equals_central_differences():
    chain = LinearGaussianChain()
    roll = _rollout(chain, RLRConfig(h=2, zo_mode="off"), seed=5)
    assert len(roll.block) == 2
    lp = half_order_log_prob(chain, roll).sum()
    (grad,) = torch.autograd.grad(lp, chain.theta)
    eps, fd = 1e-5, []
    for k in range(2):
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                chain.theta[k] += sign * eps
                vals.append(float(half_order_log_prob(chain, roll).sum()))  # same stored noises
                chain.theta[k] -= sign * eps
        fd.append((vals[0] - vals[1]) / (2 * eps))
    torch.testing.assert_close(grad, torch.tensor(fd, dtype=grad.dtype), rtol=1e-6, atol=1e-6)


def test_spsa_is_the_exact_directional_derivative_on_a_quadratic():
    """K = 2, C = {0}: x^(2) is affine in step 0's parameters, r quadratic, so (r₊ − r₋)/2ε is exact."""
    chain = LinearGaussianChain(a=(0.9, 0.8), b=(0.5, -0.3), s=(0.6, 0.0))
    cfg = RLRConfig(h=0, zo_mode="spsa", zo_groups=1, spsa_eps=0.1)
    gen = torch.Generator().manual_seed(1)
    x_T = chain.initial(8, gen)
    roll = sample_chain(chain, x_T, cfg, generator=gen, zo_seed=11, noise_generator=gen)
    assert roll.zo_steps == (0,)
    (g,) = spsa_gradients(chain, roll, x_T, chain.reward, cfg.spsa_eps)
    nu = torch.randn((1, 2), generator=torch.Generator().manual_seed(11), dtype=torch.float32).double()[0]
    theta0 = chain.theta.detach().clone().requires_grad_(True)  # step 0's own copy
    gain, shift = chain.a[0] + theta0[0], chain.b[0] + theta0[1]
    x1 = gain * x_T + shift * chain.u + chain.s[0] * roll.noises[0]
    x2, _ = chain.mean_std(x1, 1, None)
    (d,) = torch.autograd.grad(chain.reward(x2).mean(), theta0)
    torch.testing.assert_close(g.double(), (d @ nu) * nu, rtol=1e-5, atol=1e-8)


def test_zero_order_noise_replays_from_its_seed():
    chain = LinearGaussianChain()
    a = zo_noise(chain.params, 7, (0, 2), 3, 1e-3)
    b = zo_noise(chain.params, 7, (0, 2), 3, 1e-3)
    c = zo_noise(chain.params, 8, (0, 2), 3, 1e-3)
    assert all(torch.equal(x, y) for i in (0, 2) for x, y in zip(a[i], b[i]))
    assert not torch.equal(a[0][0], c[0][0])
    grads = []
    for seed in (7, 7, 8):
        chain.theta.grad = None
        gen = torch.Generator().manual_seed(0)
        rlr_backward(chain, chain.initial(16, gen), chain.reward, RLRConfig(h=1, s_nu=0.05), generator=gen,
                     zo_seed=seed, noise_generator=gen)  # fmt: skip
        grads.append(chain.theta.grad.clone())
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])


def test_leave_one_out_and_group_baselines():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(leave_one_out(r), torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]))
    groups = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(leave_group_out(r, groups), torch.tensor([1 - 4.5, 2 - 4.5, 3 - 1.5, 6 - 1.5]))
    torch.testing.assert_close(leave_group_out(r, torch.zeros(4, dtype=torch.long), 2.0), r - 2.0)


class _FakeTwoProcesses:
    """Process 0 of two: the other process's rewards are ``other``."""

    def __init__(self, other):
        self.other = other

    def gather(self, t):
        return torch.cat([t, self.other])

    def rows(self, n):
        return slice(0, n)


def test_advantages_use_global_statistics_and_keep_the_local_shape():
    local, other = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    adv = global_advantages(leave_one_out, local, _FakeTwoProcesses(other))
    assert adv.shape == local.shape
    torch.testing.assert_close(adv, leave_one_out(torch.cat([local, other]))[:3])


def test_rewards_reject_images_outside_0_1():
    from finetuners.rewards import make_reward

    fn = make_reward("shapes-probe")
    with pytest.raises(AssertionError, match=r"\[0, 1\]"):
        fn(torch.full((1, 3, 32, 32), 1.5), ["a red circle"], [{}])


# -- on the diffusion chain ---------------------------------------------------------------------------------------
class _GradCallCounter:
    def __init__(self, inner):
        self.inner, self.with_grad, self.without = inner, 0, 0

    def __call__(self, x, t, cond):
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.without += 1
        return self.inner(x, t, cond)


def _unet_chain(pipe, k=4, eta=1.0):
    from finetuners.denoisers import unet_denoiser
    from finetuners.generate import encode, schedule_tensors
    from finetuners.lora import add_lora
    from finetuners.steps import timesteps

    torch.manual_seed(0)
    params = add_lora(pipe.unet, 2)
    counter = _GradCallCounter(unet_denoiser(pipe.unet))
    cond = encode(pipe, ["a red circle", "a blue square"], None, False)[0].detach()
    alphas, final = schedule_tensors(pipe, "cpu")
    chain = DiffusionChain(counter, cond, timesteps(k, "trailing"), alphas, params, eta=eta, final_alpha_cumprod=final)
    return chain, counter


@pytest.mark.parametrize("h", [1, 2])
def test_unet_calls_with_gradients_are_one_plus_h(random_pipeline_dir, h):
    from finetuners.models import load_model

    pipe = load_model(str(random_pipeline_dir), "cpu")
    chain, counter = _unet_chain(pipe, k=4)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=gen)
    reward = lambda x: -(x**2).flatten(1).mean(1)  # noqa: E731 - a differentiable latent reward
    info = rlr_backward(chain, x_T, reward, RLRConfig(h=h), generator=gen, zo_seed=1, noise_generator=gen)
    assert counter.with_grad == 1 + h == info["grad_unet_calls"]
    stochastic = 3
    zo = stochastic - h
    assert counter.without == (4 - zo) + 2 * zo  # sampling: one call per step; a ZO step, one per row (2 rows)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in chain.params)
    counter.with_grad = 0
    truncated_backward(chain, x_T, reward, 4, noise_generator=gen)
    assert counter.with_grad == 4


def test_first_order_on_the_unet_equals_backprop_through_the_last_step(random_pipeline_dir):
    from finetuners.models import load_model

    pipe = load_model(str(random_pipeline_dir), "cpu")
    chain, _ = _unet_chain(pipe, k=2)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=gen)
    reward = lambda x: -(x**2).flatten(1).mean(1)  # noqa: E731
    roll = sample_chain(chain, x_T, RLRConfig(h=0, zo_mode="off"), generator=gen, zo_seed=0, noise_generator=gen)
    x_K, _ = first_order(chain, roll, reward)
    torch.testing.assert_close(x_K.detach(), roll.latents[-1])  # the FO replay is the sampled image


# -- runs -----------------------------------------------------------------------------------------------------------
def _config(model, method="rlr", **rlr):
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig

    algo = SDPOConfig.preset("shapes", model=str(model), reward="shapes-probe", num_steps=3, sample_batch_size=2,
                             num_batches_per_epoch=2, train_batch_size=2, grad_accum=1, num_epochs=2, eval_steps=(1,),
                             learning_rate=1e-3)  # fmt: skip
    return TrainConfig(method=method, algo=algo, num_eval_prompts=2, eval_every=1, rlr=RLRConfig(**rlr))


def test_a_non_differentiable_reward_is_refused_in_words(random_pipeline_dir, tmp_path):
    from finetuners.__main__ import main
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig

    for method in ("rlr", "draft", "bptt"):
        with pytest.raises(UserError, match="not differentiable"):
            TrainConfig(method=method, algo=SDPOConfig.preset("shapes", reward="jpeg-compressibility"))
    run = tmp_path / "r"
    assert main(["train", "--method", "rlr", "--reward", "jpeg-compressibility", "--run", str(run)]) == 2
    assert not run.exists()


@pytest.mark.parametrize("method", ["rlr", "draft"])
def test_a_short_run_is_finite_recorded_and_resumable(random_pipeline_dir, tmp_path, method):
    from finetuners.runs import list_checkpoints, read_metrics
    from finetuners.trainer import TrainConfig, check_resumable, train

    run = tmp_path / method
    config = _config(random_pipeline_dir, method, h=1, truncation=2)
    assert train(run, config)["state"] == "finished"
    stored = json.loads((run / "config.json").read_text())["config"]
    assert stored["method"] == method and stored["rlr"]["truncation"] == 2
    assert TrainConfig.from_dict(stored) == config
    epochs = [r for r in read_metrics(run) if r["event"] == "epoch"]
    assert len(epochs) == 2 and all(r["reward_queries"] > 0 and r["grad_norm"] > 0 for r in epochs)
    assert epochs[0]["grad_unet_calls"] == 2  # RLR: FO + HO (h = 1); DRaFT-K: the last K' = 2 steps
    assert list_checkpoints(run) and check_resumable(run) == config


def test_rlr_updates_raise_the_probe_reward_of_the_shapes_model(shapes_pipe):
    """Ten RLR updates (h = 1, K = 2: FO + HO, no ZO) on fixed prompts and noise raise their Shapes-probe reward."""
    import copy

    from finetuners.denoisers import unet_denoiser
    from finetuners.generate import decode_differentiable, encode, schedule_tensors
    from finetuners.lora import add_lora
    from finetuners.rewards import make_reward
    from finetuners.steps import timesteps

    pipe = copy.deepcopy(shapes_pipe)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, 4)
    prompts = ["a red circle", "a blue square on the left", "a green triangle at the top", "a white square"] * 2
    cond = encode(pipe, prompts, None, False)[0].detach()
    alphas, final = schedule_tensors(pipe, "cpu")
    chain = DiffusionChain(unet_denoiser(pipe.unet), cond, timesteps(2, "trailing"), alphas, params, eta=1.0,
                           final_alpha_cumprod=final)  # fmt: skip
    probe = make_reward("shapes-probe")
    reward = lambda x: probe(decode_differentiable(pipe, x), prompts, [{}] * len(prompts))[0]  # noqa: E731
    x_T = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def score():
        with torch.no_grad():
            roll = sample_chain(chain, x_T, RLRConfig(zo_mode="off"), generator=torch.Generator(), zo_seed=0,
                                noise_generator=torch.Generator().manual_seed(1))  # fmt: skip
            return float(reward(roll.latents[-1]).mean())

    before = score()
    opt = torch.optim.Adam(params, lr=3e-3)
    for step in range(10):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(100 + step)
        rlr_backward(chain, x_T, reward, RLRConfig(h=1), generator=gen, zo_seed=step, noise_generator=gen)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    after = score()
    print(f"probe reward {before:.2f} -> {after:.2f}")
    assert after > before + 1.0, (before, after)
