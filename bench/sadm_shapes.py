"""SADM-style structure-guided training against plain denoising (λ = 0), from the shipped Shapes model.

    OMP_NUM_THREADS=1 python bench/sadm_shapes.py [--sadm-steps 150] [--seeds 0 1 2] [--eval-images 256]

Both methods start from the same initialisation (the shipped UNet) and get the same compute: the
baseline's step count is the SADM step count times the measured time ratio of one SADM step (n_D
discriminator steps + the denoiser step, through the VAE decoder) to one plain step, so the
discriminator's cost counts against SADM. Two settings: in-domain fine-tuning on fresh "shapes" images,
and cross-domain adaptation to the shifted "large" domain (world.DOMAINS: bigger shapes). Per seed, run,
evaluate (DDIM η = 0, guidance 3) and report FD-probe (against fresh real images of the target domain, the
same reference set for every run) and probe accuracy at 20, 4 and 1 steps: mean ± std over the seeds,
and the ratio SADM / baseline. Training data (``--images`` per domain) is rendered once and shared by
every run of a domain; seeds change the discriminator's initialisation and every batch and noise draw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetuners import runs  # noqa: E402
from finetuners.models import PROBE_PATH, load_model  # noqa: E402
from finetuners.sadm import DATA_SEED_OFFSET, ProbeEvaluator, SADMConfig, SADMRun, make_shapes_data, train_sadm  # noqa: E402
from finetuners.shapes.probe import ShapesProbe  # noqa: E402


def step_seconds(pipe, cfg: SADMConfig, data, unet0: dict, steps: int) -> float:
    """Median seconds of one training step of ``cfg`` (after one warm-up step), weights restored after."""
    run = SADMRun(pipe, cfg, data)
    run.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run.step()
        times.append(time.perf_counter() - t0)
    pipe.unet.load_state_dict(unet0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sadm-steps", type=int, default=150, help="SADM denoiser steps (a multiple of 10)")
    p.add_argument("--structure-weight", type=float, default=0.1, help="λ")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domains", nargs="+", default=["shapes", "large"])
    p.add_argument("--images", type=int, default=2048, help="real training images per domain")
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--eval-steps", type=int, nargs="+", default=[20, 4, 1])
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    args = p.parse_args()
    t_start = time.time()
    torch.manual_seed(0)
    pipe = load_model("shapes", "cpu", "float32")
    probe = ShapesProbe.load(PROBE_PATH)
    unet0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    epochs = max(1, args.sadm_steps // 10)
    common = dict(learning_rate=args.lr, batch_size=args.batch, n_images=args.images, steps_per_epoch=10,
                  eval_every=0, eval_images=args.eval_images, eval_steps=tuple(args.eval_steps),
                  checkpoint_every=10**6, keep_checkpoints=1)  # fmt: skip
    sadm_cfg = SADMConfig(structure_weight=args.structure_weight, epochs=epochs, **common)
    datas = {d: make_shapes_data(pipe, args.images, DATA_SEED_OFFSET, d) for d in args.domains}

    # compute matching: the measured cost of one SADM step against one plain step, interleaved
    plain_probe = SADMConfig(structure_weight=0.0, disc_steps=0, epochs=1, **common)
    ratios = []
    for _ in range(3):
        t_sadm = step_seconds(pipe, sadm_cfg, datas[args.domains[0]], unet0, 3)
        t_plain = step_seconds(pipe, plain_probe, datas[args.domains[0]], unet0, 3)
        ratios.append(t_sadm / t_plain)
    ratio = float(np.median(ratios))
    base_epochs = max(1, round(epochs * ratio))
    base_cfg = SADMConfig(structure_weight=0.0, disc_steps=0, epochs=base_epochs, **common)
    print(f"one SADM step = {ratio:.2f} plain steps (median of {[round(r, 2) for r in ratios]}); SADM "
          f"{epochs * 10} steps, baseline {base_epochs * 10} steps; λ = {args.structure_weight}, lr {args.lr}, "
          f"batch {args.batch}, {args.images} images per domain", flush=True)  # fmt: skip

    root = args.out or Path(tempfile.mkdtemp(prefix="sadm-bench-"))
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "step_ratio": ratio, "step_ratios": ratios, "sadm_steps": epochs * 10,
               "baseline_steps": base_epochs * 10, "machine": platform.platform(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "initial": {}, "runs": []}  # fmt: skip
    for domain in args.domains:
        pipe.unet.load_state_dict(unet0)
        pipe.unet.eval()
        ev = ProbeEvaluator(pipe, probe, SADMConfig(domain=domain, **common))
        init = {}
        for k in args.eval_steps:
            init.update(ev.evaluate(k)[0])
        results["initial"][domain] = init
        print(f"[{domain}] shipped model: " + ", ".join(f"{k} {v:.3f}" for k, v in init.items()), flush=True)
        for seed in args.seeds:
            for method, cfg in (("sadm", sadm_cfg), ("baseline", base_cfg)):
                pipe.unet.load_state_dict(unet0)
                cfg = SADMConfig.from_dict({**cfg.to_dict(), "seed": seed, "domain": domain})
                run_dir = root / f"{domain}-{method}-seed{seed}"
                t0 = time.perf_counter()
                status = train_sadm(run_dir, cfg, pipe=pipe, data=datas[domain])
                seconds = time.perf_counter() - t0
                metrics = runs.read_metrics(run_dir)
                final = [r for r in metrics if r["event"] == "eval"][-1]
                last_epoch = [r for r in metrics if r["event"] == "epoch"][-1]
                row = {"domain": domain, "method": method, "seed": seed, "state": status["state"],
                       "seconds": seconds, "steps": cfg.total_steps,
                       **{k: v for k, v in final.items() if k.startswith("eval_")},
                       "final_denoising_loss": last_epoch.get("denoising_loss"),
                       "final_structure_loss": last_epoch.get("structure_loss")}  # fmt: skip
                results["runs"].append(row)
                print(
                    f"[{domain}] {method} seed {seed}: {seconds:.0f} s, "
                    + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("eval_")),
                    flush=True,
                )
    print(f"\ntotal {time.time() - t_start:.0f} s\n")
    print("| setting | K | FD-probe SADM | FD-probe baseline | ratio | accuracy SADM | accuracy baseline | shipped "
          "FD / acc |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for domain in args.domains:
        for k in args.eval_steps:
            cell = {}
            for method in ("sadm", "baseline"):
                rows = [r for r in results["runs"] if r["domain"] == domain and r["method"] == method]
                fd = np.array([r[f"eval_fd_probe_k{k}"] for r in rows])
                acc = np.array([r[f"eval_accuracy_k{k}"] for r in rows])
                cell[method] = (fd, acc)
            (fs, as_), (fb, ab) = cell["sadm"], cell["baseline"]
            init = results["initial"][domain]
            print(f"| {domain} | {k} | {fs.mean():.1f} ± {fs.std(ddof=1) if len(fs) > 1 else 0:.1f} "
                  f"| {fb.mean():.1f} ± {fb.std(ddof=1) if len(fb) > 1 else 0:.1f} | {fs.mean() / fb.mean():.3f} "
                  f"| {100 * as_.mean():.1f} % ± {100 * (as_.std(ddof=1) if len(as_) > 1 else 0):.1f} "
                  f"| {100 * ab.mean():.1f} % ± {100 * (ab.std(ddof=1) if len(ab) > 1 else 0):.1f} "
                  f"| {init[f'eval_fd_probe_k{k}']:.1f} / {100 * init[f'eval_accuracy_k{k}']:.1f} % |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
