"""The Fine-tune tab's form, as a user leaves it after picking a method, run for a fixed wall clock: how fast do its
live curves move?

Each configuration is the tab's default form (``ui.finetune_tab.make_config``: LoRA r 4, lr 3e-4, batch 4 × 2,
evaluation of 32 held-out prompts at 1/2/4/8 steps after every epoch) with the method's train steps K
(``METHOD_STEPS``) and any ``--set`` overrides of the form's fields, each run in a process of its own
(``--parallel`` runs that many side by side). It prints every evaluation and, per method, the 1-step and 2-step
reward and accuracy at the start and at the end. The form starts from the tab's own ``FORM_DEFAULTS``.

    OMP_NUM_THREADS=1 python bench/finetune_form.py --methods SDPO "Full backprop" --seconds 180 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STEPS = (1, 2, 4, 8)  # the evaluation step counts printed (the form's default)


def run_one(method: str, seconds: float, folder: Path, overrides: dict) -> dict:
    """One form, trained for ``seconds`` of wall clock (stopped by the trainer's own stop event)."""
    import torch

    from finetuners.trainer import train
    from ui.backend import Backend, Settings
    from ui.finetune_tab import FORM_DEFAULTS, METHOD_STEPS, default_eval_prompts, make_config

    torch.set_num_threads(1)
    backend = Backend(Settings(data_dir=folder / "data"))
    form = {**FORM_DEFAULTS, "method": method, "train_steps": METHOD_STEPS[method], "epochs": 100_000,
            "eval_prompts": default_eval_prompts(backend), **overrides}  # fmt: skip
    config = make_config(backend, **form)
    stop = threading.Event()
    rows, t0 = [], time.monotonic()

    def on_metrics(record):
        if record.get("event") == "eval":
            rows.append(dict(t=round(time.monotonic() - t0, 1), epoch=record.get("epoch"),
                             reward={str(k): record.get(f"eval_reward_k{k}") for k in STEPS},
                             accuracy={str(k): record.get(f"eval_accuracy_k{k}") for k in STEPS}))  # fmt: skip

    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        train(folder / "run", config, on_metrics=on_metrics, stop_event=stop)
    finally:
        timer.cancel()
    return dict(method=method, k=form["train_steps"], overrides=overrides, rows=rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["SDPO", "DDPO", "RLR", "Full backprop"])
    p.add_argument("--seconds", type=float, default=180.0, help="wall clock per run, evaluations included")
    p.add_argument("--set", default="{}", help="JSON overrides of the form's fields (make_config's arguments)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time, one process each")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method and print its JSON
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = json.loads(args.set)
    if args.one:
        print(json.dumps(run_one(args.one, args.seconds, args.folder, overrides)))
        return 0

    with TemporaryDirectory() as tmp:

        def child(i_method):
            i, method = i_method
            cmd = [sys.executable, __file__, "--one", method, "--seconds", str(args.seconds), "--set", args.set,
                   "--folder", str(Path(tmp) / str(i))]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(child, enumerate(args.methods)))
    for r in results:
        print(f"\n{r['method']} (K = {r['k']}, {json.dumps(r['overrides'])}): {len(r['rows'])} evaluations")
        for row in r["rows"]:
            acc = " ".join(f"{row['accuracy'][str(k)]:.3f}" for k in STEPS)
            rew = " ".join(f"{row['reward'][str(k)]:7.2f}" for k in STEPS)
            print(f"  {row['t']:6.1f} s  epoch {row['epoch']:>4}  accuracy {acc}  reward {rew}")
    print("\n| method | K | evaluations | 1-step reward | 2-step reward | 1-step accuracy | 2-step accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        a, b = r["rows"][0], r["rows"][-1]
        cells = [f"{a[m][k]:.2f} → {b[m][k]:.2f}" if m == "reward" else f"{100 * a[m][k]:.1f} → {100 * b[m][k]:.1f} %"
                 for m, k in (("reward", "1"), ("reward", "2"), ("accuracy", "1"), ("accuracy", "2"))]  # fmt: skip
        print(f"| {r['method']} | {r['k']} | {len(r['rows'])} (last at {b['t']:.0f} s) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
