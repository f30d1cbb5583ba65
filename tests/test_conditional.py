"""One class-conditional model with classifier-free guidance, end to end on a shrunk pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BIN, cli, make_repo_copy, run


@pytest.fixture(scope="module")
def conditional_repo(tmp_path_factory):
    repo = make_repo_copy(tmp_path_factory.mktemp("cond") / "repo",
                          {"diffusion": {"conditional": True}, "tracking": {"enabled": False}})
    run([str(BIN / "dvc"), "repro", "sample"], repo)
    return repo


def test_checkpoint_records_conditioning_and_ema(conditional_repo):
    ckpt = torch.load(conditional_repo / "models/diffusion.pt", weights_only=True)
    assert ckpt["model_config"]["num_classes"] == 10
    assert ckpt["train_config"]["conditional"] is True
    assert ckpt["ema"]["updates"] == ckpt["step"] > 0
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


def test_raw_weights_differ_from_ema(conditional_repo):
    from mnist_ldm.sampling import generate_latents, load_diffusion

    outs = []
    for use_ema in (True, False):
        model, s, _ = load_diffusion(conditional_repo / "models/diffusion.pt", use_ema=use_ema)
        outs.append(generate_latents(model, s, 4, "ddim", 5, 0.0, seed=0, progress=False))
    assert not torch.equal(*outs)
