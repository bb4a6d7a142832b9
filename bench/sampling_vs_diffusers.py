"""Our sampling loop against diffusers' own ``StableDiffusionPipeline.__call__``, in one run.

    python bench/sampling_vs_diffusers.py [--model shapes] [--steps 20] [--batch 4] [--repeats 7]

Same model, prompt, steps, guidance, batch and seeds; η = 0. Prints the median wall time of each,
their ratio (ours / diffusers), whether the images are identical, and images per second of our
loop at batch 16, 4 steps. Runs are interleaved so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from finetuners.generate import SampleRequest, generate  # noqa: E402
from finetuners.models import load_model  # noqa: E402

PROMPT = "a red circle above a blue square"


def run_ours(pipe, steps, batch, guidance, seed=0):
    req = SampleRequest(PROMPT, steps=steps, guidance=guidance, batch=batch, seed=seed, record_pred_x0=False)
    t = time.perf_counter()
    images = generate(pipe, req).images
    return time.perf_counter() - t, images


def run_diffusers(pipe, steps, batch, guidance, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    t = time.perf_counter()
    images = pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, eta=0.0, generator=gens,
                  output_type="pt").images  # fmt: skip
    return time.perf_counter() - t, images.float().cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    pipe = load_model(args.model, args.device)
    run_ours(pipe, args.steps, args.batch, args.guidance)  # warm-up
    run_diffusers(pipe, args.steps, args.batch, args.guidance)
    ours, theirs, identical = [], [], True
    for _ in range(args.repeats):
        t1, a = run_ours(pipe, args.steps, args.batch, args.guidance)
        t2, b = run_diffusers(pipe, args.steps, args.batch, args.guidance)
        ours.append(t1)
        theirs.append(t2)
        identical &= torch.equal(a, b)
    mo, md = statistics.median(ours), statistics.median(theirs)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.steps} steps, batch {args.batch}, "
          f"guidance {args.guidance}, {args.repeats} interleaved repeats")  # fmt: skip
    print(f"ours      median {mo:.4f} s")
    print(f"diffusers median {md:.4f} s")
    print(f"ratio ours/diffusers = {mo / md:.3f}; images identical at eta=0: {identical}")
    run_ours(pipe, 4, 16, args.guidance)
    times = [run_ours(pipe, 4, 16, args.guidance)[0] for _ in range(args.repeats)]
    print(f"ours at batch 16, 4 steps: {16 / statistics.median(times):.1f} images/s")


if __name__ == "__main__":
    main()
