"""A checkpoint is data, never code: pickles that would run a command on load are refused, and the
pipeline's own checkpoints hold only what `torch.load(weights_only=True)` accepts."""

from __future__ import annotations

import builtins
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli, copy_trained, merge, write_params


class Payload:
    """Unpickling this calls fn(arg): the classic pickle code-execution gadget."""

    def __init__(self, fn, arg: str):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def exec_payload(marker: Path) -> Payload:
    return Payload(builtins.exec, f"open({str(marker)!r}, 'w').write('x')")


def system_payload(marker: Path) -> Payload:
    return Payload(os.system, f"touch {shlex.quote(str(marker))}")


def _wrapped_in_checkpoint_dict(path: Path, marker: Path, real: dict) -> None:
    torch.save({"format": "mnist-ldm/diffusion", "format_version": 1, "state_dict": exec_payload(marker)}, path)


def _top_level_os_system(path: Path, marker: Path, real: dict) -> None:
    torch.save(system_payload(marker), path)


def _trojan_in_real_checkpoint(path: Path, marker: Path, real: dict) -> None:
    torch.save({**real, "notes": exec_payload(marker)}, path)


def _legacy_torch_format(path: Path, marker: Path, real: dict) -> None:
    torch.save({**real, "notes": exec_payload(marker)}, path, _use_new_zipfile_serialization=False)


def _plain_pickle(path: Path, marker: Path, real: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(exec_payload(marker), f, protocol=pickle.HIGHEST_PROTOCOL)


def _plain_pickle_protocol_0(path: Path, marker: Path, real: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(system_payload(marker), f, protocol=0)


# `mnist-ldm train-diffusion` on the repository's own inputs; each test names its own outputs
TRAIN_DIFFUSION = ["train-diffusion", "--ae-ckpt", "models/autoencoder.pt", "--latents", "data/latents",
                   "--data", "data/prepared"]

VARIANTS = {
    "checkpoint-dict-exec": _wrapped_in_checkpoint_dict,
    "top-level-os-system": _top_level_os_system,
    "trojan-in-real-checkpoint": _trojan_in_real_checkpoint,
    "legacy-torch-format": _legacy_torch_format,
    "plain-pickle": _plain_pickle,
    "plain-pickle-protocol-0": _plain_pickle_protocol_0,
}


@pytest.fixture(scope="module")
def repo(trained_repo, tmp_path_factory) -> Path:
    """A private copy of the shared trained repository (autoencoder, diffusion model, evaluator), with
    MLflow logging off for the commands run here (DVC is not used: no repro needed)."""
    repo = copy_trained(trained_repo, tmp_path_factory.mktemp("malicious") / "repo")
    write_params(repo, {"tracking": {"enabled": False}})
    return repo


@pytest.fixture(scope="module")
def real_diffusion(repo: Path) -> dict:
    return torch.load(repo / "models/diffusion.pt", map_location="cpu", weights_only=True)


def evil_file(tmp_path: Path, variant: str, real: dict) -> tuple[Path, Path]:
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    VARIANTS[variant](path, marker, real)
    assert not marker.exists()
    return path, marker


def assert_refused(proc, path: Path, marker: Path) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    context = "--- stderr (tail)\n" + "\n".join(lines[-10:])
    assert not marker.exists(), f"the payload ran\n{context}"
    assert proc.returncode == 2, context
    assert "Traceback" not in proc.stderr, context
    assert lines[-1].startswith(f"error: {path}: refused to load"), context
    assert sum(line.startswith("error:") for line in lines) == 1, context
    return lines[-1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_payload_is_live_when_unpickled_unsafely(variant: str, tmp_path: Path, real_diffusion: dict):
    """The files used below really do run code under a plain unpickler (so refusing them matters)."""
    path, marker = evil_file(tmp_path, variant, real_diffusion)
    with open(path, "rb") as f:
        try:
            torch.load(f, map_location="cpu", weights_only=False)
        except Exception:  # the plain pickles are not torch files; the payload has run by then
            pass
    assert marker.exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_infer_refuses_malicious_diffusion_checkpoint(variant: str, repo: Path, tmp_path: Path,
                                                     real_diffusion: dict):
    path, marker = evil_file(tmp_path, variant, real_diffusion)
    out = tmp_path / "digits.npz"
    proc = cli("infer", "--ckpt", str(path), "--ae-ckpt", "models/autoencoder.pt", "--num-images", "4",
               "--sampler", "ddim", "--steps", "2", "--output", str(out), cwd=repo, check=False)
    line = assert_refused(proc, path, marker)
    assert "exec" in line or "posix.system" in line or "Unsupported operand" in line, line
    assert not out.exists()


def test_infer_refuses_malicious_autoencoder_checkpoint(repo: Path, tmp_path: Path, real_diffusion: dict):
    path, marker = evil_file(tmp_path, "top-level-os-system", real_diffusion)
    proc = cli("infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", str(path), "--num-images", "4",
               "--sampler", "ddim", "--steps", "2", "--output", str(tmp_path / "digits.png"), cwd=repo, check=False)
    assert_refused(proc, path, marker)


def test_evaluate_refuses_malicious_evaluator_checkpoint(repo: Path, tmp_path: Path, real_diffusion: dict):
    path, marker = evil_file(tmp_path, "checkpoint-dict-exec", real_diffusion)
    samples = tmp_path / "samples.npz"
    cli("infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt", "--num-images", "40",
        "--sampler", "ddim", "--steps", "2", "--output", str(samples), cwd=repo)
    proc = cli("evaluate", "--samples", str(samples), "--evaluator", str(path), "--data", "data/prepared",
               "--ae-ckpt", "models/autoencoder.pt", "--latents", "data/latents", "--output",
               str(tmp_path / "eval.json"), "--plots", str(tmp_path / "plots"), "--no-tracking", cwd=repo, check=False)
    assert_refused(proc, path, marker)
    assert not (tmp_path / "eval.json").exists()


def test_malicious_resume_state_is_not_loaded(repo: Path, tmp_path: Path, real_diffusion: dict):
    """A planted resume file is refused with a warning; training starts from scratch and finishes."""
    out = tmp_path / "diffusion.pt"
    resume, marker = tmp_path / "diffusion.resume.pt", tmp_path / "pwned"
    _wrapped_in_checkpoint_dict(resume, marker, real_diffusion)
    proc = cli(*TRAIN_DIFFUSION, "--out", str(out), "--metrics", str(tmp_path / "diffusion.json"),
               "--plots", str(tmp_path / "plots"), cwd=repo)
    assert not marker.exists()
    warnings = [line for line in proc.stderr.splitlines() if "ignoring unusable resume state" in line]
    assert len(warnings) == 1 and f"{resume}: refused to load" in warnings[0], proc.stderr[-2000:]
    assert "resuming from" not in proc.stderr
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "mnist-ldm/diffusion"
    assert not resume.exists()


@pytest.mark.parametrize("name, kind", [("autoencoder.pt", "mnist-ldm/autoencoder"),
                                        ("diffusion.pt", "mnist-ldm/diffusion"),
                                        ("evaluator.pt", "mnist-ldm/evaluator")])
def test_pipeline_checkpoints_load_with_weights_only(repo: Path, name: str, kind: str):
    ckpt = torch.load(repo / "models" / name, map_location="cpu", weights_only=True)
    assert ckpt["format"] == kind and ckpt["format_version"] == 1
    assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


def test_resume_state_loads_with_weights_only(repo: Path, tmp_path: Path):
    """A real resume state: left behind by a run that diverges right after its first checkpoint."""
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()),
                   {"diffusion": {"lr": 1e30, "checkpoint_every": 1}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = cli("--params", str(tmp_path / "params.yaml"), *TRAIN_DIFFUSION, "--out", str(tmp_path / "diffusion.pt"),
               "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "plots"), cwd=repo, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    state = torch.load(tmp_path / "diffusion.resume.pt", map_location="cpu", weights_only=True)
    assert state["format"] == "mnist-ldm/resume" and state["step"] == 1
    assert {"model", "optimizer", "ema", "generator", "torch_rng"} <= set(state)
