"""SDPO epoch time on Shapes: an update's pairs as accumulated minibatches of 2 (the baseline) or as one minibatch.

    OMP_NUM_THREADS=1 python bench/sdpo_minibatch.py [--preset shapes-k8] [--epochs 8] [--rounds 2] [--threads 1]

Both batchings take the same optimiser steps on the same pairs (tests/test_trainer.py checks the adapters agree);
only the number of UNet calls per update differs. The runs alternate (baseline, ours, baseline, ours, …) so that
load from other work falls on both. Reported: mean seconds per epoch after the first (sampling + update), the
update phase alone, and the ratio; and the largest difference between the two final adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(folder: Path, preset: str, epochs: int, train_batch: int, grad_accum: int) -> tuple[list, dict]:
    from safetensors.torch import load_file

    from finetuners.lora import LORA_FILE
    from finetuners.runs import list_checkpoints, read_metrics
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig, train

    algo = SDPOConfig.preset(preset, num_epochs=epochs, train_batch_size=train_batch, grad_accum=grad_accum)
    config = TrainConfig(algo=algo, eval_every=10**6, checkpoint_every=epochs, num_eval_prompts=2)
    assert train(folder, config)["state"] == "finished"
    records = [r for r in read_metrics(folder) if r.get("event") == "epoch"]
    adapter = load_file(list_checkpoints(folder)[-1][1] / "lora" / LORA_FILE)
    return records, adapter


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shapes-k8")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from finetuners.sdpo import SDPOConfig

    preset = SDPOConfig.preset(args.preset)
    pairs, group = preset.pairs_per_process, preset.train_batch_size * preset.grad_accum
    variants = {"2 pairs × accumulation": (2, group // 2), "one minibatch": (group, 1)}
    epoch_s = {k: [] for k in variants}
    update_s = {k: [] for k in variants}
    adapters = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (tb, accum) in variants.items():
                records, adapters[name] = run(Path(tmp) / f"{r}-{tb}", args.preset, args.epochs, tb, accum)
                times = [x["time"] for x in records]
                epoch_s[name] += [b - a for a, b in zip(times[1:], times[2:])]  # the first epoch warms up
                update_s[name] += [x["train_seconds"] for x in records[2:]]
    mean = {k: sum(v) / len(v) for k, v in epoch_s.items()}
    upd = {k: sum(v) / len(v) for k, v in update_s.items()}
    base, ours = variants
    a, b = adapters[base], adapters[ours]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(a[k].abs().max()) for k in a if "lora.up" in k)
    figures = {"preset": args.preset, "pairs_per_epoch": pairs, "pairs_per_update": group, "threads": args.threads,
               "epochs": args.epochs, "rounds": args.rounds, "epoch_seconds": mean, "update_seconds": upd,
               "speedup_epoch": mean[base] / mean[ours], "speedup_update": upd[base] / upd[ours],
               "adapter_max_abs_diff": diff, "adapter_max_abs_lora_up": moved}  # fmt: skip
    print(f"preset {args.preset}: {pairs} pairs per epoch, {group} per optimiser step; {args.threads} thread(s), "
          f"{args.rounds} × {args.epochs} epochs each")  # fmt: skip
    print("\n| batching | s / epoch | s / epoch, updates only |\n|---|---|---|")
    for k in variants:
        print(f"| {k} ({variants[k][0]} × {variants[k][1]}) | {mean[k]:.2f} | {upd[k]:.2f} |")
    print(f"\nratio (baseline / one minibatch): epoch {figures['speedup_epoch']:.2f}×, updates "
          f"{figures['speedup_update']:.2f}×; final adapters differ by at most {diff:.1e} (largest LoRA-up weight "
          f"{moved:.1e})")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
