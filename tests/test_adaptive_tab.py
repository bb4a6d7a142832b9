"""The Adaptive steps tab without a browser (random tiny pipeline): train a policy from the tab, a prompt's step
distribution and ladder, a prompt set, bad input; adaptive steps in the Sample tab; the CLI ``adapt-train`` and
``sample --adaptive``."""

from __future__ import annotations

import pytest

from finetuners import adadiff as ad
from finetuners.__main__ import main as cli
from finetuners.generate import MAX_PROMPT_CHARS
from ui.adaptive_tab import (
    MIN_REWARD_SPAN,
    default_policy,
    histogram_figure,
    history_figure,
    on_model,
    on_prompt,
    on_prompt_set,
    on_train,
    policy_choices,
    probs_figure,
    quality_choices,
    quality_figure,
    run_prompt,
    run_prompt_set,
    set_prompts,
    setup_for,
    train_steps,
)
from ui.backend import Backend, Settings
from ui.sample_tab import run_sample


@pytest.fixture(scope="module")
def backend(random_pipeline_dir, tmp_path_factory) -> Backend:
    data = tmp_path_factory.mktemp("data")
    return Backend(Settings(model=str(random_pipeline_dir), device="cpu", max_batch=4, data_dir=data))


@pytest.fixture(scope="module")
def trained(backend) -> str:
    """A policy trained from the tab's handler: 4 prompts × 1 seed at 1 and 2 steps."""
    model = backend.settings.model
    updates = list(train_steps(backend, model, "tiny", 4, 1, "2, 1", 5, 1.0))
    assert "ladder" in updates[1][0] and updates[-1][1] is not None and "saved tiny" in updates[-1][0]
    assert len(updates[-1][1]) == 5  # one history record per epoch
    return "tiny"


def test_training_from_the_tab_saves_a_policy(backend, trained):
    folder = backend.settings.data_dir / "policies" / trained
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "policy.safetensors", "table.safetensors"]
    _, config, meta = ad.load_policy(folder)
    assert config.candidates == (1, 2) and meta["prompts"] == 4
    assert policy_choices(backend) == sorted([trained, *ad.SHIPPED_POLICIES])
    assert default_policy(policy_choices(backend)) == trained  # a page starts on a saved policy over a shipped one
    assert default_policy(["shapes"]) == "shapes" and default_policy([]) is None


def test_a_nearly_constant_training_curve_keeps_a_readable_axis():
    """Plotly zooms into a line that barely moves until its ticks read 0.9999999, 0.99999995, 1; the expected reward
    axis spans at least MIN_REWARD_SPAN, centred on the line, and is plotly's own once the line spans more."""
    flat = [dict(epoch=e, expected_reward=r, mean_steps=1.0) for e, r in enumerate([0.9999999, 1.0, 1.0], 1)]
    lo, hi = history_figure(flat).layout.yaxis.range
    assert hi - lo == pytest.approx(MIN_REWARD_SPAN) and (lo + hi) / 2 == pytest.approx(0.99999995)
    moving = [dict(epoch=e, expected_reward=r, mean_steps=2.0) for e, r in enumerate([0.2, 0.5, float("nan")], 1)]
    assert history_figure(moving).layout.yaxis.range is None


def test_a_prompt_shows_probabilities_the_choice_and_every_candidate(backend, trained):
    view = run_prompt(backend, backend.settings.model, trained, "a red circle above a blue square", 3)
    assert view.candidates == (1, 2) and abs(sum(view.probs) - 1) < 1e-5 and view.chosen in (1, 2)
    assert len(view.images) == 2 and "← chosen" in "".join(c for _, c in view.images)
    assert view.scores is not None and all(s in (0.0, 1.0) for s in view.scores)  # probe accuracy of a Shapes prompt
    fig = probs_figure(view)
    assert list(fig.data[0].y) == pytest.approx(view.probs)
    # a prompt the probe cannot read: images without scores, no error
    other = run_prompt(backend, backend.settings.model, trained, "a photo of a cat", 0)
    assert other.scores is None and "no quality scores" in other.info


def test_a_prompt_set_gives_the_histogram_nfe_and_quality_curve(backend, trained):
    view = run_prompt_set(backend, backend.settings.model, trained, "", 8)
    assert sum(view.histogram) == 8 and len(view.fixed_quality) == 2 and 0 <= view.adaptive_quality <= 1
    assert "network evaluations per image" in view.info
    import re

    m = re.search(r"within 0.01 of adaptive: \*\*(\d+)\*\* → \*\*(\d+)% (fewer|more) steps", view.info)
    saved = 1 - view.mean_steps / int(m[1])  # a saving below zero reads "more steps", never "-12% fewer"
    assert (m[3] == "fewer") == (saved >= 0) and int(m[2]) == round(100 * abs(saved))
    assert histogram_figure(view).data[0].y is not None and len(quality_figure(view).data) == 2
    assert view.fixed_accuracy is None  # the policy's own score is the probe's accuracy: shown once


def test_a_policy_scored_by_another_iqs_also_shows_probe_accuracy_on_shapes_prompts(backend):
    """A policy trained on the probe's probability (as the shipped one) is compared by its own score and, beside it,
    by the probe's exact accuracy: the same images, rendered again here, give the same accuracies."""
    import re

    model = backend.settings.model
    assert "saved tiny-prob" in list(train_steps(backend, model, "tiny-prob", 4, 1, "1 2", 5, 1.0,
                                                 quality="shapes-probability"))[-1][0]  # fmt: skip
    view = run_prompt_set(backend, model, "tiny-prob", "", 8)
    prompts = set_prompts("", 8)
    accuracy = ad.make_iqs("shapes-accuracy")
    for u, got in zip((1, 2), view.fixed_accuracy):
        images, _ = backend.run_with([model], lambda pipe, u=u: ad.render(pipe, prompts, range(8), u,
                                                                           "ddim-trailing", 3.0))  # fmt: skip
        assert got == pytest.approx(float(accuracy(images, prompts).mean()))
    assert 0 <= view.adaptive_accuracy <= 1 and len(view.fixed_quality) == 2
    assert "adaptive shapes-probability" in view.info and "adaptive probe accuracy" in view.info
    assert len(re.findall(r"smallest fixed count within 0.01 of adaptive", view.info)) == 2
    names = [t.name for t in quality_figure(view).data]
    assert names == ["fixed steps · policy's score", "adaptive · policy's score", "fixed steps · probe accuracy",
                     "adaptive · probe accuracy"]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(policy=None), "no policy chosen"),
        (dict(policy="../etc"), "invalid policy name"),
        (dict(policy="missing"), "does not exist"),
        (dict(prompt="  "), "prompt is empty"),
        (dict(seed=-1), "seed must be a whole number between"),
    ],
)
def test_bad_prompt_input_gives_a_message(backend, trained, args, message):
    a = {"policy": trained, "prompt": "a red circle", "seed": 0, **args}
    with pytest.raises(ad.UserError, match=message):
        run_prompt(backend, backend.settings.model, a["policy"], a["prompt"], a["seed"])
    out = on_prompt(backend, backend.settings.model, a["policy"], a["prompt"], a["seed"])
    assert message.split()[0] in out[-1] and "Traceback" not in out[-1]


@pytest.mark.parametrize(
    "candidates, message",
    [("", "empty"), ("0 1 2", "must be positive"), ("1 2 2", "must be distinct"), ("1 two", "whole numbers")],
)
def test_bad_training_input_gives_a_message_and_saves_nothing(backend, candidates, message):
    updates = list(on_train(backend, backend.settings.model, "new-one", 4, 1, candidates, 5, 1.0))
    assert len(updates) == 1 and message in updates[0][2]
    assert not (backend.settings.data_dir / "policies" / "new-one").exists()
    updates = list(on_train(backend, backend.settings.model, "new-one", 4, 1, "1 2", 5, -1.0))
    assert "must be a number ≥ 0, got -1.0" in updates[0][2]


def test_the_training_form_follows_the_model_and_the_policy_records_it(backend):
    """The form's candidates, sampler and guidance come from the picked model (``adadiff.suggested_setup``); what the
    form says is what the ladder uses and the policy records. A bad guidance is refused in words, nothing saved."""
    from finetuners.models import model_defaults

    model = backend.settings.model
    guidance = model_defaults(backend.pipeline(model)).guidance
    assert setup_for(backend, model) == ("1 2 3 4 6 8", "ddim-trailing", guidance)  # a small UNet: the Shapes set
    assert on_model(backend, model) == ("1 2 3 4 6 8", "ddim-trailing", guidance, "")
    *_, error = on_model(backend, "run:missing/step-1")
    assert "not one of this app's models" in error or "no run named" in error, error
    updates = list(train_steps(backend, model, "leading-g1", 2, 1, "2 3", 2, 1.0, "ddim", 1.0))
    assert "(`ddim`, guidance 1)" in updates[0][0]
    _, config, _ = ad.load_policy(backend.settings.data_dir / "policies" / "leading-g1")
    assert (config.sampler, config.guidance, config.candidates) == ("ddim", 1.0, (2, 3))
    for bad, message in [(None, "guidance is empty"), ("x", "must be a number between 0 and 30"),
                         (31, "got 31"), (float("nan"), "got nan")]:  # fmt: skip
        updates = list(on_train(backend, model, "bad-guidance", 2, 1, "1 2", 2, 1.0, "ddim", bad))
        assert len(updates) == 1 and message in updates[0][2], updates
    updates = list(on_train(backend, model, "bad-guidance", 2, 1, "1 2", 2, 1.0, "euler", 1.0))
    assert "unknown sampler 'euler'" in updates[0][2]
    assert not (backend.settings.data_dir / "policies" / "bad-guidance").exists()


def test_an_existing_name_is_refused(backend, trained):
    for name in (trained, *ad.SHIPPED_POLICIES):  # a saved policy's, or a shipped one's
        updates = list(on_train(backend, backend.settings.model, name, 4, 1, "1 2", 5, 1.0))
        assert "already exists" in updates[0][2]
    assert not (backend.settings.data_dir / "policies" / "shapes").exists()


def test_the_quality_score_is_chosen_in_the_form_and_recorded(backend):
    assert [n for _, n in quality_choices(backend)][:2] == ["shapes-accuracy", "shapes-probability"]
    updates = list(on_train(backend, backend.settings.model, "soft", 3, 1, "1 2", 3, 1.0, "ddim-trailing", 3.0,
                            "shapes-probability"))  # fmt: skip
    assert "saved soft" in updates[-1][0] and updates[-1][2] == ""
    _, config, _ = ad.load_policy(backend.settings.data_dir / "policies" / "soft")
    assert config.quality == "shapes-probability"
    scores = ad.load_ladder(backend.settings.data_dir / "policies" / "soft").scores
    assert ((scores > 0) & (scores < 1)).any()  # probabilities, not 0 / 1 accuracies
    updates = list(on_train(backend, backend.settings.model, "bad-iqs", 3, 1, "1 2", 3, 1.0, "ddim-trailing", 3.0,
                            "no-such-score"))  # fmt: skip
    assert "unknown reward" in updates[-1][2]
    assert not (backend.settings.data_dir / "policies" / "bad-iqs").exists()


def test_typed_training_prompts_replace_the_shapes_captions(backend):
    text = "a blue square\n\na red circle\na blue square\n"  # blank lines and repeats dropped
    updates = list(on_train(backend, backend.settings.model, "typed", 4, 1, "1 2", 3, 1.0, "ddim-trailing", 3.0,
                            "shapes-probability", text))  # fmt: skip
    assert "2 prompts × 1 seed" in updates[0][0] and "saved typed" in updates[-1][0]
    assert ad.load_ladder(backend.settings.data_dir / "policies" / "typed").prompts == ["a blue square",
                                                                                         "a red circle"]  # fmt: skip
    for bad, message in [
        ("x" * (MAX_PROMPT_CHARS + 1), "too long"),
        ("\n".join(f"p{i}" for i in range(2001)), "at most 2000"),
        ("a red circle\na photo of a cat", "reads Shapes captions only, and 'a photo of a cat'"),
    ]:
        updates = list(on_train(backend, backend.settings.model, "bad-text", 4, 1, "1 2", 3, 1.0, "ddim-trailing",
                                3.0, "shapes-accuracy", bad))  # fmt: skip
        assert message in updates[-1][2]
    assert not (backend.settings.data_dir / "policies" / "bad-text").exists()


def test_the_shipped_policy_is_offered_and_says_which_model_it_was_trained_for(backend):
    assert "shapes" in policy_choices(backend)
    view = run_prompt(backend, backend.settings.model, "shapes", "a red circle", 0)
    assert view.candidates == (1, 2, 3, 4, 6, 8) and "policy trained for `shapes`" in view.info


def test_prompt_set_with_typed_prompts(backend, trained):
    out = on_prompt_set(backend, backend.settings.model, trained, "a red circle\na blue square on the left", 8)
    assert out[-1] == "" and "2 prompts" in out[2]


def test_sample_tab_uses_the_policy_for_its_steps(backend, trained):
    view = run_sample(backend, backend.settings.model, "a red circle", "", 50, "ddim-trailing", 0.0, 3.0, 0, 1,
                      adaptive=trained)  # fmt: skip
    assert "adaptive steps: policy" in view.info and "50 steps" not in view.info
    taken = run_sample(backend, backend.settings.model, "a red circle", "", 50, "ddim", 0.0, 5.0, 0, 1,
                       adaptive=trained)  # the policy's sampler and guidance, not the form's  # fmt: skip
    assert "of `ddim-trailing`" in taken.info and "guidance 3 " in taken.info
    assert "at its sampler `ddim-trailing` and guidance 3" in taken.info
    plain = run_sample(backend, backend.settings.model, "a red circle", "", 3, "ddim-trailing", 0.0, 3.0, 0, 1,
                       adaptive="off")  # fmt: skip
    assert "3 steps" in plain.info and "adaptive" not in plain.info


def test_cli_adapt_train_then_sample_adaptive(random_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "policies" / "cli"
    args = ["adapt-train", "--model", str(random_pipeline_dir), "--out", str(out), "--prompts", "3",
            "--candidates", "1", "2", "--seeds", "1", "--epochs", "3"]  # fmt: skip
    assert cli(args) == 0
    assert (out / "policy.safetensors").is_file()
    # unset, the sampler and guidance follow the model: trailing DDIM for 1–2 steps, the model's own guidance
    assert "candidates [1, 2], sampler ddim-trailing, guidance 7.5" in capsys.readouterr().err
    config = ad.load_policy(out)[1]
    assert (config.sampler, config.guidance) == ("ddim-trailing", 7.5)
    assert cli(args) == 2  # the folder is not empty now
    assert "already holds files" in capsys.readouterr().err
    assert cli(["sample", "--model", str(random_pipeline_dir), "--adaptive", str(out), "--prompt", "a red circle",
                "--sampler", "ddim-trailing", "--out", str(tmp_path / "img")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "adaptive steps:" in err and (tmp_path / "img" / "seed0.png").is_file()
    # the shipped policy, by name
    shipped = ["sample", "--model", str(random_pipeline_dir), "--adaptive", "shapes", "--prompt", "a red circle",
               "--sampler", "ddim-trailing", "--out", str(tmp_path / "shipped")]  # fmt: skip
    assert cli(shipped) == 0
    assert "adaptive steps:" in capsys.readouterr().err and (tmp_path / "shipped" / "seed0.png").is_file()
    assert cli(["adapt-train", "--out", str(tmp_path / "x"), "--candidates", "1", "1"]) == 2
    assert "must be distinct" in capsys.readouterr().err
    (tmp_path / "cats.txt").write_text("a red circle\na photo of a cat\n")
    assert cli(["adapt-train", "--model", str(random_pipeline_dir), "--out", str(tmp_path / "cats"),
                "--prompt-file", str(tmp_path / "cats.txt")]) == 2  # fmt: skip
    assert "reads Shapes captions only" in capsys.readouterr().err and not (tmp_path / "cats").exists()
    assert cli(["sample", "--adaptive", str(tmp_path / "none"), "--prompt", "a red circle",
                "--model", str(random_pipeline_dir)]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
