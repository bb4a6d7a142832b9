"""Learning a Bradley–Terry preference reward from 200 simulated labels on pairs of Shapes images.

    python bench/preference_learning.py                          # procedural Shapes pairs (CPU, ~1–2 min)
    python bench/preference_learning.py --labels 200 --flip 0.1 --seeds 3 --probe PATH
    python bench/preference_learning.py --source generated       # pairs sampled from assets/shapes-sd

The simulated labeller prefers the image that follows the caption according to the Shapes probe: the one
the probe reads as satisfying the prompt (``prompt_accuracy``), else the one with the higher
``prompt_log_prob`` (a tie when they are within ``--tie-margin`` nats), and flips ``--flip`` of its
left/right answers at random. Pairs (``--source world``): one caption-following procedural image and,
``--mismatch`` of the time, one that breaks the caption (a changed colour or shape, a wrong place, a
missing or an extra object), else a second caption-following render; sides are random.
(``--source generated``: two samples of the Shapes pipeline for one caption, at two of 1/2/4/8 steps; it
also prints the win rates of the step counts. Sampling makes it much slower: tens of minutes on a CPU.)

The labels go through the real path: a ``LabelStore`` (PNG files, SQLite), then ``train_from_store``
(split by pair, early stopping). Each reward is then scored on fresh held-out pairs. Rows of the table,
all on non-tie held-out pairs, against the labeller's noisy answers (ceiling 1 − flip) and its
noise-free ones:
- ``bt_cells``: the default model (probe cell readings × the caption's objects, place words on grid rows and
  columns, a joint term for relations), trained on the labels;
- ``cells_prior_only``: the same model untrained (its prior alone), to show what the labels add;
- ``bt_cells_free_w``: the cells model with a free cell × token matrix instead of the grid terms
  (``geometry=False``, the model of earlier versions);
- ``bt_mlp``: the generic MLP on the probe's penultimate features + the caption's attribute embedding;
- ``probe_oracle``: the probe's log-prob difference (the labeller's own rule, before the flips).
The probe: ``--probe`` if given, else the shipped ``assets/shapes-probe``, else a small probe trained here
first (``--probe-steps``; it reads scenes less well, and the output says so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from finetuners.labels import LabelStore  # noqa: E402
from finetuners.models import PROBE_PATH  # noqa: E402
from finetuners.preference import (  # noqa: E402
    FitConfig,
    PreferenceConfig,
    PreferenceModel,
    PreferenceReward,
    ProbeFeatures,
    pairwise_accuracy,
    train_from_store,
)
from finetuners.shapes.probe import ProbeConfig, ShapesProbe, probe_loss, prompt_accuracy, prompt_log_prob  # noqa: E402
from finetuners.shapes.world import (  # noqa: E402
    COLOR_NAMES,
    N_CELLS,
    SHAPES,
    Obj,
    PromptSpec,
    caption,
    cell_targets,
    make_dataset,
    place,
    random_spec,
    render,
    valid_placements,
)

log = logging.getLogger("bench.preference")


# -- the probe -----------------------------------------------------------------------------------------------
def quick_probe(steps: int, seed: int) -> tuple[ShapesProbe, float]:
    """A small probe trained on procedural images only (a fallback when no trained probe is at hand)."""
    data = make_dataset(8000, seed=seed + 777)
    x = torch.from_numpy(np.stack([s.image for s in data])).permute(0, 3, 1, 2).float() / 255
    targets = [cell_targets(s.objects) for s in data]
    shape_t = torch.from_numpy(np.stack([t[0] for t in targets]))
    color_t = torch.from_numpy(np.stack([t[1] for t in targets]))
    torch.manual_seed(seed)
    probe = ShapesProbe(ProbeConfig(width=32))
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=gen)
        loss = probe_loss(*probe(x[idx]), shape_t[idx], color_t[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("quick probe %d/%d loss %.3f", step, steps, loss.item())
    probe.eval().requires_grad_(False)
    held = make_dataset(1000, seed=seed + 888)
    xh = torch.from_numpy(np.stack([s.image for s in held])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        acc = prompt_accuracy(probe, xh, [s.spec for s in held]).mean().item()
    return probe, acc


# -- pairs ---------------------------------------------------------------------------------------------------
def broken_scene(spec: PromptSpec, rng: np.random.Generator) -> list[Obj]:
    """Objects that do NOT satisfy ``spec``: one attribute or the placement is wrong."""
    while True:
        objects = place(spec, rng)
        kind = rng.choice(["colour", "shape", "place", "count"])
        k = rng.integers(len(objects))
        o = objects[k]
        if kind == "colour":
            objects[k] = Obj(o.shape, str(rng.choice([c for c in COLOR_NAMES if c != o.color])), o.cell)
        elif kind == "shape":
            objects[k] = Obj(str(rng.choice([s for s in SHAPES if s != o.shape])), o.color, o.cell)
        elif kind == "place":
            valid = set(valid_placements(spec))
            wrong = [c for c in itertools.permutations(range(N_CELLS), len(objects)) if c not in valid]
            if not wrong:
                continue  # "a red circle" holds anywhere: break it another way
            cells = wrong[rng.integers(len(wrong))]
            objects = [Obj(ob.shape, ob.color, c) for ob, c in zip(objects, cells)]
        elif len(objects) == 2:
            objects.pop(k)  # a missing object
        else:
            free = [c for c in range(N_CELLS) if c != o.cell]
            objects.append(
                Obj(str(rng.choice(SHAPES)), str(rng.choice(COLOR_NAMES)), int(rng.choice(free)))
            )  # an extra one
        if not spec.satisfied_by(objects):
            return objects


def world_pairs(n: int, mismatch: float, rng: np.random.Generator):
    """n (caption, image_0 uint8 [H, W, 3], image_1, model_0, model_1) with random sides."""
    out = []
    for _ in range(n):
        spec = random_spec(rng)
        good = render(place(spec, rng), rng)
        bad = mismatch > rng.random()
        other = render(broken_scene(spec, rng) if bad else place(spec, rng), rng)
        pair = [(good, "world"), (other, "world-broken" if bad else "world")]
        if rng.random() < 0.5:
            pair.reverse()
        out.append((caption(spec), pair[0][0], pair[1][0], pair[0][1], pair[1][1]))
    return out


def generated_pairs(n: int, model: str, rng: np.random.Generator):
    """n pairs of Shapes-pipeline samples for one caption at two different step counts (and seeds)."""
    from finetuners.generate import SampleRequest, generate
    from finetuners.models import load_model, model_defaults

    pipe = load_model(model, "cpu")
    defaults = model_defaults(pipe)
    out = []
    for i in range(n):
        prompt = caption(random_spec(rng))
        steps = rng.choice([1, 2, 4, 8], size=2, replace=False)
        images = []
        for s in steps:
            req = SampleRequest(prompt, steps=int(s), sampler=defaults.sampler, guidance=defaults.guidance,
                                seed=int(rng.integers(2**31)), record_pred_x0=False)  # fmt: skip
            img = generate(pipe, req).images[0]
            images.append((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        out.append((prompt, images[0], images[1], f"shapes@{steps[0]}", f"shapes@{steps[1]}"))
        if i % 50 == 0:
            log.info("generated %d/%d pairs", i, n)
    return out


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


# -- the simulated labeller ------------------------------------------------------------------------------------
@torch.no_grad()
def probe_labels(probe, pairs, flip: float, tie_margin: float, rng: np.random.Generator):
    """(noisy choices, noise-free choices, probe log-prob differences) for each pair."""
    prompts = [p[0] for p in pairs]
    x0, x1 = to_tensor([p[1] for p in pairs]), to_tensor([p[2] for p in pairs])
    acc0, acc1 = prompt_accuracy(probe, x0, prompts), prompt_accuracy(probe, x1, prompts)
    lp0, lp1 = prompt_log_prob(probe, x0, prompts), prompt_log_prob(probe, x1, prompts)
    clean = []
    for a0, a1, d in zip(acc0.tolist(), acc1.tolist(), (lp0 - lp1).tolist()):
        if a0 != a1:
            clean.append("left" if a0 > a1 else "right")
        elif abs(d) >= tie_margin:
            clean.append("left" if d > 0 else "right")
        else:
            clean.append("tie")
    swap = {"left": "right", "right": "left", "tie": "tie"}
    noisy = [swap[c] if rng.random() < flip else c for c in clean]
    return noisy, clean, lp0 - lp1


def targets(choices: list[str]) -> torch.Tensor:
    return torch.tensor([{"left": 1.0, "right": 0.0, "tie": 0.5}[c] for c in choices])


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def held_out_delta(reward, pairs, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        prompts = [p[0] for p in chunk]
        r0, _ = reward(to_tensor([p[1] for p in chunk]), prompts, [{}] * len(chunk))
        r1, _ = reward(to_tensor([p[2] for p in chunk]), prompts, [{}] * len(chunk))
        out.append(r0 - r1)
    return torch.cat(out)


@contextlib.contextmanager
def one_thread():
    """The reward MLP is tiny: one thread beats several (by far, on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_seed(args, probe, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = args.labels + args.test_pairs
    t0 = time.time()
    pairs = generated_pairs(n, args.model, rng) if args.source == "generated" else world_pairs(n, args.mismatch, rng)
    noisy, clean, lp_delta = probe_labels(probe, pairs, args.flip, args.tie_margin, rng)
    t_pairs = time.time() - t0
    train_pairs, test_pairs = pairs[: args.labels], pairs[args.labels :]
    result = {"seed": seed, "seconds_pairs_and_labels": round(t_pairs, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        store = LabelStore(Path(tmp) / "labels.sqlite")
        for (prompt, im0, im1, m0, m1), choice in zip(train_pairs, noisy):
            store.add_label(store.add_pair(prompt, png(im0), png(im1), m0, m1, {"seed": seed}), "simulated", choice)
        if args.source == "generated":
            result["win_rates"] = {r.model: round(r.win_rate, 3) for r in store.win_rates()}
        y_noisy, y_clean = targets(noisy[args.labels :]), targets(clean[args.labels :])

        def score(name: str, reward, metrics: dict | None, seconds: float) -> None:
            delta = held_out_delta(reward, test_pairs)
            result[name] = {
                "heldout_acc_noisy": pairwise_accuracy(delta, y_noisy)[0],
                "heldout_acc_clean": pairwise_accuracy(delta, y_clean)[0],
                "val_acc_split_by_pair": None if metrics is None else metrics["val_accuracy"],
                "seconds": round(seconds, 1),
            } | (
                {}
                if metrics is None
                else {"val_loss": round(metrics["val_loss"], 4), "best_step": metrics["best_step"]}
            )

        for name, model, extra in (("bt_cells", "cells", {}), ("bt_cells_free_w", "cells", {"geometry": False}),
                                   ("bt_mlp", "mlp", {})):  # fmt: skip
            t0 = time.time()
            with one_thread():
                reward, metrics = train_from_store(
                    store, Path(tmp) / name, probe, model=model, fit=FitConfig(seed=seed), **extra
                )
            score(name, reward, metrics, time.time() - t0)
        # The cells model's prior alone (W = match_init·I, nothing learnt): what the 200 labels add to it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # q's default init, as fit_preference draws it
            prior = PreferenceModel(PreferenceConfig())
        score("cells_prior_only", PreferenceReward(prior, ProbeFeatures(probe)), None, 0)
        store.close()
    test_lp = lp_delta[args.labels :]
    result["probe_oracle"] = {
        "heldout_acc_noisy": pairwise_accuracy(test_lp, y_noisy)[0],
        "heldout_acc_clean": pairwise_accuracy(test_lp, y_clean)[0],
    }
    result["n_test_non_tie"] = pairwise_accuracy(test_lp, y_noisy)[1]
    result["train_ties"] = noisy[: args.labels].count("tie")
    return result


_COLUMNS = ("heldout_acc_noisy", "heldout_acc_clean", "val_acc_split_by_pair")


def _mean(values: list) -> float | None:
    """Mean over seeds, None where a seed had nothing to score (no non-tie pairs)."""
    return None if not values or None in values else round(float(np.mean(values)), 4)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=200, help="labelled pairs to train on")
    ap.add_argument("--test-pairs", type=int, default=None, help="fresh held-out pairs (default 1000; generated: 200)")
    ap.add_argument("--flip", type=float, default=0.1, help="share of left/right answers flipped at random")
    ap.add_argument("--tie-margin", type=float, default=1.0, help="|Δ log-prob| (nats) under which it is a tie")
    ap.add_argument("--mismatch", type=float, default=0.75, help="share of pairs with one caption-breaking image")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--source", choices=("world", "generated"), default="world")
    ap.add_argument("--model", default="shapes", help="pipeline for --source generated")
    ap.add_argument("--probe", default=None, help=f"Shapes probe folder (default {PROBE_PATH} when present)")
    ap.add_argument("--probe-steps", type=int, default=600, help="steps of the fallback probe (no probe found)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if args.test_pairs is None:
        args.test_pairs = 200 if args.source == "generated" else 1000
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.time()

    if args.source == "generated":
        from finetuners.models import ALIASES

        folder = ALIASES.get(args.model, Path(args.model))
        if not (Path(folder) / "model_index.json").is_file():
            sys.exit(
                f"--source generated needs a Shapes pipeline: {folder} is missing (train it or use --source world)"
            )
    probe_folder = Path(args.probe) if args.probe else PROBE_PATH
    if (probe_folder / "model.safetensors").is_file():
        probe, probe_note = ShapesProbe.load(probe_folder), str(probe_folder)
    elif args.probe:
        sys.exit(f"no Shapes probe in {args.probe}")
    else:
        log.info("no probe at %s: training a small one for %d steps", PROBE_PATH, args.probe_steps)
        probe, acc = quick_probe(args.probe_steps, seed=0)
        probe_note = f"quick probe ({args.probe_steps} steps, held-out prompt accuracy {acc:.3f})"
    log.info("probe: %s", probe_note)

    results = [run_seed(args, probe, seed) for seed in range(args.seeds)]
    summary = {"labels": args.labels, "flip": args.flip, "source": args.source, "probe": probe_note,
               "test_pairs": args.test_pairs, "seconds": round(time.time() - t_start, 1)}  # fmt: skip
    print(
        f"\nBradley–Terry preference reward, {args.labels} simulated labels ({args.flip:.0%} flipped), {args.source} "
        f"pairs: held-out pairwise accuracy on non-tie pairs (mean over {args.seeds} seeds)"
    )
    print(f"probe: {probe_note}")
    print(f"{'':22s}{'vs noisy labels':>18s}{'vs noise-free':>16s}{'val (split by pair)':>22s}")
    for name in ("bt_cells", "cells_prior_only", "bt_cells_free_w", "bt_mlp", "probe_oracle"):
        noisy, clean, val = (_mean([r[name].get(k) for r in results]) for k in _COLUMNS)
        print(f"{name:22s}{_fmt(noisy):>18s}{_fmt(clean):>16s}{_fmt(val):>22s}")
        summary[name] = {"heldout_acc_noisy": noisy, "heldout_acc_clean": clean, "val_acc_split_by_pair": val}
    if args.source == "generated":
        print("win rates (first seed):", results[0].get("win_rates"))
    summary["per_seed"] = results
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
