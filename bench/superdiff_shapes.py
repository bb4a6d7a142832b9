r"""SuperDiff on the Shapes world (ALGORITHMS.md §4): does AND compose, does OR cover both modes, what does it cost.

    python bench/superdiff_shapes.py [--model shapes] [--probe assets/shapes-probe] [--n 64] [--steps 100] \
        [--objects "a red circle" "a blue square"]

Every sampler draws image i from seed i (i = 0 … n−1), so the rows of a table differ only in the sampler. The
Shapes probe (``read_images``) reads each image; an image "contains" an object when the probe sees that
(shape, colour) in any cell.

1. Two objects, A = "a red circle", B = "a blue square" (or ``--objects A B``, one object each, a position phrase
   allowed): the fraction of images containing both, only A, only B, or neither, under AND, averaged predictions
   (κ = ½), OR (T = 1) and two joint prompts: "A and B", the joint prompt of ALGORITHMS.md §4.4 (outside the
   Shapes grammar, whose captions have no "and"), and the nearest in-grammar joint prompts, the relation captions
   "a red circle <relation> a blue square" (the two objects without their positions), each relation on a
   quarter of the seeds. Joint prompts run the ordinary sampler (DDIM, η = 1, as the app's baseline). OR's
   balance is only-A / (only-A + only-B): 0.5 is even.
2. Two positions, A = "a red circle on the left", B = "a red circle at the top": the fraction whose red circle
   sits in both regions at once (the top-left cell). The joint prompt "a red circle at the top on the left" is
   outside the grammar (no caption has two position phrases): it is what a user would type.
3. Cost: seconds per image of each sampler (table 1's runs, one batch of n; the ordinary sampler's from table 2,
   whose joint prompt is one batch too), split into UNet time (forward hooks) and the density estimator's time
   (the combiner's κ and Itô-increment calls, timed in place; "without" subtracts it), and UNet rows per step
   per image, read from the library's counters (AND of two prompts with CFG must make 3, two models 4). The
   averaged and OR samplers still track ℓ (OR needs it; averaging does not, but the library tracks it anyway).

Prints markdown tables and the command that made them; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetuners import superdiff  # noqa: E402
from finetuners.generate import LIMITS, SampleRequest, generate  # noqa: E402
from finetuners.models import PROBE_PATH, load_model  # noqa: E402
from finetuners.shapes.probe import ShapesProbe, read_images  # noqa: E402
from finetuners.shapes.world import RELATIONS, describe_scene, parse_prompt  # noqa: E402
from finetuners.superdiff import (  # noqa: E402
    SuperDiffConfig,
    default_guidance,
    superpose_models,
    superpose_prompts,
)

OBJ_A, OBJ_B = "a red circle", "a blue square"
POS_A, POS_B = "a red circle on the left", "a red circle at the top"
POS_JOINT = "a red circle at the top on the left"
TOP_LEFT = 0  # the cell in both regions (row-major 3×3 grid)
JOINT_ETA = 1.0


class Timer:
    """Seconds spent in the UNet (forward hooks) and in the SuperDiff combiner (κ and Itô increments) during a run.

    The combiner's methods are wrapped for the duration only; what they compute is untouched."""

    def __init__(self, pipe):
        self.pipe, self.unet, self.estimator = pipe, 0.0, 0.0

    @contextmanager
    def measure(self):
        self.unet = self.estimator = 0.0
        start = {}
        pre = self.pipe.unet.register_forward_pre_hook(lambda *a: start.__setitem__("t", time.perf_counter()))
        post = self.pipe.unet.register_forward_hook(lambda *a: self._add_unet(time.perf_counter() - start["t"]))
        originals = {name: getattr(superdiff.Combiner, name) for name in ("kappa", "update")}

        def timed(fn):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.estimator += time.perf_counter() - t

            return wrapper

        try:
            for name, fn in originals.items():
                setattr(superdiff.Combiner, name, timed(fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(superdiff.Combiner, name, fn)
            pre.remove()
            post.remove()

    def _add_unet(self, seconds: float) -> None:
        self.unet += seconds


def contains(scenes, obj: tuple[str, str]) -> list[bool]:
    return [any((o.shape, o.color) == obj for o in scene) for scene in scenes]


def fraction(flags: list[bool]) -> tuple[float, float]:
    n = len(flags)
    p = sum(flags) / n
    return p, (p * (1 - p) / n) ** 0.5


def pct(flags: list[bool]) -> str:
    p, se = fraction(flags)
    return f"{100 * p:.1f}% ± {100 * se:.1f}"


def paired(first: list[bool], second: list[bool]) -> tuple[float, float]:
    """Mean of first − second over the same seeds, and its standard error (the seeds pair the two samplers' noise)."""
    d = np.array(first, dtype=float) - np.array(second, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / len(d) ** 0.5) if len(d) > 1 else float("nan")


def paired_line(what: str, runs_both: dict) -> tuple[str, dict]:
    """AND against averaged predictions on one outcome, paired over seeds."""
    diff, se = paired(runs_both["AND"], runs_both["averaged κ = ½"])
    return (f"AND − averaged, {what}, paired over the same seeds: {100 * diff:+.1f} ± {100 * se:.1f} points "
            f"({diff / se:+.1f} standard errors)" if se > 0 else f"AND − averaged, {what}: {100 * diff:+.1f} points",
            {"and_minus_avg": diff, "se": se})  # fmt: skip


class Bench:
    def __init__(self, pipe, probe, n: int, steps: int, guidance: float):
        self.pipe, self.probe, self.n, self.steps, self.guidance = pipe, probe, n, steps, guidance
        self.timer = Timer(pipe)
        self.cost: dict[str, dict] = {}
        self.kappa: dict[str, dict] = {}  # per superposed sampler: κ of A over every step and image

    def _record(self, name: str, seconds: float, rows: float | None) -> None:
        self.cost[name] = {"s_per_image": seconds / self.n, "unet_s_per_image": self.timer.unet / self.n,
                           "estimator_s_per_image": self.timer.estimator / self.n, "rows_per_step": rows}  # fmt: skip

    def superpose(self, a: str, b: str, mode: str, name: str):
        config = SuperDiffConfig(mode=mode, steps=self.steps, guidance=self.guidance)
        with self.timer.measure():
            res = superpose_prompts(self.pipe, a, b, config, seed=0, batch=self.n)
        self._record(name, res.seconds, res.info["unet_rows"] / (self.steps * self.n))
        kappa = res.kappa[..., 0].double()
        self.kappa[name] = {"mean": kappa.mean().item(), "max_abs": kappa.abs().max().item(),
                            "outside_0_1": ((kappa < 0) | (kappa > 1)).double().mean().item()}  # fmt: skip
        return self.read(res.images)

    def ordinary(self, prompts_by_seed: list[str], name: str):
        """The ordinary sampler, seed i for image i; seeds sharing a prompt run in batches (contiguous blocks of at
        most the sampler's largest batch)."""
        images, seconds, i = [], 0.0, 0
        with self.timer.measure():
            while i < self.n:
                j = i
                while j < self.n and j - i < LIMITS["batch"][1] and prompts_by_seed[j] == prompts_by_seed[i]:
                    j += 1
                request = SampleRequest(prompts_by_seed[i], steps=min(self.steps, 200), sampler="ddim", eta=JOINT_ETA,
                                        guidance=self.guidance, seed=i, batch=j - i, record_pred_x0=False)  # fmt: skip
                res = generate(self.pipe, request)
                images.append(res.images)
                seconds += res.seconds
                i = j
        self._record(name, seconds, 2 if self.guidance > 1 else 1)
        return self.read(torch.cat(images))

    def read(self, images: torch.Tensor):
        return read_images(self.probe, images)


def object_phrase(obj: tuple[str, str]) -> str:
    shape, color = obj
    return f"a {color} {shape}"


def objects_table(bench: Bench, prompt_a: str = OBJ_A, prompt_b: str = OBJ_B) -> tuple[list[str], dict]:
    """Table 1 for two one-object prompts (with or without a position); the relation captions name their objects
    only (a relation caption has no position phrase)."""
    a, b = parse_prompt(prompt_a).objects[0], parse_prompt(prompt_b).objects[0]
    quarter = -(-bench.n // len(RELATIONS))
    joint = [f"{object_phrase(a)} {RELATIONS[i // quarter]} {object_phrase(b)}" for i in range(bench.n)]
    runs = {
        "AND": bench.superpose(prompt_a, prompt_b, "and", "AND"),
        "averaged κ = ½": bench.superpose(prompt_a, prompt_b, "avg", "averaged κ = ½"),
        "joint prompt “A and B”": bench.ordinary([f"{prompt_a} and {prompt_b}"] * bench.n, "joint prompt and"),
        "joint prompt with a relation": bench.ordinary(joint, "joint prompt"),
        "OR (T = 1)": bench.superpose(prompt_a, prompt_b, "or", "OR (T = 1)"),
    }
    lines = [
        f'### 1. Two objects: A = "{prompt_a}", B = "{prompt_b}"',
        f'joint prompts: "{prompt_a} and {prompt_b}" (outside the grammar, which has no “and”) and '
        f'"{object_phrase(a)} <relation> {object_phrase(b)}", relation = {", ".join(RELATIONS)} on a quarter of the '
        "seeds each",
        "",
        "| sampler | contains both | only A | only B | neither | most common reading |",
        "|---|---|---|---|---|---|",
    ]
    numbers, boths = {}, {}
    for name, scenes in runs.items():
        has_a, has_b = contains(scenes, a), contains(scenes, b)
        both = boths[name] = [x and y for x, y in zip(has_a, has_b)]
        only_a = [x and not y for x, y in zip(has_a, has_b)]
        only_b = [y and not x for x, y in zip(has_a, has_b)]
        neither = [not (x or y) for x, y in zip(has_a, has_b)]
        common, count = Counter(describe_scene(s) for s in scenes).most_common(1)[0]
        lines.append(f"| {name} | {pct(both)} | {pct(only_a)} | {pct(only_b)} | {pct(neither)} | "
                     f"{common} ({count}/{bench.n}) |")  # fmt: skip
        numbers[name] = {k: fraction(v)[0] for k, v in
                         {"both": both, "only_a": only_a, "only_b": only_b, "neither": neither}.items()}  # fmt: skip
        if name.startswith("OR"):
            k_a, k_b = sum(only_a), sum(only_b)
            if k_a + k_b:
                p = k_a / (k_a + k_b)
                se = (p * (1 - p) / (k_a + k_b)) ** 0.5
                numbers[name]["balance"] = p
                lines += ["", f"OR balance, only A / (only A + only B): {p:.2f} ± {se:.2f} over {k_a + k_b} images "
                          "(0.5 = even)"]  # fmt: skip
    line, numbers["paired"] = paired_line("contains both", boths)
    lines += ["", line]
    k = bench.kappa["AND"]
    lines += ["", f"AND's κ of A over every step and image: mean {k['mean']:.3f}, outside [0, 1] on "
              f"{100 * k['outside_0_1']:.1f} % of steps, |κ| up to {k['max_abs']:.2f}"]  # fmt: skip
    return lines, numbers


def positions_table(bench: Bench) -> tuple[list[str], dict]:
    red_circle = parse_prompt(POS_A).objects[0]
    left, top = parse_prompt(POS_A).cells_ok, parse_prompt(POS_B).cells_ok
    runs = {
        "AND": bench.superpose(POS_A, POS_B, "and", "AND (positions)"),
        "averaged κ = ½": bench.superpose(POS_A, POS_B, "avg", "averaged κ = ½ (positions)"),
        "joint prompt": bench.ordinary([POS_JOINT] * bench.n, "ordinary sampler"),
    }
    lines = [
        f'### 2. Two positions: A = "{POS_A}", B = "{POS_B}"',
        f'joint prompt: "{POS_JOINT}" (outside the grammar: no caption has two position phrases)',
        "",
        "| sampler | red circle top-left (both) | on the left only | at the top only | exactly one object |",
        "|---|---|---|---|---|",
    ]
    numbers, boths = {}, {}
    for name, scenes in runs.items():
        cells = [[o.cell for o in s if (o.shape, o.color) == red_circle] for s in scenes]
        both = boths[name] = [TOP_LEFT in c for c in cells]
        only_left = [not x and any(left((c,)) for c in cs) for x, cs in zip(both, cells)]
        only_top = [not x and any(top((c,)) for c in cs) for x, cs in zip(both, cells)]
        single = [len(s) == 1 for s in scenes]
        lines.append(f"| {name} | {pct(both)} | {pct(only_left)} | {pct(only_top)} | {pct(single)} |")
        numbers[name] = {"both": fraction(both)[0], "only_left": fraction(only_left)[0],
                         "only_top": fraction(only_top)[0]}  # fmt: skip
    line, numbers["paired"] = paired_line("red circle top-left", boths)
    return [*lines, "", line], numbers


def cost_table(bench: Bench) -> list[str]:
    # two models: the same checkpoint twice (the count of rows does not depend on the weights)
    cfg = SuperDiffConfig(mode="and", steps=superdiff.MIN_SD_STEPS, guidance=bench.guidance)
    two = superpose_models(bench.pipe, bench.pipe, OBJ_A, cfg, seed=0, batch=1)
    rows_models = two.info["unet_rows"] / cfg.steps
    rows_and = bench.cost["AND"]["rows_per_step"]
    assert bench.guidance <= 1 or (rows_and == 3 and rows_models == 4), (rows_and, rows_models)
    lines = [
        "### 3. Cost (CPU)",
        "",
        "| sampler | UNet rows / step / image | s / image | of which UNet | of which density estimator (κ, ℓ) "
        "| s / image without the estimator |",
        "|---|---|---|---|---|---|",
    ]
    shown = {"AND": "AND", "averaged κ = ½": "averaged κ = ½", "OR (T = 1)": "OR (T = 1)",
             "ordinary sampler": f"ordinary DDIM η {JOINT_ETA:g} (joint prompt of table 2, one batch)"}  # fmt: skip
    for key, name in shown.items():
        c = bench.cost[key]
        if key == "ordinary sampler":
            est, without = "–", "–"
        else:
            est = f"{c['estimator_s_per_image'] * 1e3:.2f} ms"
            without = f"{c['s_per_image'] - c['estimator_s_per_image']:.4f}"
        lines.append(f"| {name} | {c['rows_per_step']:g} | {c['s_per_image']:.4f} | {c['unet_s_per_image']:.4f} | "
                     f"{est} | {without} |")  # fmt: skip
    if bench.guidance > 1:
        rows = (f"AND with CFG: two prompts {rows_and:g} (one call, rows [∅, A, B]), two models {rows_models:g} (each "
                "model its own ∅)")  # fmt: skip
    else:
        rows = f"AND without guidance: two prompts {rows_and:g} (rows [A, B]), two models {rows_models:g}"
    lines += ["", f"UNet rows per step per image, {rows}."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="shapes, shapes-partial or a Shapes pipeline folder")
    p.add_argument("--probe", default=str(PROBE_PATH), help="the Shapes probe folder")
    p.add_argument("--n", type=int, default=64, help="seeds (images) per sampler")
    p.add_argument("--steps", type=int, default=100, help="Euler–Maruyama steps (and DDIM steps of the joint prompt)")
    p.add_argument(
        "--guidance", type=float, default=None, help="default: the model's for SuperDiff (shapes 3, shapes-partial 1)"
    )
    p.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    p.add_argument(
        "--objects",
        nargs=2,
        metavar=("A", "B"),
        default=[OBJ_A, OBJ_B],
        help="table 1's two one-object prompts (a position phrase allowed), naming different objects",
    )
    args = p.parse_args()
    specs = [parse_prompt(text) for text in args.objects]
    for text, spec in zip(args.objects, specs):
        if spec is None or len(spec.objects) != 1:
            p.error(f"--objects {text!r}: not a one-object Shapes caption (e.g. 'a red circle on the left')")
    if specs[0].objects[0] == specs[1].objects[0]:
        p.error("--objects: the two prompts must name different objects")
    start = time.perf_counter()
    pipe = load_model(args.model, "cpu")
    probe = ShapesProbe.load(args.probe)
    if args.guidance is None:
        args.guidance = default_guidance(pipe)
    bench = Bench(pipe, probe, args.n, args.steps, args.guidance)
    command = "python bench/superdiff_shapes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"command: {command.strip()}")
    print(f"model {args.model}, probe {args.probe}, seeds 0…{args.n - 1}, {args.steps} steps, guidance "
          f"{args.guidance:g}, torch {torch.__version__}, {torch.get_num_threads()} threads\n", flush=True)  # fmt: skip
    objects, obj_numbers = objects_table(bench, *args.objects)
    print("\n".join(objects) + "\n", flush=True)
    positions, pos_numbers = positions_table(bench)
    print("\n".join(positions) + "\n", flush=True)
    print("\n".join(cost_table(bench)) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "objects": obj_numbers,
                                         "positions": pos_numbers, "cost": bench.cost,
                                         "kappa": bench.kappa}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
