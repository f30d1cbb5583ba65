"""Concurrent CPU jobs share the cores: each sizes torch's thread pool to cores // live jobs."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import types

import pytest
import torch

from mnist_ldm.io.errors import UserError
from mnist_ldm.runtime.device import CpuShare, live_jobs


@pytest.fixture
def free_env(monkeypatch, tmp_path):
    """No thread count fixed by the environment (the test workers set OMP_NUM_THREADS=1), a private jobs folder."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MNIST_LDM_THREADS", raising=False)
    monkeypatch.setenv("MNIST_LDM_JOBS_DIR", str(tmp_path / "jobs"))
    before = torch.get_num_threads()
    yield tmp_path / "jobs"
    torch.set_num_threads(before)


def test_the_share_is_the_cores_divided_by_the_jobs_and_at_least_one(free_env):
    assert CpuShare(cores=16).threads == 16
    held = []
    for i in range(3):  # three other live jobs: files locked through their own open files
        held.append(open(free_env / f"{i}.job", "wb"))
        fcntl.flock(held[-1], fcntl.LOCK_EX)
    assert CpuShare(cores=16).threads == 4 and CpuShare(cores=3).threads == 1  # 4 jobs with this one
    assert live_jobs(free_env) == 3  # this process's registration went with its object


def test_a_second_job_halves_the_first_and_its_exit_gives_the_cores_back(free_env, monkeypatch):
    import mnist_ldm.runtime.device as device

    # this job's clock, moved by hand: the rate limit is checked against it, not against how long the
    # steps below happen to take on a loaded machine
    clock = [1000.0]
    monkeypatch.setattr(device, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    other = subprocess.Popen(  # a second job: registers, says so, holds its registration until stdin closes
        [sys.executable, "-c", "import sys\nfrom mnist_ldm.runtime.device import CpuShare\n"
         "c = CpuShare(cores=4)\nprint(c.threads, flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() in ("4", "2")  # alone, or already beside this one
        me = CpuShare(cores=4)
        assert me.threads == 2 and torch.get_num_threads() == 2 and live_jobs(free_env) == 2
        other.stdin.close()
        assert other.wait(timeout=60) == 0
        clock[0] += 0.99 * device.RECHECK_S
        assert me.update() == 2  # rate-limited: not re-checked within RECHECK_S
        clock[0] += 0.02 * device.RECHECK_S
        assert me.update() == 4 and torch.get_num_threads() == 4  # re-checked once RECHECK_S has passed
        del me
        assert live_jobs(free_env) == 0 and not list(free_env.iterdir())
    finally:
        other.kill()


def test_a_killed_job_is_not_counted_and_its_file_goes(free_env):
    other = subprocess.Popen([sys.executable, "-c", "from mnist_ldm.runtime.device import CpuShare\nimport time\n"
                              "c = CpuShare(cores=2)\nprint('in', flush=True)\ntime.sleep(600)"],
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "in"
    assert live_jobs(free_env) == 1
    other.kill()
    other.wait(timeout=60)
    assert len(list(free_env.glob("*.job"))) == 1  # left behind by the kill ...
    assert live_jobs(free_env) == 0 and not list(free_env.glob("*.job"))  # ... and removed by the next count


def test_the_environment_can_fix_the_thread_count(free_env, monkeypatch):
    monkeypatch.setenv("MNIST_LDM_THREADS", "3")
    assert CpuShare(cores=2).threads == 3 and torch.get_num_threads() == 3 and not free_env.exists()  # not registered
    monkeypatch.setenv("MNIST_LDM_THREADS", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert CpuShare(cores=2).threads == 1
    monkeypatch.setenv("MNIST_LDM_THREADS", "many")
    with pytest.raises(UserError, match="MNIST_LDM_THREADS='many' is not a thread count"):
        CpuShare(cores=2)


def test_a_cpu_runtime_registers_and_ticks(free_env):
    from mnist_ldm.runtime.device import runtime

    rt = runtime("cpu")
    assert rt.cpu is not None and live_jobs(free_env) == 1
    rt.tick()
    assert torch.get_num_threads() == rt.cpu.threads
    del rt
    assert live_jobs(free_env) == 0
