"""The workbench's loop on the Shapes model, end to end: label pairs of the model's own images, train the
preference reward on those labels, fine-tune on it. Does prompt following improve as it does with the rule the
labeller followed?

1. A prompt list: ``--prompts`` distinct Shapes captions in the world's mix (seeded), as a team would type.
2. Pairs: the Label tab's own generation (``ui.label_tab.generate_pairs``), "two step counts" of the shipped model
   (``--pair-steps``, its default sampler and guidance), ``--pairs`` of them, the list repeated, into the app's
   label store.
3. Labels: a simulated labeller (``bench/preference_learning.py``'s): the image the Shapes probe reads as following
   the prompt, else the higher probe log-probability (a tie within 1 nat), ``--flip`` of the answers flipped.
4. The reward: ``python -m finetuners labels reward`` (Bradley–Terry, the default cells model).
5. Fine-tuning: the Fine-tune tab's form (``bench/finetune_form.py``) with that prompt list, for ``--seconds``
   each, per method: on ``preference:<the reward>`` and, for comparison, on ``shapes-probe`` (the probe's
   log-probability, the labeller's own rule). Each run evaluates ``--eval-prompts`` images of the list (cycled,
   each at its own seed) at 1/2/4/8 steps every ``--eval-every`` epochs, and reports the probe's accuracy
   whatever the reward.

    OMP_NUM_THREADS=1 python bench/preference_loop.py --methods SDPO "Full backprop" --seconds 420 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FORM_SCRIPT = ROOT / "bench" / "finetune_form.py"


def label_and_learn(data: Path, prompts: list[str], args) -> dict:
    """Pairs through the Label tab's path, the simulated labeller's answers, then the ``labels reward`` command."""
    import numpy as np
    import torch
    from preference_learning import probe_labels

    from finetuners.__main__ import main as cli
    from finetuners.models import PROBE_PATH
    from finetuners.shapes.probe import ShapesProbe
    from ui.backend import Backend, Settings
    from ui.label_tab import generate_pairs

    torch.set_num_threads(args.threads)
    backend = Backend(Settings(data_dir=data, labeller_names="optional"))
    queue = "\n".join(prompts[i % len(prompts)] for i in range(args.pairs))
    t0 = time.monotonic()
    generate_pairs(backend, queue, None, "steps", "shapes", None, args.pair_steps[0], args.pair_steps[1], 0)
    seconds_pairs = time.monotonic() - t0
    store = backend.label_store()
    pairs = store.pairs()
    from PIL import Image

    def pixels(uid: str):
        with Image.open(store.image_path(uid)) as im:
            return np.asarray(im.convert("RGB"))

    rows = [(p.prompt, pixels(p.image_0_uid), pixels(p.image_1_uid)) for p in pairs]
    probe = ShapesProbe.load(PROBE_PATH).eval()
    noisy, clean, _ = probe_labels(probe, rows, args.flip, 1.0, np.random.default_rng(args.seed))
    for pair, choice in zip(pairs, noisy):
        store.add_label(pair.id, "simulated", choice)
    wins = {r.model: round(r.win_rate, 3) for r in store.win_rates()}
    reward = data / "rewards" / "loop"
    t0 = time.monotonic()
    code = cli(["labels", "reward", "--data-dir", str(data), "--out", str(reward)])
    assert code == 0, "labels reward failed"
    meta = json.loads((reward / "config.json").read_text()).get("metrics", {})
    return dict(pairs=len(pairs), seconds_pairs=round(seconds_pairs, 1), seconds_reward=round(time.monotonic() - t0, 1),
                choices={c: noisy.count(c) for c in ("left", "right", "tie")}, win_rates=wins,
                val_accuracy=meta.get("val_accuracy"), reward=str(reward))  # fmt: skip


def fine_tune(jobs: list[tuple[str, str]], prompts: list[str], reward_folder: str, args, tmp: Path) -> list[dict]:
    """Each (method, reward) as the form leaves it, with the prompt list, in a process of its own."""

    def child(i_job):
        i, (method, reward) = i_job
        name = f"preference:{reward_folder}" if reward == "preference" else reward
        overrides = json.dumps({"reward": name, "prompts": "\n".join(prompts), "seed": args.seed,
                                "eval_every": args.eval_every, "eval_prompts": args.eval_prompts})  # fmt: skip
        cmd = [sys.executable, str(FORM_SCRIPT), "--one", method, "--seconds", str(args.seconds), "--set", overrides,
               "--folder", str(tmp / f"run-{i}")]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return {**json.loads(out.strip().splitlines()[-1]), "reward": reward}

    with ThreadPoolExecutor(args.parallel) as pool:
        return list(pool.map(child, enumerate(jobs)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="distinct Shapes captions in the prompt list")
    p.add_argument("--pairs", type=int, default=200, help="labelled pairs")
    p.add_argument("--pair-steps", type=int, nargs=2, default=[2, 4], help="the pairs' two step counts")
    p.add_argument("--flip", type=float, default=0.1, help="share of the labeller's answers flipped")
    p.add_argument("--methods", nargs="+", default=["SDPO", "Full backprop"])
    p.add_argument("--seconds", type=float, default=180.0, help="wall clock per fine-tuning run")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between evaluations (the form's: 1)")
    p.add_argument("--eval-prompts", type=int, default=64, help="evaluation images: the prompt list, cycled")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the pairs and the reward")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = p.parse_args()

    import numpy as np

    from finetuners.shapes.world import caption, random_spec

    rng = np.random.default_rng(args.seed)
    prompts: list[str] = []
    while len(prompts) < args.prompts:
        if (c := caption(random_spec(rng))) not in prompts:
            prompts.append(c)
    with TemporaryDirectory() as tmp:
        learned = label_and_learn(Path(tmp) / "data", prompts, args)
        print(f"{learned['pairs']} pairs in {learned['seconds_pairs']} s; labels {learned['choices']}; step counts' "
              f"win rates {learned['win_rates']}; reward trained in {learned['seconds_reward']} s, held-out pairwise "
              f"accuracy {learned['val_accuracy']}", flush=True)  # fmt: skip
        jobs = [(m, r) for m in args.methods for r in ("preference", "shapes-probe")]
        results = fine_tune(jobs, prompts, learned["reward"], args, Path(tmp))
    print("\nprompts: " + " · ".join(prompts))
    print("\n| method | reward | evaluations | 1-step accuracy | 2-step accuracy | 4-step accuracy |")
    print("|---|---|---|---|---|---|")
    for r in results:
        a, b = r["rows"][0], r["rows"][-1]
        cells = [f"{100 * a['accuracy'][k]:.1f} → {100 * b['accuracy'][k]:.1f} %" for k in ("1", "2", "4")]
        name = "learned from the labels" if r["reward"] == "preference" else "shapes-probe (the labeller's rule)"
        print(f"| {r['method']} | {name} | {len(r['rows'])} (last at {b['t']:.0f} s) | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"prompts": prompts, "labels": learned, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
