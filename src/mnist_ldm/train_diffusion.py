"""Stage `train_diffusion`: the latent DDPM (epsilon prediction, MSE) on standardized cached latents."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import plots, tracking
from .atomic import write_json
from .checkpoint import save_checkpoint
from .config import DiffusionConfig, Params
from .data import load_meta, load_split
from .denoiser import DenoiserSpec, LatentDenoiser, count_parameters
from .diffusion import NoiseSchedule, q_sample
from .encode import encode_images, latent_stats, load_latents, load_stats
from .errors import UserError
from .sampling import decode_latents, generate_latents, preview_labels
from .train_ae import load_autoencoder
from .trainer import EMA, adam, fingerprint, resume_path_for, run_training

PREVIEW_GUIDANCE = 2.0  # guidance of the per-epoch MLflow preview grid (conditional models only)
PREVIEW_STEPS = 50  # DDIM steps of that preview: cheap enough to run every epoch


def standardize(z: np.ndarray, stats: dict) -> torch.Tensor:
    return (torch.from_numpy(z).double() - torch.tensor(stats["mean"])) .div(torch.tensor(stats["std"])).float()


def select_digit(z: np.ndarray, labels: np.ndarray, only_digit: Optional[int]):
    """The seed's --only-digit: keep one digit's latents (the autoencoder still saw every digit)."""
    if only_digit is None:
        return z, labels
    keep = labels == only_digit
    return z[keep], labels[keep]


def diffusion_loss(model: LatentDenoiser, s: NoiseSchedule, z0: torch.Tensor, y: Optional[torch.Tensor],
                   gen: torch.Generator, cond_drop_prob: float) -> torch.Tensor:
    """L_simple of Ho et al.: || eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t) ||^2."""
    B = z0.shape[0]
    t = torch.randint(0, s.T, (B,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    if y is not None:  # classifier-free guidance training: drop labels to the null token
        drop = torch.rand(B, generator=gen) < cond_drop_prob
        y = torch.where(drop, torch.full_like(y, model.null_label), y)
    return F.mse_loss(model(q_sample(s, z0, t, noise), t, y), noise)


@torch.no_grad()
def held_out_loss(model: LatentDenoiser, s: NoiseSchedule, z0: torch.Tensor, y: Optional[torch.Tensor]) -> float:
    """The same loss on held-out latents with fixed t and noise, so epochs are comparable."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    return diffusion_loss(model, s, z0, y, gen, 0.0).item()


def train_denoiser(cfg: DiffusionConfig, z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor,
                   y_test: torch.Tensor, resume_path: Path, data_hash: str, on_preview=None, run=None):
    torch.manual_seed(cfg.seed)
    spec = DenoiserSpec(cfg.latent_dim, cfg.hidden_dim, cfg.num_blocks, num_classes=10 if cfg.conditional else 0)
    model = LatentDenoiser(spec)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup_steps)
    optimizer = adam(model, cfg.lr)
    s = NoiseSchedule.linear(cfg.T, cfg.beta_start, cfg.beta_end)
    cond = cfg.conditional

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return diffusion_loss(model, s, z_train[idx], y_train[idx] if cond else None, gen, cfg.cond_drop_prob)

    def on_epoch_end(epoch: int, train_loss: float) -> dict:
        metrics = {"test_loss": held_out_loss(model, s, z_test, y_test if cond else None),
                   "test_loss_ema": held_out_loss(ema.model, s, z_test, y_test if cond else None),
                   "ema_decay": ema.current_decay()}
        if run is not None:
            run.log_metrics({"train_loss": train_loss, **metrics}, step=epoch)
        if on_preview is not None:
            on_preview(ema.model, s, epoch)
        return metrics

    history = run_training(model=model, optimizer=optimizer, loss_fn=loss_fn, n_items=len(z_train),
                           batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, resume_path=resume_path,
                           checkpoint_every=cfg.checkpoint_every, on_epoch_end=on_epoch_end, ema=ema,
                           desc="train_diffusion",
                           run_fingerprint=fingerprint("diffusion", dataclasses.asdict(cfg), data_hash))
    return model, ema, optimizer, s, history


def _latents(latent_dir: Optional[Path], data_dir: Path, ae):
    """Cached latents from the encode stage, or (CLI use without a cache) encoded here once."""
    if latent_dir is not None:
        z_tr, y_tr = load_latents(latent_dir, "train")
        z_te, y_te = load_latents(latent_dir, "test")
        return z_tr, y_tr, z_te, y_te, load_stats(latent_dir)
    tr, te = load_split(data_dir, "train"), load_split(data_dir, "test")
    z_tr = encode_images(ae, tr.images, desc="encode train")
    return z_tr, tr.labels, encode_images(ae, te.images, desc="encode test"), te.labels, latent_stats(z_tr)


def main(params: Params, ae_ckpt: Path, out: Path, metrics_path: Path, plots_dir: Path,
         latent_dir: Optional[Path], data_dir: Path) -> dict:
    cfg = params.diffusion
    ae, ae_meta = load_autoencoder(ae_ckpt)
    if ae.spec.latent_dim != cfg.latent_dim:
        raise UserError(f"diffusion.latent_dim={cfg.latent_dim} does not match the latent dim "
                        f"{ae.spec.latent_dim} of the autoencoder in {ae_ckpt}")
    meta = load_meta(data_dir)
    z_tr, y_tr, z_te, y_te, stats = _latents(latent_dir, data_dir, ae)
    if z_tr.shape[1] != cfg.latent_dim:
        raise UserError(f"{latent_dir}: cached latents have dim {z_tr.shape[1]}, expected {cfg.latent_dim}")
    z_tr, y_tr = select_digit(z_tr, y_tr, cfg.only_digit)
    z_te, y_te = select_digit(z_te, y_te, cfg.only_digit)
    ae_md5 = hashlib.md5(Path(ae_ckpt).read_bytes()).hexdigest()
    stage_params = {f"diffusion.{k}": v for k, v in dataclasses.asdict(cfg).items()}
    with tracking.stage_run("train_diffusion", params, stage_params, meta) as run:
        run.log_dataset(meta, "mnist-train-latents", "training", latent_dir or data_dir)

        def preview(model, s, epoch):
            if not cfg.generate_images or not run.logging:
                return
            labels = preview_labels(model, 64)
            z = generate_latents(model, s, 64, "ddim", min(PREVIEW_STEPS, s.T), 0.0, seed=epoch, labels=labels,
                                 guidance=PREVIEW_GUIDANCE, progress=False)
            run.log_image("samples", plots.grid_array(decode_latents(ae, z, stats), 8), epoch)

        model, ema, optimizer, s, history = train_denoiser(
            cfg, standardize(z_tr, stats), torch.from_numpy(y_tr).long(), standardize(z_te, stats),
            torch.from_numpy(y_te).long(), resume_path_for(out), f"{meta['content_hash']}:{ae_md5}", preview, run)
        final = {"train_loss": history[-1]["train_loss"], "test_loss": history[-1]["test_loss"],
                 "test_loss_ema": history[-1]["test_loss_ema"], "params": count_parameters(model),
                 "train_latents": int(len(z_tr))}
        save_checkpoint(out, "mnist-ldm/diffusion", {
            "model_config": model.spec.to_dict(),
            "state_dict": model.state_dict(),
            "ema_state_dict": ema.model.state_dict(),
            "ema": {"decay": cfg.ema_decay, "warmup_steps": cfg.ema_warmup_steps, "updates": ema.updates},
            "optimizer": optimizer.state_dict(),
            "step": ema.updates,
            "schedule": {"kind": "linear", "T": cfg.T, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end},
            "latent_stats": {"mean": stats["mean"], "std": stats["std"]},
            "train_config": dataclasses.asdict(cfg),
            "trained_on": {"data_source": meta["source"], "data_hash": meta["content_hash"],
                           "autoencoder_md5": ae_md5, "autoencoder_config": ae.spec.to_dict(),
                           "only_digit": cfg.only_digit, "latents": int(len(z_tr))},
            "history": history,
            "metrics": final,
        })
        resume_path_for(out).unlink(missing_ok=True)
        write_json(metrics_path, final)
        plots.save_figure(plots.line_chart(history, ["train_loss", "test_loss", "test_loss_ema"],
                                           "latent diffusion loss (MSE on noise)"), plots_dir / "loss.png")
        run.headline(final)
        for p in (plots_dir / "loss.png", metrics_path, out):
            run.log_artifact(p)
    print(f"train_diffusion: {final['params']:,}-parameter denoiser, held-out loss {final['test_loss']:.4f} "
          f"(EMA {final['test_loss_ema']:.4f}) -> {out}")
    return final
