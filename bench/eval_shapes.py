"""Prompt-following accuracy and FD-probe of a Shapes pipeline at several step counts.

    python bench/eval_shapes.py [--model shapes] [--n 1000] [--steps 1 2 4 8 20] [--guidance 3]

Accuracy: the probe's reading satisfies the prompt exactly (right objects, nothing extra, placed as
asked), over ``--n`` captions from the training distribution (fixed list, seed 12345) with seeds 0…n−1.
FD-probe: Fréchet distance between probe features of the generated images and of ``--n`` fresh real
Shapes images for the same captions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetuners.generate import SampleRequest, generate  # noqa: E402
from finetuners.metrics import frechet_distance  # noqa: E402
from finetuners.models import PROBE_PATH, load_model  # noqa: E402
from finetuners.shapes.probe import ShapesProbe, prompt_accuracy  # noqa: E402
from finetuners.shapes.world import eval_prompts, make_sample, parse_prompt  # noqa: E402


def real_features(probe, prompts: list[str], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    imgs = np.stack([make_sample(rng, parse_prompt(p)).image for p in prompts])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    return probe.features(x)


@torch.no_grad()
def evaluate(pipe, probe, prompts, steps: int, guidance: float, sampler: str = "ddim", chunk: int = 1) -> dict:
    """Generate one image per prompt (seed = index) and score it. ``chunk`` prompts share a batch only
    when they are equal, so images are generated prompt by prompt with batch 1 (seed replayable)."""
    images = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        r = generate(pipe, SampleRequest(p, steps=steps, guidance=guidance, seed=i, sampler=sampler,
                                         record_pred_x0=False))  # fmt: skip
        images.append(r.images)
    seconds = time.perf_counter() - t0
    x = torch.cat(images)
    acc = prompt_accuracy(probe, x, prompts)
    return {"steps": steps, "accuracy": acc.mean().item(), "accuracy_se": (acc.std() / len(acc) ** 0.5).item(),
            "features": probe.features(x), "seconds_per_image": seconds / len(prompts)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 20])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = p.parse_args()
    pipe = load_model(args.model, "cpu")
    probe = ShapesProbe.load(PROBE_PATH)
    prompts = eval_prompts(args.n)
    real = real_features(probe, prompts, seed=777)
    real_2 = real_features(probe, prompts, seed=778)
    rows = []
    print(f"model {args.model}, {args.n} prompts, guidance {args.guidance}, sampler {args.sampler}")
    print(f"FD-probe between two independent real sets (noise floor): {frechet_distance(real, real_2):.3f}")
    print("| steps | accuracy (± SE) | FD-probe | s/image |")
    print("|---|---|---|---|")
    for k in args.steps:
        r = evaluate(pipe, probe, prompts, k, args.guidance, args.sampler)
        r["fd_probe"] = frechet_distance(r.pop("features"), real)
        rows.append(r)
        print(f"| {k} | {100 * r['accuracy']:.1f}% ± {100 * r['accuracy_se']:.1f} | {r['fd_probe']:.3f} "
              f"| {r['seconds_per_image']:.3f} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
