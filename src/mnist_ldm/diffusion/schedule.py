"""Gaussian diffusion math (Ho et al. 2020, "DDPM"; Song et al. 2021, "DDIM"): the noise schedule, the forward
process, one step of each sampler and classifier-free guidance. Coefficients are float64, cast to the sample dtype
when used; timesteps are 0-based (t = 0 .. T-1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    betas: torch.Tensor  # (T,) float64; every field below is derived from it
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def linear(cls, T: int, beta_start: float, beta_end: float) -> "NoiseSchedule":
        """The linear schedule of Ho et al.: T betas from beta_start to beta_end."""
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)  # alpha-bar_t
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        return cls(betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=ac.sqrt(),
                   sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
                   posterior_variance=betas * (1.0 - ac_prev) / (1.0 - ac),  # beta-tilde_t, eq. (7)
                   posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
                   posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac))

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _at(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """coef[t] shaped to broadcast against x (B, ...), in x's dtype."""
    return coef.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), eq. (4)."""
    return _at(s.sqrt_alphas_cumprod, t, x0) * x0 + _at(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def draw_timesteps(T: int, batch: int, gen: torch.Generator, device, run: int = 1) -> torch.Tensor:
    """Training timesteps uniform on 0..T-1: independent (`run` = 1), or in runs of `run` rows sharing one, the
    runs evenly spaced from one uniform draw (the low-discrepancy sampler of Kingma et al. 2021)."""
    if run <= 1:
        return torch.randint(0, T, (batch,), generator=gen, device=device)
    runs = math.ceil(batch / run)
    u = torch.rand((), generator=gen, device=device)
    lattice = torch.remainder(u + torch.arange(runs, device=device) / runs, 1.0)
    return (lattice * T).long().clamp_(max=T - 1).repeat_interleave(run)[:batch]


def local_run(run: int, world: int) -> int:
    """Rows sharing a timestep in one process's strided shard of a batch drawn with `run` (else 1)."""
    return run // world if run % world == 0 else 1


def min_snr_weights(s: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loss weights min(SNR_t, gamma) / SNR_t (Hang et al. 2023, "min-SNR-gamma"); gamma <= 0: all 1 (L_simple)."""
    if gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    ac = s.alphas_cumprod[t]
    snr = ac / (1.0 - ac)
    return (snr.clamp(max=gamma) / snr).float()


def predict_x0(s: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 implied by x_t and predicted noise (eq. (4) solved for x_0). Not clipped: latents are unbounded."""
    return (xt - _at(s.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / _at(s.sqrt_alphas_cumprod, t, xt)


def q_posterior(s: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
    """Mean and variance of q(x_{t-1} | x_t, x_0), eqs. (6)-(7)."""
    mean = _at(s.posterior_mean_coef1, t, xt) * x0 + _at(s.posterior_mean_coef2, t, xt) * xt
    return mean, _at(s.posterior_variance, t, xt)


def ddpm_step(s: NoiseSchedule, eps: torch.Tensor, xt: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2, with sigma_t^2 = beta-tilde_t)."""
    tt = torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device)
    mean, var = q_posterior(s, predict_x0(s, xt, tt, eps), xt, tt)
    return mean + (var.sqrt() * noise if t > 0 else 0.0)  # no noise at the last step


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Descending timesteps with "trailing" spacing: always starts at T-1 (Lin et al. 2024, table 2)."""
    return sorted({int(round(T - i * T / steps)) - 1 for i in range(steps)}, reverse=True)


def ddim_sigma(s: NoiseSchedule, t: int, t_prev: int, eta: float) -> float:
    """sigma_t(eta) of DDIM eq. (16); eta = 1 with t_prev = t-1 is the DDPM posterior's."""
    ac = s.alphas_cumprod[t]
    ac_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    return float(eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).sqrt())


def ddim_step(s: NoiseSchedule, eps: torch.Tensor, xt: torch.Tensor, t: int, t_prev: int, eta: float,
              noise: Optional[torch.Tensor]) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (eq. (12)); t_prev = -1 means "to x_0"."""
    x0 = predict_x0(s, xt, torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device), eps)
    ac_prev = float(s.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    sigma = ddim_sigma(s, t, t_prev, eta)
    x_prev = ac_prev**0.5 * x0 + (1.0 - ac_prev - sigma**2) ** 0.5 * eps  # the direction pointing to x_t
    return x_prev + sigma * noise if (sigma > 0 and noise is not None) else x_prev


def ddim_invert_step(s: NoiseSchedule, eps: torch.Tensor, x: torch.Tensor, t_prev: int, t: int) -> torch.Tensor:
    """Deterministic DDIM run backwards, x_{t_prev} -> x_t, using eps predicted at (x_{t_prev}, t)."""
    ac_prev = float(s.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    ac = float(s.alphas_cumprod[t])
    x0 = (x - (1 - ac_prev) ** 0.5 * eps) / ac_prev**0.5
    return ac**0.5 * x0 + (1 - ac) ** 0.5 * eps


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor], guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u); w = 0 unconditional, 1 conditional."""
    if y is None or getattr(model, "label_emb", None) is None:
        return model(x, t)
    if guidance == 0.0:
        return model(x, t, torch.full_like(y, model.null_label))
    if guidance == 1.0:
        return model(x, t, y)
    null = torch.full_like(y, model.null_label)
    eps_u, eps_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, y])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)
