"""Why relation prompts fail on a Shapes pipeline: what the probe reads, and whether the relation word matters.

    python bench/relations_shapes.py [--model shapes] [--n 150] [--batch 48]

1. Failure kinds on the first ``--n`` relation captions of ``eval_prompts(1000)`` (20 steps, guidance 3,
   prompt i at seed i): right; wrong number of objects; wrong objects (shape, colour, or the two swapped);
   right objects in a placement that breaks the relation.
2. Sensitivity to the relation word: "a red circle R a blue square" for the four relations R, one seed and
   ``--batch`` images each: where the probe puts the red circle against the blue square, and the largest
   pixel difference between the images of "above" and "below" (against "on the left" / "on the right" of a
   one-object prompt, for scale). A model that ignores the word gives the same placements for all four.
3. What the relation word is worth to the training loss: on 256 relation images (``make_dataset(4000, seed=777)``),
   the x0 mean-squared error of the model's prediction, x0_err = |eps_hat - eps|^2 / SNR, with the caption's
   relation word and with its opposite (above <-> below, left <-> right), at t = 999, 800, 600, 400. For scale,
   the gap an ideal denoiser would show at t = 999, where x_t says almost nothing about x0: the squared distance
   between the mean latents of "A R B" and "A opp(R) B" over ``make_dataset(40000, seed=5)``, made unbiased by
   subtracting each mean's sampling variance, averaged over the captions with 8 or more images of both.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetuners.generate import SampleRequest, encode, generate  # noqa: E402
from finetuners.models import PROBE_PATH, load_model  # noqa: E402
from finetuners.shapes.probe import ShapesProbe, read_scene  # noqa: E402
from finetuners.shapes.world import RELATIONS, eval_prompts, make_dataset, parse_prompt  # noqa: E402

OPPOSITE = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}


def images(pipe, prompt: str, seed: int, batch: int = 1) -> torch.Tensor:
    return generate(pipe, SampleRequest(prompt, steps=20, guidance=3.0, seed=seed, batch=batch,
                                        record_pred_x0=False)).images  # fmt: skip


def failure_kind(spec, scene) -> str:
    if spec.satisfied_by(scene):
        return "right"
    if len(scene) != len(spec.objects):
        return "wrong number of objects"
    if sorted((o.shape, o.color) for o in scene) != sorted(spec.objects):
        return "wrong objects"
    return "right objects, relation broken"


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--batch", type=int, default=48)
    args = p.parse_args()
    pipe = load_model(args.model, "cpu")
    probe = ShapesProbe.load(PROBE_PATH)

    prompts = [q for q in eval_prompts(1000) if parse_prompt(q).relation][: args.n]
    x = torch.cat([images(pipe, q, seed=i) for i, q in enumerate(prompts)])
    kinds = collections.Counter(failure_kind(parse_prompt(q), s) for q, s in zip(prompts, read_scene(*probe(x))))
    print(f"{len(prompts)} relation prompts, 20 steps, guidance 3:")
    for kind, n in kinds.most_common():
        print(f"  {kind:32s} {n:4d}  ({100 * n / len(prompts):.1f} %)")

    print(f"\n'a red circle R a blue square', seed 0, batch {args.batch}: red row − blue row, red col − blue col")
    by_relation = {}
    for relation in RELATIONS:
        x = images(pipe, f"a red circle {relation} a blue square", seed=0, batch=args.batch)
        by_relation[relation] = x
        rows, cols = [], []
        for scene in read_scene(*probe(x)):
            red = [o for o in scene if o.color == "red"]
            blue = [o for o in scene if o.color == "blue"]
            if red and blue:
                rows.append(red[0].row - blue[0].row)
                cols.append(red[0].col - blue[0].col)
        rows, cols = np.array(rows), np.array(cols)
        shares = [np.mean(d < 0) for d in (rows, cols)], [np.mean(d > 0) for d in (rows, cols)]
        print(f"  {relation:16s} read {len(rows):3d}: row diff < 0 {shares[0][0]:.2f}, > 0 {shares[1][0]:.2f}; "
              f"col diff < 0 {shares[0][1]:.2f}, > 0 {shares[1][1]:.2f}")  # fmt: skip
    left = images(pipe, "a red circle on the left", seed=0, batch=args.batch)
    right = images(pipe, "a red circle on the right", seed=0, batch=args.batch)
    above_below = (by_relation["above"] - by_relation["below"]).abs().max()
    print(f"\nlargest pixel difference: above vs below {above_below:.3f}; "
          f"on the left vs on the right {(left - right).abs().max():.3f}")  # fmt: skip
    relation_loss_gap(pipe)


def latents(pipe, samples) -> torch.Tensor:
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def swapped(sample) -> str:
    return sample.caption.replace(sample.spec.relation, OPPOSITE[sample.spec.relation])


def relation_loss_gap(pipe) -> None:
    data = [s for s in make_dataset(4000, seed=777) if s.spec.relation][:256]
    z0 = latents(pipe, data)

    right = encode(pipe, [s.caption for s in data], None, False)[0]
    wrong = encode(pipe, [swapped(s) for s in data], None, False)[0]
    g = torch.Generator().manual_seed(0)
    print(f"\n{len(data)} relation images: x0 error with the right relation word / the opposite one")
    for t in (999, 800, 600, 400):
        a = pipe.scheduler.alphas_cumprod[t]
        snr = (a / (1 - a)).item()
        eps = torch.randn(z0.shape, generator=g)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        tt = torch.full((len(zt),), t)
        err = [(pipe.unet(zt, tt, h).sample - eps).pow(2).mean().item() / snr for h in (right, wrong)]
        print(f"  t = {t:3d} (SNR {snr:.4f}): {err[0]:.4f} / {err[1]:.4f}, gap {err[1] - err[0]:+.4f}")

    groups = collections.defaultdict(list)
    for s in make_dataset(40000, seed=5):
        if s.spec.relation:
            groups[s.caption].append(s)
    gaps = []
    for caption, samples in groups.items():
        other = groups.get(swapped(samples[0]), [])
        if caption < swapped(samples[0]) and len(samples) >= 8 and len(other) >= 8:
            z1, z2 = latents(pipe, samples), latents(pipe, other)
            (m1, v1), (m2, v2) = [(z.mean(0), z.var(0) / len(z)) for z in (z1, z2)]
            gaps.append(((m1 - m2).pow(2) - v1 - v2).mean().item())
    print(f"  ideal gap at t = 999 (mean latents, {len(gaps)} caption pairs): {np.mean(gaps):+.4f}")


if __name__ == "__main__":
    main()
