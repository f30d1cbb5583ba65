"""The reference design's sibling systems through the same stages: `dvc exp run -S` switches to the MLP autoencoder
and to pixel-space diffusion (pass-through autoencoder + U-Net), and `evaluate` scores each with its floors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import BIN, copy_trained, run
from mnist_ldm.io.checkpoint import load_checkpoint

VARIANTS = {
    "mlp-ae": ["autoencoder.kind=mlp"],
    "pixel": ["autoencoder.kind=none", "diffusion.denoiser=unet", "diffusion.unet_channels=8"],
}


def test_exp_run_switches_to_each_variant_and_evaluate_scores_it(trained_repo: Path, tmp_path: Path):
    repo = copy_trained(trained_repo, tmp_path / "repo")
    store = (repo / "mlflow.db").read_bytes()
    for name, sets in VARIANTS.items():  # MLflow off: it only adds time here, and must then write nothing
        sets = [*sets, "tracking.enabled=false"]
        # up to `evaluate` (package_model wraps the same checkpoints, whatever the variant)
        run([str(BIN / "dvc"), "exp", "run", "-q", "-n", name, *[a for s in sets for a in ("-S", s)], "evaluate"],
            repo)
        ae = load_checkpoint(repo / "models" / "autoencoder.pt", "mnist-ldm/autoencoder")
        den = load_checkpoint(repo / "models" / "diffusion.pt", "mnist-ldm/diffusion")
        fcd = json.loads((repo / "metrics" / "eval.json").read_text())["fcd"]
        assert np.isfinite([fcd["generated"], fcd["ae_reconstruction"], fcd["train_vs_test"]]).all()
        if name == "mlp-ae":
            assert ae["model_config"]["kind"] == "mlp" and den["model_config"]["arch"] == "mlp"
            assert den["model_config"]["latent_dim"] == 16
        else:  # pixel space: nothing to train in the autoencoder, its floor is the real images' own
            assert ae["model_config"]["kind"] == "none" and not ae["state_dict"]
            assert den["model_config"]["arch"] == "unet" and den["model_config"]["latent_dim"] == 784
            assert json.loads((repo / "metrics" / "autoencoder.json").read_text())["test_mse"] < 1e-9  # the identity
            stats = json.loads((repo / "data" / "latents" / "stats.json").read_text())
            assert set(stats["mean"]) == {0.5} and set(stats["std"]) == {0.5} and len(stats["mean"]) == 784
    assert (repo / "mlflow.db").read_bytes() == store
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], repo).stdout)
    exps = {e["name"]: e for row in shown for e in (row.get("experiments") or []) for e in [e["revs"][0]]
            if e.get("name")}
    assert set(VARIANTS) <= set(exps)
    for name in VARIANTS:
        data = exps[name]["data"]
        kind = data["params"]["params.yaml"]["data"]["autoencoder"]["kind"]
        assert kind == ("mlp" if name == "mlp-ae" else "none")
        assert np.isfinite(data["metrics"]["metrics/eval.json"]["data"]["fcd"]["generated"])
