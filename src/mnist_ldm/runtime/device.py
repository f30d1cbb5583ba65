"""Where the work runs: the device and precision (run-time choices, not params, so choosing them never makes an
output stale; bf16 autocasts the forward passes, all else stays fp32), the CPU threads, and torchrun's process group.

A CPU job sizes torch's thread pool to the cores divided by the mnist-ldm jobs alive now (two jobs with all cores
each spin against each other: benchmarks/results/concurrent_jobs.json); each job holds a `flock` on its own file in
a temp folder. `MNIST_LDM_THREADS=N` (or `OMP_NUM_THREADS`) fixes the pool instead."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from mnist_ldm.io.errors import UserError
from mnist_ldm.runtime.memory import DEVICE_ENV, PRECISION_ENV, require_cpu_bf16

THREADS_ENV = "MNIST_LDM_THREADS"
RECHECK_S = 2.0


def env_int(name: str, default: int) -> int:
    """A whole number >= 0 that torchrun (or a user) set in the environment variable `name`."""
    text = os.environ.get(name, str(default)).strip()
    if not text.isdigit():
        raise UserError(f"{name}={text!r} is not allowed; expected a whole number >= 0 (torchrun sets it)")
    return int(text)


def resolve_device(spec: str | None = None) -> torch.device:
    """`auto` (CUDA if available, else MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`; default from the env."""
    text = (spec if spec is not None else os.environ.get(DEVICE_ENV) or "auto").strip().lower()  # --device '': refused
    source = DEVICE_ENV if spec is None and os.environ.get(DEVICE_ENV) else "--device"
    mps = torch.backends.mps.is_available()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise UserError(f"{source}={text!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps")
    if text.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text[5:]) if ":" in text else env_int("LOCAL_RANK", 0) % max(count, 1)
        if index >= count:
            raise UserError(f"{source}={text}: this machine has {count} CUDA device(s); use --device cpu or auto")
        return torch.device("cuda", index)
    if text == "mps" and not mps:
        raise UserError(f"{source}=mps: MPS is not available on this machine; use --device cpu or auto")
    return torch.device(text)


def resolve_precision(spec: str | None, device: torch.device) -> str:
    text = (spec or os.environ.get(PRECISION_ENV) or "fp32").strip().lower()
    if text not in ("fp32", "bf16"):
        raise UserError(f"--precision/{PRECISION_ENV}={text!r} is not a precision; valid: fp32, bf16")
    if text == "bf16" and device.type == "cpu":
        require_cpu_bf16(f"--precision/{PRECISION_ENV}")
    if text == "bf16" and device.type not in ("cuda", "cpu"):
        raise UserError(f"--precision bf16 needs a CUDA device or a CPU with native bf16 (this run uses {device}); "
                        f"use fp32")
    return text


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for one without any, like the pixel-space autoencoder)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def batched(fn: Callable, model: torch.nn.Module, xs, batch_size: int, precision: str) -> torch.Tensor:
    """`fn(batch, device)` over `xs` in batches, with `model` in eval mode on its device under `precision`; the
    results concatenated in fp32 on the CPU."""
    model.eval()
    dev = model_device(model)
    with autocast(dev, precision):
        return torch.cat([fn(xs[i:i + batch_size], dev).float().cpu() for i in range(0, len(xs), batch_size)])


def live_jobs(folder: Path) -> int:
    """How many registered jobs are alive; the file of a dead one (its lock can be taken) goes."""
    alive = 0
    for path in folder.glob("*.job"):
        try:
            with open(path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except BlockingIOError:
            alive += 1
        except FileNotFoundError:  # removed meanwhile by another job's count
            pass
    return alive


class CpuShare:
    """This process's registration among the CPU jobs (held while the object lives) and its thread count."""

    def __init__(self, cores: Optional[int] = None):
        text = os.environ.get(THREADS_ENV, "").strip()
        if text and not (text.isdigit() and int(text) >= 1):
            raise UserError(f"{THREADS_ENV}={text!r} is not a thread count; expected an integer >= 1")
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        self.fixed = int(text) if text else int(omp) if omp.isdigit() and int(omp) >= 1 else None
        self.cores = cores or len(os.sched_getaffinity(0))
        self.folder = Path(os.environ.get("MNIST_LDM_JOBS_DIR") or
                           Path(tempfile.gettempdir()) / f"mnist-ldm-jobs-{os.getuid()}")
        if self.fixed is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{os.getpid()}.tmp"  # locked before it gets the name other jobs count
            self.lock = open(tmp, "wb")  # closed, and the lock released, with this object or the process
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            os.replace(tmp, self.folder / f"{os.getpid()}.job")
        self.next_check, self.threads = 0.0, 0
        self.update()

    def update(self) -> int:
        """Set torch's intra-op threads to this job's share (re-counted at most every RECHECK_S seconds)."""
        if time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + RECHECK_S
            self.threads = self.fixed or max(1, self.cores // max(1, live_jobs(self.folder)))
            if self.threads != torch.get_num_threads():
                torch.set_num_threads(self.threads)
        return self.threads


@dataclass(frozen=True)
class Dist:
    """This process's place in a `torchrun` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: rows rank, rank + world, ..."""
        return x[self.rank::self.world]


@dataclass(frozen=True)
class Runtime:
    """Everything about *where* a stage runs; the default is one process on the CPU in fp32."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    dist: Dist = Dist()
    cpu: Optional[CpuShare] = field(default=None, compare=False)  # this job's share of the cores (CPU runs)

    def tick(self) -> None:
        """Called in every training and sampling step: follows the number of jobs sharing the cores."""
        if self.cpu is not None:
            self.cpu.update()

    def autocast(self):
        return autocast(self.device, self.precision)

    def record(self) -> dict:
        """What a checkpoint records of the run that made it (the device type, not its index)."""
        return {"device": self.device.type, "precision": self.precision}

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun, else the model."""
        if self.dist.world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.dist.world > 1:
            torch.distributed.all_reduce(x)
        return x


CPU = Runtime()


def runtime(device: str | None = None, precision: str | None = None) -> Runtime:
    """The runtime from flags and environment; joins torchrun's process group (NCCL on CUDA, Gloo on CPU)."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if dev.type == "cuda":  # TF32 matmuls: fp32 accuracy is ample for this model
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(dev)
    dist = Dist()
    if env_int("WORLD_SIZE", 1) > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                                 device_id=dev if dev.type == "cuda" else None)
        dist = Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Runtime(dev, prec, dist, CpuShare() if dev.type == "cpu" else None)
