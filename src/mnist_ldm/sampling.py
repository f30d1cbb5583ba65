"""Turning a trained denoiser into images: load, sample latents (DDPM or DDIM, with guidance), decode."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .autoencoder import ConvAutoencoder
from .checkpoint import load_checkpoint, state_dict_mismatch
from .denoiser import DenoiserSpec, LatentDenoiser
from .diffusion import NoiseSchedule, guided_eps, sample_loop
from .errors import UserError
from .trainer import progress as progress_bar


def load_diffusion(path: str | Path, use_ema: bool = True) -> tuple[LatentDenoiser, NoiseSchedule, dict]:
    ckpt = load_checkpoint(path, "mnist-ldm/diffusion", "diffusion checkpoint")
    model = LatentDenoiser(DenoiserSpec.from_dict(ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["ema_state_dict"] if use_ema else ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model config it records ({state_dict_mismatch(e)})") from None
    sch = ckpt["schedule"]
    return model.eval(), NoiseSchedule.linear(sch["T"], sch["beta_start"], sch["beta_end"]), ckpt


def check_pair(diffusion_ckpt: dict, ae: ConvAutoencoder, ckpt_path, ae_path) -> None:
    """The diffusion model must have been trained in this autoencoder's latent space."""
    want = diffusion_ckpt["model_config"]["latent_dim"]
    if ae.spec.latent_dim != want:
        raise UserError(f"{ae_path}: autoencoder latent dim {ae.spec.latent_dim} does not match the diffusion "
                        f"model in {ckpt_path}, which works on {want}-d latents")


def preview_labels(model: LatentDenoiser, n: int) -> Optional[torch.Tensor]:
    """Digits 0-9 in turn for a conditional model (so a grid shows every class), else None."""
    return torch.arange(n) % 10 if model.spec.num_classes else None


@torch.no_grad()
def generate_latents(model: LatentDenoiser, s: NoiseSchedule, n: int, sampler: str, steps: int, eta: float,
                     seed: int, labels: Optional[torch.Tensor] = None, guidance: float = 1.0,
                     batch_size: int = 2500, progress: bool = True, trajectory_every: int = 0):
    """Standardized latents (n, D); with trajectory_every > 0 also the predicted x_0 every k evaluations."""
    if labels is not None and model.spec.num_classes == 0:
        raise UserError("a digit was requested, but this diffusion model is unconditional "
                        "(train with diffusion.conditional=true, or use diffusion.only_digit)")
    gen = torch.Generator().manual_seed(seed)
    out, traj = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn((b, model.spec.latent_dim), generator=gen)
        y = labels[start:start + b] if labels is not None else None
        loop = sample_loop(lambda xt, t: guided_eps(model, xt, t, y, guidance), s, x, sampler, steps, eta, gen)
        n_evals = s.T if sampler == "ddpm" else steps
        for i, (t, x, x0) in enumerate(progress_bar(loop, total=n_evals, desc=f"sample {sampler}", unit="step",
                                                leave=False, disable=not progress)):
            if trajectory_every and start == 0 and (i % trajectory_every == 0):
                traj.append(x0)
        out.append(x)
        if trajectory_every and start == 0:
            traj.append(x)
    z = torch.cat(out)
    return (z, traj) if trajectory_every else z


@torch.no_grad()
def decode_latents(ae: ConvAutoencoder, z_std: torch.Tensor, stats: dict, batch_size: int = 5000) -> np.ndarray:
    """Un-standardize and decode: (N, D) -> uint8 images (N, 28, 28)."""
    mean = torch.tensor(stats["mean"], dtype=torch.float32)
    std = torch.tensor(stats["std"], dtype=torch.float32)
    ims = [ae.decode(z_std[i:i + batch_size] * std + mean) for i in range(0, len(z_std), batch_size)]
    return (torch.cat(ims)[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
