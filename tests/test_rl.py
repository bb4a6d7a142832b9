"""Shared RL pieces: the DDPO loss and the per-prompt stat tracker (ALGORITHMS.md §0.6, test 6)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from finetuners.rl import (
    PerPromptStatTracker,
    clip_advantages,
    ddpo_advantages,
    ppo_clip_loss,
    ratio_clip_fraction,
    transition_log_probs,
)
from finetuners.sampling import sample_loop
from finetuners.steps import timesteps


# -- PPO clip loss ------------------------------------------------------------------------------------
def test_ppo_loss_analytic_value():
    loss = ppo_clip_loss(torch.tensor([-1.0]), torch.tensor([1.0]), 1e-4)
    assert loss.item() == 1.0
    # mean over entries of max(−Aρ, −A·clip(ρ)): A = 2, ρ = 0.5 → max(−1, −2·(1−ε))
    eps = 0.1
    loss = ppo_clip_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5]), eps)
    expected = (max(-1.0, -2 * (1 - eps)) + max(1.5, 1.0 * (1 + eps))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(("adv", "rho", "grad_is_zero"), [(1.0, 1.5, True), (-1.0, 0.5, True), (1.0, 1.00005, False),
                                                          (1.0, 0.5, False), (-1.0, 1.5, False)])  # fmt: skip
def test_ppo_loss_gradient_vanishes_only_where_the_clip_binds(adv, rho, grad_is_zero):
    ratio = torch.tensor([rho], requires_grad=True)
    ppo_clip_loss(torch.tensor([adv]), ratio, 1e-4).backward()
    if grad_is_zero:
        assert ratio.grad.item() == 0.0
    else:
        assert ratio.grad.item() == pytest.approx(-adv)


def test_ratio_clip_fraction():
    assert ratio_clip_fraction(torch.tensor([1.0, 1.00005, 1.001, 0.99]), 1e-4) == 0.5


# -- tracker ------------------------------------------------------------------------------------------
def _pop_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def test_tracker_uses_batch_statistics_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    adv = tracker.advantages(["x", "x", "y"], torch.tensor([1.0, 3.0, 10.0]))
    batch = [1.0, 3.0, 10.0]  # "x" holds 2 < 3 values, "y" 1: both use the whole batch
    mean, std = sum(batch) / 3, _pop_std(batch)
    torch.testing.assert_close(adv, torch.tensor([(v - mean) / (std + 1e-6) for v in batch]), atol=1e-6, rtol=0)
    adv = tracker.advantages(["x", "y"], torch.tensor([5.0, 0.0]))  # "x" now holds [1, 3, 5]
    assert adv[0].item() == pytest.approx((5 - 3) / (_pop_std([1, 3, 5]) + 1e-6), abs=1e-6)
    assert adv[1].item() == pytest.approx((0 - 2.5) / (2.5 + 1e-6), abs=1e-6)  # "y": batch [5, 0]


def test_tracker_batch_statistics_per_group():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=8)
    adv = tracker.advantages(["p", "q", "p", "q"], torch.tensor([0.0, 100.0, 2.0, 300.0]), groups=[0, 1, 0, 1])
    torch.testing.assert_close(adv, torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-5, rtol=0)


def test_tracker_fifo_eviction():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.advantages(["x"] * 4, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert list(tracker.buffers["x"]) == [2.0, 3.0, 4.0]
    adv = tracker.advantages(["x"], torch.tensor([9.0]))  # buffer [3, 4, 9]
    assert adv.item() == pytest.approx((9 - 16 / 3) / (_pop_std([3, 4, 9]) + 1e-6), abs=1e-6)
    assert tracker.stats()["x"]["count"] == 3


def test_full_buffer_gives_mean_zero_std_one():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
    values = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 7 + 3
    adv = tracker.advantages(["cat"] * 32, values).double()
    assert abs(adv.mean().item()) < 1e-6
    assert adv.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_tracker_state_dict_round_trip():
    a = PerPromptStatTracker(buffer_size=4, min_count=2)
    keys = [("cat", 0), ("cat", 1), ("dog", 0)]
    a.advantages(keys, torch.tensor([1.0, 2.0, 3.0]))
    a.advantages(keys, torch.tensor([2.0, 5.0, 1.0]))
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = PerPromptStatTracker(buffer_size=1, min_count=1)
    b.load_state_dict(torch.load(blob, weights_only=True))
    assert (b.buffer_size, b.min_count) == (4, 2) and set(b.buffers) == set(keys)
    nxt = torch.tensor([4.0, -1.0, 0.5])
    assert torch.equal(a.advantages(keys, nxt), b.advantages(keys, nxt))


def test_ddpo_advantages_are_clipped_and_clip_fractions_logged():
    tracker = PerPromptStatTracker(buffer_size=128, min_count=128)  # batch statistics
    rewards = torch.cat([torch.zeros(99), torch.tensor([1000.0])])  # the outlier's z-score is √99 ≈ 9.95
    adv, info = ddpo_advantages(tracker, ["p"] * 100, rewards, adv_clip=5.0)
    assert adv.max().item() == 5.0 and adv.min().item() == pytest.approx(-1 / math.sqrt(99), abs=1e-5)
    assert info == pytest.approx({"adv_clipfrac_low": 0.0, "adv_clipfrac_high": 0.01})
    _, info = clip_advantages(torch.tensor([-6.0, 0.0, 6.0, 7.0]), 5.0)
    assert info == {"adv_clipfrac_low": 0.25, "adv_clipfrac_high": 0.5}


def test_tracker_rejects_bad_sizes():
    with pytest.raises(ValueError):
        PerPromptStatTracker(buffer_size=4, min_count=5)
    with pytest.raises(ValueError):
        PerPromptStatTracker(4, 2).advantages(["a"], torch.tensor([1.0, 2.0]))


# -- re-evaluation with per-row timesteps --------------------------------------------------------------
def _toy_denoiser(x, t, cond):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.3 * x + 1e-3 * t + cond


def test_transition_log_probs_with_shuffled_steps_equal_stored_log_probs():
    from diffusers import DDIMScheduler

    alphas = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    ts = timesteps(5, "leading")
    g = torch.Generator().manual_seed(0)
    x_T, cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 0.1
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    _, traj = sample_loop(_toy_denoiser, x_T, cond, ts, alphas, eta=1.0, final_alpha_cumprod=alphas[0], generator=gens)
    step = torch.tensor([4, 0, 2])  # every row a different step
    rows = torch.arange(3)
    t = torch.tensor(traj.timesteps)[step]
    tp = torch.tensor(traj.next_timesteps)[step]
    lp = transition_log_probs(_toy_denoiser, traj.latents[rows, step], traj.latents[rows, step + 1], t, tp, cond,
                              alphas, eta=1.0, final_alpha_cumprod=alphas[0])  # fmt: skip
    assert torch.equal(lp, traj.log_probs[rows, step])
