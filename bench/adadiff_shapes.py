r"""AdaDiff on Shapes: average steps of the adaptive policy against fixed step counts, on held-out prompts.

    python bench/adadiff_shapes.py [--model shapes] [--n-eval 1000] [--n-train 1000] [--seeds 2] \
        [--candidates 1 2 3 4 6 8] [--sampler ddim-trailing] [--guidance 3] [--cache bench/.cache] [--fold-seeds 4]

Held-out prompts: ``eval_prompts(n_eval)`` (seed 12345, the list bench/eval_shapes.py uses; prompt i at seed i).
Protocol ``crossfit`` (the default): each half of the held-out prompts is read out by the policy trained on the
other half (no caption in both). Protocol ``separate``: the policy trains on ``--n-train`` prompts drawn in the
world's mix at seeds from 10^6, as the Adaptive steps tab and ``adapt-train`` train (the shipped policy is one). Every
prompt's ladder (its image at every candidate step count) is rendered once and cached under ``--cache`` (images as
uint8, keyed by the model's weights); the policy trains on the training ladder's reward table (ALGORITHMS.md §3.2)
and is read out by argmax on the held-out prompts, whose ladder gives both the fixed-step accuracies and the adaptive
one (the very same images: a paired comparison).

Reported: probe accuracy at every fixed u; the adaptive policy's accuracy, mean steps and network evaluations; the
smallest fixed u whose accuracy is within 1 point of the adaptive one, and the steps saved against it; mean chosen
steps per template (object / position / relation); the oracle (argmax of R on the held-out ladder itself) and a
random policy with the adaptive histogram as references. With ``--fold-seeds S`` the crossfit policies train on
their fold's distinct prompts at S further seeds (as ALGORITHMS.md §3.2 asks), and the bench adds crossfit
attribute-cell oracles: how much any prompt-only policy that reads the template and one more attribute could save.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from finetuners import adadiff  # noqa: E402
from finetuners.models import resolve_model_path  # noqa: E402
from finetuners.runs import is_checkpoint_ref, load_pipeline, read_json, resolve_checkpoint  # noqa: E402
from finetuners.shapes.world import TEMPLATES, eval_prompts, parse_prompt  # noqa: E402


def weights_key(model: str, runs_root: Path) -> str:
    """A short hash of the pipeline's weight files' contents: a new model, a new cache (a copy, the same one). A run's
    checkpoint (``run:NAME/step-N``) hashes its base model's files and then its own (a LoRA or a whole UNet)."""
    if is_checkpoint_ref(model):
        run_dir, ckpt = resolve_checkpoint(runs_root, model)
        folders = [Path(resolve_model_path(read_json(run_dir / "config.json")["config"]["algo"]["model"])), ckpt]
    else:
        folders = [Path(resolve_model_path(model))]
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.glob("*/*.safetensors")):
            h.update(str(f.relative_to(folder)).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:12]


def cached_ladder(pipe, name: str, prompts, seeds, args, cache: Path) -> adadiff.Ladder:
    """The ladder's images (uint8) from the cache, or rendered now and stored."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([weights_key(args.model, args.runs), prompts, seeds.tolist(), args.candidates,
                                     args.sampler, args.guidance]).encode()).hexdigest()[:16]  # fmt: skip
    path = cache / f"{name}-{key}.safetensors"
    if path.is_file():
        d = load_file(path)
        print(f"{name}: cached ladder {path}", file=sys.stderr)
        return adadiff.Ladder(prompts, seeds, tuple(args.candidates), torch.zeros(0), d["images"].float() / 255,
                              float(d["seconds"]), int(d["nfe"]))  # fmt: skip
    t0 = [time.perf_counter()]

    def progress(done, total, text):
        if time.perf_counter() - t0[0] > 20:
            t0[0] = time.perf_counter()
            print(f"{name}: {100 * done / total:.0f}% ({text})", file=sys.stderr)

    ladder = adadiff.build_quality_table(pipe, prompts, args.candidates, lambda x, p: torch.zeros(len(p)),
                                         seeds=seeds, sampler=args.sampler, guidance=args.guidance, batch_size=128,
                                         keep_images=True, progress=progress)  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    images = (ladder.images * 255).round().to(torch.uint8).contiguous()
    save_file({"images": images, "seconds": torch.tensor(ladder.seconds), "nfe": torch.tensor(ladder.nfe)}, path)
    print(f"{name}: rendered in {ladder.seconds:.0f} s → {path}", file=sys.stderr)
    ladder.images = images.float() / 255  # score the stored 8-bit images, as a rerun from the cache does
    return ladder


def score(ladder: adadiff.Ladder, iqs) -> torch.Tensor:
    """[P, S, N] IQS of every cached image."""
    return adadiff.score_images(ladder.images, ladder.prompts, iqs)


def fixed_steps_for(fixed: dict[int, float], accuracy: float) -> float | None:
    """Steps a fixed schedule needs for ``accuracy``, linear between the measured counts; None above the best.
    The curve is read as its running maximum (the best accuracy at this many steps or fewer), so that on a curve
    that falls somewhere the figure is the first count that reaches ``accuracy``, not a later crossing."""
    pts, best = [], -1.0
    for u, a in sorted(fixed.items()):
        best = max(best, a)
        pts.append((u, best))
    if accuracy <= pts[0][1]:
        return float(pts[0][0])
    for (u0, a0), (u1, a1) in zip(pts, pts[1:]):
        if a0 < accuracy <= a1:
            return u0 + (u1 - u0) * (accuracy - a0) / (a1 - a0)
    return None


def matched_fixed(fixed: dict[int, float], accuracy: float) -> int | None:
    """The issue's comparison: the smallest fixed step count whose accuracy is within 1 point of ``accuracy``."""
    return next((k for k, a in fixed.items() if a >= accuracy - 0.01), None)


def template_oracle(per_template: dict, fixed: dict[int, float], floor: float) -> dict | None:
    """The best a policy that knows only each prompt's template can do, read off the held-out ladder itself: over
    every assignment of one step count per template whose accuracy is at least ``floor``, the one saving the most
    steps against ``matched_fixed``. An upper bound for prompt-only policies that see no more than the template."""
    names = list(per_template)
    total = sum(per_template[t]["n"] for t in names)
    best = None
    for combo in itertools.product(fixed, repeat=len(names)):
        acc = sum(per_template[t]["n"] * per_template[t]["fixed_accuracy"][u] for t, u in zip(names, combo)) / total
        steps = sum(per_template[t]["n"] * u for t, u in zip(names, combo)) / total
        matched = matched_fixed(fixed, acc)
        if acc < floor or matched is None:
            continue
        saving = 1 - steps / matched
        if best is None or saving > best["steps_saved_vs_matched"]:
            best = {"steps": dict(zip(names, combo)), "accuracy": acc, "mean_steps": steps,
                    "matched_fixed_steps": matched, "steps_saved_vs_matched": saving}  # fmt: skip
    return best


def template_masks(prompts: list[str]) -> dict[str, torch.Tensor]:
    """{template: bool mask [P] of the prompts in it}, in ``TEMPLATES`` order, for the templates present."""
    kinds = [parse_prompt(p).template for p in prompts]
    masks = {t: torch.tensor([k == t for k in kinds]) for t in TEMPLATES}
    return {t: m for t, m in masks.items() if m.any()}


CELLS = {  # attributes an attribute-cell oracle may read from a prompt, beyond its template
    "template": lambda s: (),
    "template + relation or position word": lambda s: (s.relation or s.position,),
    "template + shapes": lambda s: tuple(o[0] for o in s.objects),
    "template + colours": lambda s: tuple(o[1] for o in s.objects),
    "template + word + shapes": lambda s: (s.relation or s.position, *(o[0] for o in s.objects)),
}


def cell_oracles(held_out, fold, eval_acc, train_prompts, train_fold, train_acc, candidates) -> dict:
    """Crossfit attribute-cell oracles: for each way of grouping prompts into cells (``CELLS``), every cell gets one
    step count, chosen on the other fold's prompts at their own seeds (``train_acc`` [D, N], seed-averaged) as the
    argmax of accuracy − c·u, and is read out on the held-out images. Swept over the step price c, the best saving by
    the issue's measure at an accuracy ≥ 80 %. The sweep is chosen on the held-out images: an upper bound for any
    prompt-only policy that sees no more than these attributes."""
    u = torch.tensor(candidates, dtype=torch.float32)
    fixed = {int(k): float(eval_acc[:, j].mean()) for j, k in enumerate(candidates)}
    specs, train_specs = [parse_prompt(p) for p in held_out], [parse_prompt(p) for p in train_prompts]
    rows, out = torch.arange(len(held_out)), {}
    for name, attrs in CELLS.items():
        cells, train_cells = [(s.template, *attrs(s)) for s in specs], [(s.template, *attrs(s)) for s in train_specs]
        tables = []  # per fold: {cell: accuracy [N]} from the other fold's prompts, and the template's as fallback
        for f in (0, 1):
            groups: dict = {}
            for i, cell in enumerate(train_cells):
                if train_fold[i] != f:
                    for key in (cell[:1], cell):
                        groups.setdefault(key, []).append(i)
            tables.append({k: train_acc[torch.tensor(v)].mean(0) for k, v in groups.items()})
        curves = torch.stack([tables[int(fold[i])].get(cell, tables[int(fold[i])][cell[:1]])
                              for i, cell in enumerate(cells)])  # fmt: skip
        best = None
        for c in torch.linspace(0, 0.3, 301):
            idx = (curves - c * u).argmax(-1)
            acc, steps = float(eval_acc[rows, idx].mean()), float(u[idx].mean())
            matched = matched_fixed(fixed, acc)
            if acc >= 0.8 and matched and (best is None or 1 - steps / matched > best["steps_saved_vs_matched"]):
                best = {"cells": len(set(cells)), "price": float(c),
                        "accuracy": acc, "mean_steps": steps, "matched_fixed_steps": matched,
                        "steps_saved_vs_matched": 1 - steps / matched}  # fmt: skip
        out[name] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes", help="a pipeline, or a run's checkpoint run:NAME/step-N")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder for --model run:NAME/step-N")
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--three-share", type=float, default=0.0,
                    help="fraction of the held-out prompts drawn as three-object captions (world.random_spec); 0 is "
                    "the default world's evaluation list")  # fmt: skip
    ap.add_argument("--protocol", choices=("crossfit", "separate"), default="crossfit",
                    help="crossfit: 2 folds of the held-out prompts by prompt string, each read out by the policy "
                    "trained on the other; separate: --n-train prompts drawn in the world's mix (captions may repeat "
                    "held-out ones, images never do) × --seeds, as the tab and adapt-train train")  # fmt: skip
    ap.add_argument("--fold-seeds", type=int, default=0,
                    help="crossfit: render every distinct held-out prompt at this many further seeds; each fold's "
                    "policy trains on its prompts' seed-averaged ladder (ALGORITHMS.md §3.2's S) instead of their "
                    "held-out images, and crossfit attribute-cell oracles are chosen from it")  # fmt: skip
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per training prompt (S)")
    ap.add_argument("--candidates", type=int, nargs="+", default=list(adadiff.CANDIDATE_SETS["shapes"]))
    ap.add_argument("--sampler", default="ddim-trailing")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--quality", default="shapes-accuracy", help="IQS: a reward name")
    ap.add_argument("--probe", type=Path, default=None, help="the probe folder of the Shapes IQS (default: shipped)")
    ap.add_argument("--quality-weight", type=float, default=1.0, help="λ")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--flat-rows", choices=adadiff.FLAT_ROWS, default="fewest")
    ap.add_argument("--loss", default="expected", choices=adadiff.LOSSES)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--policy-seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("bench/.cache"))
    ap.add_argument("--save", type=Path, default=None, help="also save the trained policy to this folder")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: up to 8)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)) if args.threads is None else args.threads)

    config = adadiff.AdaDiffConfig(candidates=tuple(args.candidates), top_k=args.top_k, quality=args.quality,
                                   quality_weight=args.quality_weight, flat_rows=args.flat_rows,
                                   num_seeds=args.seeds, sampler=args.sampler, guidance=args.guidance,
                                   loss=args.loss, epochs=args.epochs, seed=args.policy_seed)  # fmt: skip
    args.candidates = list(config.candidates)
    pipe = load_pipeline(args.model, "cpu", runs_root=args.runs)
    held_out = eval_prompts(args.n_eval, three_share=args.three_share)
    eval_ladder = cached_ladder(pipe, "eval", held_out, torch.arange(len(held_out))[:, None], args, args.cache)
    iqs = adadiff.make_iqs(args.quality, weights=args.probe)
    accuracy = adadiff.make_iqs("shapes-accuracy", weights=args.probe)
    eval_acc = score(eval_ladder, accuracy)[:, 0]  # [P, N]
    features = adadiff.text_features(pipe, held_out)
    u = torch.tensor(config.candidates, dtype=torch.float32)
    idx = torch.zeros(len(held_out), dtype=torch.int64)
    t0 = time.perf_counter()
    overlap = None  # separate protocol: the share of held-out prompts whose caption is a training prompt too
    if args.protocol == "crossfit":
        # two folds by prompt string: each held-out prompt is read out by the policy trained on the other fold
        eval_q = score(eval_ladder, iqs)[:, 0] if args.quality != "shapes-accuracy" else eval_acc
        fold = torch.tensor([zlib.crc32(p.encode()) % 2 for p in held_out])
        n_train, train_ladder = [], None
        if args.fold_seeds:  # the distinct held-out prompts at S seeds none of the held-out images uses
            distinct = sorted(set(held_out))
            train_ladder = cached_ladder(pipe, "folds", distinct, adadiff.ladder_seeds(len(distinct), args.fold_seeds,
                                         10**6), args, args.cache)  # fmt: skip
            train_q = score(train_ladder, iqs).mean(1)
            train_acc = score(train_ladder, accuracy).mean(1) if args.quality != "shapes-accuracy" else train_q
            train_fold = torch.tensor([zlib.crc32(p.encode()) % 2 for p in distinct])
            train_features = adadiff.text_features(pipe, distinct)
        for f in (0, 1):
            tr, te = fold != f, fold == f
            assert not {p for p, m in zip(held_out, tr) if m} & {p for p, m in zip(held_out, te) if m}
            if args.fold_seeds:
                m = train_fold != f
                policy = adadiff.train_policy(train_features[m], adadiff.config_rewards(train_q[m], config),
                                              config).policy  # fmt: skip
                n_train.append(int(m.sum()))
            else:
                policy = adadiff.train_policy(features[tr], adadiff.config_rewards(eval_q[tr], config), config).policy
                n_train.append(int(tr.sum()))
            idx[te] = policy.probs(features[te]).argmax(-1)
            if f == 0 and args.save:
                adadiff.save_policy(args.save, policy, config, {"model": args.model, "bench": "adadiff_shapes fold 0"})
    else:  # training prompts drawn in the world's mix (captions may repeat held-out ones), S seeds each from 10^6
        train = adadiff.training_prompts(args.n_train, three_share=args.three_share)
        seen = set(train)
        overlap = sum(p in seen for p in held_out) / len(held_out)
        print(f"held-out prompts whose caption is among the training prompts: {100 * overlap:.1f}% (their images "
              "are not)", file=sys.stderr)  # fmt: skip
        train_ladder = cached_ladder(pipe, "train", train, adadiff.ladder_seeds(len(train), args.seeds,
                                     adadiff.TRAIN_SEED_BASE), args, args.cache)  # fmt: skip
        train_ladder.scores = score(train_ladder, iqs)
        rewards = adadiff.config_rewards(train_ladder.quality, config)
        result = adadiff.train_policy(adadiff.text_features(pipe, train), rewards, config)
        chosen, _ = adadiff.choose_steps(pipe, result.policy, held_out)
        idx = torch.tensor([config.candidates.index(c) for c in chosen])
        n_train = [len(train)]
        if args.save:
            meta = {"model": args.model, "prompts": len(train), "bench": "adadiff_shapes --protocol separate"}
            adadiff.save_policy(args.save, result.policy, config, meta, train_ladder)
    train_s = time.perf_counter() - t0
    rows = torch.arange(len(held_out))
    ada_acc = float(eval_acc[rows, idx].mean())
    ada_steps = float(u[idx].mean())
    fixed = {int(k): float(eval_acc[:, j].mean()) for j, k in enumerate(config.candidates)}
    matched = matched_fixed(fixed, ada_acc)
    saving = 1 - ada_steps / matched if matched else float("nan")
    equal = fixed_steps_for(fixed, ada_acc)  # the fixed-step curve, interpolated, at exactly the adaptive accuracy
    # references: the oracle argmax of R on the held-out ladder; a random policy with the adaptive histogram
    eval_rewards = adadiff.reward_table(eval_acc, config.candidates, config.k, config.quality_weight, config.penalty)
    oracle = eval_rewards.argmax(-1)
    hist = torch.bincount(idx, minlength=len(u)).float()
    gen = torch.Generator().manual_seed(0)
    rand = torch.multinomial(hist / hist.sum(), len(held_out), replacement=True, generator=gen)
    per_template = {}
    for t, m in template_masks(held_out).items():
        per_template[t] = {
            "n": int(m.sum()),
            "mean_steps": float(u[idx[m]].mean()),
            "adaptive_accuracy": float(eval_acc[rows[m], idx[m]].mean()),
            "fixed_accuracy": {int(k): float(eval_acc[m, j].mean()) for j, k in enumerate(config.candidates)},
        }
    figures = {
        "model": args.model, "weights": weights_key(args.model, args.runs), "candidates": list(config.candidates),
        "sampler": args.sampler, "guidance": args.guidance, "n_eval": len(held_out), "n_train": n_train,
        "protocol": args.protocol, "held_out_captions_in_training": overlap,
        "config": config.to_dict(), "fixed_accuracy": fixed, "adaptive_accuracy": ada_acc,
        "adaptive_mean_steps": ada_steps, "adaptive_nfe_per_image": ada_steps * (2 if args.guidance > 1 else 1),
        "matched_fixed_steps": matched, "steps_saved_vs_matched": saving, "fixed_steps_at_equal_accuracy": equal,
        "steps_saved_vs_equal_accuracy": 1 - ada_steps / equal if equal else float("nan"),
        "speedup_vs_max": 1 - ada_steps / u[-1].item(), "histogram": {int(k): int(c) for k, c in zip(u, hist)},
        "per_template": per_template, "template_oracle": template_oracle(per_template, fixed, ada_acc),
        "cell_oracles": cell_oracles(held_out, fold, eval_acc, distinct, train_fold, train_acc, config.candidates)
        if args.protocol == "crossfit" and args.fold_seeds else None, "fold_seeds": args.fold_seeds,
        "oracle": {"accuracy": float(eval_acc[rows, oracle].mean()), "mean_steps": float(u[oracle].mean())},
        "random_same_histogram": {"accuracy": float(eval_acc[rows, rand].mean()), "mean_steps": float(u[rand].mean())},
        "policy_train_seconds": train_s, "ladder_seconds": {"eval": eval_ladder.seconds,
                                                          "train": train_ladder.seconds if train_ladder else 0},
    }  # fmt: skip
    se = (ada_acc * (1 - ada_acc) / len(held_out)) ** 0.5
    print(f"model {args.model} (weights {figures['weights']}), sampler {args.sampler}, guidance {args.guidance:g}, "
          f"U = {list(config.candidates)}, IQS {args.quality}, λ {config.quality_weight:g}, k {config.k}, "
          f"flat rows {config.flat_rows}, "
          f"protocol {args.protocol}: training prompts {n_train}, {len(held_out)} held-out prompts")  # fmt: skip
    print("\n| policy | probe accuracy | mean steps | UNet evals / image |")
    print("|---|---|---|---|")
    nfe = 2 if args.guidance > 1 else 1
    for k, a in fixed.items():
        print(f"| fixed {k} | {100 * a:.1f}% | {k} | {k * nfe} |")
    print(f"| **adaptive** | **{100 * ada_acc:.1f}% ± {100 * se:.1f}** | **{ada_steps:.2f}** | {ada_steps * nfe:.2f} |")
    o = figures["oracle"]
    r = figures["random_same_histogram"]
    print(f"| random, same histogram | {100 * r['accuracy']:.1f}% | {r['mean_steps']:.2f} | |")
    print(f"| oracle argmax R (upper bound) | {100 * o['accuracy']:.1f}% | {o['mean_steps']:.2f} | |")
    print(f"\nsmallest fixed u within 1 point of adaptive accuracy: {matched}; steps saved: {100 * saving:.1f}%")
    pts = sorted(fixed.items())
    if falls := [(u0, u1) for (u0, a0), (u1, a1) in zip(pts, pts[1:]) if a1 < a0 - 0.01]:
        print("the fixed curve falls (" + ", ".join(f"{u0} → {u1} steps" for u0, u1 in falls) + "): more steps are "
              "not better on this model, so the interpolated figure below counts steps no fixed schedule needs; "
              "the within-1-point comparison above is the one to read")  # fmt: skip
    if equal:
        print(f"fixed steps at exactly the adaptive accuracy (linear between fixed counts): {equal:.2f}; "
              f"steps saved: {100 * figures['steps_saved_vs_equal_accuracy']:.1f}%")  # fmt: skip
    if (best := figures["template_oracle"]) is not None:
        print(f"best one-count-per-template assignment at ≥ the adaptive accuracy (upper bound for a policy that "
              f"sees only the template): {best['steps']}, {100 * best['accuracy']:.1f}%, {best['mean_steps']:.2f} "
              f"steps, against fixed {best['matched_fixed_steps']}: {100 * best['steps_saved_vs_matched']:.1f}% "
              f"saved")  # fmt: skip
    if figures["cell_oracles"]:
        print(f"\ncrossfit attribute-cell oracles (one count per cell, chosen on the other fold's prompts at "
              f"{args.fold_seeds} seeds; the step price swept on the held-out images):\n")  # fmt: skip
        print("| cells | number | price c | accuracy | mean steps | against fixed | steps saved |")
        print("|---" * 7 + "|")
        for name, o in figures["cell_oracles"].items():
            print(f"| {name} | – | – | – | – | – | none at ≥ 80 % |" if o is None else
                  f"| {name} | {o['cells']} | {o['price']:.3f} | {100 * o['accuracy']:.1f}% | {o['mean_steps']:.2f} | "
                  f"{o['matched_fixed_steps']} | {100 * o['steps_saved_vs_matched']:.1f}% |")  # fmt: skip
    print("\n| template | prompts | adaptive mean steps | adaptive accuracy | " +
          " | ".join(f"fixed {k}" for k in config.candidates) + " |")  # fmt: skip
    print("|---" * (4 + len(config.candidates)) + "|")
    for t, d in per_template.items():
        print(f"| {t} | {d['n']} | {d['mean_steps']:.2f} | {100 * d['adaptive_accuracy']:.1f}% | " +
              " | ".join(f"{100 * a:.1f}%" for a in d["fixed_accuracy"].values()) + " |")  # fmt: skip
    print(f"\nhistogram of chosen steps: {figures['histogram']}; policy training {train_s:.1f} s; ladders "
          f"{figures['ladder_seconds']} s (as first rendered)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
