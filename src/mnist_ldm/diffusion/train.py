"""Training the denoiser: DDPM's L_simple (MSE on the noise) on standardized latents (or pixels), with EMA."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mnist_ldm.config.sections import DIGIT_CLASSES, DiffusionConfig
from mnist_ldm.diffusion.denoiser import Denoiser, DenoiserSpec, build_denoiser
from mnist_ldm.diffusion.schedule import NoiseSchedule, draw_timesteps, local_run, min_snr_weights, q_sample
from mnist_ldm.runtime.device import CPU, Dist, Runtime, autocast
from mnist_ldm.runtime.loop import EMA, EPOCH_TEST_ITEMS, adam, fingerprint, run_training, total_steps


def select_digit(z: np.ndarray, labels: np.ndarray, only_digit: Optional[int]):
    """`diffusion.only_digit`: keep one digit's rows."""
    keep = labels == only_digit
    return (z, labels) if only_digit is None else (z[keep], labels[keep])


def diffusion_loss(model: torch.nn.Module, s: NoiseSchedule, z0: torch.Tensor, gen: torch.Generator, *,
                   y: Optional[torch.Tensor] = None, cond_drop_prob: float = 0.0, null_label: int = -1,
                   min_snr_gamma: float = 0.0, run: int = 1, dist: Dist = Dist()) -> torch.Tensor:
    """L_simple of Ho et al. on `z0` (B, D) (min-SNR weighted when `min_snr_gamma` > 0), labels dropped to
    `null_label` with probability `cond_drop_prob`. Drawn for the whole batch, then sharded: the same global batch
    at any process count."""
    B, dev = z0.shape[0], z0.device
    t = draw_timesteps(s.T, B, gen, dev, run)
    noise = torch.randn(z0.shape, generator=gen, device=dev)
    if y is not None:
        drop = torch.rand(B, generator=gen, device=dev) < cond_drop_prob
        y = dist.shard(torch.where(drop, torch.full_like(y, null_label), y))
    z0, t, noise = dist.shard(z0), dist.shard(t), dist.shard(noise)
    pred = model(q_sample(s, z0, t, noise), t, y, run=local_run(run, dist.world)).float()  # an fp32 loss
    if min_snr_gamma <= 0:
        return F.mse_loss(pred, noise)
    return (min_snr_weights(s, t, min_snr_gamma) * (pred - noise).pow(2).mean(dim=1)).mean()


@torch.no_grad()
def held_out_loss(model: Denoiser, s: NoiseSchedule, z0: torch.Tensor, y: Optional[torch.Tensor],
                  precision: str = "fp32") -> float:
    """The loss on held-out latents with fixed t and noise (epochs compare), in chunks of about 2M values."""
    model.eval()
    gen = torch.Generator(device=z0.device).manual_seed(1234)
    rows = max(1, 2_000_000 // z0.shape[1])
    total = 0.0
    for i in range(0, len(z0), rows):
        with autocast(z0.device, precision):
            loss = diffusion_loss(model, s, z0[i:i + rows], gen, y=y[i:i + rows] if y is not None else None,
                                  null_label=model.null_label)
        total += loss.item() * len(z0[i:i + rows])
    return total / len(z0)


def train_denoiser(cfg: DiffusionConfig, z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor,
                   y_test: torch.Tensor, resume_path: Path, data_hash: str,
                   on_epoch: Optional[Callable[[int, dict, dict], None]] = None,
                   preview: Optional[Callable[[Denoiser, NoiseSchedule, int], np.ndarray]] = None, rt: Runtime = CPU):
    """Model, EMA, optimizer, schedule and history; `on_epoch` gets each epoch's figures and `preview`'s grid."""
    torch.manual_seed(cfg.seed)
    spec = DenoiserSpec(z_train.shape[1], cfg.hidden_dim, cfg.num_blocks, DIGIT_CLASSES if cfg.conditional else 0,
                        cfg.denoiser, cfg.unet_channels)
    model = build_denoiser(spec).to(rt.device)
    net = rt.wrap(model)
    steps = total_steps(len(z_train), cfg.batch_size, cfg.epochs)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup_steps, max_horizon=cfg.ema_max_fraction * steps)
    optimizer = adam(model, cfg.lr)
    s = NoiseSchedule.linear(cfg.T, cfg.beta_start, cfg.beta_end).to(rt.device)
    cond, run = cfg.conditional, min(cfg.samples_per_timestep, cfg.batch_size)  # a longer run pads every batch
    if run < cfg.samples_per_timestep:
        print(f"warning: diffusion.samples_per_timestep={cfg.samples_per_timestep} is more than diffusion.batch_size="
              f"{cfg.batch_size}: every batch shares one timestep, as with {run}", file=sys.stderr)
    z_train, y_train, z_test, y_test = (t.to(rt.device) for t in (z_train, y_train, z_test, y_test))

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return diffusion_loss(net, s, z_train[idx], gen, y=y_train[idx] if cond else None,
                              cond_drop_prob=cfg.cond_drop_prob, null_label=model.null_label,
                              min_snr_gamma=cfg.min_snr_gamma, run=run, dist=rt.dist)

    z_epoch, y_epoch = z_test[:EPOCH_TEST_ITEMS], (y_test[:EPOCH_TEST_ITEMS] if cond else None)

    def on_epoch_end(epoch: int, train_loss: float) -> dict:
        metrics = {"test_loss": held_out_loss(model, s, z_epoch, y_epoch, rt.precision),
                   "test_loss_ema": held_out_loss(ema.model, s, z_epoch, y_epoch, rt.precision),
                   "ema_decay": ema.current_decay()}
        if on_epoch is not None:
            grids = {"samples": preview(ema.model, s, epoch)} if preview is not None else {}
            on_epoch(epoch, {"train_loss": train_loss, **metrics}, grids)
        return metrics

    history = run_training(model=model, optimizer=optimizer, loss_fn=loss_fn, n_items=len(z_train),
                           batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, resume_path=resume_path,
                           checkpoint_every=cfg.checkpoint_every, on_epoch_end=on_epoch_end, ema=ema,
                           lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                           desc="train_diffusion", rt=rt, run_fingerprint=fingerprint(
                               "diffusion", cfg.model_dump(exclude={"generate_images"}), data_hash))
    return model, ema, optimizer, s, history
