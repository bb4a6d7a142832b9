"""Data-parallel training through ``accelerate launch``, and nothing at all in a single process.

    dist = Dist.from_environment("cpu")    # accelerate launch --num_processes N …: N processes; else a no-op
    dist.all_reduce_grads(params)          # before every optimiser step: the mean gradient of all processes
    dist.gather(tensor), dist.gather_objects(list)   # rows of every process, in rank order
    dist.any(flag)                         # one decision for all (stop requested? a NaN anywhere?)
    launch_command(2, "-m", "finetuners", "train", …)   # the argv that starts N such processes on this machine

Each process samples its own prompts and noise (``rank`` is folded into the seeds), computes its gradients,
and the trainable parameters' gradients are averaged before each optimiser step, so the weights stay identical
on every process without wrapping the UNet (what DDP's all-reduce does, made explicit; the trainer's denoiser
keeps calling the plain module). Rewards and prompts are gathered so that advantages are normalised over all
processes' samples and every process's statistics tracker holds the same state. Only the main process writes
files. A single process (``python -m finetuners train``) takes none of these paths.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import torch


class Dist:
    """The process group, or a stand-in for one process."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0

    @classmethod
    def from_environment(cls, device: str) -> Dist:
        """A ``Dist`` over the processes ``accelerate launch`` (or torchrun) started; one process otherwise."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import Accelerator

        return cls(Accelerator(cpu=str(device) == "cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, default: str) -> str:
        return str(self.accelerator.device) if self.accelerator is not None else default

    def all_reduce_grads(self, params) -> None:
        """Replace every parameter's gradient by its mean over the processes (zeros where a process has none)."""
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(self.accelerator.reduce(p.grad.contiguous(), reduction="mean"))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 the same-shaped tensors of every process, in rank order."""
        return self.accelerator.gather(tensor.contiguous()) if self.distributed else tensor

    def gather_objects(self, items: list) -> list:
        if not self.distributed:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (a collective: every process must call it)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def rows(self, n: int) -> slice:
        """This process's rows in a gather of ``n`` rows per process."""
        return slice(self.rank * n, (self.rank + 1) * n)

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()


def accelerate_executable() -> str | None:
    """The ``accelerate`` launcher on PATH or beside this interpreter; None when it is not installed."""
    found = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    return found if Path(found).exists() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, *target: str, port: int | None = None) -> list[str]:
    """``accelerate launch`` of ``target`` (a script and its arguments, or ``-m module …``) on ``num_processes``
    processes of this machine, in fp32 without dynamo. ``--multi_gpu`` is accelerate's "start N processes with
    torch.distributed" (its ``--cpu`` starts only one); with no GPU each process runs on the CPU over gloo."""
    accelerate = accelerate_executable()
    if accelerate is None:
        raise RuntimeError("accelerate is not installed")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or free_port()),
            *target]  # fmt: skip
