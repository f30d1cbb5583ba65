"""Where the work runs: the device, the precision, and the process group under `torchrun`.

Device and precision are run-time choices, not params: a `--device`/`--precision` flag on every
command, or `MNIST_LDM_DEVICE`/`MNIST_LDM_PRECISION` for `dvc repro`. They say how a stage computes,
not what it computes: the same params mean the same model at fp32 and bf16 on any device, only
rounded differently, and a run repeats bit for bit on the same machine at the same precision. As
params deps, they would make DVC call every output stale when a run moves to another machine, and
push the choice of hardware into params.yaml, which is shared. Outputs stay device-independent:
checkpoints hold fp32 CPU tensors and load onto any device.

bf16 (CUDA, or a CPU with AMX or AVX-512 BF16) is autocast around every forward pass that computes
(the three trainings, encoding, sampling, decoding, the evaluator's features); the weights, the
optimizer, the losses and every metric stay fp32. Each checkpoint and latent cache records the
device type and precision that made it (`"runtime"`), and each stage's MLflow run the tag
`mnist_ldm.precision`. DVC does not see the precision, so comparing it means forcing the stages:

    MNIST_LDM_PRECISION=bf16 dvc exp run -f          # one experiment at bf16, beside the fp32 baseline
    mnist-ldm train-diffusion --precision bf16 ...   # one stage by hand
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from mnist_ldm.runtime.cpu_share import CpuShare
from mnist_ldm.io.errors import UserError

DEVICE_ENV, PRECISION_ENV = "MNIST_LDM_DEVICE", "MNIST_LDM_PRECISION"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
PRECISIONS = ("fp32", "bf16")


def resolve_device(spec: str | None = None) -> torch.device:
    """`auto` (CUDA if available, else MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`; default from the env."""
    text = (spec or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    source = "--device" if spec else (DEVICE_ENV if os.environ.get(DEVICE_ENV) else "--device")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise UserError(f"{source}={text!r} is not a device; valid: {DEVICE_CHOICES}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{source}={text}: CUDA is not available on this machine (torch {torch.__version__}); "
                            f"use --device cpu or auto")
        index = int(text.split(":")[1]) if ":" in text else local_rank() % torch.cuda.device_count()
        if index >= torch.cuda.device_count():
            raise UserError(f"{source}={text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{source}=mps: MPS is not available on this machine; use --device cpu or auto")
    return torch.device(text)


def resolve_precision(spec: str | None, device: torch.device) -> str:
    text = (spec or os.environ.get(PRECISION_ENV) or "fp32").strip().lower()
    if text not in PRECISIONS:
        raise UserError(f"--precision/{PRECISION_ENV}={text!r} is not a precision; valid: {', '.join(PRECISIONS)}")
    if text == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise UserError(f"--precision/{PRECISION_ENV}=bf16: this CPU has no native bf16 units (neither "
                        f"{' nor '.join(BF16_CPU_FLAGS)} in /proc/cpuinfo), so bf16 would be slower than fp32; use fp32")
    if text == "bf16" and device.type not in ("cuda", "cpu"):
        raise UserError(f"--precision bf16 needs a CUDA device or a CPU with native bf16 (this run uses {device}); "
                        f"use fp32")
    return text


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 matmuls in hardware (AMX or AVX-512 BF16, read from the kernel's flags)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def configure(device: torch.device) -> None:
    """Process-wide settings for `device`: TF32 matmuls on CUDA (fp32 accuracy is ample for this model)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast (CUDA, or a CPU with native bf16) when asked for: weights stay fp32; otherwise plain fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Dist:
    """This process's place in a `torchrun` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: rows rank, rank + world, ... (all of them when alone)."""
        return x if self.world == 1 else x[self.rank::self.world]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that `torchrun` describes in the environment (NCCL on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size())


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
        """A generator on this device, seeded from the params (reproducible on one device type)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward passes through: DistributedDataParallel under torchrun, else the model."""
        if self.dist.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.dist.world > 1:
            torch.distributed.all_reduce(x)
        return x


CPU = Runtime()


def runtime(device: str | None = None, precision: str | None = None) -> Runtime:
    """The runtime from flags and environment; joins the torchrun process group when there is one."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    configure(dev)
    cpu = None
    if dev.type == "cpu":  # registered for the life of the process; the lock goes with it
        cpu = CpuShare().__enter__()
        atexit.register(cpu.__exit__, None, None, None)
    return Runtime(dev, prec, init_distributed(dev), cpu)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for one without any, like the pixel-space autoencoder)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
