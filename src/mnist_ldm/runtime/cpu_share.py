"""How many intra-op threads a CPU job uses: its share of the machine's cores among the mnist-ldm jobs
running on it now.

PyTorch gives every process an OpenMP pool as large as the machine. Two such processes on the same
cores (two experiments of `dvc queue start -j 2`, or `infer` beside the `sample` stage) spin against
each other: measured on 2 cores, a DDPM sampling loop fell from about 9 to 1.1 steps/s, 8× slower
instead of 2×. Each CPU job therefore registers itself in a folder of the machine's temp directory
(one file per process, held with an exclusive `flock` for as long as the process lives, so a killed
job's file is recognised as stale and removed) and sizes its pool to `cores // jobs`, re-checking
every few seconds so that a job that started alone shrinks when another one starts.

`MNIST_LDM_THREADS=N` (or an explicit `OMP_NUM_THREADS`) fixes the pool size instead.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

THREADS_ENV = "MNIST_LDM_THREADS"
JOBS_DIR_ENV = "MNIST_LDM_JOBS_DIR"  # where the jobs register (default: a folder of the temp directory)
RECHECK_S = 2.0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def share(cores: int, jobs: int) -> int:
    """Threads for one of `jobs` concurrent jobs on `cores` cores: at least 1, never more than the cores."""
    return max(1, cores // max(1, jobs))


def jobs_dir() -> Path:
    return Path(os.environ.get(JOBS_DIR_ENV) or Path(tempfile.gettempdir()) / f"mnist-ldm-jobs-{os.getuid()}")


def active_jobs(folder: Path) -> int:
    """How many registered jobs are alive: a file whose lock can be taken belongs to a dead process and goes."""
    alive = 0
    for path in folder.glob("*.job"):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # removed meanwhile by its job or by another job's clean-up
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            alive += 1
        else:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return alive


class CpuShare:
    """This process's registration and the thread count it implies; `update()` is cheap to call often."""

    def __init__(self, folder: Optional[Path] = None, cores: Optional[int] = None):
        self.fixed = _fixed_threads()
        self.folder = folder or jobs_dir()
        self.cores = cores or usable_cores()
        self._fd: Optional[int] = None
        self._next_check = 0.0
        self.threads: Optional[int] = None

    def __enter__(self) -> "CpuShare":
        if self.fixed is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{os.getpid()}.tmp"  # locked before it gets the name other jobs count
            self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.replace(tmp, self.folder / f"{os.getpid()}.job")
        self.update(force=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            (self.folder / f"{os.getpid()}.job").unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def update(self, force: bool = False) -> int:
        """Set torch's intra-op threads to this job's share (at most every RECHECK_S seconds); returns it."""
        import torch

        now = time.monotonic()
        if not force and now < self._next_check and self.threads is not None:
            return self.threads
        self._next_check = now + RECHECK_S
        want = self.fixed if self.fixed is not None else share(self.cores, active_jobs(self.folder))
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
        self.threads = want
        return want


def _fixed_threads() -> Optional[int]:
    """MNIST_LDM_THREADS (checked), else a valid OMP_NUM_THREADS the user set, else None (share the cores)."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        if not (text.isdigit() and int(text) >= 1):
            from mnist_ldm.io.errors import UserError

            raise UserError(f"{THREADS_ENV}={text!r} is not a thread count; expected an integer >= 1")
        return int(text)
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) >= 1 else None
