"""The latent-diffusion pipeline: autoencoder, denoiser, noise schedule and latent scaler in one object.

    pipe = LatentDiffusionPipeline.from_checkpoints("models/diffusion.pt", "models/autoencoder.pt")
    samples = pipe.sample(64, sampler="ddim", steps=50, eta=0.0, seed=0)   # samples.images: (64, 28, 28) uint8

A request's fields left out take the `sample` params' defaults (`config.sections.SamplingRequest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from pydantic import ValidationError

from mnist_ldm.autoencoder.model import Autoencoder, decode_latents, encode_images, load_autoencoder
from mnist_ldm.config.sections import ConfigError, DiffusionConfig, SamplingRequest, error_line, spec_from
from mnist_ldm.data.latents import LatentScaler
from mnist_ldm.diffusion.denoiser import DenoiserSpec, build_denoiser
from mnist_ldm.diffusion.samplers import SAMPLERS, sample_loop
from mnist_ldm.diffusion.schedule import NoiseSchedule, ddim_invert_step, ddim_timesteps, guided_eps
from mnist_ldm.io.checkpoint import load_model_checkpoint
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.hashing import file_md5
from mnist_ldm.runtime.device import CPU, Runtime
from mnist_ldm.runtime.progress import progress as progress_bar


@dataclass(frozen=True)
class Samples:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: Optional[np.ndarray] = None  # the requested digit of each image (conditional models), uint8
    trajectory: Optional[list[np.ndarray]] = None  # predicted x_0 of the first 10 samples, over time


class LatentDiffusionPipeline:
    def __init__(self, autoencoder: Autoencoder, denoiser: torch.nn.Module, schedule: NoiseSchedule,
                 scaler: LatentScaler):
        dims = {"autoencoder": autoencoder.spec.latent_dim, "denoiser": denoiser.spec.latent_dim,
                "latent statistics": scaler.dim}
        if len(set(dims.values())) != 1:
            raise UserError(f"latent sizes differ: {dims}")
        self.autoencoder, self.denoiser, self.schedule, self.scaler = autoencoder.eval(), denoiser.eval(), schedule, scaler
        self.source = ""  # the diffusion checkpoint's path, which a refused request names
        self.rt: Runtime = CPU

    def to(self, rt: Runtime) -> "LatentDiffusionPipeline":
        """Run on `rt`'s device and precision (the one call that places the whole pipeline)."""
        self.autoencoder.to(rt.device)
        self.denoiser.to(rt.device)
        self.schedule, self.rt = self.schedule.to(rt.device), rt
        return self

    @classmethod
    def from_checkpoints(cls, diffusion_ckpt: str | Path, ae_ckpt: str | Path, use_ema: bool = True):
        """Load both checkpoints (EMA or raw denoiser weights), refusing a diffusion model trained in another
        autoencoder's latent space."""
        denoiser, meta = load_model_checkpoint(diffusion_ckpt, "mnist-ldm/diffusion", "diffusion checkpoint",
                                               lambda cfg: build_denoiser(spec_from(DenoiserSpec, cfg)),
                                               weights="ema_state_dict" if use_ema else "state_dict")
        try:  # the `diffusion` params' own rules for T and the betas; the one kind of schedule there is
            sch = DiffusionConfig.model_validate({k: meta["schedule"][k] for k in ("T", "beta_start", "beta_end")},
                                                 strict=False)
            if meta["schedule"].get("kind", "linear") != "linear":
                raise TypeError(f"schedule.kind={meta['schedule']['kind']!r} is not allowed; expected linear")
        except (KeyError, TypeError, ValidationError) as e:
            why = error_line(e, model=DiffusionConfig) if isinstance(e, ValidationError) else e
            raise UserError(f"{diffusion_ckpt}: the noise schedule it records is unusable ({why})") from None
        ae, _ = load_autoencoder(ae_ckpt)
        recorded = meta["trained_on"].get("autoencoder_md5") if isinstance(meta.get("trained_on"), dict) else None
        actual = file_md5(ae_ckpt)
        if ae.spec.latent_dim != denoiser.spec.latent_dim or recorded != actual:
            raise UserError(f"{diffusion_ckpt} was trained on the latents of another autoencoder "
                            f"(md5 {str(recorded)[:12]}, {denoiser.spec.latent_dim}-d) than {ae_ckpt} "
                            f"(md5 {actual[:12]}, {ae.spec.latent_dim}-d); pass the autoencoder it was trained "
                            f"with, or retrain it (dvc repro train_diffusion)")
        pipe = cls(ae, denoiser, NoiseSchedule.linear(sch.T, sch.beta_start, sch.beta_end),
                   LatentScaler.from_dict(meta.get("latent_stats", {}), f"{diffusion_ckpt}: latent_stats"))
        pipe.source = str(diffusion_ckpt)
        return pipe

    @property
    def latent_dim(self) -> int:
        return self.denoiser.spec.latent_dim

    @property
    def num_classes(self) -> int:
        return self.denoiser.spec.num_classes

    def network_evals(self, sampler: str, steps: Optional[int]) -> int:
        return len(SAMPLERS[sampler](self.schedule, steps).timesteps)

    def check(self, request: SamplingRequest, given: Iterable[str] = ()) -> SamplingRequest:
        """`request`, if this model can serve it (`given`: the fields the user set); else a `RequestError`."""
        return request.checked(self.schedule.T, self.num_classes, self.source, given)

    def labels_for(self, n: int, digit: Optional[int]) -> Optional[torch.Tensor]:
        """The digit of each sample: `digit`, or 0-9 in turn for a conditional model; None if unconditional."""
        if not self.num_classes:
            return None
        return torch.full((n,), digit) if digit is not None else torch.arange(n) % 10

    @torch.no_grad()
    def sample_latents(self, n: int, *, sampler: str = "ddpm", steps: Optional[int] = None, eta: float = 1.0,
                       guidance: float = 1.0, labels: Optional[torch.Tensor] = None, seed: int = 0,
                       batch_size: int = 2500, progress: bool = True, trajectory_every: int = 0):
        """Standardized latents (n, D), and the first batch's predicted x_0 every `trajectory_every` evals."""
        rt = self.rt
        gen = rt.generator(seed)
        n_evals = self.network_evals(sampler, steps)
        labels = labels.to(rt.device) if labels is not None else None
        out, traj = [], []

        def eps(xt, t, y):
            with rt.autocast():
                return guided_eps(self.denoiser, xt, t, y, guidance).float()

        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn((b, self.latent_dim), generator=gen, device=rt.device)
            y = labels[start:start + b] if labels is not None else None
            loop = sample_loop(lambda xt, t, y=y: eps(xt, t, y), self.schedule, x, sampler, n_evals, eta, gen)
            for i, (_, x, x0) in enumerate(progress_bar(loop, total=n_evals, desc=f"sample {sampler}", unit="step",
                                                        leave=False, disable=not progress)):
                rt.tick()
                if trajectory_every and start == 0 and i % trajectory_every == 0:
                    traj.append(x0)
            out.append(x)
            if trajectory_every and start == 0:
                traj.append(x)
        z = torch.cat(out)
        if not torch.isfinite(z).all():
            raise UserError("sampling produced NaN or infinite latents; the diffusion checkpoint or the sampling "
                            "settings (guidance, eta) are unusable")
        return z, traj

    def sample(self, n: int, *, batch_size: int = 2500, progress: bool = True, trajectory_points: int = 0,
               **request: Any) -> Samples:
        """`generate` for the request these fields make (the others: the `sample` params' defaults)."""
        try:
            req = SamplingRequest(**request)
        except ValidationError as e:
            raise ConfigError(error_line(e, self.source, SamplingRequest)) from None
        return self.generate(n, self.check(req), batch_size=batch_size, progress=progress,
                             trajectory_points=trajectory_points)

    def generate(self, n: int, r: SamplingRequest, *, batch_size: int = 2500, progress: bool = True,
                 trajectory_points: int = 0) -> Samples:
        """n decoded digits for a request `check` returned, and the first 10's denoising at `trajectory_points`."""
        every = max(1, self.network_evals(r.sampler, r.steps) // trajectory_points) if trajectory_points else 0
        labels = self.labels_for(n, r.digit)
        z, traj = self.sample_latents(n, sampler=r.sampler, steps=r.steps, eta=r.eta, guidance=r.guidance,
                                      labels=labels, seed=r.seed, batch_size=batch_size, progress=progress,
                                      trajectory_every=every)
        return Samples(self.decode(z), labels.numpy().astype(np.uint8) if labels is not None else None,
                       [self.decode(x[:10]) for x in traj] if traj else None)

    @torch.no_grad()
    def decode(self, z_std: torch.Tensor) -> np.ndarray:
        """Standardized latents (N, D) -> uint8 images (N, 28, 28)."""
        return decode_latents(self.autoencoder, self.scaler.unstandardize(z_std.to(self.rt.device)),
                              precision=self.rt.precision)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, 28, 28) -> standardized latents (N, D), on the pipeline's device."""
        z = encode_images(self.autoencoder, images, precision=self.rt.precision)
        return self.scaler.standardize(z).to(self.rt.device)

    @torch.no_grad()
    def invert(self, z_std: torch.Tensor, steps: int = 50) -> torch.Tensor:
        """Deterministic DDIM run from clean latents to noise (unconditional branch)."""
        x, prev = z_std.to(self.rt.device), -1
        for t in ddim_timesteps(self.schedule.T, steps)[::-1]:  # ascending
            eps = self.denoiser(x, torch.full((len(x),), t, dtype=torch.long, device=x.device))
            x, prev = ddim_invert_step(self.schedule, eps, x, prev, t), t
        return x

    @torch.no_grad()
    def interpolate(self, z_a: torch.Tensor, z_b: torch.Tensor, points: int = 10, steps: int = 50) -> np.ndarray:
        """Rows: pairs (z_a[i], z_b[i]); columns: their DDIM-inverted noise slerped and sampled back."""
        steps = min(steps, self.schedule.T)
        xa, xb = self.invert(z_a, steps), self.invert(z_b, steps)
        rows = []
        for w in np.linspace(0, 1, points):
            for _, x, _ in sample_loop(self.denoiser, self.schedule, slerp(xa, xb, float(w)), "ddim", steps, 0.0):
                pass
            rows.append(x)
        return self.decode(torch.stack(rows, 1).reshape(-1, self.latent_dim))

    @torch.no_grad()
    def guidance_sweep(self, scales: tuple[float, ...], steps: int = 50, seed: int = 0) -> np.ndarray:
        """Rows: digits 0-9; columns: guidance scales; the same noise along a row. (10 * len(scales), 28, 28)."""
        steps = min(steps, self.schedule.T)
        cells = [self.sample_latents(1, sampler="ddim", steps=steps, eta=0.0, guidance=w, seed=seed + digit,
                                     labels=torch.full((1,), digit), progress=False)[0]
                 for digit in range(10) for w in scales]
        return self.decode(torch.cat(cells))


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between Gaussian noise vectors (keeps their norm typical)."""
    omega = torch.arccos((a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)))
    so = torch.sin(omega)
    return torch.sin((1 - w) * omega) / so * a + torch.sin(w * omega) / so * b
