"""Concurrent CPU jobs share the cores: each sizes torch's thread pool to cores // live jobs."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from mnist_ldm.runtime.cpu_share import CpuShare, active_jobs, share
from mnist_ldm.io.errors import UserError


@pytest.fixture
def free_env(monkeypatch, tmp_path):
    """No thread count fixed by the environment (the test workers set OMP_NUM_THREADS=1), a private jobs folder."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MNIST_LDM_THREADS", raising=False)
    monkeypatch.setenv("MNIST_LDM_JOBS_DIR", str(tmp_path / "jobs"))
    before = torch.get_num_threads()
    yield tmp_path / "jobs"
    torch.set_num_threads(before)


def test_share_is_the_cores_divided_by_the_jobs_and_at_least_one():
    assert [share(2, j) for j in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert [share(16, j) for j in (1, 2, 3, 4, 32)] == [16, 8, 5, 4, 1]


def test_a_second_job_halves_the_first_and_its_exit_gives_the_cores_back(free_env, monkeypatch):
    import mnist_ldm.runtime.cpu_share as cpu_share

    # this job's clock, moved by hand: the rate limit is checked against it, not against how long the
    # steps below happen to take on a loaded machine
    clock = [1000.0]
    monkeypatch.setattr(cpu_share, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    other = subprocess.Popen(  # a second job: registers, says so, holds its registration until stdin closes
        [sys.executable, "-c", "import sys\nfrom mnist_ldm.runtime.cpu_share import CpuShare\n"
         "with CpuShare(cores=4) as c:\n    print(c.threads, flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() in ("4", "2")  # alone, or already beside this one
        with CpuShare(cores=4) as me:
            assert me.threads == 2 and torch.get_num_threads() == 2 and active_jobs(free_env) == 2
            other.stdin.close()
            assert other.wait(timeout=60) == 0
            clock[0] += 0.99 * cpu_share.RECHECK_S
            assert me.update() == 2  # rate-limited: not re-checked within RECHECK_S
            clock[0] += 0.02 * cpu_share.RECHECK_S
            assert me.update() == 4 and torch.get_num_threads() == 4  # re-checked once RECHECK_S has passed
        assert active_jobs(free_env) == 0 and not list(free_env.iterdir())
    finally:
        other.kill()


def test_a_killed_job_is_not_counted_and_its_file_goes(free_env):
    other = subprocess.Popen([sys.executable, "-c", "from mnist_ldm.runtime.cpu_share import CpuShare\nimport time\n"
                              "c = CpuShare(cores=2).__enter__()\nprint('in', flush=True)\ntime.sleep(600)"],
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "in"
    assert active_jobs(free_env) == 1
    other.kill()
    other.wait(timeout=60)
    assert len(list(free_env.glob("*.job"))) == 1  # left behind by the kill ...
    assert active_jobs(free_env) == 0 and not list(free_env.glob("*.job"))  # ... and removed by the next count


def test_the_environment_can_fix_the_thread_count(free_env, monkeypatch):
    monkeypatch.setenv("MNIST_LDM_THREADS", "3")
    with CpuShare(cores=2) as c:
        assert c.threads == 3 and torch.get_num_threads() == 3 and not free_env.exists()  # not registered
    monkeypatch.setenv("MNIST_LDM_THREADS", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert CpuShare(cores=2).__enter__().threads == 1
    monkeypatch.setenv("MNIST_LDM_THREADS", "many")
    with pytest.raises(UserError, match="MNIST_LDM_THREADS='many' is not a thread count"):
        CpuShare(cores=2)


def test_a_cpu_runtime_registers_and_ticks(free_env):
    from mnist_ldm.runtime.device import runtime

    rt = runtime("cpu")
    assert rt.cpu is not None and active_jobs(free_env) == 1
    rt.tick()
    assert torch.get_num_threads() == rt.cpu.threads
    rt.cpu.__exit__(None, None, None)
    assert active_jobs(free_env) == 0
