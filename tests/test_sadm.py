"""SADM-style structure-guided adversarial training (ALGORITHMS.md §5.6): the structure loss on constructed
batches, the x̂0 prediction, update isolation, λ = 0 against the plain denoising trainer, opposite moves of
the two players, a short run (finite, reloadable, resumable) and the batch-size-1 message.

The FD checks of §5.6 (FD(X, X) = 0, symmetry, the two-Gaussian closed form, a scipy ``sqrtm`` reference) are
in tests/test_shapes.py::test_frechet_distance_closed_form_and_properties.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from finetuners import runs
from finetuners import sadm as S
from finetuners.errors import UserError

TINY = dict(batch_size=4, n_images=16, caption_dropout=0.25, learning_rate=1e-3)


# -- structure -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("center", [False, True])
def test_structure_matrix_symmetric_unit_diagonal_in_range(center):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, generator=g) + 3.0  # a common offset: what centring removes
    s = S.structure_matrix(f, torch.rand(7, generator=g) if center else None)
    assert torch.allclose(s, s.T, atol=1e-6)
    assert torch.allclose(s.diagonal(), torch.ones(7), atol=1e-6)
    assert s.min() >= -1 - 1e-6 and s.max() <= 1 + 1e-6
    if not center:  # the degenerate case centring exists for: every cosine near 1
        assert s.min() > 0.5


def test_structure_distance_closed_form():
    e = torch.eye(3)
    real, fake = e, torch.stack([e[0], e[0], e[1]])  # S_real = I; S_fake has S_01 = S_10 = 1, others 0
    # 6 off-diagonal pairs, (S_real − S_fake)² = 1 on two of them
    assert float(S.structure_distance(real, fake, centering="none")) == pytest.approx(2 / 6)
    # ω = (1, 1, 0): only the pair (0, 1) counts, both orders, weight √(1·1)
    assert float(S.structure_distance(real, fake, torch.tensor([1.0, 1.0, 0.0]), "none")) == pytest.approx(1.0)
    # ω = (1, 4, 1): w_01 = 2, w_02 = 1, w_12 = 2 → d = 2·2 / (2·(2 + 1 + 2))
    assert float(S.structure_distance(real, fake, torch.tensor([1.0, 4.0, 1.0]), "none")) == pytest.approx(0.4)
    assert float(S.structure_distance(real, fake, torch.zeros(3), "none")) == 0.0  # no weight: nothing counts


@pytest.mark.parametrize("centering", S.CENTERINGS)
def test_structure_distance_permutation_zero_nonnegative_and_zero_weights(centering):
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    omega = torch.rand(8, generator=g)
    d = S.structure_distance(real, fake, omega, centering)
    assert d > 0
    perm = torch.randperm(8, generator=g)  # a joint permutation permutes S and leaves d unchanged
    c = omega if centering == "weighted" else None
    assert torch.allclose(S.structure_matrix(real[perm], c[perm] if c is not None else None),
                          S.structure_matrix(real, c)[perm][:, perm], atol=1e-6)  # fmt: skip
    assert float(S.structure_distance(real[perm], fake[perm], omega[perm], centering)) == pytest.approx(float(d))
    assert float(S.structure_distance(real, real.clone(), omega, centering)) == pytest.approx(0.0, abs=1e-7)
    for _ in range(20):
        a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
        assert float(S.structure_distance(a, b, torch.rand(5, generator=g), centering)) >= 0
    omega0 = omega.clone()
    omega0[3] = 0.0  # sample 3 has weight 0: whatever its fake is, d does not change
    fake2 = fake.clone()
    fake2[3] = torch.randn(6, generator=g) * 10
    assert float(S.structure_distance(real, fake2, omega0, centering)) == pytest.approx(
        float(S.structure_distance(real, fake, omega0, centering)), rel=1e-5
    )


def test_batch_size_one_is_a_clear_error():
    with pytest.raises(UserError, match="at least 2.*pairs"):
        S.SADMConfig(batch_size=1)
    with pytest.raises(UserError, match="at least 2"):
        S.SADMConfig.from_dict({"batch_size": 1})
    with pytest.raises(UserError, match="at least 2 samples"):
        S.structure_distance(torch.randn(1, 4), torch.randn(1, 4))


def test_config_round_trip_and_bad_values():
    cfg = S.SADMConfig(structure_weight=0.5, eval_steps=(1, 20), domain="large")
    assert S.SADMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in [({"structure_weight": -1}, "structure_weight"), ({"domain": "mars"}, "unknown domain"),
                       ({"disc_steps": 0}, "disc_steps is 0"), ({"learning_rate": 0}, "learning_rate"),
                       ({"eval_steps": []}, "eval_steps"), ({"lambda": 1}, "unknown SADM setting"),
                       ({"epochs": "ten"}, "epochs")]:  # fmt: skip
        with pytest.raises(UserError, match=match):
            S.SADMConfig.from_dict(bad)
    assert S.SADMConfig(structure_weight=0.0, disc_steps=0).disc_steps == 0  # plain denoising needs no D
    cfg = S.SADMConfig(structure_weight=0.2, warmup_fraction=0.5, epochs=2, steps_per_epoch=5)
    assert [cfg.structure_weight_at(s) for s in (0, 2, 5, 9)] == pytest.approx([0.0, 0.08, 0.2, 0.2])


# -- the model pieces ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(random_pipeline_dir):
    """A random Shapes-architecture pipeline, its data, and a fresh ``SADMRun`` factory (fresh weights each)."""
    from finetuners.models import load_model

    pipe = load_model(str(random_pipeline_dir), "cpu")
    unet0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    data = S.make_shapes_data(pipe, 16, seed=3)

    def make(**kw) -> S.SADMRun:
        pipe.unet.load_state_dict(unet0)
        return S.SADMRun(pipe, S.SADMConfig(**{**TINY, **kw}), data)

    return pipe, data, make


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_true_eps_predicts_x0(tiny):
    _, data, make = tiny
    m = make().models
    batch = S.draw_batch(data, 16, 0.0, torch.Generator().manual_seed(0))
    x_t = S.noised(batch, m.alphas_cumprod)
    assert torch.allclose(S.predict_x0(batch.eps, x_t, batch, m.alphas_cumprod), batch.z0, atol=1e-4)


def test_updates_are_isolated(tiny):
    _, data, make = tiny
    run = make(structure_weight=1.0, warmup_fraction=0.0)
    m = run.models
    theta, phi = _params(m.unet), _params(m.encoder)
    S.discriminator_step(m, data, run.cfg, torch.Generator().manual_seed(1))
    assert _same(theta, _params(m.unet)), "the discriminator step changed θ"
    assert not _same(phi, _params(m.encoder)), "the discriminator step did not change φ"
    assert all(p.grad is None for p in m.unet.parameters()), "a gradient reached θ in the discriminator step"
    phi = _params(m.encoder)
    out = S.denoiser_step(m, data, run.cfg, torch.Generator().manual_seed(2), structure_weight=1.0)
    assert out["structure_loss"] > 0
    assert _same(phi, _params(m.encoder)), "the denoiser step changed φ"
    assert all(p.grad is None for p in m.encoder.parameters()), "a gradient reached φ in the denoiser step"
    assert not _same(theta, _params(m.unet)), "the denoiser step did not change θ"


def test_lambda_zero_reproduces_the_plain_denoising_trainer(tiny):
    _, data, make = tiny
    plain = make(structure_weight=0.0, disc_steps=0)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        S.denoising_step(plain.models, data, plain.cfg, gen)
    expected = _params(plain.models.unet)

    sadm0 = make(structure_weight=0.0, disc_steps=2)  # the discriminator trains, on its own generator
    g_den, g_disc = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    phi0 = _params(sadm0.models.encoder)
    for step in range(3):
        out = S.sadm_step(sadm0.models, data, sadm0.cfg, step, g_den, g_disc)
        assert np.isfinite(out["structure_loss"]) and np.isfinite(out["disc_structure"])
    assert not _same(phi0, _params(sadm0.models.encoder))
    assert _same(expected, _params(sadm0.models.unet)), "λ = 0 differs from the plain denoising trainer"

    sadm1 = make(structure_weight=1.0, warmup_fraction=0.0, disc_steps=2)  # control: λ > 0 does change θ
    g_den, g_disc = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    for step in range(3):
        S.sadm_step(sadm1.models, data, sadm1.cfg, step, g_den, g_disc)
    assert not _same(expected, _params(sadm1.models.unet))


def test_discriminator_raises_and_denoiser_lowers_the_structure_distance(tiny):
    _, data, make = tiny
    run = make(structure_weight=1e3, warmup_fraction=0.0, disc_penalty=0.0, batch_size=8, caption_dropout=0.0,
               learning_rate=1e-4, disc_learning_rate=1e-3)  # fmt: skip
    m, cfg = run.models, run.cfg
    for seed in range(3):  # the same batch for both players: generators in the same state
        batch = S.draw_batch(data, cfg.batch_size, cfg.caption_dropout, torch.Generator().manual_seed(seed))
        d0 = S.measure_structure(m, data, cfg, batch)
        S.discriminator_step(m, data, cfg, torch.Generator().manual_seed(seed))
        d1 = S.measure_structure(m, data, cfg, batch)
        S.denoiser_step(m, data, cfg, torch.Generator().manual_seed(seed), cfg.structure_weight)
        d2 = S.measure_structure(m, data, cfg, batch)
        assert d1 > d0, f"the discriminator step did not raise d ({d0} → {d1})"
        assert d2 < d1, f"the denoiser step did not lower d ({d1} → {d2})"


# -- a run --------------------------------------------------------------------------------------------
RUN = dict(TINY, structure_weight=0.5, epochs=2, steps_per_epoch=2, eval_every=1, eval_images=4, eval_steps=(2,),
           checkpoint_every=1)  # fmt: skip


def test_short_run_is_finite_reloadable_and_resumes_exactly(tmp_path, random_pipeline_dir):
    from finetuners.models import load_model

    cfg = S.SADMConfig.from_dict({**RUN, "model": str(random_pipeline_dir)})
    straight = S.train_sadm(tmp_path / "straight", cfg)
    assert straight["state"] == "finished"
    records = runs.read_metrics(tmp_path / "straight")
    epochs = [r for r in records if r["event"] == "epoch"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["epoch"] for r in evals] == [0, 1, 2]
    for r in epochs:
        for key in ("loss", "denoising_loss", "structure_loss", "disc_structure", "grad_norm"):
            assert np.isfinite(r[key]), (key, r)
    for r in evals:
        assert np.isfinite(r["eval_fd_probe_k2"]) and 0 <= r["eval_accuracy_k2"] <= 1
    assert (tmp_path / "straight" / "samples" / "step-000004_k2.png").is_file()
    assert [n for n, _ in runs.list_checkpoints(tmp_path / "straight")] == [2, 4]

    # the checkpoint loads as a model, the way the Sample tab loads it
    pipe = runs.load_checkpoint_pipeline(tmp_path, "run:straight/step-4", "cpu")
    base = load_model(str(random_pipeline_dir), "cpu")
    assert not _same(_params(base.unet), _params(pipe.unet))

    # stopped after the first epoch (stop event), then resumed: the same weights as the straight run
    stop = threading.Event()
    first = S.train_sadm(tmp_path / "split", cfg, stop_event=stop,
                         on_metrics=lambda r: stop.set() if r["event"] == "epoch" else None)  # fmt: skip
    assert first["state"] == "stopped"
    assert S.check_resumable(tmp_path / "split") == cfg
    with pytest.raises(UserError, match="already exists"):
        S.train_sadm(tmp_path / "split", cfg)
    second = S.train_sadm(tmp_path / "split", resume=True)
    assert second["state"] == "finished"
    resumed = runs.load_checkpoint_pipeline(tmp_path, "run:split/step-4", "cpu")
    assert _same(_params(pipe.unet), _params(resumed.unet)), "stop + resume differs from the uninterrupted run"


def test_stop_file_stops_within_an_epoch(tmp_path, random_pipeline_dir, monkeypatch):
    cfg = S.SADMConfig.from_dict({**RUN, "model": str(random_pipeline_dir), "eval_every": 0})
    run_dir = tmp_path / "r"
    step = S.SADMRun.step

    def step_then_stop(self):  # someone creates STOP during the first step of an epoch of two
        out = step(self)
        (run_dir / "STOP").touch()
        return out

    monkeypatch.setattr(S.SADMRun, "step", step_then_stop)
    status = S.train_sadm(run_dir, cfg)
    assert status["state"] == "stopped" and not (run_dir / "STOP").exists()
    assert [n for n, _ in runs.list_checkpoints(run_dir)] == [1]
    assert runs.read_metrics(run_dir)[-1] == {**runs.read_metrics(run_dir)[-1], "event": "stopped", "global_step": 1}


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    from finetuners.__main__ import main

    for argv, match in [(["--batch", "1"], "batch_size must be at least 2"), (["--domain", "mars"], "unknown domain"),
                        (["--resume"], "cannot resume")]:  # fmt: skip
        assert main(["sadm", "--run", str(tmp_path / "r"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # bad input writes nothing


def test_shifted_domain_is_readable_by_the_shipped_probe(shapes_probe):
    """The cross-domain target ("large": bigger shapes) is a world the probe still reads, so its FD and accuracy
    mean the same there; the same seed gives the same captions and placements as the default world."""
    from finetuners.shapes.probe import prompt_accuracy
    from finetuners.shapes.world import make_dataset

    large, default = make_dataset(200, seed=5, domain="large"), make_dataset(200, seed=5)
    assert [s.caption for s in large] == [s.caption for s in default]
    assert [s.objects for s in large] == [s.objects for s in default]
    assert any((a.image != b.image).any() for a, b in zip(large, default))
    x = torch.from_numpy(np.stack([s.image for s in large])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert prompt_accuracy(shapes_probe, x, [s.spec for s in large]).mean() >= 0.95


def test_scratch_init_is_a_fresh_unet_fixed_by_the_seed(random_pipeline_dir):
    from finetuners.models import load_model

    pipes = [load_model(str(random_pipeline_dir), "cpu") for _ in range(3)]
    loaded = _params(pipes[0].unet)
    data = S.make_shapes_data(pipes[0], 4, seed=0)
    unets = [S.SADMRun(p, S.SADMConfig(**{**TINY, "init": "scratch", "seed": s}), data).models.unet
             for p, s in zip(pipes, (0, 0, 1))]  # fmt: skip
    assert not _same(loaded, _params(unets[0]))
    assert _same(_params(unets[0]), _params(unets[1])) and not _same(_params(unets[0]), _params(unets[2]))
    assert pipes[0].unet is unets[0]  # the pipeline samples with the new UNet
