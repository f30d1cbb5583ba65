"""Whether the arrays a command builds fit in the memory available, checked before any work."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from mnist_ldm.io.errors import UserError


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate: MemAvailable, or less under a cgroup (v2) memory limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = left if avail is None else min(avail, left)
    return avail


def sampling_bytes(n: int, batch_size: int, latent_dim: int) -> int:
    """Peak memory of sampling and decoding `n` digits: the uint8 images, the float32 decoded batch list,
    its concatenation and rounding (3 x 4 bytes a pixel), the latents twice, and one working batch."""
    pixels = 28 * 28
    return n * (pixels * (1 + 12) + latent_dim * 8) + min(batch_size, n) * (latent_dim * 4 * 16 + pixels * 16)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.1f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.0f} MiB"


def check_sampling_memory(what: str, n: int, batch_size: int, latent_dim: int) -> None:
    """Refuse to sample `n` digits (asked for by `what`, e.g. "--num-images 100000000") before any work
    when they need more memory than is available."""
    need, avail = sampling_bytes(n, batch_size, latent_dim), available_memory()
    if avail is not None and need > avail:
        raise UserError(f"{what}: {n:,} images need about {gib(need)} of memory, but {gib(avail)} is available; "
                        f"ask for fewer images (or a smaller sample.batch_size)")
