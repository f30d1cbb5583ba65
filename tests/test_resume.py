"""Killed training resumes to bit-identical weights; divergence stops cleanly; sampling is seeded.

The stage commands come from dvc.yaml, run through `mnist-ldm` as a user would, in a shrunk copy
of the project where one diffusion run takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import BIN, cli, make_repo_copy, merge, run
from conftest import test_env as user_env
from mnist_ldm.runtime.memory import cpu_has_native_bf16

PARAMS = {
    "data": {"limit_train": 2000, "limit_test": 200},
    # a cosine schedule with warm-up: the resumed run's learning rates must follow it too
    "diffusion": {"epochs": 3, "batch_size": 64, "hidden_dim": 64, "checkpoint_every": 5, "generate_images": False,
                  "lr_schedule": "cosine", "warmup_steps": 10},
    "evaluator": {"epochs": 2, "batch_size": 64, "checkpoint_every": 3},
    "tracking": {"enabled": False},
}
STEPS_PER_EPOCH = 32  # ceil(2000 / 64), for the autoencoder, the denoiser and the evaluator


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def stage_argv(repo: Path, stage: str) -> list[str]:
    """The stage's command line from dvc.yaml, as `mnist-ldm <subcommand> ...`."""
    cmd = shlex.split(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    assert cmd[:2] == ["python", f"stages/{stage}.py"], cmd
    return [str(BIN / "mnist-ldm"), stage.replace("_", "-"), *cmd[2:]]


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}[{k}] differs"


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), f"optimizer state[{i}][{k}] differs"


def kill_after_checkpoint(argv: list[str], cwd: Path, resume: Path, min_step: int, log: Path,
                          timeout: float = 300) -> int:
    """Start `argv`; once the resume file has been rewritten and records a step >= min_step, SIGKILL the
    process. Returns the step recorded in the resume file it leaves behind."""
    assert not resume.exists()
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=user_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            seen, writes, deadline = None, 0, time.monotonic() + timeout
            while True:
                assert proc.poll() is None, f"finished before it could be killed\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no resumable checkpoint appeared in time"
                try:
                    stamp = resume.stat().st_mtime_ns
                except FileNotFoundError:
                    stamp = None
                if stamp is not None and stamp != seen:
                    seen, writes = stamp, writes + 1
                    if writes >= 2 and load(resume)["step"] >= min_step:
                        proc.send_signal(signal.SIGKILL)
                        break
                time.sleep(0.01)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return int(load(resume)["step"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The shrunk project after `dvc repro encode`: prepared data, autoencoder, latent cache."""
    repo = make_repo_copy(tmp_path_factory.mktemp("resume") / "repo", PARAMS)
    run([str(BIN / "dvc"), "repro", "encode"], repo)
    return repo


@pytest.fixture(scope="module")
def reference(repo: Path, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted train_diffusion run: its checkpoint and metrics, kept aside."""
    keep = tmp_path_factory.mktemp("reference")
    run(stage_argv(repo, "train_diffusion"), repo)
    assert not (repo / "models/diffusion.resume.pt").exists()
    shutil.copy(repo / "models/diffusion.pt", keep / "diffusion.pt")
    shutil.copy(repo / "metrics/diffusion.json", keep / "diffusion.json")
    return {"ckpt": keep / "diffusion.pt", "metrics": keep / "diffusion.json"}


def test_killed_diffusion_training_resumes_bit_identically(repo: Path, reference: dict, tmp_path: Path):
    argv = stage_argv(repo, "train_diffusion")
    out, resume, metrics = repo / "models/diffusion.pt", repo / "models/diffusion.resume.pt", repo / "metrics/diffusion.json"
    for p in (out, metrics):
        p.unlink()
    shutil.rmtree(repo / "plots/diffusion")

    # killed mid-epoch 2, after the resume file has been written more than once
    step = kill_after_checkpoint(argv, repo, resume, STEPS_PER_EPOCH + 1, tmp_path / "killed.log")
    assert STEPS_PER_EPOCH < step < 3 * STEPS_PER_EPOCH and step % STEPS_PER_EPOCH != 0, step
    state = load(resume)
    assert len(state["history"]) == step // STEPS_PER_EPOCH and state["epoch_loss_sum"] > 0
    assert not out.exists() and not metrics.exists(), "a killed run left a final output behind"
    assert not list(out.parent.glob(".diffusion.pt.tmp-*")), "a half-written final checkpoint was left behind"

    proc = run(argv, repo)
    assert f"resuming from models/diffusion.resume.pt at step {step}" in proc.stderr
    assert not resume.exists(), "the resume state outlived the finished run"

    got, want = load(out), load(reference["ckpt"])
    assert_same_tensors(got["state_dict"], want["state_dict"], "state_dict")
    assert_same_tensors(got["ema_state_dict"], want["ema_state_dict"], "ema_state_dict")
    assert_same_optimizer(got["optimizer"], want["optimizer"])
    assert got["step"] == want["step"] == 3 * STEPS_PER_EPOCH
    assert got["history"] == want["history"]  # per-epoch losses, including the epoch cut in two
    assert json.loads(metrics.read_text()) == json.loads(reference["metrics"].read_text())


def test_killed_autoencoder_training_resumes_bit_identically(repo: Path, tmp_path: Path):
    """The pipeline's own train_ae run is the uninterrupted reference; this one is killed and resumed."""
    argv = stage_argv(repo, "train_ae")
    out = tmp_path / "autoencoder.pt"
    for flag, value in (("--out", out), ("--metrics", tmp_path / "ae.json"), ("--plots", tmp_path / "plots")):
        argv[argv.index(flag) + 1] = str(value)
    resume = tmp_path / "autoencoder.resume.pt"

    step = kill_after_checkpoint(argv, repo, resume, 10, tmp_path / "killed.log")
    assert 10 <= step < STEPS_PER_EPOCH
    assert not out.exists()

    proc = run(argv, repo)
    assert f"resuming from {resume} at step {step}" in proc.stderr
    assert not resume.exists()
    got, want = load(out), load(repo / "models/autoencoder.pt")
    assert_same_tensors(got["state_dict"], want["state_dict"], "state_dict")
    assert got["history"] == want["history"]


def test_killed_evaluator_training_resumes_bit_identically(repo: Path, tmp_path: Path):
    """train_evaluator resumes too: killed in its second epoch, it ends with the weights of an uninterrupted run."""
    def argv_to(folder: Path) -> list[str]:
        argv = stage_argv(repo, "train_evaluator")
        for flag, value in (("--out", folder / "evaluator.pt"), ("--metrics", folder / "evaluator.json")):
            argv[argv.index(flag) + 1] = str(value)
        return argv

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(argv_to(whole), repo)
    assert not (whole / "evaluator.resume.pt").exists()

    resume = cut / "evaluator.resume.pt"
    cut.mkdir()
    step = kill_after_checkpoint(argv_to(cut), repo, resume, STEPS_PER_EPOCH + 1, tmp_path / "killed.log")
    assert STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH, step
    assert not (cut / "evaluator.pt").exists() and not (cut / "evaluator.json").exists()

    proc = run(argv_to(cut), repo)
    assert f"resuming from {resume} at step {step}" in proc.stderr
    assert not resume.exists()
    got, want = load(cut / "evaluator.pt"), load(whole / "evaluator.pt")
    assert_same_tensors(got["state_dict"], want["state_dict"], "state_dict")
    assert got["weights_sha256"] == want["weights_sha256"]
    assert json.loads((cut / "evaluator.json").read_text()) == json.loads((whole / "evaluator.json").read_text())


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 units (amx_bf16 or avx512_bf16)")
def test_killed_bf16_diffusion_training_resumes_bit_identically(repo: Path, reference: dict, tmp_path: Path):
    """At --precision bf16 too, a run killed mid-epoch 2 ends with the weights of an uninterrupted bf16 run;
    both checkpoints record bf16, and their weights are not the fp32 reference's."""
    def argv_to(folder: Path) -> list[str]:
        argv = stage_argv(repo, "train_diffusion") + ["--precision", "bf16"]
        for flag, value in (("--out", folder / "diffusion.pt"), ("--metrics", folder / "diffusion.json"),
                            ("--plots", folder / "plots")):
            argv[argv.index(flag) + 1] = str(value)
        return argv

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(argv_to(whole), repo)
    resume = cut / "diffusion.resume.pt"
    cut.mkdir()
    step = kill_after_checkpoint(argv_to(cut), repo, resume, STEPS_PER_EPOCH + 1, tmp_path / "killed.log")
    assert STEPS_PER_EPOCH < step < 3 * STEPS_PER_EPOCH, step
    assert not (cut / "diffusion.pt").exists()

    proc = run(argv_to(cut), repo)
    assert f"resuming from {resume} at step {step}" in proc.stderr
    assert not resume.exists()
    got, want, fp32 = load(cut / "diffusion.pt"), load(whole / "diffusion.pt"), load(reference["ckpt"])
    assert_same_tensors(got["state_dict"], want["state_dict"], "state_dict")
    assert_same_tensors(got["ema_state_dict"], want["ema_state_dict"], "ema_state_dict")
    assert_same_optimizer(got["optimizer"], want["optimizer"])
    assert got["history"] == want["history"]
    assert json.loads((cut / "diffusion.json").read_text()) == json.loads((whole / "diffusion.json").read_text())
    assert got["runtime"] == want["runtime"] == {"device": "cpu", "precision": "bf16"}
    assert fp32["runtime"] == {"device": "cpu", "precision": "fp32"}
    assert any(not torch.equal(v, fp32["state_dict"][k]) for k, v in got["state_dict"].items()), "bf16 trained as fp32"


def diverging_params(repo: Path, tmp_path: Path, checkpoint_every: int) -> Path:
    raw = merge(yaml.safe_load((repo / "params.yaml").read_text()),
                {"diffusion": {"lr": 1e30, "checkpoint_every": checkpoint_every}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_diverging(repo: Path, tmp_path: Path, params: Path) -> subprocess.CompletedProcess:
    return cli("--params", str(params), "train-diffusion", "--ae-ckpt", "models/autoencoder.pt",
               "--latents", "data/latents", "--data", "data/prepared", "--out", str(tmp_path / "diffusion.pt"),
               "--metrics", str(tmp_path / "diffusion.json"), "--plots", str(tmp_path / "plots"), cwd=repo, check=False)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-3000:]
    return lines[-1]


def test_divergence_stops_with_one_line_and_keeps_the_resume_state(repo: Path, tmp_path: Path):
    """Adam at lr=1e30 blows the weights up after one step, so the second loss is not finite."""
    params, resume = diverging_params(repo, tmp_path, checkpoint_every=1), tmp_path / "diffusion.resume.pt"

    first = train_diverging(repo, tmp_path, params)
    assert first.returncode == 2, first.stderr[-3000:]
    line = last_line(first)
    assert re.fullmatch(rf"error: train_diffusion: loss became (nan|inf|-inf) at step 2 \(epoch 1\); training "
                        rf"stopped; last good checkpoint: {re.escape(str(resume))} \(left as it was\)", line), line
    assert load(resume)["step"] == 1
    before = (md5(resume), resume.stat().st_mtime_ns)

    second = train_diverging(repo, tmp_path, params)  # resumes from step 1 and diverges again
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"resuming from {resume} at step 1" in second.stderr
    assert "at step 2 (epoch 1)" in last_line(second) and str(resume) in last_line(second)
    assert (md5(resume), resume.stat().st_mtime_ns) == before
    assert not (tmp_path / "diffusion.pt").exists() and not (tmp_path / "diffusion.json").exists()


def test_divergence_before_any_checkpoint_says_so(repo: Path, tmp_path: Path):
    proc = train_diverging(repo, tmp_path, diverging_params(repo, tmp_path, checkpoint_every=5))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("error: train_diffusion: loss became") and "at step 2" in line, line
    assert line.endswith("last good checkpoint: none written yet"), line
    assert not list(tmp_path.glob("diffusion*.pt"))


def test_infer_is_deterministic_for_a_seed(repo: Path, reference: dict, tmp_path: Path):
    def infer(seed: int, name: str) -> dict[str, np.ndarray]:
        out = tmp_path / name
        cli("infer", "--ckpt", str(reference["ckpt"]), "--ae-ckpt", "models/autoencoder.pt", "--num-images", "24",
            "--sampler", "ddpm", "--seed", str(seed), "--output", str(out), cwd=repo)
        with np.load(out) as f:
            return {k: f[k] for k in f.files}

    a, b, c = infer(7, "a.npz"), infer(7, "b.npz"), infer(8, "c.npz")
    assert a.keys() == b.keys() == {"images"}
    assert a["images"].shape == (24, 28, 28) and a["images"].dtype == np.uint8
    assert np.array_equal(a["images"], b["images"])
    assert not np.array_equal(a["images"], c["images"]), "the seed has no effect"
