"""The Bradley–Terry preference reward: loss, split by pair, learning a planted preference, standardisation,
gradients, persistence, and training from a label store."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from finetuners.errors import UserError
from finetuners.labels import LabelStore
from finetuners.preference import (
    ATTRIBUTE_DIM,
    CELL_FEATURES_DIM,
    OBJECT_TOKENS_DIM,
    FitConfig,
    PreferenceConfig,
    PreferenceData,
    PreferenceModel,
    PreferenceReward,
    ProbeFeatures,
    _unique_images,
    bt_loss,
    fit_preference,
    pairwise_accuracy,
    preference_reward,
    shapes_object_tokens,
    shapes_prompt_embedding,
    split_by_pair,
    train_from_store,
)
from finetuners.shapes.probe import ProbeConfig, ShapesProbe
from finetuners.shapes.world import (
    COLOR_NAMES,
    GRID,
    N_CELLS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    make_dataset,
    make_sample,
    parse_prompt,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is fastest, and much faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PRECOMPUTED = dict(model="mlp", features="precomputed", prompt_embedding="none")


def planted(n: int, d: int, seed: int, flip: float = 0.1) -> tuple[PreferenceData, torch.Tensor]:
    """Features ~ N(0, I); the labeller prefers the image further along a fixed direction w, and flips
    ``flip`` of the labels at random. Returns (noisy data, noise-free labels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=torch.Generator().manual_seed(1234))
    f0, f1 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    clean = ((f0 - f1) @ w > 0).float()
    y = torch.where(torch.rand(n, generator=g) < flip, 1 - clean, clean)
    return PreferenceData(f0, f1, None, y, torch.arange(n)), clean


def tiny_probe(seed: int = 0) -> ShapesProbe:
    torch.manual_seed(seed)
    return ShapesProbe(ProbeConfig(width=4, feature_dim=8)).eval().requires_grad_(False)


def test_bt_loss_matches_its_definition():
    delta = torch.tensor([0.0, 2.0, -1.0, 0.3])
    y = torch.tensor([1.0, 1.0, 0.0, 0.5])
    sig = torch.sigmoid
    want = -(y * torch.log(sig(delta)) + (1 - y) * torch.log(sig(-delta))).mean()
    assert bt_loss(delta, y) == pytest.approx(float(want), abs=1e-6)
    assert bt_loss(torch.zeros(3), torch.tensor([1.0, 0.5, 0.0])) == pytest.approx(math.log(2))
    d = torch.tensor([0.7], requires_grad=True)  # a tie pulls Δ towards 0: dL/dΔ = σ(Δ) − ½ > 0 for Δ > 0
    bt_loss(d, torch.tensor([0.5])).backward()
    assert d.grad.item() == pytest.approx(torch.sigmoid(torch.tensor(0.7)).item() - 0.5, abs=1e-6)


def test_pairwise_accuracy_ignores_ties():
    acc, n = pairwise_accuracy(torch.tensor([1.0, -1.0, 2.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 0.5, 0.0, 0.5]))
    assert n == 3 and acc == pytest.approx((1 + 0 + 0.5) / 3)
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([0.5])) == (None, 0)


def test_split_is_by_pair_and_replays():
    groups = torch.tensor([3, 3, 3, 7, 8, 8, 9, 10, 11, 12, 13, 14, 15, 15])
    train, val = split_by_pair(groups, 0.3, seed=5)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(groups)))
    assert not set(groups[train].tolist()) & set(groups[val].tolist())  # no pair on both sides
    assert len(torch.unique(groups[val])) == 3  # 30 % of 11 pairs
    again = split_by_pair(groups, 0.3, seed=5)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])


def test_prompt_embeddings():
    e = shapes_prompt_embedding(["a red circle above a blue square", "a red circle", "a zebra"])
    assert e.shape == (3, ATTRIBUTE_DIM)
    assert e[0, :18].sum() == 2 and e[1, :18].sum() == 1 and e[2, :-1].sum() == 0 and e[2, -1] == 1
    assert not torch.equal(e[0], shapes_prompt_embedding(["a red circle below a blue square"])[0])
    t = shapes_object_tokens(["a red circle above a blue square", "a green square on the left", "a zebra"])
    assert t.shape == (3, OBJECT_TOKENS_DIM)
    assert t[0, -2:].tolist() == [1, 1] and t[1, -2:].tolist() == [1, 0] and t[2].sum() == 0
    above_subject, above_object = t[0, :31], t[0, 31:62]
    assert (
        above_subject[:18].argmax() != above_object[:18].argmax() and above_subject[23] == 1 and above_object[24] == 1
    )
    assert t[1, 18 + 0] == 1  # "on the left" is the first position word
    # a three-object caption is outside the features' world: encoded as a caption that does not parse
    three = "a red circle, a blue square and a green triangle"
    assert torch.equal(shapes_prompt_embedding([three]), shapes_prompt_embedding(["a zebra"]))
    assert shapes_object_tokens([three]).sum() == 0


def test_cell_features_read_the_probe():
    probe = tiny_probe()
    x = torch.rand(2, 3, 32, 32)
    f = ProbeFeatures(probe, "cells")(x).unflatten(1, (9, 28))
    assert f.shape == (2, 9, 28) and CELL_FEATURES_DIM == 9 * 28
    shape_p = probe(x)[0].softmax(-1)
    assert torch.allclose(f[..., 0], shape_p[..., 0], atol=1e-6)  # P(empty)
    assert torch.allclose(f[..., 0] + f[..., 1:19].sum(-1), torch.ones(2, 9), atol=1e-5)  # a distribution per cell
    assert torch.equal(f[0, :, 19:], torch.eye(9))
    assert ProbeFeatures(probe, "penultimate")(x).shape == (2, 8)


def scene_features(objects: list[tuple[str, str, int]]) -> torch.Tensor:
    """[1, 9 × 28] cell features of a scene the probe reads with certainty: (shape, colour, cell) per object."""
    f = torch.zeros(N_CELLS, 28)
    f[:, 0] = 1
    f[:, 19:] = torch.eye(N_CELLS)
    for shape, color, cell in objects:
        f[cell, 0] = 0
        f[cell, 1 + SHAPES.index(shape) * len(COLOR_NAMES) + COLOR_NAMES.index(color)] = 1
    return f.flatten()[None]


def test_cells_model_reads_places_and_relations_on_the_grid():
    model = PreferenceModel(PreferenceConfig(hidden=4, tau=0.5))
    with torch.no_grad():
        model.quality[-1].weight.zero_()  # q constant: only the matching term is left
    a, tau = model.config.match_init, model.config.tau

    def r(prompt, objects):
        with torch.no_grad():
            return (
                model.raw(scene_features(objects), shapes_object_tokens([prompt])).item()
                - model.quality[-1].bias.item()
            )

    above = "a red circle above a blue square"
    right, swapped = [("circle", "red", 0), ("square", "blue", 6)], [("circle", "red", 6), ("square", "blue", 0)]
    # Relation weights at zero: a soft maximum over the 72 placements (j ≠ l) of a·[j holds red circle] + a·[l holds
    # blue square]: one placement scores 2a, 14 score a, 57 score 0. Blind to the relation.
    expected = tau * math.log(math.exp(2 * a / tau) + 14 * math.exp(a / tau) + 57)
    assert r(above, right) == pytest.approx(expected, rel=1e-5) and r(above, swapped) == pytest.approx(
        expected, rel=1e-5
    )
    # One object: a soft maximum over the 9 cells.
    assert r("a red circle", right[:1]) == pytest.approx(tau * math.log(math.exp(a / tau) + 8), rel=1e-5)
    with torch.no_grad():
        model.relation[RELATIONS.index("above"), 0] = 3.0  # "above" ~ row of the first object < row of the second
        model.place[GRID + 0, list(POSITIONS).index("on the left")] = 2.0  # "on the left" ~ column 0
    assert r(above, right) > r(above, swapped) + 2
    assert r(above.replace("above", "below"), right) == pytest.approx(expected, rel=1e-5)  # other words unchanged
    left = "a red circle on the left"
    # The three column-0 cells get +2 whether or not they hold the circle.
    at_3 = tau * math.log(math.exp((a + 2) / tau) + 2 * math.exp(2 / tau) + 6)
    at_5 = tau * math.log(math.exp(a / tau) + 3 * math.exp(2 / tau) + 5)
    assert r(left, [("circle", "red", 3)]) == pytest.approx(at_3, rel=1e-5)
    assert r(left, [("circle", "red", 5)]) == pytest.approx(at_5, rel=1e-5)
    with torch.no_grad():
        model.match[2] = 0.5  # partial credit for the right colour
    assert r("a red circle", [("square", "red", 4)]) > r("a red circle", [("square", "blue", 4)])


def test_cells_model_saved_before_the_grid_terms_still_loads(tmp_path):
    old = PreferenceModel(PreferenceConfig(hidden=4, geometry=False))
    old.save(tmp_path / "old")
    doc = json.loads((tmp_path / "old" / "config.json").read_text())
    del doc["config"]["geometry"]  # as written by earlier versions
    (tmp_path / "old" / "config.json").write_text(json.dumps(doc))
    loaded, _ = PreferenceModel.load(tmp_path / "old")
    x, t = scene_features([("circle", "red", 0)]), shapes_object_tokens(["a red circle"])
    assert loaded.config.geometry is False and torch.equal(loaded.raw(x, t), old.raw(x, t))


def test_learns_a_planted_preference_from_200_noisy_labels():
    data, _ = planted(200, d=8, seed=0)
    config = PreferenceConfig(feature_dim=8, **PRECOMPUTED)
    model, metrics = fit_preference(data, config, FitConfig(seed=0))
    assert metrics["n_train"] + metrics["n_val"] == 200 and metrics["n_val"] == 40
    assert metrics["val_accuracy"] >= 0.7 and metrics["n_val_non_tie"] == 40
    test, clean = planted(2000, d=8, seed=1)  # fresh pairs, never seen
    with torch.no_grad():
        delta = model.raw(test.features_0) - model.raw(test.features_1)
    assert pairwise_accuracy(delta, clean)[0] >= 0.85  # the labeller's true preference
    assert pairwise_accuracy(delta, test.y)[0] >= 0.78  # against noisy labels (ceiling 0.9)
    # Replays exactly from the seed.
    again, _ = fit_preference(data, config, FitConfig(seed=0))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_output_is_standardised_over_the_training_images():
    data, _ = planted(120, d=6, seed=2)
    fit = FitConfig(seed=3, val_fraction=0.25)
    model, _ = fit_preference(data, PreferenceConfig(feature_dim=6, **PRECOMPUTED), fit)
    train_idx, _ = split_by_pair(data.groups, fit.val_fraction, fit.seed)
    with torch.no_grad():
        r = model(_unique_images(data.subset(train_idx)))
    assert len(r) == 2 * 90
    assert r.mean().item() == pytest.approx(0, abs=1e-5) and r.std().item() == pytest.approx(1, abs=1e-5)
    with torch.no_grad():  # standardising is affine: the preference between two images is unchanged
        raw = model.raw(data.features_0[:5]) - model.raw(data.features_1[:5])
        std = model(data.features_0[:5]) - model(data.features_1[:5])
    assert torch.allclose(std * model.reward_std, raw, atol=1e-5)


def test_ties_pull_the_difference_to_zero():
    data, _ = planted(100, d=4, seed=4)
    data.y[:] = 0.5
    model, metrics = fit_preference(data, PreferenceConfig(feature_dim=4, **PRECOMPUTED), FitConfig(seed=0))
    assert metrics["val_accuracy"] is None and metrics["val_loss"] == pytest.approx(math.log(2), abs=0.01)


def test_too_few_pairs_is_a_user_error():
    data, _ = planted(5, d=4, seed=0)
    with pytest.raises(UserError, match="at least 10 labelled pairs"):
        fit_preference(data, PreferenceConfig(feature_dim=4, **PRECOMPUTED))
    with pytest.raises(UserError):
        PreferenceConfig(feature_dim=4, prompt_embedding="none")  # prompt_dim must then be 0


def _reward(model: str, seed: int = 0) -> PreferenceReward:
    torch.manual_seed(seed)
    probe = tiny_probe(seed)
    if model == "cells":
        config, features = PreferenceConfig(hidden=8), ProbeFeatures(probe, "cells")
    else:
        config = PreferenceConfig(model="mlp", feature_dim=8, features="shapes-probe",
                                  prompt_embedding="shapes-attributes", hidden=8, rank=4)  # fmt: skip
        features = ProbeFeatures(probe, "penultimate")
    reward_model = PreferenceModel(config)
    with torch.no_grad():
        reward_model.reward_mean.fill_(0.3)
        reward_model.reward_std.fill_(2.0)
    return PreferenceReward(reward_model.eval(), features)


@pytest.mark.parametrize("model", ["cells", "mlp"])
def test_reward_signature_range_check_and_gradient(model):
    reward = _reward(model)
    prompts = ["a red circle", "a blue square above a green triangle"]
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    rewards, info = reward(images, prompts, [{}, {}])
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and "preference_raw" in info
    rewards.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.full((1, 3, 32, 32), 1.5), prompts[:1], [{}])
    with pytest.raises(ValueError, match="float32"):
        reward(torch.rand(1, 3, 32, 32, dtype=torch.float64), prompts[:1], [{}])
    # Autograd agrees with central finite differences along random directions (float64 copy of the reward).
    reward64 = PreferenceReward(reward.model.double(), reward.features.double())
    g = torch.Generator().manual_seed(0)
    x = (0.1 + 0.8 * torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)).requires_grad_(True)  # resized inside
    (grad,) = torch.autograd.grad(reward64.score(x, prompts).sum(), x)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(x.shape, generator=g, dtype=torch.float64)
            fd = (reward64.score(x + eps * v, prompts).sum() - reward64.score(x - eps * v, prompts).sum()) / (2 * eps)
            assert fd.item() == pytest.approx((grad * v).sum().item(), rel=1e-5, abs=1e-8)


def add_world_pairs(store: LabelStore, n_pairs: int, seed: int = 0) -> None:
    """Pairs of a caption-following Shapes image and one with a changed colour, each labelled by a noise-free
    labeller "sim" who prefers the one that follows the caption."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, good in enumerate(make_dataset(n_pairs, seed=seed)):
        shape, color = good.spec.objects[0]
        other = "red" if color != "red" else "blue"
        bad_spec = parse_prompt(good.caption.replace(f"{color} {shape}", f"{other} {shape}", 1))
        bad = make_sample(rng, bad_spec)
        pngs = []
        for s in (good, bad):
            buf = io.BytesIO()
            Image.fromarray(s.image).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        left_good = i % 2 == 0
        order = slice(None) if left_good else slice(None, None, -1)  # each image with its model, on one side
        pair = store.add_pair(good.caption, *pngs[order], *("world", "world-recoloured")[order])
        store.add_label(pair, "sim", "left" if left_good else "right")


def _world_store(tmp_path, n_pairs: int, seed: int = 0) -> LabelStore:
    store = LabelStore(tmp_path / "db.sqlite")
    add_world_pairs(store, n_pairs, seed)
    return store


def test_train_from_store_save_load_and_probe_check(tmp_path):
    store = _world_store(tmp_path, 24)
    probe = tiny_probe()
    out = tmp_path / "reward"
    reward, metrics = train_from_store(store, out, probe, fit=FitConfig(seed=0, max_steps=200), hidden=16, rank=4)
    assert metrics["n_pairs"] == 24 and metrics["n_val"] == 5 and 0 <= metrics["val_accuracy"] <= 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    loaded = preference_reward(out, probe)
    x = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle", "a blue square on the left", "a zebra"]
    assert torch.allclose(loaded(x, prompts, [{}] * 3)[0], reward(x, prompts, [{}] * 3)[0], atol=1e-6)
    assert loaded.metrics["n_pairs"] == 24

    with pytest.raises(UserError, match="another Shapes probe"):
        preference_reward(out, tiny_probe(seed=1))
    with pytest.raises(UserError, match="no preference model"):
        preference_reward(tmp_path / "nothing-here", probe)
    with pytest.raises(UserError, match="Shapes probe is not in"):
        preference_reward(out, tmp_path / "no-probe")
    # Retraining replaces the saved model in one step.
    train_from_store(store, out, probe, fit=FitConfig(seed=1, max_steps=50), hidden=16, rank=4)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".reward")]
    store.close()


def test_train_from_an_empty_store_is_a_user_error(tmp_path):
    with LabelStore(tmp_path / "db.sqlite") as store, pytest.raises(UserError, match="no labels"):
        train_from_store(store, None, tiny_probe())


# -- CLIP features (a tiny random CLIPModel folder stands in for the user's weights) ------------------------
def _coloured(rng: np.random.Generator) -> np.ndarray:
    """A 32×32 RGB uint8 image: a random colour with a random-colour square on it and pixel noise."""
    img = np.broadcast_to(rng.uniform(0.1, 0.9, 3), (32, 32, 3)).copy()
    y, x, s = *rng.integers(0, 20, 2), rng.integers(6, 13)
    img[y : y + s, x : x + s] = rng.uniform(0.1, 0.9, 3)
    img += rng.normal(0, 0.03, img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def redness(images: torch.Tensor) -> torch.Tensor:
    """The simulated labeller's taste: mean red minus mean green and blue, [B, 3, H, W] -> [B]."""
    return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean((-1, -2))


def _redness_store(tmp_path, n_pairs: int, seed: int = 0) -> LabelStore:
    """Random coloured pairs; a noise-free labeller prefers the redder image."""
    from PIL import Image

    store = LabelStore(tmp_path / "db.sqlite")
    rng = np.random.default_rng(seed)
    prompts = ["a red circle", "a blue square above a green triangle", "a yellow triangle on the left"]
    for i in range(n_pairs):
        arrays = [_coloured(rng), _coloured(rng)]
        pngs = []
        for a in arrays:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        r = redness(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255)
        pair = store.add_pair(prompts[i % 3], *pngs, "a", "b")
        store.add_label(pair, "sim", "left" if r[0] > r[1] else "right")
    return store


def test_clip_features_shape_norm_gradient_and_preprocessing(tiny_clip_dir):
    from finetuners.preference import CLIP_MEAN, ClipFeatures

    features = ClipFeatures(tiny_clip_dir)
    assert features.dim == 32 and features.image_size == 32 and len(features.digest) == 64
    assert not any(p.requires_grad for p in features.parameters())
    x = torch.rand(3, 3, 48, 40, requires_grad=True)  # resized to 32 on the short side, centre-cropped
    f = features(x)
    assert f.shape == (3, 32) and torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
    f[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert features.preprocess(x).shape == (3, 3, 32, 32)
    grey = torch.full((1, 3, 32, 32), 0.5)  # already the right size: only normalised, with CLIP's constants
    assert torch.allclose(features.preprocess(grey)[0, :, 0, 0], (0.5 - torch.tensor(CLIP_MEAN)) / features.std.view(3))
    t = features.embed_prompts(["a red circle", "a blue square above a green triangle", "a red circle"])
    assert t.shape == (3, 32) and torch.allclose(t[0], t[2]) and not torch.allclose(t[0], t[1])


def test_clip_preprocessing_reads_the_folder_processor_config(tiny_clip_dir, tmp_path):
    import json
    import shutil

    from finetuners.preference import ClipFeatures

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    features = ClipFeatures(folder)
    assert torch.equal(features.preprocess(torch.ones(1, 3, 32, 32)), torch.full((1, 3, 32, 32), 2.0))
    assert features.digest != ClipFeatures(tiny_clip_dir).digest  # other preprocessing, other encoder


def test_train_on_clip_features_learns_redness_saves_and_reloads(tiny_clip_dir, tmp_path):
    from finetuners.rewards import make_reward

    store = _redness_store(tmp_path, 150)
    out = tmp_path / "clip-reward"
    reward, metrics = train_from_store(store, out, clip=tiny_clip_dir, fit=FitConfig(seed=0))
    saved = PreferenceModel.load(out)[0].config
    assert saved.features == "clip" and saved.prompt_embedding == "clip-text" and saved.text_dim == 32
    assert saved.clip_folder == str(tiny_clip_dir.resolve()) and saved.feature_digest == reward.features.digest
    assert metrics["n_val_non_tie"] == 30 and metrics["val_accuracy"] >= ACC_HELD_OUT

    # Fresh pairs, never labelled: the reward orders them by redness.
    rng = np.random.default_rng(99)
    a, b = (torch.from_numpy(np.stack([_coloured(rng) for _ in range(200)])).permute(0, 3, 1, 2) / 255 for _ in "ab")
    prompts = ["a red circle"] * 200
    with torch.no_grad():
        delta = reward.score(a, prompts) - reward.score(b, prompts)
    assert pairwise_accuracy(delta, (redness(a) > redness(b)).float())[0] >= ACC_FRESH

    # Reloaded from the folder (the CLIP folder recorded in it), and through the reward registry: same scores.
    x = torch.rand(4, 3, 32, 32)
    prompts = ["a red circle", "a zebra", "a blue square on the left", "a red circle"]
    want = reward(x, prompts, [{}] * 4)[0]
    assert torch.allclose(preference_reward(out)(x, prompts, [{}] * 4)[0], want, atol=1e-6)
    assert torch.allclose(make_reward(f"preference:{out}")(x, prompts, [{}] * 4)[0], want, atol=1e-6)
    store.close()


# Measured (store seeds 0–3, fit seed = store seed): held-out 0.87–0.97 on 30 labels, fresh pairs 0.885–0.925 on
# 200; chance is 0.5. 0.8 leaves room for numeric drift across torch / transformers versions.
ACC_HELD_OUT = 0.8
ACC_FRESH = 0.8


def test_clip_folder_errors(tiny_clip_dir, tmp_path):
    import shutil

    from finetuners.preference import ClipFeatures

    with pytest.raises(UserError, match="no CLIP weights folder .*missing"):
        ClipFeatures(tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="no safetensors CLIP weights .*pytorch_model.bin"):
        ClipFeatures(pickled)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="are unreadable"):
        ClipFeatures(broken)
    store = _redness_store(tmp_path, 12)
    with pytest.raises(UserError, match="no safetensors"):
        train_from_store(store, tmp_path / "out", clip=pickled)
    with pytest.raises(UserError, match="mlp model"):
        train_from_store(store, tmp_path / "out", model="cells", clip=tiny_clip_dir)
    assert not (tmp_path / "out").exists()
    # A reward trained on one CLIP folder refuses other weights.
    out = tmp_path / "reward"
    train_from_store(store, out, clip=tiny_clip_dir, fit=FitConfig(max_steps=5))
    other = tmp_path / "other-clip"
    shutil.copytree(tiny_clip_dir, other)
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(other)
    with torch.no_grad():
        model.visual_projection.weight.mul_(2)
    model.save_pretrained(other, safe_serialization=True)
    with pytest.raises(UserError, match="other CLIP weights"):
        preference_reward(out, clip=other)
    with pytest.raises(UserError, match="no CLIP weights folder"):
        preference_reward(out, clip=tmp_path / "gone")
    store.close()


# -- the labels command: the Label tab's store from the command line ------------------------------------------------
def test_the_labels_command_reports_exports_imports_and_trains_the_reward(tmp_path, capsys):
    """stats reads back the counts, agreement and ranking of a store built by hand; an export imported into a new
    data folder carries the same content, twice adds nothing; the reward trains on the shipped probe's features;
    bad input is one line, exit 2, and changes nothing."""
    from finetuners.__main__ import main as cli

    data = tmp_path / "data"
    data.mkdir()
    store = LabelStore(data / "labels.db")
    add_world_pairs(store, 40)  # "sim" labels every pair, always for the caption-following image (model "world")
    pairs = store.pairs()
    for k, pair in enumerate(pairs[:10]):  # "ann" agrees with sim on 8 of 10 pairs
        sim = next(lab.choice for lab in store.labels() if lab.pair.id == pair.id)
        store.add_label(pair.id, "ann", sim if k < 8 else {"left": "right", "right": "left"}[sim])
    assert cli(["labels", "stats", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "40 pairs, 50 labels" in out[0] and "from 2 labellers; 0 pairs without a label" in out[0]
    assert out[1] == "labellers: ann 10 · sim 40"
    assert out[2] == "agreement: 80.0% over 10 comparisons of two labellers on one pair"
    assert out[3].startswith("rank 1: world  Elo ") and "48 wins, 2 losses, 0 ties, win rate 96.0%" in out[3]
    assert out[4].startswith("rank 2: world-recoloured") and out[-1].startswith("integrity: ok")

    export = tmp_path / "export"
    assert cli(["labels", "export", "--data-dir", str(data), "--out", str(export), "--format", "parquet"]) == 0
    assert "exported 50 labels" in capsys.readouterr().out and (export / "labels.parquet").is_file()
    new = tmp_path / "new-data"  # a data folder that does not exist yet: the import makes it
    assert cli(["labels", "import", "--data-dir", str(new), str(export)]) == 0
    assert "imported 40 new pairs and 50 labels" in capsys.readouterr().out
    with LabelStore(new / "labels.db") as imported:
        assert imported.content() == store.content()
        before = imported.digest()
    assert cli(["labels", "import", "--data-dir", str(new), str(export)]) == 0  # again: nothing new
    assert "imported 0 new pairs and 0 labels (50 already here" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a red circle"}\n')
    for args, said in [
        (["stats", "--data-dir", str(tmp_path / "nowhere")], "there is no label database at"),
        (["export", "--data-dir", str(data), "--out", str(export)], "already exists"),
        (["import", "--data-dir", str(new), str(bad)], "bad.jsonl"),
        (["import", "--data-dir", str(new), str(tmp_path / "missing")], "missing"),
        (["import", "--data-dir", str(tmp_path / "fresh" / "data"), str(bad)], "bad.jsonl"),  # made, then removed
    ]:
        assert cli(["labels", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and said in err and "Traceback" not in err, (args, err)
    with LabelStore(new / "labels.db") as imported:
        assert imported.digest() == before
    foreign = tmp_path / "notes.txt"  # an existing file that is not a label database: refused, and left as it was
    foreign.write_text("not a database")
    for action in (["stats"], ["import", str(export)]):
        assert cli(["labels", *action, "--labels-db", str(foreign)]) == 2
        assert "not a label database" in capsys.readouterr().err and foreign.read_text() == "not a database"
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "fresh").exists()

    assert cli(["labels", "reward", "--data-dir", str(data)]) == 0
    said = capsys.readouterr().out
    reward = data / "rewards" / "labels"
    assert said.startswith("held-out pairwise accuracy ") and f"--reward preference:{reward.resolve()}" in said
    assert sorted(p.name for p in reward.iterdir()) == ["config.json", "model.safetensors"]
    assert preference_reward(reward).metrics["n_pairs"] == 40

    image = next((data / "images").glob("*.png"))  # a label's image changed on disk: reported, exit 1
    image.write_bytes(image.read_bytes() + b"x")
    assert cli(["labels", "stats", "--data-dir", str(data)]) == 1
    assert "integrity: 1 images whose content is not their hash" in capsys.readouterr().out
    store.close()
