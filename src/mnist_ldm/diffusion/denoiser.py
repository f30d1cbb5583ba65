"""The denoising networks, found by `diffusion.denoiser` in `DENOISERS` (a new one: its class and entry here, its
name in `config.sections.DenoiserArch`). `forward(x_t (B, D), t (B,), y (B,) or None, run=1)` -> eps (B, D), D the
latent size or the 784 pixels; label `num_classes` is classifier-free guidance's "no label"."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, TypeAdapter

from mnist_ldm.config.sections import DIGIT_CLASSES, DenoiserArch, Width
from mnist_ldm.data.images import PIXELS, SIDE


@dataclass(frozen=True)
class DenoiserSpec:
    latent_dim: Width = 16  # D: the latent size, or 784 when the network denoises pixels
    hidden_dim: Width = 256
    num_blocks: Annotated[int, Field(ge=1, le=64)] = 4
    num_classes: Annotated[int, Field(ge=0, le=DIGIT_CLASSES)] = 0  # 0 = unconditional
    arch: DenoiserArch = "mlp"  # a key of DENOISERS
    channels: Width = 16  # unet only: the width of its first level (widths c, 2c, 2c)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserSpec":
        """A checkpoint's `model_config`, checked (a ValidationError names the field)."""
        return TypeAdapter(cls).validate_python(d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim), as in the Transformer/DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


class Denoiser(nn.Module):
    """Subclasses set `spec`, `time_mlp` and `label_emb` (None when unconditional)."""

    spec: DenoiserSpec
    time_mlp: nn.Module
    label_emb: nn.Embedding | None

    @property
    def null_label(self) -> int:
        return self.spec.num_classes

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, time_dim: int) -> torch.Tensor:
        """(B, E); (1, E), computed once and broadcast, when the batch shares one timestep and label."""
        if len(t) > 1 and bool((t == t[0]).all()) and (y is None or bool((y == y[0]).all())):
            t, y = t[:1], (y[:1] if y is not None else None)
        emb = self.time_mlp(timestep_embedding(t, time_dim))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y if y is not None else torch.full_like(t, self.null_label))
        return emb


class FiLMLayer(nn.Module):
    """LayerNorm(h) -> (1 + gamma) * h + beta with gamma, beta = Linear(emb), then SiLU -> Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(emb).chunk(2, dim=-1)
        return self.out(F.silu((1 + gamma) * self.norm(h) + beta))


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.film1, self.film2 = FiLMLayer(hidden), FiLMLayer(hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.film2(self.film1(h, emb), emb)


class LatentDenoiser(Denoiser):
    """`mlp`: `num_blocks` FiLM residual blocks of width `hidden_dim` between projections from and to the latent."""

    def __init__(self, spec: DenoiserSpec):
        super().__init__()
        self.spec = spec
        H = spec.hidden_dim
        self.time_mlp = nn.Sequential(nn.Linear(H, H), nn.SiLU(), nn.Linear(H, H))
        self.label_emb = nn.Embedding(spec.num_classes + 1, H) if spec.num_classes else None
        self.in_proj = nn.Linear(spec.latent_dim, H)
        self.blocks = nn.ModuleList(ResidualBlock(H) for _ in range(spec.num_blocks))
        self.out_proj = nn.Linear(H, spec.latent_dim)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, run: int = 1) -> torch.Tensor:
        """`run` > 1: every `run` rows share their timestep (`diffusion.samples_per_timestep`), so the embedding
        and FiLM are computed once per run (unconditional models only)."""
        B, h = z.shape[0], self.in_proj(z)
        if run > 1 and self.label_emb is None:
            G = len(t[::run])
            emb = self.time_mlp(timestep_embedding(t[::run], self.spec.hidden_dim))[:, None]  # (G, 1, H)
            h = F.pad(h, (0, 0, 0, G * run - B)).view(G, run, -1)
        else:
            emb = self.embed(t, y, self.spec.hidden_dim)
        for block in self.blocks:
            h = block(h, emb)
        return self.out_proj(h.reshape(-1, h.shape[-1])[:B])  # (B, H), the padding rows of a run dropped


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class FiLMResBlock(nn.Module):
    """Residual conv block, FiLM-conditioned after its second GroupNorm (as in improved-diffusion)."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (improved-diffusion's zero init)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # (B or 1, cout, 1, 1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class UNetDenoiser(Denoiser):
    """`unet`: a small conv U-Net on 28x28 images in [-1, 1], levels 28 -> 14 -> 7 with widths (c, 2c, 2c)."""

    def __init__(self, spec: DenoiserSpec):
        super().__init__()
        self.spec = spec
        c, E = spec.channels, 4 * spec.channels
        self.time_mlp = nn.Sequential(nn.Linear(c, E), nn.SiLU(), nn.Linear(E, E))
        self.label_emb = nn.Embedding(spec.num_classes + 1, E) if spec.num_classes else None
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = FiLMResBlock(c, c, E)                           # 28
        self.pool1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)     # 28 -> 14
        self.down2 = FiLMResBlock(2 * c, 2 * c, E)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)  # 14 -> 7
        self.down3 = FiLMResBlock(2 * c, 2 * c, E)
        self.mid = FiLMResBlock(2 * c, 2 * c, E)
        self.up2 = nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2)     # 7 -> 14 (the U-Net paper's 2x2 up-convolution)
        self.dec2 = FiLMResBlock(4 * c, 2 * c, E)                    # with the 14x14 skip
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)         # 14 -> 28
        self.dec1 = FiLMResBlock(2 * c, c, E)                        # with the 28x28 skip
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))
        self.to(memory_format=torch.channels_last)  # oneDNN's fast layout on CPUs (1.3-1.7x here), cuDNN's with AMP

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, run: int = 1) -> torch.Tensor:
        emb = self.embed(t, y, self.spec.channels)
        x = self.inp(z.reshape(-1, 1, SIDE, SIDE).contiguous(memory_format=torch.channels_last))
        h1 = self.down1(x, emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid(self.down3(self.pool2(h2), emb), emb)
        h = self.dec2(torch.cat([self.up2(h), h2], dim=1), emb)
        h = self.dec1(torch.cat([self.up1(h), h1], dim=1), emb)
        return self.out(h).reshape(-1, PIXELS)


DENOISERS = {"mlp": LatentDenoiser, "unet": UNetDenoiser}


def build_denoiser(spec: DenoiserSpec) -> Denoiser:
    return DENOISERS[spec.arch](spec)
