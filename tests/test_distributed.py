"""Devices and torchrun: a 2-process Gloo DDP run of the training stages on the CPU, the README's
several-machines command as two torchrun launchers meeting at a c10d rendezvous, `--device` choices,
and checkpoints that load on any device."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import conftest
from conftest import BIN, cli, copy_trained, run

DIGEST = re.compile(r"(train_\w+): rank (\d)/2 final weights ([0-9a-f]{16})")


@pytest.fixture(scope="module")
def repo(trained_repo, tmp_path_factory):
    """A private copy of the shared trained repository: prepared data, an autoencoder and latents
    (tracking to its sqlite store)."""
    return copy_trained(trained_repo, tmp_path_factory.mktemp("dist") / "repo")


def _stage(repo, name: str, args: list[str], **env: str):
    return run([str(BIN / "python"), f"stages/{name}.py", *args], repo, env=conftest.test_env(**env))


def diffusion_args(folder: str, name: str = "diff") -> list[str]:
    """`stages/train_diffusion.py`'s paths, writing `<folder>/<name>.pt`, `.json` and the plots folder."""
    return ["--ae-ckpt", "models/autoencoder.pt", "--latents", "data/latents", "--data", "data/prepared",
            "--out", f"{folder}/{name}.pt", "--metrics", f"{folder}/{name}.json", "--plots", f"{folder}/{name}"]


@pytest.fixture(scope="module")
def one_process_diffusion(repo) -> Path:
    """train_diffusion as one process (`MNIST_LDM_NPROC=1`): the weights every torchrun layout must end near."""
    _stage(repo, "train_diffusion", diffusion_args("ddp", "single-diff") + ["--set", "tracking.enabled=false"],
           MNIST_LDM_NPROC="1")
    return repo / "ddp" / "single-diff.pt"


def assert_same_weights_within_rounding(a: Path, b: Path) -> None:
    sa, sb = (torch.load(path, weights_only=True)["state_dict"] for path in (a, b))
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


def _mlflow_children(repo, stage: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mnist-ldm")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mnist_ldm.stage` = '{stage}'")


@pytest.mark.parametrize("stage,args", [
    ("train_ae", ["--data", "data/prepared", "--out", "ddp/ae.pt", "--metrics", "ddp/ae.json", "--plots", "ddp/ae"]),
    ("train_diffusion", diffusion_args("ddp")),
])
def test_two_process_gloo_ddp(repo, stage, args, request):
    before = len(_mlflow_children(repo, stage))
    proc = _stage(repo, stage, args, MNIST_LDM_NPROC="2")
    digests = {int(r): d for s, r, d in DIGEST.findall(proc.stderr) if s == stage}
    assert set(digests) == {0, 1}, proc.stderr[-3000:]
    assert digests[0] == digests[1], f"the two ranks ended with different weights: {digests}"
    out = repo / args[args.index("--out") + 1]
    assert out.is_file() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert len(_mlflow_children(repo, stage)) == before + 1, "rank 0 alone logs one child run"
    if stage != "train_diffusion":
        return
    # the same global batch at any process count: one process ends within float rounding of two
    assert_same_weights_within_rounding(out, request.getfixturevalue("one_process_diffusion"))


def test_two_machines_c10d_rendezvous(repo, one_process_diffusion, tmp_path):
    """The README's several-machines command, with two torchrun launchers on this machine standing for two
    nodes (one Gloo process each) that meet at a c10d rendezvous on 127.0.0.1: the same weights as one
    process, within float rounding."""
    port, args = conftest.free_port(), diffusion_args("rdzv") + ["--set", "tracking.enabled=false"]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]  # files, not pipes: neither launcher blocks on output
    files = [log.open("w") for log in logs]
    launchers = [subprocess.Popen(
        [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"mnist-ldm-{port}",
         "stages/train_diffusion.py", *args],
        cwd=repo, env=conftest.test_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        for f in files]
    try:
        for p in launchers:
            p.wait(timeout=300)
    finally:
        for p in launchers:  # a launcher left waiting for its peer, and its worker
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in files:
            f.close()
    output = "\n".join(log.read_text() for log in logs)
    assert [p.returncode for p in launchers] == [0, 0], output[-4000:]
    digests = {int(r): d for s, r, d in DIGEST.findall(output) if s == "train_diffusion"}
    assert set(digests) == {0, 1} and digests[0] == digests[1], output[-3000:]
    out = repo / "rdzv" / "diff.pt"
    assert out.is_file() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert_same_weights_within_rounding(out, one_process_diffusion)


def test_device_cpu_and_auto_agree_on_a_cpu_only_machine(repo):
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA on this machine")
    args = ["--data", "data/prepared", "--out", "dev/{d}.pt", "--metrics", "dev/{d}.json", "--set", "tracking.enabled=false"]
    for device in ("cpu", "auto"):  # in this process: the choice is made per command, not at start-up
        cli("train-evaluator", *[a.format(d=device) for a in args], "--device", device, cwd=repo,
            env=conftest.test_env())
    assert (repo / "dev/cpu.pt").read_bytes() == (repo / "dev/auto.pt").read_bytes()


def test_bad_device_is_one_line(repo):
    proc = cli("train-evaluator", "--data", "data/prepared", "--out", "x.pt", "--metrics", "x.json", "--device", "tpu",
               cwd=repo, check=False)  # in this process: the stage script is the same command
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --device='tpu'")
    assert "auto, cpu, cuda, cuda:N, mps" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoints_hold_cpu_tensors_and_load_anywhere(repo):
    ckpt = torch.load(repo / "models/autoencoder.pt", weights_only=True)  # no map_location needed
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    from mnist_ldm.autoencoder.model import load_autoencoder

    model, _ = load_autoencoder(repo / "models/autoencoder.pt")
    if torch.cuda.is_available():
        assert next(model.to("cuda").parameters()).is_cuda
