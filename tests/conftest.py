"""Shared fixtures: a shrunk copy of the repository for end-to-end runs, and CLI helpers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"  # as `test_env` gives the processes the tests start (commands run in-process too)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs pytest workers on the machine's two cores: one intra-op thread each, as the
    # pipeline processes they start get (`test_env`); set before anything imports torch
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough for seconds per stage, real enough to exercise every code path.
SHRUNK = {
    "data": {"limit_train": 300, "limit_test": 100},  # source auto, as a user's: no IDX files, Hub offline -> bundled
    "autoencoder": {"epochs": 1, "batch_size": 64, "warmup_steps": 0, "checkpoint_every": 2},
    "diffusion": {"epochs": 1, "batch_size": 64, "hidden_dim": 32, "num_blocks": 1, "T": 50, "warmup_steps": 0,
                  "ema_warmup_steps": 2, "ema_max_fraction": 1.0, "checkpoint_every": 2},  # 5 steps: a 5-step EMA
    "sample": {"num_images": 0, "grid_size": 16, "sampler": "ddim", "steps": 5, "batch_size": 100},
    "evaluator": {"epochs": 1, "batch_size": 64},
    "evaluate": {"n": 100},
}


# The modules that drive whole pipelines, longest first: `make test` hands whole modules to the
# pytest-xdist workers in this order (--no-loadscope-reorder), so the long ones start early and the
# workers finish together instead of one waiting on a long module picked up last.
#
# The first three go to the three workers at once: two that wait for `trained_repo` and test_resume.py, which
# builds its own pipeline, so that both cores work while the first worker builds `trained_repo`. pytest-xdist
# gives a worker another module while it has at most 2 tests pending, so a worker that starts with test_readme.py
# or test_docs_tracking.py (one or two long tests each) takes the next module at once and runs it after: the
# fourth and fifth are quick modules of many tests, which stops that.
LONGEST_FIRST = ("test_readme.py", "test_docs_tracking.py", "test_resume.py", "test_diffusion_math.py",
                 "test_data.py", "test_team.py", "test_mlflow_ui.py", "test_tracking.py", "test_dvc_semantics.py", "test_variants.py",
                 "test_docs_api.py", "test_distributed.py", "test_remotes.py", "test_heap.py", "test_bad_inputs.py",
                 "test_cli.py", "test_malicious_checkpoint.py", "test_evaluation.py", "test_conditional.py",
                 "test_serving.py", "test_bad_inputs_os.py", "test_pipeline.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a module stays


def test_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have after activating the venv, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), changes), sort_keys=False))


def run(args: list[str], cwd: Path, check: bool = True, env: dict | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env or test_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def cli(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mnist-ldm args...` in `cwd`, in this process (`cli.main` with `env` as its environment and its output
    captured; a re-run under torchrun, `MNIST_LDM_NPROC`, needs a process of its own). An uncaught exception becomes
    exit 1 with its traceback on stderr, as a process would end."""
    if env is not None and "MNIST_LDM_NPROC" in env:
        return run([str(BIN / "mnist-ldm"), *args], cwd, check, env)
    import contextlib
    import io
    import traceback

    import torch

    from mnist_ldm.commands.cli import main

    out, err, here, threads = io.StringIO(), io.StringIO(), os.getcwd(), torch.get_num_threads()
    environ = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's --help and usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
    proc = subprocess.CompletedProcess(["mnist-ldm", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"mnist-ldm {' '.join(args)} exited {code}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def make_repo_copy(dest: Path, params: dict | None = None) -> Path:
    """A git repository holding this project's tracked and unignored files, with shrunk params."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    skip = ("dvc.lock", "metrics/", "plots/", "outputs/", "models/", "data/prepared", "data/latents")
    for rel in filter(None, files):
        if rel.startswith(skip) or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    write_params(dest, merge(SHRUNK, params or {}))
    env = test_env()
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


# MLflow 3's server starts a GenAI job runner beside the tracking server by default: 7 more Python
# processes (about 30 CPU-seconds of imports at every start on 2 cores) that nothing here uses
SERVER_JOBS = "false"


class MlflowServer:
    """`mlflow server` on a free 127.0.0.1 port with its own sqlite store, in its own process group."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "srv.db"
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--default-artifact-root", str(root / "art"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=root, env=test_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=SERVER_JOBS), stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited: {Path(self.log.name).read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server not healthy after {timeout} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


class TeamServer:
    """The team's stack (`tools/team.py up`: `mlflow server` on PostgreSQL with its artifacts in SeaweedFS's S3) with
    its data under `root`, started in the background; `MlflowServer`'s interface."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.team = [str(BIN / "python"), str(REPO / "tools" / "team.py")]
        self.root = root / ".team"
        self.proc = subprocess.Popen([*self.team, "up", "--root", str(self.root)], cwd=root, env=test_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.uri = ""

    def wait_healthy(self, timeout: float = 240) -> None:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"tools/team.py up: {err[-2000:]}"
        self.uri = out.split("MLFLOW_TRACKING_URI=", 1)[1].split()[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        subprocess.run([*self.team, "down", "--root", str(self.root)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on 2 shared cores: a second intra-op thread only adds contention (10x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A repository that `build(repo)` makes once per session (in `<name>/repo`) and tests only read: under
    pytest-xdist the workers share it, the first to ask builds it and the others wait for it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    repo, done = root / "repo", root / "built"
    with FileLock(str(root / "lock")):
        if not done.exists():
            shutil.rmtree(repo, ignore_errors=True)  # a build that failed on another worker
            build(repo)
            done.touch()
    return repo


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory) -> Path:
    """One shrunk `dvc repro` with tracking on (its own sqlite store, one registered model version; what it
    printed is kept for `first_build`), built once (`built_once`) and
    shared by the tests that only read its outputs (do not modify it; `copy_trained` gives a private copy)."""
    def build(repo: Path) -> None:
        repo.mkdir()
        make_repo_copy(repo)
        proc = run([str(BIN / "dvc"), "repro"], repo)
        (repo.parent / "repro.stdout").write_text(proc.stdout)
        (repo.parent / "repro.stderr").write_text(proc.stderr)

    return built_once(tmp_path_factory, "trained", build)


def first_build(trained_repo: Path) -> tuple[str, str]:
    """What the `dvc repro` that built `trained_repo` printed: (stdout, stderr)."""
    return (trained_repo.parent / "repro.stdout").read_text(), (trained_repo.parent / "repro.stderr").read_text()


def copy_repo(source: Path, dest: Path) -> Path:
    """A copy of a repository built here with its git history, DVC cache and MLflow store (which re-points its
    artifact locations to the copy)."""
    shutil.copytree(source, dest, symlinks=True)
    if (dest / "mlflow.db").exists():  # what the first stage run in the copy would do, done before tests read it
        from mnist_ldm.tracking.store import repoint

        repoint(dest / "mlflow.db", (source / "mlartifacts").as_uri(), (dest / "mlartifacts").as_uri())
    return dest


def copy_trained(trained_repo: Path, dest: Path, params: dict | None = None) -> Path:
    """A private copy of the trained repository (`copy_repo`) with its outputs committed. With `params`, those
    values are changed first and `dvc repro` brings the outputs up to date (only the stages that read
    them re-run)."""
    copy_repo(trained_repo, dest)
    if params:
        write_params(dest, params)
        run([str(BIN / "dvc"), "repro"], dest)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "pipeline outputs"]):
        run(cmd, dest)
    return dest


# the learning-rate experiments of `lr_experiments`, docs/tracking.md's grid search as tests/test_readme.py's `EDITS`
# runs it: DVC experiment name -> diffusion.lr
LR_VARIANTS = {"lr-1": "0.0001", "lr-2": "0.0002"}


@pytest.fixture(scope="session")
def untracked_repo(trained_repo, tmp_path_factory) -> Path:
    """The trained repository with `tracking.enabled: false` (MLflow only adds time where a test looks at DVC),
    brought up to date and committed (`copy_trained`); built once (`built_once`), read only (`copy_repo` gives a
    private copy)."""
    return built_once(tmp_path_factory, "untracked",
                      lambda repo: copy_trained(trained_repo, repo, {"tracking": {"enabled": False}}))


@pytest.fixture(scope="session")
def lr_experiments(trained_repo, tmp_path_factory) -> Path:
    """The committed trained repository, its MLflow store emptied, after docs/tracking.md's grid search
    (`run_grid` in tests/test_readme.py: `dvc exp run --queue -n lr -S diffusion.lr=...` for each of `LR_VARIANTS`,
    the stages from train_diffusion on, each experiment registering a generator version in the repository's default
    sqlite store, which holds these two experiments' runs only) and `mnist-ldm promote` (what it printed is in
    `promoted.txt` beside the repository). Built once (`built_once`), read only (`copy_repo` gives a private copy;
    tests/test_docs_tracking.py runs the page's later blocks in one)."""
    def build(repo: Path) -> None:
        from test_readme import run_grid

        copy_trained(trained_repo, repo)
        (repo / "mlflow.db").unlink()
        shutil.rmtree(repo / "mlartifacts")
        run_grid(repo, test_env())
        (repo.parent / "promoted.txt").write_text(run([str(BIN / "mnist-ldm"), "promote"], repo).stdout)

    return built_once(tmp_path_factory, "lr_experiments", build)
