"""SDPO against DDPO (issue 4, ALGORITHMS.md §1.4), and RLR against both and the backprop baselines (issue 5,
§2.4), on the Shapes model with the probe prompt-alignment reward.

    python bench/sdpo_vs_ddpo.py --seeds 0 1 2 --minutes 5 --queries 6000 --parallel 2
    python bench/sdpo_vs_ddpo.py --methods sdpo ddpo rlr draft bptt --rlr '{"h": 1, "truncation": 1}' --minutes 2

Each (method, seed) is one ``trainer.train`` run in a temporary run folder, from the "shapes-full" SDPO preset
(DDPO reads the same keys: model, K_train, spacing, η, lr, batch, tracker; ``--preset``/``--set`` change it).
Both methods get the same budgets, whichever runs out first: ``--queries`` reward queries and ``--minutes``
of training wall-clock (the epoch-0 evaluation is not counted; a run is stopped within one minibatch).
Before and after, the bench evaluates the run's checkpoint with ``Trainer.evaluate`` on a fixed held-out
prompt set (``shapes.world.eval_prompts``, seeds 0…n−1) at 1, 2, 4 and 8 steps with the preset's evaluation
sampler (deterministic DDIM, trailing timesteps, CFG off as trained): mean probe log-prob reward and exact
probe accuracy. The table gives mean ± std over seeds (population std; n = number of seeds).
Runs go ``--parallel`` at a time, each on ``--processes`` data-parallel processes (``accelerate launch``; 1: in
the bench's own worker) with ``--threads`` torch threads each; reward queries count every process's. ``--rlr``
sets the RLR / DRaFT-K settings (``rlr.RLRConfig``) of the gradient methods; the "reward per minute" column is the
gain of the mean probe reward at each step count over the start model, divided by the training minutes.
``--keep DIR`` keeps the run folders (config, metrics, last checkpoint) in a new folder DIR, and ``--evaluate-kept
DIR`` evaluates them again, without training, on ``--eval-prompts`` prompts (e.g. 1000, for a smaller error).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

METHODS = ("sdpo", "ddpo", "rlr", "draft", "bptt", "reinforce")


def make_config(method: str, seed: int, overrides: dict, eval_prompts: int, preset: str = "shapes-full",
                rlr: dict | None = None):  # fmt: skip
    from finetuners.rlr import RLRConfig
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig

    algo = SDPOConfig.preset(preset, seed=seed, num_epochs=100_000, **overrides)
    # no evaluation inside the run (the bench evaluates before and after); one checkpoint at the end
    return TrainConfig(method=method, algo=algo, eval_every=10**6, checkpoint_every=10**6,
                       num_eval_prompts=eval_prompts, rlr=RLRConfig.from_dict(rlr))  # fmt: skip


def evaluate(config, checkpoint: Path | None, threads: int) -> dict:
    """``Trainer.evaluate`` of the base model (checkpoint None) or of a run's checkpoint."""
    import torch

    from finetuners.models import load_model
    from finetuners.rewards import make_reward
    from finetuners.trainer import Trainer

    torch.set_num_threads(threads)
    cfg = config.algo
    pipe = load_model(cfg.model, "cpu", cfg.precision)
    reward_fn = make_reward(cfg.reward, "cpu", config.reward_weights)
    accuracy_fn = make_reward("shapes-accuracy", "cpu", config.reward_weights)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Path(tmp), config, pipe, reward_fn, accuracy_fn)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        return trainer.evaluate()


def run_one(job: dict) -> dict:
    """Train one (method, seed) under both budgets, then evaluate its last checkpoint."""
    import torch

    from finetuners import runs
    from finetuners.trainer import train

    torch.set_num_threads(job["threads"])
    config = make_config(job["method"], job["seed"], job["overrides"], job["eval_prompts"], job["preset"], job["rlr"])
    run_dir = Path(job["root"]) / f"{job['method']}-seed{job['seed']}"
    stop = threading.Event()
    clock = {"start": None, "reason": "epochs", "timer": None}

    def out_of_time() -> None:
        clock["reason"] = "time" if not stop.is_set() else clock["reason"]
        stop.set()

    def on_metrics(rec: dict) -> None:
        if rec.get("event") == "eval" and clock["start"] is None:
            clock["start"] = time.perf_counter()  # the budget starts after the epoch-0 evaluation
            clock["timer"] = threading.Timer(job["seconds"], out_of_time)
            clock["timer"].daemon = True
            clock["timer"].start()
        if rec.get("event") == "epoch":
            if rec["reward_queries"] >= job["queries"] and not stop.is_set():
                clock["reason"] = "queries"
                stop.set()

    if job["processes"] > 1:
        status = train_launched(run_dir, config, job, on_metrics, stop)
    else:
        status = train(run_dir, config, stop_event=stop, on_metrics=on_metrics)
    seconds = time.perf_counter() - clock["start"]
    clock["timer"].cancel()
    metrics = runs.read_metrics(run_dir)
    last = [r for r in metrics if r.get("event") in ("epoch", "stopped")][-1]
    queries = max([r.get("reward_queries", 0) for r in metrics if r.get("event") == "epoch"], default=0)
    checkpoint = runs.list_checkpoints(run_dir)[-1][1]
    result = evaluate(config, checkpoint, job["threads"])
    return {"method": job["method"], "seed": job["seed"], "state": status["state"], "stop_reason": clock["reason"],
            "train_seconds": seconds, "epochs": last["epoch"], "optimiser_steps": last["global_step"],
            "reward_queries_completed_epochs": queries, "eval": result}  # fmt: skip


def train_launched(run_dir: Path, config, job: dict, on_metrics, stop: threading.Event) -> dict:
    """The same run on ``job["processes"]`` data-parallel processes: ``accelerate launch … -m finetuners train``
    (gloo on a CPU), ``job["threads"]`` torch threads each. The budgets are watched in the run's metrics file, and a
    STOP file ends the run (all processes stop together at the next minibatch)."""
    import subprocess

    from finetuners import runs
    from finetuners.distributed import launch_command

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    launch = run_dir.parent / f"{run_dir.name}.json"
    launch.write_text(json.dumps({"config": config.to_dict()}))
    cmd = launch_command(job["processes"], "-m", "finetuners", "train", "--run", str(run_dir), "--config", str(launch))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "PYTHONPATH": str(REPO)}
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        seen = 0
        while proc.poll() is None:
            time.sleep(1.0)
            records = runs.read_metrics(run_dir)  # complete lines only: a line being written is read next time
            for record in records[seen:]:
                on_metrics(record)
            seen = len(records)
            if stop.is_set() and run_dir.exists() and not (run_dir / "STOP").exists():
                (run_dir / "STOP").touch()
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}: see {log}\n{log.read_text()[-2000:]}")
    return runs.read_status(run_dir)


def table(before: dict, results: list[dict], steps: tuple[int, ...], methods=METHODS, per_minute: bool = True) -> str:
    def cell(values, scale=1.0, digits=2):
        v = np.asarray(values, dtype=float) * scale
        return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"

    lines = ["| method | metric | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in steps) + " |",
             "|---|---|" + "---|" * len(steps)]  # fmt: skip
    for metric, key, scale, digits in (
        ("probe reward", "eval_reward", 1.0, 2),
        ("accuracy %", "eval_accuracy", 100, 1),
    ):
        base = [f"{before[f'{key}_k{k}'] * scale:.{digits}f}" for k in steps]
        lines.append(f"| start | {metric} | " + " | ".join(base) + " |")
        for method in methods:
            rows = [r for r in results if r["method"] == method]
            if rows:
                cells = [cell([r["eval"][f"{key}_k{k}"] for r in rows], scale, digits) for k in steps]
                lines.append(f"| {method} | {metric} | " + " | ".join(cells) + " |")
    for method in methods if per_minute else ():
        rows = [r for r in results if r["method"] == method]
        if rows:
            gains = [cell([(r["eval"][f"eval_reward_k{k}"] - before[f"eval_reward_k{k}"]) / (r["train_seconds"] / 60)
                           for r in rows]) for k in steps]  # fmt: skip
            lines.append(f"| {method} | reward gain per minute | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--minutes", type=float, default=20.0, help="training wall-clock per run")
    p.add_argument("--queries", type=int, default=10**9, help="reward queries per run")
    p.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts (eval_prompts(n)), seeds 0…n−1")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--processes", type=int, default=1, help="data-parallel processes per run (accelerate launch)")
    p.add_argument("--preset", default="shapes-full", help="SDPOConfig preset, for both methods")
    p.add_argument("--set", default="{}", help="JSON overrides of the preset, for both methods")
    p.add_argument("--rlr", default="{}", help="JSON RLR / DRaFT-K settings for rlr, draft, bptt (rlr.RLRConfig)")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--keep", type=Path, help="keep the run folders in this new folder (default: a temporary one)")
    p.add_argument("--evaluate-kept", type=Path, help="no training: evaluate the last checkpoints of the run "
                   "folders an earlier --keep left in this folder, on --eval-prompts prompts")  # fmt: skip
    args = p.parse_args()
    if args.evaluate_kept is not None:
        return evaluate_kept(args.evaluate_kept, args.eval_prompts, args.threads)
    if args.keep is not None:
        if args.keep.exists():
            p.error(f"--keep {args.keep}: the folder exists; name a new one")
        args.keep.mkdir(parents=True)
    overrides = json.loads(args.set)
    command = "python bench/sdpo_vs_ddpo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rlr = json.loads(args.rlr)
    config = make_config("sdpo", args.seeds[0], overrides, args.eval_prompts, args.preset, rlr)
    steps = config.algo.eval_steps
    t0 = time.time()
    kept = contextlib.nullcontext(str(args.keep)) if args.keep else None
    with kept or tempfile.TemporaryDirectory(prefix="sdpo-vs-ddpo-") as root:
        jobs = [{"method": m, "seed": s, "overrides": overrides, "eval_prompts": args.eval_prompts, "root": root,
                 "preset": args.preset, "seconds": 60 * args.minutes, "queries": args.queries, "threads": args.threads,
                 "processes": args.processes, "rlr": rlr}
                for s in args.seeds for m in args.methods]  # fmt: skip
        before = evaluate(config, None, args.threads)  # the start model, before any run competes for the CPU
        with mp.get_context("spawn").Pool(args.parallel) as pool:  # (sdpo, ddpo) of one seed run side by side
            results = pool.map(run_one, jobs, chunksize=1)
    print(f"## {' vs '.join(m.upper() for m in args.methods)} on Shapes (probe reward), {len(args.seeds)} seeds\n")
    print(f"Command: `{command}`  ")
    print(
        f"Preset: {args.preset} + {json.dumps(overrides)}; RLR settings {json.dumps(rlr)}; "
        f"evaluation: {args.eval_prompts} held-out prompts, "
        f"{config.algo.eval_sampler}, η = {config.algo.eval_eta}, guidance {config.algo.eval_guidance}; "
        f"total wall-clock {(time.time() - t0) / 60:.1f} min\n"
    )
    print(table(before, results, steps, args.methods))
    print("\n| method | seed | stopped by | train s | epochs | optimiser steps | reward queries |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["method"], r["seed"])):
        print(
            f"| {r['method']} | {r['seed']} | {r['stop_reason']} | {r['train_seconds']:.0f} | {r['epochs']} | "
            f"{r['optimiser_steps']} | {r['reward_queries_completed_epochs']} |"
        )
    print(per_run_table(sorted(results, key=lambda r: (r["method"], r["seed"])), steps))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "config": dataclasses.asdict(config.algo),
                                         "before": before, "runs": results}, indent=1))  # fmt: skip


def evaluate_kept(folder: Path, eval_prompts: int, threads: int) -> None:
    """The start model and every kept run's last checkpoint, evaluated on ``eval_prompts`` held-out prompts."""
    from finetuners import runs
    from finetuners.trainer import TrainConfig

    folders = sorted(d for d in folder.glob("*-seed*") if (d / "config.json").is_file())
    if not folders:
        sys.exit(f"error: no run folders (METHOD-seedN with a config.json) in {folder}")
    results = []
    for d in folders:
        config = TrainConfig.from_dict(runs.read_json(d / "config.json")["config"])
        config = dataclasses.replace(config, num_eval_prompts=eval_prompts)
        method, seed = d.name.rsplit("-seed", 1)
        result = evaluate(config, runs.list_checkpoints(d)[-1][1], threads)
        results.append({"method": method, "seed": int(seed), "eval": result})
        print(f"{d.name}: {json.dumps(result)}", file=sys.stderr)
    before = evaluate(config, None, threads)
    methods = sorted({r["method"] for r in results})
    print(f"## Kept runs in {folder}, evaluated again on {eval_prompts} held-out prompts\n")
    steps = config.algo.eval_steps
    print(table(before, results, steps, methods, per_minute=False))
    print(per_run_table(results, steps))


def per_run_table(results: list[dict], steps) -> str:
    """Each run's own accuracy at every evaluation step count (the summary table gives mean ± std)."""
    lines = ["", "| run | " + " | ".join(f"accuracy %, {k} step{'s' if k > 1 else ''}" for k in steps) + " |",
             "|---|" + "---|" * len(steps)]  # fmt: skip
    for r in results:
        lines.append(f"| {r['method']} seed {r['seed']} | " +
                     " | ".join(f"{100 * r['eval'][f'eval_accuracy_k{k}']:.1f}" for k in steps) + " |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
