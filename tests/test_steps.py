"""The shared step maths against diffusers and against closed forms (ALGORITHMS.md §0.6, tests 1–5)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from finetuners.denoisers import CFGDenoiser, CountingDenoiser
from finetuners.steps import ddim_step, gaussian_log_prob, lcm_step, next_timesteps, timesteps

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def _sched(spacing: str, prediction_type: str = "epsilon", set_alpha_to_one: bool = False) -> DDIMScheduler:
    return DDIMScheduler(**SD_SCHEDULE, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                         prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)  # fmt: skip


def _final(s: DDIMScheduler) -> torch.Tensor:
    return s.final_alpha_cumprod


def test_trailing_and_leading_timesteps():
    assert timesteps(1, "trailing") == [999]
    assert timesteps(2, "trailing") == [999, 499]
    assert timesteps(4, "trailing") == [999, 749, 499, 249]
    assert timesteps(3, "trailing") == [999, 666, 332]
    lead = timesteps(50, "leading")
    assert lead[0] == 981 and lead[-1] == 1 and len(lead) == 50
    assert next_timesteps([999, 666, 332]) == [666, 332, -1]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("k", [1, 2, 4, 8, 50])
def test_eta0_equals_diffusers_ddim(k, spacing, prediction_type):
    sched = _sched(spacing, prediction_type)
    sched.set_timesteps(k)
    ts = [int(t) for t in sched.timesteps]
    assert ts == timesteps(k, spacing)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t, tp in zip(ts, next_timesteps(ts)):
        out_model = torch.randn(x.shape, generator=g)
        ref = sched.step(out_model, t, x, eta=0.0)
        ours = ddim_step(out_model, t, tp, x, sched.alphas_cumprod, eta=0.0, prediction_type=prediction_type,
                         final_alpha_cumprod=_final(sched))  # fmt: skip
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.pred_x0, ref.pred_original_sample, atol=1e-6, rtol=0)
        assert ours.log_prob is None  # η = 0 is deterministic
        x = ref.prev_sample


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_injected_noise_equals_variance_noise(eta):
    sched = _sched("leading")
    sched.set_timesteps(10)
    ts = [int(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for t, tp in zip(ts, next_timesteps(ts)):
        out_model, z = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
        ref = sched.step(out_model, t, x, eta=eta, variance_noise=z)
        ours = ddim_step(out_model, t, tp, x, sched.alphas_cumprod, eta=eta, final_alpha_cumprod=_final(sched), noise=z)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-6, rtol=0)
        x = ours.prev_sample


def test_generator_draw_equals_diffusers():
    sched = _sched("leading")
    sched.set_timesteps(5)
    ts = [int(t) for t in sched.timesteps]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out_model = torch.randn_like(x)
    ref = sched.step(out_model, ts[1], x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    ours = ddim_step(out_model, ts[1], ts[2], x, sched.alphas_cumprod, eta=1.0, final_alpha_cumprod=_final(sched),
                     generator=torch.Generator().manual_seed(7)).prev_sample  # fmt: skip
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_the_gaussian_density(reduction):
    sched = _sched("leading")
    g = torch.Generator().manual_seed(2)
    x, out_model = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    step = ddim_step(out_model, 501, 401, x, sched.alphas_cumprod, eta=1.0, generator=g, reduction=reduction)
    ref = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.prev_sample).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    torch.testing.assert_close(step.log_prob, ref, atol=1e-5, rtol=1e-6)
    # the same transition re-evaluated (prev_sample given) under the same output: identical value
    again = ddim_step(out_model, 501, 401, x, sched.alphas_cumprod, eta=1.0, prev_sample=step.prev_sample,
                      reduction=reduction)  # fmt: skip
    assert torch.equal(again.log_prob, step.log_prob)


def test_eta1_consecutive_is_ddpm_posterior_variance():
    sched = _sched("leading")
    a = sched.alphas_cumprod.double()  # fp64: 1 − ᾱ_t/ᾱ_p cancels badly in fp32 at small t
    betas = 1 - a / torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    for t in (1, 10, 500, 999):
        step = ddim_step(torch.zeros_like(x), t, t - 1, x, a, eta=1.0, noise=torch.zeros_like(x))
        beta_tilde = betas[t] * (1 - a[t - 1]) / (1 - a[t])
        torch.testing.assert_close(step.std.flatten()[0] ** 2, beta_tilde, atol=1e-9, rtol=1e-5)


def test_pred_x0_recovers_x0_from_true_noise():
    sched = _sched("leading")
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (1, 250, 999):
        xt = sched.add_noise(x0, eps, torch.tensor([t]))
        step = ddim_step(eps, t, t - 100, xt, sched.alphas_cumprod, eta=0.5, generator=g)
        torch.testing.assert_close(step.pred_x0, x0, atol=2e-4 if t == 999 else 1e-5, rtol=0)


def test_log_prob_gradient_matches_closed_form():
    """d log π / d ε̂ = (c_ε/σ²)(x' − μ)/D with c_ε = √(1−ᾱ_p−σ²) − √ᾱ_p·√(1−ᾱ_t)/√ᾱ_t ("mean" reduction)."""
    sched = _sched("leading")
    a = sched.alphas_cumprod.double()
    t, tp, eta = 601, 401, 0.8
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x_next = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    step = ddim_step(eps, t, tp, x, a, eta=eta, prev_sample=x_next, reduction="mean")
    (grad,) = torch.autograd.grad(step.log_prob.sum(), eps)
    at, ap = a[t], a[tp]
    sigma2 = eta**2 * (1 - ap) / (1 - at) * (1 - at / ap)
    c_eps = (1 - ap - sigma2).sqrt() - ap.sqrt() * (1 - at).sqrt() / at.sqrt()
    d = x[0].numel()
    torch.testing.assert_close(grad, c_eps / sigma2 * (x_next - step.mean.detach()) / d, atol=1e-10, rtol=1e-8)


def test_gaussian_log_prob_reductions():
    x, m, s = torch.ones(1, 2, 2), torch.zeros(1, 2, 2), torch.full((1, 1, 1), 2.0)
    lp_sum = gaussian_log_prob(x, m, s, "sum")
    expected = 4 * (-1 / 8 - torch.log(torch.tensor(2.0)) - 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    torch.testing.assert_close(lp_sum, expected.reshape(1))
    torch.testing.assert_close(gaussian_log_prob(x, m, s, "mean"), expected.reshape(1) / 4)


def test_lcm_step_equals_diffusers():
    sched = LCMScheduler(**SD_SCHEDULE, set_alpha_to_one=True)
    sched.set_timesteps(4)
    ts = [int(t) for t in sched.timesteps]
    assert ts == [999, 759, 499, 259]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    gen_ref, gen_ours = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x_ref = x_ours = x
    for t, tp in zip(ts, next_timesteps(ts)):
        out_model = torch.randn(x.shape, generator=g)
        ref = sched.step(out_model, t, x_ref, generator=gen_ref)
        ours = lcm_step(out_model, t, tp, x_ours, sched.alphas_cumprod, final_alpha_cumprod=sched.final_alpha_cumprod,
                        timestep_scaling=sched.config.timestep_scaling, generator=gen_ours)  # fmt: skip
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.pred_x0, ref.denoised, atol=1e-6, rtol=0)
        if tp >= 0:
            ref_lp = torch.distributions.Normal(ours.mean, ours.std.expand_as(ours.mean)).log_prob(ours.prev_sample)
            torch.testing.assert_close(ours.log_prob, ref_lp.flatten(1).mean(1), atol=1e-5, rtol=1e-6)
        else:
            assert ours.log_prob is None
        x_ref, x_ours = ref.prev_sample, ours.prev_sample


def test_cfg_wrapper_calls():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return x * 0 + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x = torch.zeros(2, 4, 8, 8)
    cond, uncond = torch.full((2, 3, 5), 2.0), torch.full((2, 3, 5), 0.5)
    counted = CountingDenoiser(model)
    out = CFGDenoiser(counted, uncond, 1.0)(x, 10, cond)
    assert counted.calls == 1 and counted.rows == 2 and torch.allclose(out, torch.full_like(x, 2.0))
    out = CFGDenoiser(counted, uncond, 0.0)(x, 10, cond)  # SD-Turbo's "guidance 0": conditional
    assert counted.calls == 2 and torch.allclose(out, torch.full_like(x, 2.0))
    out = CFGDenoiser(counted, uncond, 3.0)(x, 10, cond)  # one batched call, 0.5 + 3·(2 − 0.5)
    assert counted.calls == 3 and counted.rows == 2 + 2 + 4 and torch.allclose(out, torch.full_like(x, 5.0))
