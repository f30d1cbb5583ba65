"""Where a command's memory comes from, and whether what it is asked to build fits, checked before any work.

glibc's malloc would trim freed memory and `mmap` large blocks afresh, so that every training step page-faults its
activations back in (tests/test_heap.py); keeping them is 1.23x the autoencoder's training rate
(benchmarks/results/speed.json). Forward passes without gradients run in batches of `INFERENCE_BATCH`, which stay
under the mmap threshold. What a stage's tracking builds to last until the process ends stays out of the cyclic
garbage collector (`long_lived`). Whether the CPU has native bf16 units is read from /proc/cpuinfo here, without
torch, so that `check_params` can ask."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from mnist_ldm.io.errors import UserError

INFERENCE_BATCH = 500  # images per forward pass of the encoder, decoder and evaluators
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
DEVICE_ENV, PRECISION_ENV = "MNIST_LDM_DEVICE", "MNIST_LDM_PRECISION"  # run-time choices, read here and in device.py


def keep_freed_memory() -> bool:
    """Set glibc's trim threshold to 1 GiB and its mmap threshold to 32 MiB (its largest), unless the user set
    either; whether it did."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: another C library's mallopt takes other numbers
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(-1, 1 << 30) and libc.mallopt(-3, 32 << 20))  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """A block that builds what lives until the process ends (the modules and clients of MLflow and DVC), run with
    the cyclic garbage collector paused and then frozen, so that the collector never scans it again: a stage's
    MLflow run opens in about half the CPU time (benchmarks/speed.py, docs/results.md#speed-of-the-networks)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:  # an outer block resumes it
            gc.freeze()
            gc.enable()


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate: MemAvailable, or less under a cgroup (v2) memory limit."""
    try:
        avail = int(re.search(r"MemAvailable:\s*(\d+)", Path("/proc/meminfo").read_text())[1]) * 1024
    except (OSError, TypeError):
        return None
    with contextlib.suppress(OSError, ValueError):  # no cgroup file, or no limit ("max")
        cgroup = Path("/sys/fs/cgroup")
        avail = min(avail, int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text()))
    return avail


def gib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.1f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.0f} MiB"


def check_sampling_memory(what: str, n: int, batch_size: int, latent_dim: int) -> None:
    """Refuse `n` digits (asked for by `what`, e.g. "--num-images 100000000") that need more memory than is
    available: uint8 images, float32 decoded batches, concatenated and rounded, the latents twice, a working batch."""
    pixels = 28 * 28
    need = n * (pixels * 13 + latent_dim * 8) + min(batch_size, n) * (latent_dim * 64 + pixels * 16)
    avail = available_memory()
    if avail is not None and need > avail:
        raise UserError(f"{what}: {n:,} images need about {gib(need)} of memory, but {gib(avail)} is available; "
                        f"ask for fewer images (or a smaller sample.batch_size)")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the kernel lists AMX or AVX-512 BF16 among the CPU's flags."""
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path(cpuinfo).read_text(), re.M)
    except OSError:
        return False
    return flags is not None and any(f in flags[1].split() for f in BF16_CPU_FLAGS)


def require_cpu_bf16(source: str) -> None:
    """Refuse bf16 (asked for by `source`) on a CPU without native bf16 units, where it is slower than fp32."""
    if not cpu_has_native_bf16():
        raise UserError(f"{source}=bf16: this CPU has no native bf16 units (neither {' nor '.join(BF16_CPU_FLAGS)} "
                        f"in /proc/cpuinfo), so bf16 would be slower than fp32; use fp32")
