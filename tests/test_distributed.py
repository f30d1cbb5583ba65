"""Devices and torchrun: a 2-process Gloo DDP run of the training stages on the CPU, `--device` choices,
and checkpoints that load on any device."""

from __future__ import annotations

import re

import pytest
import torch

import conftest
from conftest import BIN, copy_trained, run

DIGEST = re.compile(r"(train_\w+): rank (\d)/2 final weights ([0-9a-f]{16})")


@pytest.fixture(scope="module")
def repo(trained_repo, tmp_path_factory):
    """A private copy of the shared trained repository: prepared data, an autoencoder and latents
    (tracking to its sqlite store)."""
    return copy_trained(trained_repo, tmp_path_factory.mktemp("dist") / "repo")


def _stage(repo, name: str, args: list[str], **env: str):
    return run([str(BIN / "python"), f"stages/{name}.py", *args], repo, env=conftest.test_env(**env))


def _mlflow_children(repo, stage: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mnist-ldm")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mnist_ldm.stage` = '{stage}'")


@pytest.mark.parametrize("stage,args", [
    ("train_ae", ["--data", "data/prepared", "--out", "ddp/ae.pt", "--metrics", "ddp/ae.json", "--plots", "ddp/ae"]),
    ("train_diffusion", ["--ae-ckpt", "models/autoencoder.pt", "--latents", "data/latents", "--data",
                         "data/prepared", "--out", "ddp/diff.pt", "--metrics", "ddp/diff.json", "--plots", "ddp/diff"]),
])
def test_two_process_gloo_ddp(repo, stage, args):
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
    single = repo / "ddp" / f"single-{out.name}"
    one = args[:args.index("--out")] + ["--out", str(single)] + [
        a if a not in ("ddp/ae.json", "ddp/diff.json", "ddp/ae", "ddp/diff") else "ddp/single-" + a.split("/")[1]
        for a in args[args.index("--out") + 2:]]
    _stage(repo, stage, one, MLFLOW_TRACKING_URI="", **{"MNIST_LDM_NPROC": "1"})
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(single, weights_only=True)["state_dict"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_device_cpu_and_auto_agree_on_a_cpu_only_machine(repo):
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA on this machine")
    args = ["--data", "data/prepared", "--out", "dev/{d}.pt", "--metrics", "dev/{d}.json", "--set", "tracking.enabled=false"]
    for device in ("cpu", "auto"):
        _stage(repo, "train_evaluator", [a.format(d=device) for a in args] + ["--device", device])
    assert (repo / "dev/cpu.pt").read_bytes() == (repo / "dev/auto.pt").read_bytes()


def test_bad_device_is_one_line(repo):
    proc = run([str(BIN / "python"), "stages/train_evaluator.py", "--data", "data/prepared", "--out", "x.pt",
                "--metrics", "x.json", "--device", "tpu"], repo, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --device='tpu'")
    assert "auto, cpu, cuda, cuda:N, mps" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoints_hold_cpu_tensors_and_load_anywhere(repo):
    ckpt = torch.load(repo / "models/autoencoder.pt", weights_only=True)  # no map_location needed
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    from mnist_ldm.autoencoder import load_autoencoder

    model, _ = load_autoencoder(repo / "models/autoencoder.pt")
    if torch.cuda.is_available():
        assert next(model.to("cuda").parameters()).is_cuda
