r"""AdaDiff on Shapes under diffusers' multistep solvers: does a sampler other than DDIM spread the templates' step
needs apart, and so give a prompt-only policy more steps to save?

    python bench/adadiff_solvers.py [--solvers ddim dpmpp2m unipc euler] [--n-eval 1000] [--guidance 3] \
        [--candidates 1 2 3 4 6 8] [--threads 2]

Each solver is the diffusers scheduler built from the pipeline's own scheduler config, on trailing timesteps (ddim:
``DDIMScheduler``, the sampler bench/adadiff_shapes.py measures; dpmpp2m: ``DPMSolverMultistepScheduler``, DPM-Solver++
2M; unipc: ``UniPCMultistepScheduler``; euler: ``EulerDiscreteScheduler``), and the images are the pipeline's own
``__call__``. The held-out prompts are ``eval_prompts(n)`` with prompt i at seed i, read by the Shapes probe's exact
accuracy. Reported per solver: accuracy at every candidate step count, per template, and the template oracle of
bench/adadiff_shapes.py (the best one-count-per-template assignment, read off these very images, against the smallest
fixed count within 1 point), at accuracy floors of 80, 90 and 95 %: an upper bound for any policy that sees only the
prompt's template.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from adadiff_shapes import template_masks, template_oracle  # noqa: E402

from finetuners.models import load_model  # noqa: E402
from finetuners.rewards import make_reward  # noqa: E402
from finetuners.shapes.world import eval_prompts  # noqa: E402

SOLVERS = {  # name → (diffusers scheduler class, extra config), every one on trailing timesteps
    "ddim": ("DDIMScheduler", {}),
    "dpmpp2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
    ),  # fmt: skip
    "unipc": ("UniPCMultistepScheduler", {"final_sigmas_type": "zero"}),
    "euler": ("EulerDiscreteScheduler", {}),
}
FLOORS = (0.8, 0.9, 0.95)


def ladder_accuracy(pipe, prompts: list[str], candidates: list[int], guidance: float, accuracy, batch: int = 100):
    """[P, N] probe accuracy of prompt i at seed i, sampled with ``pipe.scheduler`` at every candidate count."""
    acc = torch.zeros(len(prompts), len(candidates))
    for j, steps in enumerate(candidates):
        for s in range(0, len(prompts), batch):
            chunk = prompts[s : s + batch]
            gens = [torch.Generator().manual_seed(i) for i in range(s, s + len(chunk))]
            with torch.no_grad():
                images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                              output_type="pt").images  # fmt: skip
            acc[s : s + len(chunk), j] = torch.as_tensor(accuracy(images, chunk, None)[0]).float()
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--candidates", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    pipe = load_model(args.model, "cpu", "fp32")
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    accuracy = make_reward("shapes-accuracy", "cpu", None)
    prompts = eval_prompts(args.n_eval)
    masks = template_masks(prompts)
    figures = {}
    for name in args.solvers:
        cls, extra = SOLVERS[name]
        pipe.scheduler = getattr(diffusers, cls).from_config(config, timestep_spacing="trailing", **extra)
        t0 = time.perf_counter()
        acc = ladder_accuracy(pipe, prompts, args.candidates, args.guidance, accuracy)
        fixed = {u: float(acc[:, j].mean()) for j, u in enumerate(args.candidates)}
        per_template = {t: {"n": int(m.sum()), "fixed_accuracy": {u: float(acc[m, j].mean())
                                                                  for j, u in enumerate(args.candidates)}}
                        for t, m in masks.items()}  # fmt: skip
        figures[name] = {"scheduler": cls, "seconds": time.perf_counter() - t0, "fixed_accuracy": fixed,
                         "per_template": per_template,
                         "template_oracle": {f: template_oracle(per_template, fixed, f) for f in FLOORS}}  # fmt: skip
        print(f"{name}: {figures[name]['seconds']:.0f} s", file=sys.stderr)

    print(f"model {args.model}, guidance {args.guidance:g}, {args.n_eval} held-out prompts (prompt i at seed i), "
          f"trailing timesteps\n")  # fmt: skip
    print("| solver | " + " | ".join(f"u = {u}" for u in args.candidates) + " | " +
          " | ".join(f"template oracle, accuracy ≥ {100 * f:.0f} %" for f in FLOORS) + " |")  # fmt: skip
    print("|---" * (1 + len(args.candidates) + len(FLOORS)) + "|")
    for name, fig in figures.items():
        cells = [f"{100 * a:.1f} %" for a in fig["fixed_accuracy"].values()]
        for f in FLOORS:
            best = fig["template_oracle"][f]
            if best is None:
                cells.append("–")
                continue
            steps = " / ".join(map(str, best["steps"].values()))
            cells.append(f"{100 * best['steps_saved_vs_matched']:.1f} % ({steps}: {100 * best['accuracy']:.1f} %, "
                         f"{best['mean_steps']:.2f} against {best['matched_fixed_steps']})")  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
        for t, d in fig["per_template"].items():
            print(f"| · {t} ({d['n']}) | " + " | ".join(f"{100 * a:.1f} %" for a in d["fixed_accuracy"].values()) +
                  " |" * (len(FLOORS) + 1))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "solvers": figures}, indent=1))


if __name__ == "__main__":
    main()
