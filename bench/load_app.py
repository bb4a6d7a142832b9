"""Load: the real app with one training run training and N sessions sampling and labelling at once.

    python bench/load_app.py                      # 8 sessions for 3 minutes on the embedded Shapes model
    python bench/load_app.py --duration 120 --sessions 8 --json load.json

Starts ``python app.py`` on a free port with a fresh data folder, stores pairs to label (the Label tab's "Generate
pairs"), starts a short SDPO run through the Fine-tune tab's API, then runs ``--sessions`` gradio_client sessions,
each alternating a label click (as its own labeller) and a Sample click, until ``--duration`` is over. Prints p50 /
p95 / max response times of a sample and of a label click, the errors (an exception, or a message in the tab's
error box), the labels acknowledged against the rows in the database, and how far the run trained meanwhile.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SAVED = re.compile(r"Saved label #(\d+): \*\*(\w+)\*\* on pair #(\d+) by (\S+)\.")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


class Session(threading.Thread):
    """One browser's worth of clicks: label, sample, label, sample … as labeller ``name``."""

    def __init__(self, url: str, name: str, model: str, steps: int, deadline: float, seed: int):
        super().__init__(daemon=True)
        self.url, self.name, self.model, self.steps, self.deadline = url, name, model, steps, deadline
        self.rng = random.Random(seed)
        self.sample_s: list[float] = []
        self.label_s: list[float] = []
        self.acked: list[int] = []  # label ids the app acknowledged to this session
        self.errors: list[str] = []

    def run(self) -> None:
        from gradio_client import Client

        try:
            client = Client(self.url, download_files=False, verbose=False)
            out = client.predict(self.name, api_name="/label_start")
            if out[5]:
                self.errors.append(f"label_start: {out[5]}")
        except Exception as e:  # noqa: BLE001 - counted, the bench goes on
            self.errors.append(f"connect: {type(e).__name__}: {e}")
            return
        try:
            while time.monotonic() < self.deadline:
                self._label(client)
                if time.monotonic() >= self.deadline:
                    break
                self._sample(client)
        except Exception as e:  # noqa: BLE001 - a bug in the bench or a reply it cannot read: counted
            self.errors.append(f"session: {type(e).__name__}: {e}")

    def _label(self, client) -> None:
        choice = self.rng.choice(["left", "right", "tie", "skip"])
        t0 = time.perf_counter()
        try:
            out = client.predict(self.name, api_name=f"/label_{choice}")
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"label: {type(e).__name__}: {e}")
            return
        self.label_s.append(time.perf_counter() - t0)
        status, error = (x if isinstance(x, str) else "" for x in (out[3], out[5]))  # a skipped output: a dict
        saved = SAVED.search(status)
        if error or not saved:
            self.errors.append(f"label: {error or status or 'no acknowledgement'}")
            return
        label_id, said, _, who = saved.groups()
        if (said, who) != (choice, self.name):
            self.errors.append(f"label: acknowledged {said} by {who}, clicked {choice} as {self.name}")
        self.acked.append(int(label_id))

    def _sample(self, client) -> None:
        seed = self.rng.randrange(2**31)
        t0 = time.perf_counter()
        try:
            out = client.predict(self.model, "a red circle above a blue square", "", self.steps, "ddim-trailing", 0.0,
                                 1.0, seed, 1, "off", api_name="/sample")  # fmt: skip
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"sample: {type(e).__name__}: {e}")
            return
        self.sample_s.append(time.perf_counter() - t0)
        if isinstance(out[3], str) and out[3]:
            self.errors.append(f"sample: {out[3]}")
        elif not out[0]:
            self.errors.append("sample: no image")


def start_training(client, name: str, epochs: int) -> str:
    """The Fine-tune tab's Start: the run name, then the widgets in ``CONFIG_FIELDS`` order; the settings not named
    here keep the tab's defaults."""
    from ui.finetune_tab import CONFIG_FIELDS

    wanted = dict(method="SDPO", reward="jpeg-compressibility", learning_rate=3e-4, batch=2, epochs=epochs,
                  train_steps=2, eval_steps=[1, 2], adapter="LoRA", lora_rank=2, batches_per_epoch=1, eval_prompts=2,
                  eval_every=5)  # fmt: skip
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/finetune_start"]["parameters"]
    values = [name]
    for field, param in zip(CONFIG_FIELDS, params[1:]):
        values.append(wanted[field] if field in wanted else param.get("parameter_default"))
    out = client.predict(*values, api_name="/finetune_start")
    return out[0] if isinstance(out, tuple | list) else out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (after the warm-up)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--model", default=str(REPO / "assets" / "shapes-sd"))
    p.add_argument("--steps", type=int, default=2, help="denoising steps of each sample")
    p.add_argument("--pairs", type=int, default=400, help="pairs stored before the load (each labeller's supply)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs of the run (stopped when the load ends)")
    p.add_argument("--data-dir", default=None, help="default: a new temporary folder")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)

    from gradio_client import Client

    from tests.app_process import App

    data = Path(args.data_dir or tempfile.mkdtemp(prefix="finetuners-load-"))
    log = data / "app.log"
    data.mkdir(parents=True, exist_ok=True)
    app = App(["--model", args.model, "--data-dir", str(data)], log)
    try:
        admin = Client(app.url, download_files=False, verbose=False)
        prompts = "\n".join(f"a {c} circle {w} a blue square" for c in ("red", "green", "yellow", "white")
                            for w in ("above", "below", "left of", "right of")) + "\n"  # fmt: skip
        made = 0
        while made < args.pairs:
            msg, error = admin.predict(prompts, None, "seeds", args.model, None, 1, 1, made * 2, api_name=
                                       "/label_generate_pairs")  # fmt: skip
            if error:
                raise SystemExit(f"cannot generate pairs: {error}")
            made += 16
        error = start_training(admin, "load-run", args.epochs)
        if error:
            raise SystemExit(f"cannot start the training run: {error}")
        run_dir = data / "runs" / "load-run"
        t0 = time.monotonic()
        while not (run_dir / "metrics.jsonl").exists():  # the trainer is up (model loaded, first evaluation)
            if time.monotonic() - t0 > 300:
                raise SystemExit(f"the training run did not start: {(run_dir / 'train.log').read_text()[-2000:]}")
            time.sleep(0.5)
        epochs_before = sum(1 for line in open(run_dir / "metrics.jsonl") if '"event": "epoch"' in line)

        deadline = time.monotonic() + args.duration
        sessions = [Session(app.url, f"labeller-{k}", args.model, args.steps, deadline, seed=k)
                    for k in range(args.sessions)]  # fmt: skip
        for s in sessions:
            s.start()
        for s in sessions:
            s.join(args.duration + 300)
        wall = args.duration

        state = json.loads((run_dir / "status.json").read_text()).get("state") if (run_dir / "status.json").exists() \
            else "missing"  # fmt: skip
        epochs_after = sum(1 for line in open(run_dir / "metrics.jsonl") if '"event": "epoch"' in line)
        admin.predict("load-run", api_name="/finetune_stop")

        acked = {i for s in sessions for i in s.acked}
        with sqlite3.connect(data / "labels.db") as db:
            rows = dict(db.execute("SELECT id, labeller FROM labels").fetchall())
        stored = sum(1 for i in acked if i in rows)
        owners_ok = all(rows.get(i) == s.name for s in sessions for i in s.acked)
        sample_s = [x for s in sessions for x in s.sample_s]
        label_s = [x for s in sessions for x in s.label_s]
        errors = [e for s in sessions for e in s.errors]
        figures = {
            "sessions": args.sessions, "duration_s": wall, "sample_steps": args.steps,
            "samples": len(sample_s), "sample_p50_s": percentile(sample_s, 0.5),
            "sample_p95_s": percentile(sample_s, 0.95), "sample_max_s": max(sample_s, default=float("nan")),
            "labels_clicked": len(label_s), "label_p50_s": percentile(label_s, 0.5),
            "label_p95_s": percentile(label_s, 0.95), "label_max_s": max(label_s, default=float("nan")),
            "errors": len(errors), "labels_acknowledged": len(acked), "labels_stored": stored,
            "label_rows_in_db": len(rows), "acknowledged_owner_matches": owners_ok,
            "training_state_during_load": state, "training_epochs_during_load": epochs_after - epochs_before,
        }  # fmt: skip
        print(f"{args.sessions} sessions × {wall:.0f} s, one SDPO run training ({state}, "
              f"{epochs_after - epochs_before} epochs during the load)")  # fmt: skip
        print(f"sample ({args.steps} steps, 1 image): {len(sample_s)} clicks, p50 {figures['sample_p50_s']:.3f} s, "
              f"p95 {figures['sample_p95_s']:.3f} s, max {figures['sample_max_s']:.3f} s")  # fmt: skip
        print(f"label click: {len(label_s)} clicks, p50 {figures['label_p50_s']:.3f} s, "
              f"p95 {figures['label_p95_s']:.3f} s, max {figures['label_max_s']:.3f} s")  # fmt: skip
        print(f"errors: {len(errors)}; labels acknowledged {len(acked)}, stored {stored} (rows in the database "
              f"{len(rows)}; each in its own labeller's name: {owners_ok})")  # fmt: skip
        for e in errors[:10]:
            print("  error:", e[:300])
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        return 0 if not errors and stored == len(acked) and owners_ok else 1
    finally:
        app.stop()


if __name__ == "__main__":
    sys.exit(main())
