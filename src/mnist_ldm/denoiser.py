"""The seed's LatentDenoiser: an MLP of FiLM residual blocks that predicts the noise in a latent
(`diffusion.denoiser: mlp`); `build_denoiser` also makes the pixel-space U-Net of `unet.py` (`unet`).

Optionally class-conditional: a label embedding is added to the time embedding; label index
`num_classes` is the "no label" token used for classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DENOISERS


@dataclass(frozen=True)
class DenoiserSpec:
    latent_dim: int = 16
    hidden_dim: int = 256
    num_blocks: int = 4
    num_classes: int = 0  # 0 = unconditional (the seed's model)
    arch: str = "mlp"  # mlp (the seed's, on latents) | unet (on 28x28 pixels)
    channels: int = 16  # unet only: the width of its first level (widths c, 2c, 2c)

    def __post_init__(self):
        if self.arch not in DENOISERS:
            raise ValueError(f"denoiser {self.arch!r} is not one of {', '.join(DENOISERS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserSpec":
        """Checkpoints written before the U-Net existed hold an MLP without `arch`."""
        ints = {k: int(d[k]) for k in ("latent_dim", "hidden_dim", "num_blocks", "num_classes")}
        return cls(**ints, arch=str(d.get("arch", "mlp")), channels=int(d.get("channels", 16)))


def build_denoiser(spec: DenoiserSpec) -> nn.Module:
    """The network `spec.arch` names; both take (B, D) inputs, (B,) timesteps and optional (B,) labels."""
    if spec.arch == "unet":
        from .unet import UNetDenoiser  # unet.py imports this module's helpers

        return UNetDenoiser(spec)
    return LatentDenoiser(spec)


def shared_step(t: torch.Tensor, y: torch.Tensor | None):
    """One timestep (and label) for the whole batch, as in sampling: keep one copy, so the embedding is
    computed once and its FiLM scale/shift broadcast, which skips most of the multiply-adds."""
    if len(t) > 1 and bool((t == t[0]).all()) and (y is None or bool((y == y[0]).all())):
        return t[:1], (y[:1] if y is not None else None)
    return t, y


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim), as in the Transformer/DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class FiLMLayer(nn.Module):
    """LayerNorm(h) -> (1 + gamma) * h + beta with gamma, beta = Linear(emb) -> SiLU -> Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(emb).chunk(2, dim=-1)  # (B, H) each
        h = (1 + gamma) * self.norm(h) + beta
        return self.out(F.silu(h))


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.film1 = FiLMLayer(hidden)
        self.film2 = FiLMLayer(hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.film2(self.film1(h, emb), emb)


class LatentDenoiser(nn.Module):
    def __init__(self, spec: DenoiserSpec):
        super().__init__()
        self.spec = spec
        H = spec.hidden_dim
        self.time_mlp = nn.Sequential(nn.Linear(H, H), nn.SiLU(), nn.Linear(H, H))
        self.label_emb = nn.Embedding(spec.num_classes + 1, H) if spec.num_classes else None
        self.in_proj = nn.Linear(spec.latent_dim, H)
        self.blocks = nn.ModuleList(ResidualBlock(H) for _ in range(spec.num_blocks))
        self.out_proj = nn.Linear(H, spec.latent_dim)

    @property
    def null_label(self) -> int:
        return self.spec.num_classes

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, run: int = 1) -> torch.Tensor:
        """z (B, latent), t (B,) long, y (B,) long or None -> predicted noise (B, latent).

        `run` > 1 says that every `run` consecutive rows share their timestep (the last run may be shorter), as
        `diffusion.samples_per_timestep` draws them in training: the time embedding and the FiLM scale and shift,
        about two thirds of the multiply-adds, are then computed once per run. The result is the same as with
        `run` = 1. Conditional models take the per-row path (their labels differ within a run)."""
        if run > 1 and self.label_emb is None:
            return self._forward_runs(z, t[::run], run)
        t, y = shared_step(t, y)
        emb = self.time_mlp(timestep_embedding(t, self.spec.hidden_dim))  # (B, H) or (1, H)
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.null_label)
            emb = emb + self.label_emb(y)
        h = self.in_proj(z)  # (B, H)
        for block in self.blocks:
            h = block(h, emb)
        return self.out_proj(h)

    def _forward_runs(self, z: torch.Tensor, t_runs: torch.Tensor, run: int) -> torch.Tensor:
        B, G = z.shape[0], t_runs.shape[0]
        emb = self.time_mlp(timestep_embedding(t_runs, self.spec.hidden_dim))[:, None]  # (G, 1, H)
        h = self.in_proj(z)
        if G * run != B:  # a shorter last run: padded with zero rows (every row is computed on its own), dropped below
            h = F.pad(h, (0, 0, 0, G * run - B))
        h = h.view(G, run, -1)  # (G, run, H): each run's FiLM broadcast over its rows
        for block in self.blocks:
            h = block(h, emb)
        return self.out_proj(h.reshape(G * run, -1)[:B])

