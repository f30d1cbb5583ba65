"""Stage `sample` and the `infer` command: latents from the diffusion model, decoded into digits.

The stage writes the samples that `evaluate` scores (`.npz`), a grid, a denoising trajectory, a
latent interpolation and, for a class-conditional model, a guidance sweep.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import plots, tracking
from .atomic import write_json, write_npz
from .config import Params, SampleConfig
from .diffusion import NoiseSchedule, ddim_invert_step, ddim_timesteps
from .encode import load_latents
from .errors import UserError
from .sampling import check_pair, decode_latents, generate_latents, load_diffusion
from .train_ae import load_autoencoder

GUIDANCE_SWEEP = (0.0, 1.0, 2.0, 4.0)


def sample_images(cfg: SampleConfig, ckpt: Path, ae_ckpt: Path, n: int, trajectory_points: int = 0):
    """Images (n, 28, 28) uint8, their requested labels (or None) and, optionally, the predicted x_0 of
    the first 10 samples at about `trajectory_points` moments of the denoising."""
    model, s, meta = load_diffusion(ckpt, use_ema=cfg.use_ema)
    n_evals = s.T if cfg.sampler == "ddpm" else cfg.steps
    trajectory_every = max(1, n_evals // trajectory_points) if trajectory_points else 0
    if cfg.sampler == "ddim" and cfg.steps > s.T:
        raise UserError(f"--steps/sample.steps={cfg.steps} is more than the T={s.T} diffusion steps of the model in "
                        f"{ckpt}; use at most {s.T}")
    ae, _ = load_autoencoder(ae_ckpt)
    check_pair(meta, ae, ckpt, ae_ckpt)
    labels = None
    if model.spec.num_classes:
        labels = torch.full((n,), cfg.digit) if cfg.digit is not None else torch.arange(n) % 10
    elif cfg.digit is not None:
        raise UserError(f"{ckpt}: --digit/sample.digit={cfg.digit} needs a class-conditional model, and this one is "
                        f"unconditional (train with diffusion.conditional=true, or use diffusion.only_digit)")
    res = generate_latents(model, s, n, cfg.sampler, cfg.steps, cfg.eta, cfg.seed, labels, cfg.guidance,
                           cfg.batch_size, trajectory_every=trajectory_every)
    z, traj = res if trajectory_every else (res, None)
    stats = meta["latent_stats"]
    images = decode_latents(ae, z, stats)
    traj_images = [decode_latents(ae, x[:10], stats) for x in traj] if traj else None
    return images, (labels.numpy().astype(np.uint8) if labels is not None else None), traj_images, (model, s, ae, stats)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between Gaussian noise vectors (keeps their norm typical)."""
    omega = torch.arccos((a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)))
    so = torch.sin(omega)
    return torch.sin((1 - w) * omega) / so * a + torch.sin(w * omega) / so * b


@torch.no_grad()
def ddim_invert(model, s: NoiseSchedule, z0: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM run from clean latents to noise (unconditional branch)."""
    ts = ddim_timesteps(s.T, steps)[::-1]  # ascending
    x, prev = z0, -1
    for t in ts:
        x = ddim_invert_step(s, model(x, torch.full((len(x),), t, dtype=torch.long)), x, prev, t)
        prev = t
    return x


@torch.no_grad()
def interpolation_grid(model, s, ae, stats, z_test_std: torch.Tensor, pairs: int = 6, points: int = 10,
                       steps: int = 50) -> np.ndarray:
    """Rows: pairs of test digits; columns: DDIM-inverted noise slerped from one to the other, decoded."""
    from .diffusion import sample_loop

    a, b = z_test_std[:pairs], z_test_std[pairs:2 * pairs]
    xa, xb = ddim_invert(model, s, a, steps), ddim_invert(model, s, b, steps)
    rows = []
    for w in np.linspace(0, 1, points):
        x = slerp(xa, xb, float(w))
        for _, x, _ in sample_loop(lambda xt, t: model(xt, t), s, x, "ddim", steps, 0.0):
            pass
        rows.append(x)
    z = torch.stack(rows, 1).reshape(-1, a.shape[1])  # (pairs * points, D), row-major by pair
    return decode_latents(ae, z, stats)


@torch.no_grad()
def guidance_sweep(model, s, ae, stats, scales=GUIDANCE_SWEEP, per_cell: int = 1, steps: int = 50, seed: int = 0):
    """Rows: digits 0-9; columns: guidance scales; the same noise along a row."""
    cells = []
    for digit in range(10):
        for w in scales:
            z = generate_latents(model, s, per_cell, "ddim", steps, 0.0, seed + digit,
                                 torch.full((per_cell,), digit), w, progress=False)
            cells.append(z)
    return decode_latents(ae, torch.cat(cells), stats)


def main(params: Params, ckpt: Path, ae_ckpt: Path, latent_dir: Path, out: Path, plots_dir: Path,
         metrics_path: Path) -> dict:
    cfg = params.sample
    z_test, _ = load_latents(latent_dir, "test")  # the reference set's size, and digits to interpolate
    if cfg.num_images == 0:  # as many as the test set, the reference that `evaluate` compares with
        cfg = dataclasses.replace(cfg, num_images=len(z_test))
    stage_params = {f"sample.{k}": v for k, v in dataclasses.asdict(cfg).items()}
    with tracking.stage_run("sample", params, stage_params) as run:
        t0 = time.perf_counter()
        images, labels, traj, (model, s, ae, stats) = sample_images(cfg, ckpt, ae_ckpt, cfg.num_images,
                                                                    trajectory_points=10)
        n_evals = s.T if cfg.sampler == "ddpm" else cfg.steps
        seconds = time.perf_counter() - t0
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        write_npz(out, **arrays)
        nrow = int(math.sqrt(cfg.grid_size)) or 1
        plots.save_grid(images[:cfg.grid_size], plots_dir / "grid.png", nrow=nrow)
        strip = np.stack(traj, 1).reshape(-1, 28, 28)  # rows: samples, columns: time
        plots.save_grid(strip, plots_dir / "trajectory.png", nrow=len(traj))
        z_test_std = (torch.from_numpy(z_test) - torch.tensor(stats["mean"]).float()) / torch.tensor(stats["std"]).float()
        plots.save_grid(interpolation_grid(model, s, ae, stats, z_test_std), plots_dir / "interpolation.png", nrow=10)
        if model.spec.num_classes:
            plots.save_grid(guidance_sweep(model, s, ae, stats), plots_dir / "guidance_sweep.png",
                            nrow=len(GUIDANCE_SWEEP))
        summary = {"num_images": int(len(images)), "sampler": cfg.sampler, "network_evals": int(n_evals),
                   "seconds": round(seconds, 2), "images_per_second": round(len(images) / seconds, 1)}
        write_json(metrics_path, summary)
        run.headline({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_image("samples", plots.grid_array(images[:64], 8), 0)
        for p in sorted(plots_dir.glob("*.png")) + [metrics_path]:
            run.log_artifact(p)
    print(f"sample: {len(images)} images with {cfg.sampler} ({n_evals} network evaluations) in {seconds:.1f} s -> {out}")
    return summary


def infer(cfg: SampleConfig, ckpt: Path, ae_ckpt: Path, output: Path) -> Path:
    """The seed's infer.py: `.png` writes a grid, `.npz` writes `images` (N, 28, 28) uint8 (+ `labels`)."""
    suffix = output.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise UserError(f"--output {output}: unsupported file type '{output.suffix}'; use .png (a grid) or .npz (arrays)")
    images, labels, _, _ = sample_images(cfg, ckpt, ae_ckpt, cfg.num_images)
    if suffix == ".npz":
        write_npz(output, **({"images": images} if labels is None else {"images": images, "labels": labels}))
    else:
        plots.save_grid(images, output, nrow=max(1, int(math.ceil(math.sqrt(len(images))))))
    print(f"infer: {len(images)} images ({cfg.sampler}, seed {cfg.seed}) -> {output}")
    return output
