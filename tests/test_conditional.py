"""One class-conditional model with classifier-free guidance, end to end on a shrunk pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BIN, cli, copy_trained, run, write_params
from mnist_ldm.io.checkpoint import save_checkpoint
from mnist_ldm.config.sections import ConfigError
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.hashing import file_md5
from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline


@pytest.fixture(scope="module")
def conditional_repo(trained_repo, tmp_path_factory):
    """The shared trained repository's copy with a class-conditional denoiser: `dvc repro sample` re-runs
    train_diffusion and sample only (tracking off)."""
    repo = copy_trained(trained_repo, tmp_path_factory.mktemp("cond") / "repo")
    write_params(repo, {"diffusion": {"conditional": True}, "tracking": {"enabled": False}})
    run([str(BIN / "dvc"), "repro", "sample"], repo)
    return repo


def test_checkpoint_records_conditioning_and_ema(conditional_repo):
    ckpt = torch.load(conditional_repo / "models/diffusion.pt", weights_only=True)
    assert ckpt["model_config"]["num_classes"] == 10
    assert ckpt["train_config"]["conditional"] is True
    assert ckpt["ema"]["updates"] == ckpt["step"] > 0
    assert ckpt["trained_on"]["autoencoder_md5"] == file_md5(conditional_repo / "models/autoencoder.pt")
    differs = [not torch.equal(ckpt["state_dict"][k], ckpt["ema_state_dict"][k]) for k in ckpt["state_dict"]]
    assert any(differs), "EMA weights should differ from the raw weights after training"


def test_sample_stage_writes_labels_and_a_guidance_sweep(conditional_repo):
    with np.load(conditional_repo / "outputs/samples.npz") as f:
        labels, images = f["labels"], f["images"]
    assert images.shape == (100, 28, 28) and labels.shape == (100,)
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10
    for name in ("grid.png", "trajectory.png", "interpolation.png", "guidance_sweep.png"):
        assert (conditional_repo / "plots/sample" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infer_digit_with_guidance(conditional_repo, tmp_path):
    out = tmp_path / "sevens.npz"
    cli("infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt", "--digit", "7",
        "--guidance", "3", "--num-images", "6", "--sampler", "ddim", "--steps", "5", "--output", str(out),
        cwd=conditional_repo)
    with np.load(out) as f:
        assert f["labels"].tolist() == [7] * 6 and f["images"].shape == (6, 28, 28)
    # Guidance changes the samples (same seed): w = 0 is the unconditional model.
    other = tmp_path / "w0.npz"
    cli("infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt", "--digit", "7",
        "--guidance", "0", "--num-images", "6", "--sampler", "ddim", "--steps", "5", "--output", str(other),
        cwd=conditional_repo)
    with np.load(out) as a, np.load(other) as b:
        assert not np.array_equal(a["images"], b["images"])


def _pipe(repo, use_ema: bool = True) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_checkpoints(repo / "models/diffusion.pt", repo / "models/autoencoder.pt",
                                                    use_ema=use_ema)


def test_raw_weights_differ_from_ema(conditional_repo):
    outs = []
    for use_ema in (True, False):
        pipe = _pipe(conditional_repo, use_ema)
        outs.append(pipe.sample_latents(4, sampler="ddim", steps=5, eta=0.0, seed=0, progress=False)[0])
    assert not torch.equal(*outs)


def test_pipeline_samples_every_digit_or_the_requested_one(conditional_repo):
    pipe = _pipe(conditional_repo)
    assert pipe.num_classes == 10 and pipe.latent_dim == 16
    every = pipe.sample(20, sampler="ddim", steps=5, eta=0.0, guidance=2.0, seed=0, progress=False)
    assert every.images.shape == (20, 28, 28) and every.images.dtype == np.uint8
    assert every.labels.dtype == np.uint8 and every.labels.tolist() == list(range(10)) * 2
    sevens = pipe.sample(5, sampler="ddim", steps=5, eta=0.0, guidance=2.0, digit=7, seed=0, progress=False)
    assert sevens.labels.tolist() == [7] * 5
    with pytest.raises(ConfigError, match="digit=10 is not allowed"):
        pipe.sample(2, digit=10, progress=False)
    sweep = pipe.guidance_sweep((0.0, 1.0, 3.0), steps=5)
    assert sweep.shape == (10 * 3, 28, 28) and sweep.dtype == np.uint8
    cells = sweep.reshape(10, 3, 28, 28)
    assert not np.array_equal(cells[7, 0], cells[7, 2])  # the guidance scale changes the digit drawn from one noise


def test_from_checkpoints_refuses_another_autoencoder(conditional_repo, tmp_path):
    """An autoencoder of the same shape but other weights (md5 differs from the one recorded at training)."""
    ckpt = torch.load(conditional_repo / "models/autoencoder.pt", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 0.01
    other = tmp_path / "other_autoencoder.pt"
    save_checkpoint(other, ckpt.pop("format"), {k: v for k, v in ckpt.items() if k != "format_version"})
    with pytest.raises(UserError) as info:
        LatentDiffusionPipeline.from_checkpoints(conditional_repo / "models/diffusion.pt", other)
    msg = str(info.value)
    assert "\n" not in msg and "latents of another autoencoder" in msg and str(other) in msg
    assert file_md5(other)[:12] in msg
    assert file_md5(conditional_repo / "models/autoencoder.pt")[:12] in msg  # the recorded one
    # a byte-identical copy elsewhere is the same autoencoder
    same = tmp_path / "copy.pt"
    same.write_bytes((conditional_repo / "models/autoencoder.pt").read_bytes())
    assert LatentDiffusionPipeline.from_checkpoints(conditional_repo / "models/diffusion.pt", same).latent_dim == 16
    # and the CLI says the same in one line, exit 2
    proc = cli("infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", str(other), "--num-images", "2",
               "--output", str(tmp_path / "x.npz"), cwd=conditional_repo, check=False)
    assert proc.returncode == 2 and "latents of another autoencoder" in proc.stderr
    assert not (tmp_path / "x.npz").exists()
