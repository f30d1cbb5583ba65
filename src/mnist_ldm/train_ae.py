"""Stage `train_ae`: the convolutional autoencoder, trained with BCE on every training digit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import plots, tracking
from .atomic import write_json
from .autoencoder import AutoencoderSpec, ConvAutoencoder
from .checkpoint import load_checkpoint, save_checkpoint, state_dict_mismatch
from .config import AutoencoderConfig, Params
from .data import Split, load_meta, load_split
from .denoiser import count_parameters
from .errors import UserError
from .trainer import adam, fingerprint, resume_path_for, run_training


def as_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1]."""
    return torch.as_tensor(images).float().div(255.0).unsqueeze(1)


@torch.no_grad()
def reconstruction_metrics(model: ConvAutoencoder, images: np.ndarray, batch_size: int = 1000) -> dict:
    model.eval()
    bce = mse = 0.0
    for i in range(0, len(images), batch_size):
        x = as_batch(images[i:i + batch_size])
        logits = model(x)
        bce += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
        mse += F.mse_loss(torch.sigmoid(logits), x, reduction="sum").item()
    n = len(images) * 28 * 28
    return {"test_bce": bce / n, "test_mse": mse / n}


@torch.no_grad()
def reconstructions(model: ConvAutoencoder, images: np.ndarray) -> torch.Tensor:
    """Rows of originals above their reconstructions: (2N, 1, 28, 28)."""
    model.eval()
    x = as_batch(images)
    return torch.cat([x, model.decode(model.encode(x))])


def train_autoencoder(cfg: AutoencoderConfig, train: Split, test: Split, resume_path: Path, data_hash: str,
                      run: Optional[tracking.StageRun] = None, generate_images: bool = False):
    torch.manual_seed(cfg.seed)
    model = ConvAutoencoder(AutoencoderSpec(latent_dim=cfg.latent_dim))
    optimizer = adam(model, cfg.lr)
    images = torch.from_numpy(train.images)

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = as_batch(images[idx])
        return F.binary_cross_entropy_with_logits(model(x), x)

    def on_epoch_end(epoch: int, train_loss: float) -> dict:
        metrics = reconstruction_metrics(model, test.images)
        if run is not None:
            run.log_metrics({"train_bce": train_loss, **metrics}, step=epoch)
            if generate_images and run.logging:
                run.log_image("reconstructions", plots.grid_array(reconstructions(model, test.images[:16]), 16), epoch)
        return metrics

    history = run_training(model=model, optimizer=optimizer, loss_fn=loss_fn, n_items=len(images),
                           batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, resume_path=resume_path,
                           checkpoint_every=cfg.checkpoint_every, on_epoch_end=on_epoch_end, desc="train_ae",
                           run_fingerprint=fingerprint("autoencoder", dataclasses.asdict(cfg), data_hash))
    return model, history


def load_autoencoder(path: str | Path) -> tuple[ConvAutoencoder, dict]:
    ckpt = load_checkpoint(path, "mnist-ldm/autoencoder", "autoencoder checkpoint")
    model = ConvAutoencoder(AutoencoderSpec.from_dict(ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model config it records ({state_dict_mismatch(e)})") from None
    return model.eval(), ckpt


def main(params: Params, data_dir: Path, out: Path, metrics_path: Path, plots_dir: Path,
         generate_images: bool = False) -> dict:
    cfg = params.autoencoder
    meta = load_meta(data_dir)
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    with tracking.stage_run("train_ae", params, {f"autoencoder.{k}": v for k, v in dataclasses.asdict(cfg).items()},
                            meta) as run:
        run.log_dataset(meta, "mnist-train", "training", data_dir)
        model, history = train_autoencoder(cfg, train, test, resume_path_for(out), meta["content_hash"], run,
                                           generate_images)
        final = {**reconstruction_metrics(model, test.images), "params": count_parameters(model)}
        save_checkpoint(out, "mnist-ldm/autoencoder", {
            "model_config": model.spec.to_dict(),
            "state_dict": model.state_dict(),
            "train_config": dataclasses.asdict(cfg),
            "trained_on": {k: meta[k] for k in ("source", "content_hash", "counts")},
            "history": history,
            "metrics": final,
        })
        resume_path_for(out).unlink(missing_ok=True)
        write_json(metrics_path, final)
        plots.save_grid(reconstructions(model, test.images[:32]), plots_dir / "reconstructions.png", nrow=32)
        plots.save_figure(plots.line_chart(history, ["train_loss", "test_bce"], "autoencoder BCE"),
                          plots_dir / "loss.png")
        run.headline(final)
        for p in (plots_dir / "reconstructions.png", plots_dir / "loss.png", metrics_path, data_dir / "meta.json", out):
            run.log_artifact(p)
    print(f"train_ae: test BCE {final['test_bce']:.4f}, MSE {final['test_mse']:.5f}, "
          f"{final['params']:,} parameters -> {out}")
    return final
