"""SDPO's pure core against hand-computed values and on the tiny random pipeline (ALGORITHMS.md §1.6, tests 1–7)."""

from __future__ import annotations

import io

import pytest
import torch

from finetuners.denoisers import CFGDenoiser, UNetDenoiser
from finetuners.errors import UserError
from finetuners.generate import encode, schedule_tensors
from finetuners.rl import PerPromptStatTracker
from finetuners.sampling import initial_noise, reevaluate_log_probs
from finetuners.sdpo import (
    PRESETS,
    PairSteps,
    SDPOConfig,
    anchor_index,
    dense_rewards,
    discounted_returns,
    iter_minibatches,
    latent_reward,
    pair_generators,
    sample_pairs,
    sdpo_advantages,
    sdpo_clip_fraction,
    sdpo_loss,
    sdpo_minibatch_loss,
    shapes_preset,
    shuffle_steps,
    step_tracker,
    step_weights,
    train_timesteps,
    updates_per_epoch,
)

PROMPTS = ["a red circle", "a blue square on the left"]


class CountingLatentReward:
    """A fake reward on latents: the mean of each latent. Counts the queries per trajectory."""

    def __init__(self):
        self.calls, self.rows = 0, 0

    def __call__(self, latents):  # [B, Q, C, H, W] -> [B, Q]
        self.calls += 1
        self.rows += latents.shape[0] * latents.shape[1]
        return latents.flatten(2).mean(-1)


# -- 1. dense reward ----------------------------------------------------------------------------------
def test_dense_reward_is_exact_at_queries_and_within_their_range():
    x0 = torch.rand(4, 7, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # positive ⇒ cosines ≥ 0
    reward = CountingLatentReward()
    out = dense_rewards(x0, reward)
    rows = torch.arange(4)
    exact = x0.flatten(2).mean(-1)  # the fake reward of every x̂0
    assert torch.equal(out.rewards[:, 0], exact[:, 0]) and torch.equal(out.rewards[:, -1], exact[:, -1])
    assert torch.equal(out.rewards[rows, out.anchor], exact[rows, out.anchor])
    lo, hi = out.exact.min(1).values, out.exact.max(1).values
    assert ((out.rewards >= lo[:, None] - 1e-6) & (out.rewards <= hi[:, None] + 1e-6)).all()
    assert out.rewards.shape == (4, 7) and out.queries_per_trajectory == 3


def test_dense_reward_hand_computed_interpolation():
    # K = 3 along orthonormal axes e0 → e2 → e1: i* = 1; cosines at step 1 to (first, anchor, last) = (0, 1, 0)
    e = torch.eye(3)
    x0 = torch.stack([e[0], e[2], e[1]])[None, :, :, None, None]  # [1, 3, 3, 1, 1]
    out = dense_rewards(x0, lambda q: torch.tensor([[1.0, 2.0, 4.0]]))
    assert out.anchor.tolist() == [1] and out.rewards.tolist() == [[1.0, 2.0, 4.0]]
    # K = 4: step 2 = e0 + e1 has cosines 1/√2 to first and last, 0 to the anchor (e2): R̂ = (1 + 4)/2
    x0 = torch.stack([e[0], e[2], e[0] + e[1], e[1]])[None, :, :, None, None]
    out = dense_rewards(x0, lambda q: torch.tensor([[1.0, 2.0, 4.0]]))
    torch.testing.assert_close(out.rewards, torch.tensor([[1.0, 2.0, 2.5, 4.0]]))


def test_three_equal_rewards_give_a_constant_dense_reward():
    x0 = torch.rand(3, 6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = dense_rewards(x0, lambda q: torch.full(q.shape[:2], 0.7))
    torch.testing.assert_close(out.rewards, torch.full((3, 6), 0.7))


def test_dense_reward_guards_the_denominator_and_clamps_cosines_on_request():
    e = torch.eye(2)
    # ends e0, e1; anchor −(e0 + e1) (cosines −1/√2 to both ends); step 2 = −e0 has cosines
    # (first, anchor, last) = (−1, 1/√2, 0): a negative sum, so the denominator is floored at 1e−6
    x0 = torch.stack([e[0], -(e[0] + e[1]), -e[0], e[1]])[None, :, :, None, None]
    out = dense_rewards(x0, lambda q: torch.tensor([[1.0, 2.0, 3.0]]))
    assert out.anchor.tolist() == [1]
    assert out.rewards[0, 2].item() == pytest.approx((-1.0 + 2.0 / 2**0.5) / 1e-6, rel=1e-4)
    clamped = dense_rewards(x0, lambda q: torch.tensor([[1.0, 2.0, 3.0]]), cosine_clamp="nonnegative")
    assert clamped.rewards[0].tolist() == pytest.approx([1.0, 2.0, 2.0, 3.0])


@pytest.mark.parametrize(("k", "queries"), [(1, 1), (2, 2), (3, 3), (8, 3), (50, 3)])
def test_reward_queries_per_trajectory(k, queries):
    reward = CountingLatentReward()
    out = dense_rewards(torch.randn(5, k, 4, 2, 2, generator=torch.Generator().manual_seed(k)), reward)
    assert reward.calls == 1 and reward.rows == 5 * queries and out.queries_per_trajectory == queries
    assert out.rewards.shape == (5, k) and out.exact.shape == (5, 3)


# -- 2. anchor ----------------------------------------------------------------------------------------
def _line_with_detour(k: int, detour: int) -> torch.Tensor:
    a, b, c = torch.eye(3)
    s = torch.linspace(0, 1, k)[:, None]
    path = (1 - s) * a + s * b  # a straight line from a to b …
    path[detour] = c  # … with one step off it, orthogonal to both ends
    return path[None, :, :, None, None]  # [1, K, 3, 1, 1]


@pytest.mark.parametrize(("k", "detour"), [(3, 1), (5, 3), (8, 2), (50, 37)])
def test_anchor_is_the_detour(k, detour):
    assert anchor_index(_line_with_detour(k, detour)).tolist() == [detour]


@pytest.mark.parametrize("k", [3, 4, 8, 50])
def test_anchor_is_never_an_end_for_three_or_more_steps(k):
    a, b = torch.eye(2)
    s = torch.linspace(0, 1, k)[:, None]
    straight = ((1 - s) * a + s * b)[None, :, :, None, None]  # no detour: the ends score lowest overall
    noisy = torch.randn(6, k, 4, 4, 4, generator=torch.Generator().manual_seed(k))
    for x0 in (straight, noisy):
        anchor = anchor_index(x0)
        assert ((anchor > 0) & (anchor < k - 1)).all()


# -- 3. returns ---------------------------------------------------------------------------------------
def test_returns_with_zero_discount_are_the_rewards():
    r = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(discounted_returns(r, 0.0), r)


def test_returns_of_a_constant_reward_are_a_geometric_sum():
    k, gamma, r = 50, 0.99, 0.8
    g = discounted_returns(torch.full((2, k), r, dtype=torch.float64), gamma)
    expected = torch.tensor([r * (1 - gamma ** (k - i)) / (1 - gamma) for i in range(k)], dtype=torch.float64)
    torch.testing.assert_close(g, expected.expand(2, k))
    torch.testing.assert_close(
        discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), 0.5), torch.tensor([[3.0, 4.0, 4.0]])
    )


# -- 4. tracker keyed by (prompt, step) -----------------------------------------------------------------
def test_advantages_per_prompt_and_step_use_step_batch_statistics_first():
    tracker = step_tracker(buffer_size=32, min_count=16)
    returns = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])  # 3 trajectories × 2 steps
    adv, info = sdpo_advantages(tracker, ["cat", "cat", "dog"], returns)
    # every key is young: statistics of the batch at each step (1, 3, 5) and (10, 30, 50)
    z = torch.tensor([-1.0, 0.0, 1.0]) * (1 / (8 / 3) ** 0.5) * 2
    torch.testing.assert_close(adv, torch.stack([z, z], 1), atol=1e-5, rtol=0)
    assert set(tracker.buffers) == {("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1)}
    assert list(tracker.buffers[("cat", 1)]) == [10.0, 30.0]
    assert info == {"adv_clipfrac_low": 0.0, "adv_clipfrac_high": 0.0}


def test_step_tracker_fifo_of_32_and_its_own_statistics_after_min_count():
    tracker = step_tracker()
    assert (tracker.buffer_size, tracker.min_count) == (32, 16)
    for epoch in range(3):  # 20 returns per step for "cat" per call: its FIFOs fill and evict
        sdpo_advantages(tracker, ["cat"] * 20 + ["dog"], torch.arange(21.0)[:, None].repeat(1, 2) + 100 * epoch)
    assert len(tracker.buffers[("cat", 0)]) == 32 and len(tracker.buffers[("dog", 1)]) == 3
    buf = torch.tensor(list(tracker.buffers[("cat", 0)]), dtype=torch.float64)
    adv, _ = sdpo_advantages(tracker, ["cat", "dog"], torch.tensor([[250.0, 250.0], [7.0, 7.0]]))
    buf = torch.cat([buf[1:], torch.tensor([250.0], dtype=torch.float64)])  # FIFO: the oldest leaves
    expected = (250.0 - buf.mean()) / (buf.std(unbiased=False) + 1e-6)
    assert adv[0, 0].item() == pytest.approx(expected.item(), abs=1e-5)
    assert adv[1, 0].item() == pytest.approx(-1.0, abs=1e-5)  # "dog" holds 4 < 16: batch [250, 7] at step 0


def test_step_tracker_survives_a_checkpoint():
    tracker = step_tracker(buffer_size=32, min_count=2)
    sdpo_advantages(tracker, ["cat", "dog"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    sdpo_advantages(tracker, ["cat", "dog"], torch.tensor([[2.0, 0.0], [1.0, 9.0]]))
    blob = io.BytesIO()
    torch.save(tracker.state_dict(), blob)
    blob.seek(0)
    restored = PerPromptStatTracker(1, 1)
    restored.load_state_dict(torch.load(blob, weights_only=True))
    nxt = torch.tensor([[5.0, 1.0], [0.0, 2.0]])
    assert torch.equal(sdpo_advantages(tracker, ["cat", "dog"], nxt)[0], sdpo_advantages(restored, ["cat", "dog"],
                                                                                             nxt)[0])  # fmt: skip


def test_advantages_are_clipped_at_five():
    tracker = step_tracker(buffer_size=128, min_count=128)
    returns = torch.cat([torch.zeros(99, 1), torch.tensor([[1000.0]])])
    adv, info = sdpo_advantages(tracker, ["p"] * 100, returns, adv_clip=5.0)
    assert adv.max().item() == 5.0 and info["adv_clipfrac_high"] == pytest.approx(0.01)


# -- 5. loss ------------------------------------------------------------------------------------------
def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_loss_hand_computed_with_the_clamp_branch():
    # pair 0 (w = 1): ρa = 0.3, ρb = 0.1, ΔA = 2; with ε = 0.2, ρ̃a = 0.2:
    #   unclipped (0.2 − 2)² = 3.24, clipped (0.1 − 2)² = 3.61 → 3.61 (the clamp branch)
    # pair 1 (w = 0.5): ρa = −0.1, ρb = 0.05, ΔA = −1: both (0.5·(−0.15) + 1)² = 0.855625
    args = (_t(0.3, -0.1), _t(0.1, 0.05), _t(0.0, 0.0), _t(0.0, 0.0), _t(1.0, 0.5), _t(-1.0, 1.5), _t(1.0, 0.5), 0.2)
    assert sdpo_loss(*args).item() == pytest.approx((3.61 + 0.855625) / 2, abs=1e-12)
    assert sdpo_clip_fraction(*args) == 0.5


def test_loss_symmetric_nonnegative_and_mean_squared_advantage_gap_at_zero_ratio():
    g = torch.Generator().manual_seed(0)
    lp_a, lp_b, old_a, old_b, adv_a, adv_b = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(6))
    w = torch.rand(64, generator=g, dtype=torch.float64)
    for eps in (1e-4, 0.5):
        loss = sdpo_loss(lp_a, lp_b, old_a, old_b, adv_a, adv_b, w, eps)
        swapped = sdpo_loss(lp_b, lp_a, old_b, old_a, adv_b, adv_a, w, eps)
        assert loss.item() >= 0 and loss.item() == pytest.approx(swapped.item(), abs=1e-12)
    at_old = sdpo_loss(old_a, old_b, old_a, old_b, adv_a, adv_b, w, 1e-4)
    assert at_old.item() == pytest.approx(((adv_a - adv_b) ** 2).mean().item(), abs=1e-12)


def test_loss_gradient_at_zero_ratio_favours_the_better_transition():
    lp_a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adv_a, adv_b, w = _t(1.0, -2.0, 0.5), _t(0.0, 0.0, 0.0), _t(1.0, 0.9, 0.8)
    sdpo_loss(
        lp_a, torch.zeros(3, dtype=torch.float64), torch.zeros(3), torch.zeros(3), adv_a, adv_b, w, 1e-4
    ).backward()
    torch.testing.assert_close(lp_a.grad, -2 * w * (adv_a - adv_b) / 3)


def test_clipped_branch_has_zero_gradient_outside_eps():
    # ΔA = 1, ρa = 0.5 > ε: unclipped (0.5 − 1)² = 0.25 < clipped (1e−4 − 1)² → the clamped term wins, flat in ρa
    lp_a = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    lp_b = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    loss = sdpo_loss(lp_a, lp_b, _t(0.0), _t(0.0), _t(1.0), _t(0.0), _t(1.0), 1e-4)
    loss.backward()
    assert loss.item() == pytest.approx((1e-4 - 1) ** 2) and lp_a.grad.item() == 0.0
    # inside ±ε the same configuration has a gradient
    lp_a = torch.tensor([0.5e-4], dtype=torch.float64, requires_grad=True)
    sdpo_loss(lp_a, _t(0.0), _t(0.0), _t(0.0), _t(1.0), _t(0.0), _t(1.0), 1e-4).backward()
    assert lp_a.grad.item() != 0.0


def test_step_weights():
    w = step_weights(50, 0.99, 1.0)
    assert w[0].item() == 1.0 and w[-1].item() == pytest.approx(0.99**49) and 0.61 < w[-1].item() < 0.612
    torch.testing.assert_close(step_weights(3, 0.5, 2.0), torch.tensor([0.5, 0.25, 0.125]))


# -- 6. shuffle and update count -----------------------------------------------------------------------
def _coded_steps(p: int, k: int) -> PairSteps:
    """Entries encode (pair, step, trajectory), so every moved value can be traced back."""
    pp, ii = torch.meshgrid(torch.arange(p), torch.arange(k), indexing="ij")
    code = (100 * pp + ii).double()
    lat = lambda off: (code + off)[:, :, None, None, None].expand(p, k, 1, 2, 2).clone()
    return PairSteps(
        step_index=ii.clone(), timesteps=(999 - 100 * ii), next_timesteps=(899 - 100 * ii),
        latents_a=lat(0.1), next_latents_a=lat(0.2), latents_b=lat(0.3), next_latents_b=lat(0.4),
        log_probs_a=code + 0.5, log_probs_b=code + 0.6, advantages_a=code + 0.7, advantages_b=code + 0.8,
        weights=0.9**ii.double(), cond=torch.arange(p).double()[:, None] * 1000, pair_index=torch.arange(p),
    )  # fmt: skip


def test_shuffle_shares_one_permutation_per_pair_and_keeps_rows_together():
    p, k = 6, 5
    s = shuffle_steps(_coded_steps(p, k), torch.Generator().manual_seed(0))
    assert sorted(s.pair_index.tolist()) == list(range(p)) and s.pair_index.tolist() != list(range(p))
    assert any(row.tolist() != list(range(k)) for row in s.step_index)
    for r in range(p):
        pair, steps = s.pair_index[r].item(), s.step_index[r]
        assert sorted(steps.tolist()) == list(range(k))  # each row is a permutation
        code = 100 * pair + steps.double()
        assert torch.equal(s.timesteps[r], 999 - 100 * steps) and torch.equal(s.next_timesteps[r], 899 - 100 * steps)
        assert torch.equal(s.weights[r], 0.9 ** steps.double())
        for name, off in [("log_probs_a", 0.5), ("log_probs_b", 0.6), ("advantages_a", 0.7), ("advantages_b", 0.8)]:
            assert torch.equal(getattr(s, name)[r], code + off), name  # a and b share the permutation
        for name, off in [("latents_a", 0.1), ("next_latents_a", 0.2), ("latents_b", 0.3), ("next_latents_b", 0.4)]:
            assert torch.equal(getattr(s, name)[r, :, 0, 0, 0], code + off), name
        assert s.cond[r].item() == 1000 * pair
    again = shuffle_steps(_coded_steps(p, k), torch.Generator().manual_seed(0))
    assert torch.equal(again.step_index, s.step_index) and torch.equal(again.pair_index, s.pair_index)


def test_update_count_matches_the_formula_and_the_training_loop():
    assert updates_per_epoch(50, 32, 2, 8) == 100  # the reference aesthetic config
    assert updates_per_epoch(50, 32, 1, 32) == 50 and updates_per_epoch(50, 32, 1, 16) == 100
    assert SDPOConfig().updates_per_epoch == 100 and SDPOConfig.preset("shapes").updates_per_epoch == 4
    p, k, bs, accum = 8, 5, 2, 2
    order, updates, n = [], 0, 0
    for column, batch in iter_minibatches(_coded_steps(p, k), bs):
        assert batch.num_pairs == bs and batch.num_steps == 1
        order.append(column)
        n += 1
        if n % accum == 0:
            updates += 1
            assert order[-1] == order[-accum]  # optimiser steps fall inside a column
    assert order == sorted(order) and updates == updates_per_epoch(k, p, bs, accum) == 10
    with pytest.raises(UserError, match="multiple of grad_accum"):
        updates_per_epoch(50, 32, 2, 3)
    with pytest.raises(UserError, match=r"pairs per process \(2: prompts per sampling batch × sampling batches per "
                       r"epoch\) must be a multiple of the train batch size \(4\): raise the first"):  # fmt: skip
        SDPOConfig.preset("paper", sample_batch_size=2, num_batches_per_epoch=1, train_batch_size=4)


# -- config --------------------------------------------------------------------------------------------
def test_config_presets_and_validation():
    paper = SDPOConfig.preset("paper")
    assert paper.num_steps == 50 and paper.pairs_per_process == 32 and paper.guidance_scale == 1.0
    assert (paper.gamma, paper.lam, paper.eta_s, paper.clip_range, paper.adv_clip) == (0.99, 0.99, 1.0, 1e-4, 5.0)
    assert (paper.buffer_size, paper.min_count, paper.inner_epochs, paper.max_grad_norm) == (32, 16, 1, 1.0)
    shapes = SDPOConfig.preset("shapes")
    assert shapes.num_steps == 2 and shapes.reward == "shapes-probe" and shapes.eval_steps == (1, 2, 4, 8)
    assert shapes.timestep_spacing == "trailing" and shapes.eval_sampler == "ddim-trailing"  # 1 step starts at 999
    assert shapes.eval_guidance <= 1.0 and shapes.min_count <= 2 * shapes.pairs_per_prompt
    k8 = SDPOConfig.preset("shapes-k8")
    assert (k8.num_steps, k8.lam, k8.timestep_spacing) == (8, 0.99, "trailing")
    assert [shapes_preset(k) for k in (None, 1, 2, 3, 8)] == ["shapes", "shapes", "shapes", "shapes-k8", "shapes-k8"]
    assert SDPOConfig.preset("paper-imagereward").reward_variant == "raw"
    assert set(PRESETS) >= {"paper", "shapes"}
    assert SDPOConfig(**paper.to_dict()) == paper
    with pytest.raises(AttributeError):
        paper.num_steps = 4  # frozen
    for bad, message in [
        ({"guidance_scale": 3.0}, "guidance_scale"), ({"eta": 0.0}, "eta must be above 0"),
        ({"min_count": 64}, "cannot exceed"), ({"train_batch_size": 3}, "multiple"),
        ({"cosine_clamp": "softmax"}, "cosine_clamp must be one of"), ({"num_steps": 2.5}, "whole number"),
        ({"clip_range": -1.0}, "clip_range"), ({"eval_steps": (1, 0)}, "eval_steps"), ({"reward": " "}, "reward"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            SDPOConfig.preset("paper", **bad)
    with pytest.raises(UserError, match="unknown SDPO preset"):
        SDPOConfig.preset("nope")
    with pytest.raises(UserError, match="unknown SDPO setting"):
        SDPOConfig.preset("paper", gama=0.9)


# -- 7. pairs on the tiny random pipeline ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sampled(random_pipe):
    pipe = random_pipe
    with torch.no_grad():
        cond, _ = encode(pipe, PROMPTS, None, False)
    ts = train_timesteps(pipe, 3, "pipeline")
    alphas, final = schedule_tensors(pipe, "cpu")
    gens_x, gens_a, gens_b = pair_generators([7, 8])
    x_T = initial_noise((2, 4, 8, 8), gens_x, "cpu")
    denoiser = UNetDenoiser(pipe.unet)
    pair = sample_pairs(denoiser, x_T, cond, ts, alphas, generators_a=gens_a, generators_b=gens_b,
                        final_alpha_cumprod=final)  # fmt: skip
    return dict(pipe=pipe, cond=cond, ts=ts, alphas=alphas, final=final, x_T=x_T, denoiser=denoiser, pair=pair)


def test_pairs_share_x_T_and_differ_afterwards(sampled):
    pair, x_T = sampled["pair"], sampled["x_T"]
    assert sampled["ts"] == [667, 334, 1]
    a, b = pair.a, pair.b
    assert a.latents.shape == b.latents.shape == (2, 4, 4, 8, 8) and a.pred_x0.shape == (2, 3, 4, 8, 8)
    assert torch.equal(a.latents[:, 0], x_T) and torch.equal(b.latents[:, 0], x_T) and torch.equal(pair.x_T, x_T)
    assert torch.equal(a.pred_x0[:, 0], b.pred_x0[:, 0])  # the first x̂0 sees the same x_T
    for i in range(1, 4):
        assert not torch.allclose(a.latents[:, i], b.latents[:, i])
    assert torch.isfinite(pair.joint.log_probs).all() and a.eta == 1.0


@torch.no_grad()
def test_lcm_pairs_train_every_step_but_the_last(sampled):
    """LCM steps as the policy (ALGORITHMS.md §0.2): log π = log N(x'; √ᾱ_p·f_θ, (1−ᾱ_p)I) on every step but the
    last, which returns f_θ; the pair's steps then hold K − 1 columns whose log-probs re-evaluate exactly."""
    from finetuners.generate import sampler_setup

    s = sampled
    ts, kind, kwargs = sampler_setup(s["pipe"], "lcm", 3)
    _, gens_a, gens_b = pair_generators([7, 8])
    pair = sample_pairs(s["denoiser"], s["x_T"], s["cond"], ts, s["alphas"], generators_a=gens_a,
                        generators_b=gens_b, final_alpha_cumprod=s["final"], step_kind=kind,
                        step_kwargs=kwargs)  # fmt: skip
    j = pair.joint
    assert kind == "lcm" and j.step_kind == "lcm"
    assert torch.isfinite(j.log_probs[:, :2]).all() and torch.isnan(j.log_probs[:, 2]).all()
    assert torch.equal(j.latents[:, 3], j.pred_x0[:, 2])  # the last step's output is f_θ itself
    a_p = s["alphas"][ts[1]]  # step 0's transition: mean √ᾱ_p·f_θ, std √(1−ᾱ_p)
    closed = torch.distributions.Normal(a_p.sqrt() * j.pred_x0[:, 0], (1 - a_p).sqrt()).log_prob(j.latents[:, 1])
    torch.testing.assert_close(j.log_probs[:, 0], closed.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    adv = torch.tensor([[1.0, 0.5, -1.0], [0.0, 2.0, 1.0]])
    steps = PairSteps.from_pair(pair, adv, torch.zeros(2, 3), step_weights(3), s["cond"])
    assert steps.num_steps == 2 and torch.equal(steps.timesteps[0], torch.tensor(ts[:2]))
    for _column, batch in iter_minibatches(steps, train_batch_size=2):
        loss, info = sdpo_minibatch_loss(s["denoiser"], batch, s["alphas"], clip_range=1e-4, step_kind="lcm",
                                         final_alpha_cumprod=s["final"], step_kwargs=kwargs)  # fmt: skip
        assert info["ratio_abs_max"] == 0.0  # unchanged weights: ratio exactly 1
        assert loss.item() == pytest.approx((batch.advantages_a**2).mean().item(), abs=1e-7)
    with pytest.raises(UserError, match="LCM training needs at least 2 steps"):
        SDPOConfig.preset("shapes", num_steps=1, train_sampler="lcm")
    with pytest.raises(UserError, match="train_sampler must be one of"):
        SDPOConfig.preset("shapes", train_sampler="euler")


@torch.no_grad()
def test_one_step_pairs_have_one_image_between_them(sampled):
    """Why SDPO refuses K_train = 1 (TrainConfig): the pair's only x̂0 is read off the shared x_T."""
    s = sampled
    ts = train_timesteps(s["pipe"], 1, "pipeline")
    _, gens_a, gens_b = pair_generators([7, 8])
    pair = sample_pairs(s["denoiser"], s["x_T"], s["cond"], ts, s["alphas"], generators_a=gens_a,
                        generators_b=gens_b, final_alpha_cumprod=s["final"])  # fmt: skip
    assert pair.a.pred_x0.shape[1] == 1 and torch.equal(pair.a.pred_x0, pair.b.pred_x0)


@torch.no_grad()
def test_pairs_replay_from_their_generators(sampled):
    s = sampled
    _, gens_a, gens_b = pair_generators([7, 8])
    again = sample_pairs(s["denoiser"], s["x_T"], s["cond"], s["ts"], s["alphas"], generators_a=gens_a,
                         generators_b=gens_b, final_alpha_cumprod=s["final"])  # fmt: skip
    assert torch.equal(again.joint.latents, s["pair"].joint.latents)


@torch.no_grad()
def test_pair_log_probs_reevaluate_exactly(sampled):
    s = sampled
    pair, cond2 = s["pair"], torch.cat([s["cond"], s["cond"]])
    for i in range(3):  # unchanged weights ⇒ log π_θ = log π_old bit for bit
        again = reevaluate_log_probs(s["denoiser"], pair.joint, cond2, s["alphas"], i, final_alpha_cumprod=s["final"])
        assert torch.equal(again.log_prob, pair.joint.log_probs[:, i])
    # after the step shuffle, a column mixes timesteps across rows; re-evaluated at the sampling batch size
    # (2 pairs × a, b = 4 rows) the loss is exactly mean ΔA² and the ratio exactly 1
    adv_a, adv_b = torch.tensor([[1.0, 0.5, -1.0], [0.0, 2.0, 1.0]]), torch.zeros(2, 3)
    steps = PairSteps.from_pair(pair, adv_a, adv_b, step_weights(3), s["cond"])
    steps = shuffle_steps(steps, torch.Generator().manual_seed(3))
    for _column, batch in iter_minibatches(steps, train_batch_size=2):
        loss, info = sdpo_minibatch_loss(s["denoiser"], batch, s["alphas"], clip_range=1e-4,
                                         final_alpha_cumprod=s["final"])  # fmt: skip
        assert info["ratio_abs_max"] == 0.0
        assert loss.item() == pytest.approx(((batch.advantages_a - batch.advantages_b) ** 2).mean().item(), abs=1e-7)


def test_pairs_refuse_cfg_and_deterministic_steps(sampled):
    s = sampled
    _, gens_a, gens_b = pair_generators([1, 2])
    guided = CFGDenoiser(s["denoiser"], s["cond"], 3.0)
    with pytest.raises(ValueError, match="CFG off"):
        sample_pairs(guided, s["x_T"], s["cond"], s["ts"], s["alphas"], generators_a=gens_a, generators_b=gens_b)
    with pytest.raises(ValueError, match="η > 0"):
        sample_pairs(s["denoiser"], s["x_T"], s["cond"], s["ts"], s["alphas"], generators_a=gens_a,
                     generators_b=gens_b, eta=0.0)  # fmt: skip


def test_one_epoch_end_to_end_on_the_tiny_pipeline(sampled):
    """Sample → decode 3 x̂0 per trajectory → dense rewards → returns → advantages → shuffled loss → gradients."""
    s = sampled
    pipe, pair = s["pipe"], s["pair"]
    seen = []

    def image_reward(images, prompts, metadata):  # §6 signature: images [N, 3, H, W] in [0, 1]
        assert images.min() >= 0 and images.max() <= 1
        seen.extend(prompts)
        return images.mean(dim=(1, 2, 3)), {}

    joint = pair.joint
    dense = dense_rewards(joint.pred_x0, latent_reward(pipe, image_reward, PROMPTS * 2))
    assert len(seen) == 3 * 4 and seen[:3] == [PROMPTS[0]] * 3  # 3 queries per trajectory, row-major
    returns = discounted_returns(dense.rewards, 0.99)
    tracker = step_tracker()
    adv, _ = sdpo_advantages(tracker, PROMPTS * 2, returns)
    steps = PairSteps.from_pair(pair, adv[:2], adv[2:], step_weights(3), s["cond"])
    steps = shuffle_steps(steps, torch.Generator().manual_seed(0))
    unet = pipe.unet
    unet.zero_grad()
    try:
        for _column, batch in iter_minibatches(steps, train_batch_size=2):
            loss, _ = sdpo_minibatch_loss(s["denoiser"], batch, s["alphas"], clip_range=1e-4,
                                          final_alpha_cumprod=s["final"])  # fmt: skip
            loss.backward()
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        unet.zero_grad(set_to_none=True)


def test_pairs_per_prompt_repeat_prompts_and_normalise_by_their_own_statistics():
    from finetuners.trainer import training_prompts

    cfg = SDPOConfig.preset("shapes", pairs_per_prompt=4, sample_batch_size=10, train_batch_size=2, grad_accum=5)
    prompts = training_prompts(cfg, epoch=0, batch=0, n=10)
    assert len(prompts) == 10 and prompts[:4] == [prompts[0]] * 4 and prompts[4:8] == [prompts[4]] * 4
    assert prompts[8:] == [prompts[8]] * 2 and len({prompts[0], prompts[4], prompts[8]}) == 3
    single = SDPOConfig.preset("shapes", pairs_per_prompt=1, sample_batch_size=3, train_batch_size=1, grad_accum=3)
    assert training_prompts(single, 0, 0, 3) == [prompts[0], prompts[4], prompts[8]]  # the same draws
    # 2 pairs of one prompt (4 trajectories) with min_count 4: that prompt's own mean and std at once
    tracker = step_tracker(buffer_size=32, min_count=4)
    returns = torch.tensor([[1.0], [3.0], [2.0], [2.0], [100.0], [300.0], [200.0], [200.0]])
    adv, _ = sdpo_advantages(tracker, ["x", "x", "x", "x", "y", "y", "y", "y"], returns)
    want = torch.tensor([-1.0, 1, 0, 0]) / 0.5**0.5  # ±1/σ with σ = √0.5 (×100 for "y": the same z-scores)
    assert torch.allclose(adv[:, 0], torch.cat([want, want]), atol=1e-4)


def test_probability_reward_variant_exponentiates_a_log_prob_reward():
    from finetuners.sdpo import training_reward

    def log_prob_reward(images, prompts, metadata):
        return torch.tensor([-0.5, -3.0]), {"k": 1}

    assert training_reward(log_prob_reward, "log_prob") is log_prob_reward
    rewards, info = training_reward(log_prob_reward, "probability")(None, ["a", "b"], [{}, {}])
    assert torch.allclose(rewards, torch.tensor([-0.5, -3.0]).exp()) and info == {"k": 1}
