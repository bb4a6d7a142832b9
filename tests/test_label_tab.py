"""The Label tab without a browser: its handlers on good and bad input (nothing stored changes on bad input),
the statistics figures, export / import inside the data folder, the preference reward and ``preference:``."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from finetuners.errors import UserError
from finetuners.labels import LabelStore
from tests.test_preference import add_world_pairs
from ui.backend import Backend, Settings
from ui.label_tab import (
    counts_markdown,
    export_labels,
    generate_pairs,
    import_labels,
    inside_data_dir,
    on_label,
    on_stats,
    on_tab_select,
    on_train,
    parse_queue,
    record_label,
    show_next,
    statistics,
    train_reward,
    undo_label,
)

QUEUE = "a red circle\n\n# a comment line\na blue square above a green triangle\n"
SOURCE = dict(kind="seeds", model_a="m", model_b=None, steps_a=2, steps_b=1, seed=7)


def _no_load(*args):
    raise AssertionError("bad input must be refused before any model is loaded")


def png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from finetuners.models import load_model

    return load_model(str(tiny_pipeline_dir), "cpu")


@pytest.fixture
def backend(tmp_path, pipe) -> Backend:
    """Every model name loads the one small pipeline (two 'checkpoints' are then the same weights)."""
    b = Backend(Settings(model="m", device="cpu", data_dir=tmp_path / "data"), loader=lambda *a: pipe)
    yield b
    if b._label_store is not None:
        b._label_store.close()


@pytest.fixture
def offline(tmp_path) -> Backend:
    b = Backend(Settings(model="m", device="cpu", data_dir=tmp_path / "data"), loader=_no_load)
    yield b
    if b._label_store is not None:
        b._label_store.close()


def with_pairs(backend: Backend, n: int) -> list[int]:
    store = backend.label_store()
    return [store.add_pair(f"a red circle {i}", png(2 * i), png(2 * i + 1), "m@4", "m@1") for i in range(n)]


def unchanged(backend: Backend):
    """A context that asserts nothing stored changed (rows, tombstones, image files)."""
    store = backend.label_store()

    class _Same:
        def __enter__(self):
            self.before = store.digest()

        def __exit__(self, *exc):
            assert store.digest() == self.before

    return _Same()


# -- generating pairs ---------------------------------------------------------------------------------------
def test_generate_pairs_stores_each_pair_with_its_images_and_settings(backend):
    summary = generate_pairs(backend, QUEUE, None, **{**SOURCE, "kind": "steps", "steps_a": 2, "steps_b": 1})
    assert "2 pairs" in summary
    store = backend.label_store()
    pairs = store.pairs()
    assert [p.prompt for p in pairs] == ["a red circle", "a blue square above a green triangle"]
    for i, p in enumerate(pairs):
        assert {p.model_0, p.model_1} == {"m@2", "m@1"}
        assert p.image_0_path.is_file() and p.image_1_path.is_file() and p.image_0_uid != p.image_1_uid
        assert p.meta["source"] == "steps" and p.meta["seeds"] == [7 + i] * 2  # same noise, different step counts
        assert [f"m@{s}" for s in p.meta["steps"]] == [p.model_0, p.model_1]  # meta follows the sides
    assert store.integrity_check(verify_hashes=True).ok
    # The same click again gives the same images (seeds), as new pairs with the same sides.
    generate_pairs(backend, QUEUE, None, **{**SOURCE, "kind": "steps", "steps_a": 2, "steps_b": 1})
    again = store.pairs()[2:]
    assert [(p.image_0_uid, p.image_1_uid) for p in again] == [(p.image_0_uid, p.image_1_uid) for p in pairs]


def test_two_seeds_and_two_checkpoints(backend):
    generate_pairs(backend, "a red circle", None, **SOURCE)
    generate_pairs(backend, "a red circle", None, **{**SOURCE, "kind": "checkpoints", "model_b": "other"})
    seeds, ckpts = backend.label_store().pairs()
    assert seeds.model_0 == seeds.model_1 == "m@2" and sorted(seeds.meta["seeds"]) == [7, 8]
    assert seeds.image_0_uid != seeds.image_1_uid
    assert {ckpts.model_0, ckpts.model_1} == {"m@2", "other@2"} and ckpts.meta["seeds"] == [7, 7]


def test_the_queue_comes_from_text_and_a_prompt_list_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\ufeffa yellow star\n  \n# skipped\na red circle on the left\n", encoding="utf-8")
    assert parse_queue("a blue square", str(f)) == ["a blue square", "a yellow star", "a red circle on the left"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        parse_queue("", str(bad))


BAD_GENERATE = [
    (dict(queue=""), "the prompt queue is empty"),
    (dict(queue="  \n# only a comment\n"), "the prompt queue is empty"),
    (dict(queue="x" * 1001), "prompt 1: the prompt is too long"),
    (dict(queue="a red circle\r\x1b"), "prompt 2: the prompt contains control characters"),  # found by a fuzz hunt
    (dict(queue="p\n" * 501), "at most 500 per click"),
    (dict(kind="bogus"), "unknown pair source"),
    (dict(kind="checkpoints", model_b=None), "no model chosen"),
    (dict(kind="checkpoints", model_b="m"), "choose two different models"),
    (dict(kind="steps", steps_b=2), "choose two different numbers of steps"),
    (dict(steps_a=0), "steps A must be between 1 and 200"),
    (dict(steps_a=None), "steps A is empty"),
    (dict(seed=-1), "seed must be between 0"),
]


@pytest.mark.parametrize("change, message", BAD_GENERATE, ids=[m[:24] for _, m in BAD_GENERATE])
def test_bad_generate_input_changes_nothing_and_loads_nothing(offline, change, message):
    values = {"queue": QUEUE, **SOURCE, **change}
    with unchanged(offline), pytest.raises(UserError, match=message):
        generate_pairs(offline, values.pop("queue"), None, **values)
    assert offline.loaded_models() == []


def test_a_prompt_too_long_for_the_text_encoder_stores_no_pair(backend):
    with unchanged(backend), pytest.raises(UserError, match="prompt 2: the prompt is too long for this model"):
        generate_pairs(backend, "a red circle\n" + "red " * 200, None, **SOURCE)


# -- labelling ----------------------------------------------------------------------------------------------
def test_label_undo_and_progress(offline):
    ids = with_pairs(offline, 3)
    store = offline.label_store()
    view = show_next(offline, " ann ")
    assert view.pair_id == ids[0] and "pair #1" in view.prompt and view.left.size[0] >= 256  # upscaled for display
    assert "**ann**: 0 done · **3 left** of 3" in view.counts
    view = record_label(offline, "ann", view.pair_id, "left")
    (label,) = store.labels()
    assert (label.labeller, label.pair.id, label.choice) == ("ann", ids[0], "left")
    assert f"Saved label #{label.id}: **left** on pair #{ids[0]}" in view.status  # acknowledged after the commit
    assert view.pair_id == ids[1] and "1 done · **2 left**" in view.counts
    record_label(offline, "bob", ids[0], "right")  # another labeller on the same pair
    view = record_label(offline, "ann", view.pair_id, "skip")
    view = undo_label(offline, "ann")  # withdraws the skip, shows that pair again
    assert view.pair_id == ids[1] and "Undid" in view.status
    view = record_label(offline, "ann", view.pair_id, "tie")
    view = record_label(offline, "ann", view.pair_id, "right")
    assert view.pair_id is None and "Nothing left" in view.prompt and "**0 left**" in view.counts
    assert [(x.labeller, x.pair.id, x.choice) for x in store.labels()] == [
        ("ann", ids[0], "left"), ("bob", ids[0], "right"), ("ann", ids[1], "tie"), ("ann", ids[2], "right"),
    ]  # fmt: skip
    assert store.counts()["undone"] == 1


def test_the_signed_in_user_is_the_labeller(offline):
    (pair,) = with_pairs(offline, 1)
    record_label(offline, "typed name", pair, "left", username="alice")
    assert [x.labeller for x in offline.label_store().labels()] == ["alice"]
    name, counts, error, model_a, model_b = on_tab_select(offline, "", SimpleNamespace(username="alice"))
    assert name == {"__type__": "update", "value": "alice", "interactive": False}
    assert "**alice**: 1 done" in counts and error == ""
    assert model_a == model_b == {"__type__": "update", "choices": offline.model_choices()}


def test_optional_names_record_anonymous(tmp_path):
    b = Backend(Settings(model="m", data_dir=tmp_path, labeller_names="optional"), loader=_no_load)
    (pair,) = with_pairs(b, 1)
    record_label(b, "  ", pair, "left")
    assert [x.labeller for x in b.label_store().labels()] == ["anonymous"]
    b.label_store().close()


BAD_LABEL = [
    (lambda b, p: record_label(b, "", p, "left"), "type your name first"),
    (lambda b, p: record_label(b, None, p, "left"), "type your name first"),
    (lambda b, p: show_next(b, "   "), "type your name first"),
    (lambda b, p: undo_label(b, ""), "type your name first"),
    (lambda b, p: record_label(b, "x" * 65, p, "left"), "too long"),
    (lambda b, p: record_label(b, "ann\x07", p, "left"), "control characters"),
    (lambda b, p: record_label(b, "ann", None, "left"), "no pair on screen"),
    (lambda b, p: record_label(b, "ann", 999, "left"), "unknown pair 999"),
    (lambda b, p: record_label(b, "ann", p, "both"), "unknown choice"),
    (lambda b, p: undo_label(b, "carol"), "carol has no label to undo"),
]


@pytest.mark.parametrize("call, message", BAD_LABEL, ids=[m for _, m in BAD_LABEL])
def test_bad_label_input_changes_nothing(offline, call, message):
    (pair,) = with_pairs(offline, 1)
    record_label(offline, "bob", pair, "left")
    with unchanged(offline), pytest.raises(UserError, match=message):
        call(offline, pair)


def test_nothing_to_label_yet(offline):
    with pytest.raises(UserError, match="no pairs to label yet"):
        show_next(offline, "ann")


def test_a_label_with_no_pair_on_screen_says_why_for_this_labeller(offline):
    """No pairs at all, pairs not started, and every pair done: three states, three messages, nothing stored."""
    with pytest.raises(UserError, match="no pairs to label yet"):
        record_label(offline, "ann", None, "skip")
    (pair,) = with_pairs(offline, 1)
    with unchanged(offline), pytest.raises(UserError, match="click Start labelling first"):
        record_label(offline, "ann", None, "skip")
    assert record_label(offline, "ann", pair, "left").pair_id is None  # ann's last pair
    with unchanged(offline), pytest.raises(UserError, match="nothing is left to label for you"):
        record_label(offline, "ann", None, "skip")
    with pytest.raises(UserError, match="click Start labelling first"):  # bob has not labelled it yet
        record_label(offline, "bob", None, "skip")


def test_the_gradio_adapter_shows_the_message_and_keeps_the_pair(offline):
    (pair,) = with_pairs(offline, 1)
    with unchanged(offline), pytest.warns(UserWarning, match="type your name first"):
        *views, error, state = on_label(offline, "", pair, "left")
    assert views == [{"__type__": "update"}] * 5 and state == {"__type__": "update"}
    assert "Label not saved" in error and "Traceback" not in error


# -- a corrupt or unusable database -------------------------------------------------------------------------
def test_a_corrupt_database_is_reported_in_the_tab_and_left_untouched(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = data / "labels.db"
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    before = db.read_bytes()
    b = Backend(Settings(model="m", data_dir=data), loader=_no_load)
    with pytest.raises(UserError, match="the label database is unreadable"):
        b.label_store()
    _, counts, error, *_ = on_tab_select(b, "ann", None)
    assert counts == {"__type__": "update"} and "label database is unreadable" in error
    with pytest.warns(UserWarning, match="unreadable"):
        *_, error, _ = on_label(b, "ann", 1, "left")
    assert "unreadable" in error and "Traceback" not in error
    *_, error = on_stats(b)
    assert "unreadable" in error
    assert db.read_bytes() == before and sorted(p.name for p in data.iterdir()) == ["labels.db"]
    # Once the file is restored (here: removed), the same app opens a fresh store without a restart.
    db.unlink()
    assert b.label_store().counts()["pairs"] == 0
    b.label_store().close()


def test_the_app_starts_with_a_corrupt_database(tmp_path, tiny_pipeline_dir):
    import app

    (tmp_path / "labels.db").write_bytes(b"not a database at all" * 10)
    args = app.parse_args(["--model", str(tiny_pipeline_dir), "--device", "cpu", "--data-dir", str(tmp_path)])
    backend = Backend(app.settings_from_args(args))
    demo = app.build_app(backend)  # the Label tab is built; it reports the problem when used
    assert {"label_start", "label_left", "label_export", "label_train_reward"} <= {
        d.api_name for d in demo.fns.values()
    }


def test_labels_db_flag(tmp_path):
    import app

    args = app.parse_args(["--labels-db", str(tmp_path / "team.db"), "--labeller-names", "optional"])
    settings = app.settings_from_args(args)
    assert settings.labels_db == tmp_path / "team.db" and settings.labeller_names == "optional"
    assert Backend(settings).labels_db_path == tmp_path / "team.db"
    with pytest.raises(UserError, match="must be a file in an existing folder"):
        app.settings_from_args(app.parse_args(["--labels-db", str(tmp_path / "no" / "team.db")]))
    with pytest.raises(UserError, match="must be a file in an existing folder"):
        app.settings_from_args(app.parse_args(["--labels-db", str(tmp_path)]))
    assert Backend(Settings(data_dir=tmp_path)).labels_db_path == tmp_path / "labels.db"


# -- statistics ---------------------------------------------------------------------------------------------
def test_statistics_figures_hold_the_stores_numbers(offline):
    empty = statistics(offline)
    assert "No ranking yet" in empty.table and empty.per_labeller.layout.annotations[0].text == "no labels yet"
    store = offline.label_store()
    a = store.add_pair("p", png(0), png(1), "base@4", "tuned@4")
    b = store.add_pair("p", png(2), png(3), "tuned@4", "base@4")
    c = store.add_pair("p", png(4), png(5), "base@4", "base@4")  # two seeds: no ranking information
    for pair, ann, bob in ((a, "right", "right"), (b, "left", "right"), (c, "left", "left")):
        store.add_label(pair, "ann", ann)
        store.add_label(pair, "bob", bob)
    store.add_label(a, "carol", "skip")
    view = statistics(offline)
    bars = {t.name: dict(zip(t.x, t.y)) for t in view.per_labeller.data}
    assert bars["left"] == {"ann": 2, "bob": 1, "carol": 0} and bars["skip"]["carol"] == 1
    (agree,) = view.agreement.data
    assert list(agree.x) == ["ann · bob"] and agree.y[0] == pytest.approx(2 / 3)
    (rank,) = view.ranking.data
    assert list(rank.x) == ["tuned@4", "base@4"]  # tuned won 3 of 4
    expected = store.win_rates()
    assert list(rank.y) == pytest.approx([r.elo for r in expected]) and rank.y[0] > 1500 > rank.y[1]
    assert "| 1 | `tuned@4` | 3 | 1 | 0 | 75.0% |" in view.table


# -- export / import ----------------------------------------------------------------------------------------
def _filled(backend: Backend) -> None:
    ids = with_pairs(backend, 3)
    record_label(backend, "ann", ids[0], "left")
    record_label(backend, "ann", ids[1], "tie")
    record_label(backend, "bob", ids[0], "right")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_then_import_reproduces_the_store(offline, tmp_path, fmt):
    _filled(offline)
    msg = export_labels(offline, "exports/today", fmt)
    folder = offline.settings.data_dir / "exports" / "today"
    assert f"`{(folder / f'labels.{fmt}').resolve()}`" in msg and (folder / "images").is_dir()
    fresh = Backend(Settings(model="m", data_dir=tmp_path / "other"), loader=_no_load)
    # Through an uploaded zip of the export folder, as a labeller on another machine would.
    archive = tmp_path / "today.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.rglob("*"):
            z.write(f, Path("today") / f.relative_to(folder))
    msg = import_labels(fresh, "", str(archive))
    assert "**3 labels**" in msg
    assert fresh.label_store().content() == offline.label_store().content()
    assert "**0 labels**" in import_labels(fresh, "", str(archive))  # importing twice adds nothing
    fresh.label_store().close()


def test_import_from_a_folder_inside_the_data_folder(offline, tmp_path):
    _filled(offline)
    export_labels(offline, "exports/a", "jsonl")
    other = Backend(Settings(model="m", data_dir=offline.settings.data_dir, labels_db=tmp_path / "b.db"))
    assert "**3 labels**" in import_labels(other, "exports/a", None)
    assert other.label_store().content() == offline.label_store().content()
    other.label_store().close()


def test_export_paths_stay_inside_the_data_folder(offline, tmp_path):
    _filled(offline)
    root = offline.settings.data_dir.resolve()
    assert inside_data_dir(offline, "exports/x", "export") == root / "exports" / "x"
    assert inside_data_dir(offline, str(root / "y"), "export") == root / "y"  # absolute, but inside
    (root / "blocked").write_text("a file where a folder would go")
    export_labels(offline, "exports/taken", "jsonl")
    cases = [
        ("../outside", "must stay inside the data folder"),
        ("exports/../../outside", "must stay inside the data folder"),
        (str(tmp_path / "elsewhere"), "must stay inside the data folder"),
        ("/etc/labels", "must stay inside the data folder"),
        (".", "must stay inside the data folder"),
        ("", "the export path is empty"),
        ("exports/taken", "already exists"),
        ("blocked/x", "blocked is a file, not a folder"),
    ]
    for path, message in cases:
        with unchanged(offline), pytest.raises(UserError, match=message):
            export_labels(offline, path, "jsonl")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "elsewhere").exists()
    with pytest.raises(UserError, match="unknown export format"):
        export_labels(offline, "exports/z", "csv")


def test_a_symlink_out_of_the_data_folder_is_refused(offline, tmp_path):
    _filled(offline)
    outside = tmp_path / "outside"
    outside.mkdir()
    (offline.settings.data_dir / "link").symlink_to(outside)
    with unchanged(offline), pytest.raises(UserError, match="must stay inside"):
        export_labels(offline, "link/export", "jsonl")
    assert list(outside.iterdir()) == []


def test_bad_imports_change_nothing(offline, tmp_path):
    _filled(offline)
    export_labels(offline, "exports/good", "jsonl")
    good = offline.settings.data_dir / "exports" / "good"
    rows = [json.loads(line) for line in (good / "labels.jsonl").read_text().splitlines()]

    no_columns = tmp_path / "no-columns.jsonl"
    no_columns.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "user_id"}) + "\n" for r in rows))
    no_images = tmp_path / "no-images.jsonl"  # uploaded alone: its images/ folder did not come with it
    no_images.write_text((good / "labels.jsonl").read_text())
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.jsonl", "{}")
    not_zip = tmp_path / "broken.zip"
    not_zip.write_bytes(b"PK not really")
    text = tmp_path / "labels.csv"
    text.write_text("caption\n")
    cases = [
        (lambda: import_labels(offline, "", str(no_columns)), "lacks the column\\(s\\) user_id"),
        (lambda: import_labels(offline, "", str(no_images)), "image file\\(s\\) are missing"),
        (lambda: import_labels(offline, "", str(evil)), "leaves the archive's folder"),
        (lambda: import_labels(offline, "", str(not_zip)), "not a readable zip"),
        (lambda: import_labels(offline, "", str(text)), "upload a .zip"),
        (lambda: import_labels(offline, "../elsewhere", None), "must stay inside the data folder"),
        (lambda: import_labels(offline, "exports/none", None), "does not exist"),
        (lambda: import_labels(offline, "", None), "the import path is empty"),
    ]
    for call, message in cases:
        with unchanged(offline), pytest.raises(UserError, match=message):
            call()
    assert not (tmp_path / "escape.jsonl").exists()


# -- the preference reward ----------------------------------------------------------------------------------
def _world_labels(backend: Backend, n_pairs: int, seed: int = 0) -> None:
    """Pairs of a caption-following Shapes image and one with a changed colour; the labeller prefers the first."""
    add_world_pairs(backend.label_store(), n_pairs, seed)


def test_train_preference_reward_saves_and_registers_it(offline, monkeypatch):
    from finetuners import rewards

    _world_labels(offline, 60)
    msg = train_reward(offline, "team")
    folder = offline.settings.data_dir / "rewards" / "team"
    saved = json.loads((folder / "config.json").read_text())["metrics"]
    assert f"Held-out pairwise accuracy **{saved['val_accuracy']:.1%}**" in msg
    assert saved["n_val_non_tie"] >= 10 and saved["val_accuracy"] >= 0.8  # a colour change is easy to learn
    assert offline.preference_rewards() == [f"preference:{folder.resolve()}"]
    assert f"`preference:{folder.resolve()}`" in msg

    # The registry loads it by folder, and by bare name from data/rewards/.
    spec = rewards.reward_spec(f"preference:{folder}")
    assert spec.differentiable and not spec.needs_weights
    fn = rewards.make_reward(f"preference:{folder}")
    monkeypatch.setattr(rewards, "DEFAULT_REWARDS_DIR", offline.settings.data_dir / "rewards")
    by_name = rewards.make_reward("preference:team")
    store = offline.label_store()
    from finetuners.preference import load_image

    labels = store.labels()[-10:]
    good = [lab.pair.image_0_path if lab.choice == "left" else lab.pair.image_1_path for lab in labels]
    bad = [lab.pair.image_1_path if lab.choice == "left" else lab.pair.image_0_path for lab in labels]
    prompts = [lab.pair.prompt for lab in labels]
    r_good, info = fn(torch.stack([load_image(p) for p in good]), prompts, [{}] * 10)
    r_bad, _ = by_name(torch.stack([load_image(p) for p in bad]), prompts, [{}] * 10)
    assert r_good.dtype == torch.float32 and r_good.shape == (10,) and "preference_raw" in info
    assert (r_good > r_bad).float().mean() >= 0.8

    # Fine-tuning accepts it as its reward.
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig

    assert TrainConfig(algo=SDPOConfig.preset("shapes", reward=f"preference:{folder}")).algo.reward.endswith("team")

    # Retraining under the same name replaces it.
    assert "Replaced in" in train_reward(offline, "team")


def test_preference_reward_errors(tmp_path):
    from finetuners.rewards import make_reward, reward_spec

    with pytest.raises(UserError, match="no trained preference model"):
        reward_spec(f"preference:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="needs a folder or a name"):
        reward_spec("preference:")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="is unreadable"):
        make_reward(f"preference:{corrupt}")
    with pytest.raises(UserError, match="or preference:<folder>"):
        reward_spec("preferences")


def test_train_preference_reward_on_clip_features(offline, tiny_clip_dir, tmp_path):
    from finetuners.rewards import make_reward

    _world_labels(offline, 20)
    rewards_dir = offline.settings.data_dir / "rewards"
    pickled = tmp_path / "pickled-clip"
    pickled.mkdir()
    torch.save({}, pickled / "pytorch_model.bin")
    for bad, message in [(tmp_path / "no-such-clip", "no CLIP weights folder"), (pickled, "no safetensors")]:
        with unchanged(offline), pytest.raises(UserError, match=message):
            train_reward(offline, "clip", str(bad))
        assert not rewards_dir.exists()
        text, error = on_train(offline, "clip", str(bad))
        assert message in error and bad.name in error  # (a Markdown message: the name has no "_" to escape)
    assert not rewards_dir.exists()

    msg = train_reward(offline, "clip", f"  {tiny_clip_dir}  ")
    assert f"CLIP features of `{tiny_clip_dir.resolve()}`" in msg
    folder = rewards_dir / "clip"
    assert json.loads((folder / "config.json").read_text())["config"]["clip_folder"] == str(tiny_clip_dir.resolve())
    rewards, info = make_reward(f"preference:{folder}")(torch.rand(2, 3, 32, 32), ["a red circle", "a zebra"], [{}] * 2)
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    assert "Shapes-probe features" in train_reward(offline, "probe", "  ")  # empty: the Shapes probe


@pytest.mark.parametrize(
    "name, message",
    [("", "the reward name must be"), ("../x", "the reward name must be"), (".hidden", "the reward name must be")],
)
def test_bad_reward_names_and_too_few_labels(offline, name, message):
    with unchanged(offline), pytest.raises(UserError, match=message):
        train_reward(offline, name)
    assert not (offline.settings.data_dir / "rewards").exists()


def test_too_few_labels_to_train(offline):
    _world_labels(offline, 4)
    with unchanged(offline), pytest.raises(UserError, match="need at least 10 labelled pairs"):
        train_reward(offline, "small")
    assert not (offline.settings.data_dir / "rewards" / "small").exists()


def test_counts_markdown(offline):
    assert "**0 pairs**, **0 labels**" in counts_markdown(offline, None)
    (pair,) = with_pairs(offline, 1)
    record_label(offline, "ann", pair, "left")
    assert counts_markdown(offline, "ann").startswith("**ann**: 1 done · **0 left** of 1")
    assert "**1 pair**, **1 label** (left 1" in counts_markdown(offline, None)


def test_the_label_store_is_opened_once_per_app(offline):
    stores = {id(offline.label_store()) for _ in range(3)}
    assert len(stores) == 1 and isinstance(offline.label_store(), LabelStore)
    assert offline.labels_db_path == offline.settings.data_dir / "labels.db"
