"""AdaDiff (ALGORITHMS.md §3.6): the reward table, the policy-gradient estimators, a synthetic bandit, persistence,
bad input, and choosing steps / sampling on the random tiny pipeline."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from finetuners import adadiff as ad
from finetuners.errors import UserError
from finetuners.generate import SampleRequest, generate

U4 = (1, 2, 4, 8)


# -- reward table -------------------------------------------------------------------------------------------------


def test_reward_on_hand_made_quality():
    quality = torch.tensor([[0.0, 0.5, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2], [3.0, 1.0, 2.0, 0.0]])
    r = ad.reward_table(quality, U4, k=2, quality_weight=1.0, penalty=1.0)
    o = torch.tensor([1.0, 6 / 7, 4 / 7, 0.0])  # O(u) = (8 − u)/7
    # row 0: Q = (0, .5, 1, 1); top-2 = {4, 8} (tie at Q = 1 broken towards 4 first; both are in)
    torch.testing.assert_close(r[0], torch.tensor([-1.0, -1.0, o[2] + 1, o[3] + 1]))
    # row 1: no spread → Q = 0 everywhere, top-2 = the two fewest step counts
    torch.testing.assert_close(r[1], torch.tensor([o[0], o[1], -1.0, -1.0]))
    # row 2: Q = (1, 1/3, 2/3, 0) → top-2 = {1, 4}
    torch.testing.assert_close(r[2], torch.tensor([o[0] + 1, -1.0, o[2] + 2 / 3, -1.0]))


def test_flat_rows_skip_gives_no_signal():
    quality = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    fewest = ad.reward_table(quality, U4, k=2)
    skip = ad.reward_table(quality, U4, k=2, flat_rows="skip")
    assert torch.equal(skip[0], torch.zeros(4)) and torch.equal(skip[1], fewest[1]) and fewest[0, 0] == 1.0
    logits = torch.zeros(1, 4, requires_grad=True)
    ad.expected_reward_loss(logits, skip[:1]).backward()
    assert torch.equal(logits.grad, torch.zeros(1, 4))


def test_reward_table_invariants():
    g = torch.Generator().manual_seed(0)
    quality = torch.randint(0, 3, (200, 6), generator=g).float() / 2  # many ties, as with 2-seed accuracy
    cands = ad.CANDIDATE_SETS["shapes"]
    for k in (1, 2, 3):
        r = ad.reward_table(quality, cands, k=k, quality_weight=1.0, penalty=2.0)
        assert ((r >= 0).sum(-1) == k).all()  # exactly k entries ≥ 0, the rest −γ
        assert ((r < 0) == (r == -2.0)).all()
        assert torch.equal(r, ad.reward_table(quality, cands, k=k, quality_weight=1.0, penalty=2.0))  # deterministic
    r0 = ad.reward_table(quality, cands, k=3, quality_weight=0.0)  # λ = 0: the top-k rewards decrease in u
    for row in r0:
        inside = row[row >= 0]
        assert (inside[1:] < inside[:-1]).all()
    # ties go to fewer steps: a flat row's top-k is the k fewest
    flat = ad.reward_table(torch.ones(1, 6), cands, k=3)
    assert ((flat[0] >= 0).nonzero().flatten() == torch.tensor([0, 1, 2])).all()


# -- estimators ---------------------------------------------------------------------------------------------------


def test_reinforce_gradient_is_unbiased_and_the_baseline_lowers_its_variance():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, requires_grad=True)
    rewards = torch.tensor([[1.0, 2.0, 0.5, 3.0]])
    (exact,) = torch.autograd.grad(ad.expected_reward_loss(logits, rewards), logits)
    probs = logits.detach().softmax(-1)
    g = torch.Generator().manual_seed(1)
    n = 4000
    actions = torch.multinomial(probs.expand(n, -1), 1, replacement=True, generator=g)[:, 0]
    r = rewards[0, actions]
    grads = {}
    for name, b in (("plain", torch.zeros(n)), ("baseline", (probs * rewards).sum(-1).expand(n))):
        lg = logits.expand(n, -1)
        per = torch.stack([torch.autograd.grad(ad.reinforce_loss(lg[i : i + 1], actions[i : i + 1], r[i : i + 1],
                                                                 b[i : i + 1]), logits)[0][0]
                           for i in range(0, 400)])  # fmt: skip
        mean = torch.autograd.grad(ad.reinforce_loss(lg, actions, r, b), logits)[0]
        grads[name] = (mean, per.var(0).sum())
    for name in grads:
        torch.testing.assert_close(grads[name][0], exact, atol=0.05, rtol=0.0)
    assert grads["baseline"][1] < 0.5 * grads["plain"][1]


@pytest.mark.parametrize("loss", ["reinforce_baseline", "reinforce", "expected"])
def test_policy_gradient_moves_probability_to_the_rewarded_arm(loss):
    features = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    rewards = torch.zeros(32, 4)
    rewards[:, 2] = 1.0  # a bandit: arm 2 (4 steps) pays, the others do not
    config = ad.AdaDiffConfig(candidates=U4, loss=loss, epochs=60, batch_size=32, lr=1e-2, hidden=16)
    before = ad.StepPolicy(5, U4, 16)
    result = ad.train_policy(features, rewards, config)
    probs = result.policy.probs(features).detach()
    assert probs[:, 2].mean() > 0.9 > before.probs(features).detach()[:, 2].mean()
    assert result.history[-1]["expected_reward"] > result.history[0]["expected_reward"]


def test_synthetic_contextual_bandit_reaches_95_percent():
    """A planted feature of e(p) fixes the best u (§3.6 test 3); the argmax must follow it on unseen prompts."""
    g = torch.Generator().manual_seed(0)
    best = torch.randint(0, 4, (400,), generator=g)
    features = torch.randn(400, 8, generator=g)
    features[:, 0] = best.float() + 0.2 * torch.randn(400, generator=g)  # the planted feature
    quality = torch.nn.functional.one_hot(best, 4).float() + 0.1 * torch.rand(400, 4, generator=g)
    rewards = ad.reward_table(quality, U4, k=2, quality_weight=2.0)
    assert (rewards.argmax(-1) == best).all()
    config = ad.AdaDiffConfig(candidates=U4, epochs=40, batch_size=100, lr=2e-2, hidden=32)
    result = ad.train_policy(features[:300], rewards[:300], config)
    chosen = result.policy.probs(features[300:]).argmax(-1)
    assert (chosen == best[300:]).float().mean() >= 0.95


def test_training_is_replayable_from_its_seed():
    features, rewards = torch.randn(20, 3), torch.rand(20, 4)
    config = ad.AdaDiffConfig(candidates=U4, loss="reinforce_baseline", epochs=5, batch_size=8)
    a = ad.train_policy(features, rewards, config).policy.probs(features)
    b = ad.train_policy(features, rewards, config).policy.probs(features)
    assert torch.equal(a, b)


# -- persistence ---------------------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_probabilities(tmp_path):
    features = torch.randn(10, 6)
    config = ad.AdaDiffConfig(candidates=(1, 2, 3, 4, 6, 8), epochs=3, hidden=8)
    policy = ad.train_policy(features, torch.rand(10, 6), config).policy
    ladder = ad.Ladder(["a red circle"], torch.tensor([[0, 1]]), config.candidates, torch.rand(1, 2, 6))
    ad.save_policy(tmp_path / "p", policy, config, {"model": "shapes"}, ladder)
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["config.json", "policy.safetensors",
                                                                   "table.safetensors"]  # fmt: skip
    loaded, config2, meta = ad.load_policy(tmp_path / "p")
    assert config2 == config and meta == {"model": "shapes"} and loaded.candidates == config.candidates
    assert torch.equal(loaded.probs(features), policy.probs(features))
    back = ad.load_ladder(tmp_path / "p")
    assert back.prompts == ["a red circle"] and torch.equal(back.scores, ladder.scores)
    assert ad.list_policies(tmp_path) == ["p", *ad.SHIPPED_POLICIES]


def test_the_shipped_policy_is_listed_and_found_unless_a_saved_one_has_its_name(tmp_path):
    shipped = ad.shipped_policy("shapes")
    assert shipped is not None and shipped.parent.name == "assets" and ad.shipped_policy("p") is None
    assert ad.list_policies(tmp_path / "missing") == ["shapes"]
    assert ad.find_policy(tmp_path, "shapes") == shipped
    assert ad.find_policy(tmp_path, "other") == tmp_path / "other"  # load_policy says it does not exist
    assert ad.policy_arg("shapes") == shipped and ad.policy_arg(tmp_path / "x") == tmp_path / "x"
    config = ad.AdaDiffConfig(candidates=U4, hidden=8)
    ad.save_policy(tmp_path / "shapes", ad.StepPolicy(4, U4, 8), config)
    assert ad.list_policies(tmp_path) == ["shapes"]  # listed once
    assert ad.find_policy(tmp_path, "shapes") == tmp_path / "shapes"
    assert ad.load_policy(ad.find_policy(tmp_path, "shapes"))[0].candidates == U4
    with pytest.raises(UserError, match="invalid policy name"):
        ad.find_policy(tmp_path, "../shapes")


def test_load_refuses_anything_but_its_own_safetensors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ad.load_policy(tmp_path / "nope")
    (tmp_path / "pickled").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "pickled" / "policy.pt")
    with pytest.raises(UserError, match="only safetensors"):
        ad.load_policy(tmp_path / "pickled")
    policy = ad.StepPolicy(4, U4, 8)
    ad.save_policy(tmp_path / "bad", policy, ad.AdaDiffConfig(candidates=U4, hidden=8))
    (tmp_path / "bad" / "policy.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        ad.load_policy(tmp_path / "bad")
    ad.save_policy(tmp_path / "other", policy, ad.AdaDiffConfig(candidates=U4, hidden=8))
    record = json.loads((tmp_path / "other" / "config.json").read_text())
    record["format"] = "something/else"
    (tmp_path / "other" / "config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="format"):
        ad.load_policy(tmp_path / "other")
    for name in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(UserError, match="invalid policy name"):
            ad.policy_path(tmp_path, name)


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(candidates=()), "candidate set of step counts is empty"),
        (dict(candidates=(0, 1, 2)), "must be positive, got 0"),
        (dict(candidates=(4, -1)), "must be positive, got -1"),
        (dict(candidates=(1, 2, 2, 4)), "must be distinct: 2 given more than once"),
        (dict(candidates=(1.5, 2)), "whole numbers"),
        (dict(candidates=(4,)), "at least two"),
        (dict(candidates=(1, 500)), "at most 200"),
        (dict(quality_weight=-0.5), "quality_weight must be a number ≥ 0"),
        (dict(penalty=-1), "penalty must be a number ≥ 0"),
        (dict(top_k=5), "top_k must be between 1 and 4"),
        (dict(loss="ppo"), "unknown loss"),
        (dict(sampler="euler"), "unknown sampler"),
        (dict(lr=0), "lr must be in"),
        (dict(flat_rows="drop"), "unknown flat_rows"),
    ],
)
def test_bad_config_gives_a_clear_message(kwargs, message):
    with pytest.raises(UserError, match=message):
        ad.AdaDiffConfig(**{"candidates": U4, **kwargs})


def test_defaults_and_candidate_sets():
    assert ad.AdaDiffConfig().candidates == (1, 2, 4, 8) and ad.AdaDiffConfig().k == 2
    assert ad.AdaDiffConfig(candidates=ad.CANDIDATE_SETS["standard"]).k == 3
    assert ad.AdaDiffConfig(candidates=(8, 1, 4)).candidates == (1, 4, 8)  # sorted
    torch.testing.assert_close(ad.step_saving((1, 3, 5)), torch.tensor([1.0, 0.5, 0.0]))


def test_training_prompts_keep_the_worlds_template_mix_and_their_seeds_are_not_the_evaluations():
    """Distinct captions outside the evaluation list would be 894 relations of 898 (the world has 18 single-object
    captions, every one of them among ``eval_prompts(1000)``); draws in the world's mix keep every template."""
    from finetuners.shapes.world import eval_prompts, parse_prompt

    def shares(prompts):
        kinds = [parse_prompt(p).template for p in prompts]
        return {t: kinds.count(t) / len(kinds) for t in ("object", "position", "relation")}

    train = ad.training_prompts(1000)
    assert train == ad.training_prompts(1000) and train != eval_prompts(1000)  # its own seeded draws
    for t, share in shares(eval_prompts(1000)).items():
        assert abs(shares(train)[t] - share) < 0.05, (t, shares(train))
    seeds = ad.ladder_seeds(len(train), 2, ad.TRAIN_SEED_BASE)
    assert int(seeds.min()) >= 1000 and int(seeds.max()) < 2**32  # never seed i of an evaluation list ≤ 1000


# -- on a (random) pipeline -----------------------------------------------------------------------------------------


def test_render_matches_generate_and_the_ladder_scores_every_candidate(random_pipe):
    prompts = ["a red circle", "a blue square above a green triangle"]
    x, nfe = ad.render(random_pipe, prompts, [3, 5], 2, "ddim-trailing", 3.0)
    assert nfe == 2 * 2 * 2  # images × steps × CFG rows
    ref = generate(random_pipe, SampleRequest(prompts[1], steps=2, sampler="ddim-trailing", guidance=3.0, seed=5,
                                              record_pred_x0=False))  # fmt: skip
    torch.testing.assert_close(x[1], ref.images[0], atol=1e-5, rtol=0)
    calls = []

    def iqs(images, ps):
        calls.append(len(ps))
        return images.mean((1, 2, 3))

    ladder = ad.build_quality_table(random_pipe, prompts, (1, 2), iqs, seeds=ad.ladder_seeds(2, 2), keep_images=True)
    assert ladder.scores.shape == (2, 2, 2) and ladder.images.shape[:3] == (2, 2, 2) and ladder.quality.shape == (2, 2)
    assert sum(calls) == 2 * 2 * 2 and ladder.nfe == 2 * 2 * (1 + 2) * 2


def test_score_images_scores_each_ladder_image_against_its_own_prompt_in_chunks():
    """Image [p, s, n] holds the value 100·p + 10·s + n; the IQS adds the prompt's length, so a wrong pairing or
    order shows, and chunks of 4 split prompts and seeds alike."""
    import torch

    p, s, n = 3, 2, 5
    value = (100 * torch.arange(p)[:, None, None] + 10 * torch.arange(s)[None, :, None] + torch.arange(n)).float()
    images = value[..., None, None, None].expand(p, s, n, 3, 2, 2).contiguous()
    prompts = ["a", "bb", "ccc"]
    calls = []

    def iqs(x, ps):
        calls.append(len(ps))
        return x.mean((1, 2, 3)) + torch.tensor([len(q) for q in ps], dtype=torch.float32)

    scores = ad.score_images(images, prompts, iqs, chunk=4)
    assert torch.equal(scores, value + torch.tensor([1.0, 2.0, 3.0])[:, None, None])
    assert calls == [4] * 7 + [2]  # 30 images


def test_choose_steps_and_adaptive_generation(random_pipe):
    features = ad.text_features(random_pipe, ["a red circle", "a red circle on the left"])
    assert features.shape == (2, 2 * random_pipe.text_encoder.config.hidden_size)
    assert not torch.equal(features[0], features[1])
    policy = ad.StepPolicy(features.shape[1], (1, 2, 3), 8)
    steps, probs = ad.choose_steps(random_pipe, policy, ["a red circle", "a red circle on the left"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert all(s in (1, 2, 3) for s in steps)
    assert ad.choose_steps(random_pipe, policy, ["a red circle", "a red circle on the left"])[0] == steps
    request = SampleRequest("a red circle", steps=50, sampler="ddim", guidance=5.0, record_pred_x0=False)
    result = ad.generate_adaptive(random_pipe, policy, request)
    assert len(result.timesteps) == steps[0] == result.info["adaptive_steps"]
    config = ad.AdaDiffConfig(candidates=(1, 2, 3), sampler="ddim-trailing", guidance=2.0)
    assert ad.adaptive_request(request, 2, config) == replace(request, steps=2, sampler="ddim-trailing", guidance=2.0)
    ours = ad.generate_adaptive(random_pipe, policy, request, config=config)  # the policy's sampler and guidance
    ref = generate(random_pipe, replace(request, steps=steps[0], sampler="ddim-trailing", guidance=2.0))
    assert ours.timesteps == ref.timesteps and ours.timesteps[0] == 999 and torch.equal(ours.images, ref.images)
    with pytest.raises(UserError, match="another model"):
        ad.choose_steps(random_pipe, ad.StepPolicy(7, (1, 2), 8), ["a red circle"])
    with pytest.raises(UserError, match="prompt is empty"):
        ad.choose_steps(random_pipe, policy, [" "])


def test_a_shapes_quality_score_refuses_what_it_cannot_read_before_anything_renders():
    from types import SimpleNamespace

    def pipe(sample_size, factor):
        return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)),
                               vae_scale_factor=factor)  # fmt: skip

    for quality in ("shapes-accuracy", "shapes-probability", "shapes-probe"):
        ad.check_quality(quality, ["a red circle", "a blue square above a red circle"], pipe(8, 4))  # 32 × 32
        with pytest.raises(UserError, match="reads Shapes captions only, and 'a photo of a cat'"):
            ad.check_quality(quality, ["a red circle", "a photo of a cat"])
        with pytest.raises(UserError, match="reads 32×32 Shapes images, and this model draws 512×512"):
            ad.check_quality(quality, ["a red circle"], pipe(64, 8))  # an SD 1.x model
    ad.check_quality("jpeg-compressibility", ["a photo of a cat"], pipe(64, 8))  # any prompt, any size


def test_the_suggested_setup_follows_the_model(monkeypatch):
    """§3.2 (ours): the Shapes set on a small UNet, the few-step set where the model's default is ≤ 8 steps, else
    the paper's; trailing DDIM under 5 steps (LCM on LCM), else the model's spacing; the model's guidance, which for
    a fine-tuned checkpoint is its run's."""
    from types import SimpleNamespace

    import finetuners.models
    from finetuners.models import ModelDefaults

    def pipe(sampler, steps, guidance):
        return SimpleNamespace(unet=torch.nn.Linear(2, 2), finetuners_defaults=ModelDefaults(sampler, steps, guidance))

    assert ad.suggested_setup(pipe("ddim", 20, 3.0)) == ((1, 2, 3, 4, 6, 8), "ddim-trailing", 3.0)  # Shapes
    assert ad.suggested_setup(pipe("ddim-trailing", 2, 1.0)) == ((1, 2, 3, 4, 6, 8), "ddim-trailing", 1.0)  # its run
    monkeypatch.setattr(finetuners.models, "SMALL_UNET_PARAMS", 0)  # as if the UNet were a real one
    assert ad.suggested_setup(pipe("ddim-trailing", 1, 0.0)) == ((1, 2, 4, 8), "ddim-trailing", 0.0)  # SD-Turbo
    assert ad.suggested_setup(pipe("lcm", 4, 1.0)) == ((1, 2, 4, 8), "lcm", 1.0)  # LCM
    assert ad.suggested_setup(pipe("ddim", 25, 7.5)) == (tuple(range(5, 55, 5)), "ddim", 7.5)  # SD 1.x
    assert ad.suggested_setup(pipe("ddim", 25, 7.5), (4, 1, 2)) == ((1, 2, 4), "ddim-trailing", 7.5)
    with pytest.raises(UserError, match="positive"):
        ad.suggested_setup(pipe("ddim", 25, 7.5), (0, 1))
