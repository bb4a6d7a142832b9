"""``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo): the same trainer as in one process,
gradients really synchronised."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from finetuners.distributed import accelerate_executable, launch_command

REPO = Path(__file__).resolve().parent.parent

# Runs the train CLI under accelerate, recording after every optimiser step of every process: the gradient this
# process computed on its own samples (before the all-reduce) and the LoRA weights after the step.
SPY = """
import sys
from pathlib import Path

import torch

import finetuners.trainer as trainer_mod
from finetuners.lora import lora_state_dict

out = Path(sys.argv[1])
real_step = trainer_mod.Trainer._optimizer_step


def spy(self):
    local = torch.cat([p.grad.detach().flatten().clone() for p in self.params if p.grad is not None])
    norm = real_step(self)
    weights = {k: v.detach().clone() for k, v in lora_state_dict(self.pipe.unet).items()}
    torch.save({"local_grad": local, "weights": weights, "world": self.dist.world},
               out / f"rank{self.dist.rank}-step{self.global_step}.pt")
    return norm


trainer_mod.Trainer._optimizer_step = spy
from finetuners.__main__ import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
# queries: reward queries of epoch 1 over both processes. SDPO: 2 prompts · 2 trajectories · 2 queries (K = 2: first,
# last) = 8 per process; RLR: one per sample, 2 per process.
@pytest.mark.parametrize("method, reward, updates, queries",
                         [("sdpo", "jpeg-compressibility", 2, 16), ("rlr", "shapes-probe", 1, 4)])  # fmt: skip
def test_accelerate_two_processes_keep_lora_weights_identical(tiny_pipeline_dir, tmp_path, method, reward, updates,
                                                              queries):  # fmt: skip
    if accelerate_executable() is None:
        pytest.skip("accelerate is not installed")
    script, out, run = tmp_path / "spy.py", tmp_path / "steps", tmp_path / "runs" / "two"
    script.write_text(SPY)
    out.mkdir()
    train = ["train", "--run", str(run), "--model", str(tiny_pipeline_dir), "--reward", reward, "--method", method,
             "--epochs", "2", "--batch", "2", "--batches", "1", "--train-batch", "1", "--grad-accum", "2",
             "--train-steps", "2", "--eval-steps", "1", "--eval-prompts", "2", "--lora-rank", "2"]  # fmt: skip
    cmd = launch_command(2, str(script), str(out), *train)  # gloo: each process trains on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished"
    steps = sorted({int(p.stem.split("step")[1]) for p in out.glob("rank*-step*.pt")})
    # SDPO: K·pairs/(train batch·accum) = 2·2/(1·2) = 2 updates per epoch; RLR: one per sampling batch (accum 2)
    assert steps == list(range(1, 2 * updates + 1))
    previous = None
    for step in steps:
        a, b = (torch.load(out / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        assert a["world"] == b["world"] == 2
        assert not torch.allclose(a["local_grad"], b["local_grad"])  # each process trains on its own samples ...
        assert a["weights"].keys() == b["weights"].keys() and a["weights"]
        for key in a["weights"]:  # ... yet after every update the weights are the same everywhere
            assert torch.equal(a["weights"][key], b["weights"][key]), (step, key)
        if previous is not None:
            assert any(not torch.equal(a["weights"][k], previous[k]) for k in a["weights"])  # an update happened
        previous = a["weights"]
    # One run folder, written by the main process alone: one metrics line per event, no duplicates.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["event"] == "epoch"] == [1, 2]
    assert [r["epoch"] for r in lines if r["event"] == "eval"] == [0, 2]  # eval_every = 5: before and at the end
    epoch = next(r for r in lines if r["event"] == "epoch")
    assert epoch["reward_queries"] == queries and epoch["updates"] == updates  # queries counted on every process
