"""The pixel-space denoiser: a small convolutional U-Net on 28x28 images (about 150K parameters at the
default width), for `autoencoder.kind: none` + `diffusion.denoiser: unet`.

It takes and returns flat (B, 784) tensors, like the latent MLP, so the schedule, the losses, the samplers
and the pipeline are the same code for both. Levels 28 -> 14 -> 7 with widths (c, 2c, 2c); every residual
block is FiLM-conditioned on the timestep (scale and shift after its second GroupNorm, as in
improved-diffusion), and the label embedding of a conditional model is added to the timestep's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_ldm.data.images import PIXELS, SIDE
from mnist_ldm.diffusion.layers import Denoiser, DenoiserSpec


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class FiLMResBlock(nn.Module):
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
    """Predicts the noise in a (B, 784) image (standardized to [-1, 1]); the `Denoiser` call of the latent MLP."""

    def __init__(self, spec: DenoiserSpec):
        super().__init__()
        if spec.latent_dim != PIXELS:
            raise ValueError(f"the U-Net denoises {SIDE}x{SIDE} images ({PIXELS} values), not a "
                             f"{spec.latent_dim}-d latent")
        self.spec = spec
        c, E = spec.channels, 4 * spec.channels
        self.time_mlp = nn.Sequential(nn.Linear(c, E), nn.SiLU(), nn.Linear(E, E))
        self.label_emb = nn.Embedding(spec.num_classes + 1, E) if spec.num_classes else None
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = FiLMResBlock(c, c, E)                      # 28
        self.pool1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)   # 28 -> 14
        self.down2 = FiLMResBlock(2 * c, 2 * c, E)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)  # 14 -> 7
        self.down3 = FiLMResBlock(2 * c, 2 * c, E)
        self.mid = FiLMResBlock(2 * c, 2 * c, E)
        self.up2 = nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2)   # 7 -> 14 (the U-Net paper's 2x2 up-convolution)
        self.dec2 = FiLMResBlock(4 * c, 2 * c, E)               # with the 14x14 skip
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)       # 14 -> 28
        self.dec1 = FiLMResBlock(2 * c, c, E)                   # with the 28x28 skip
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))
        self.to(memory_format=torch.channels_last)  # oneDNN's fast layout on CPUs (1.3-1.7x here), cuDNN's with AMP

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, run: int = 1) -> torch.Tensor:
        """`run` (rows that share a timestep) is the MLP's shortcut; the U-Net embeds every row's t."""
        emb = self.embed(t, y, self.spec.channels)
        x = self.inp(z.reshape(-1, 1, SIDE, SIDE).contiguous(memory_format=torch.channels_last))
        h1 = self.down1(x, emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid(self.down3(self.pool2(h2), emb), emb)
        h = self.dec2(torch.cat([self.up2(h), h2], dim=1), emb)
        h = self.dec1(torch.cat([self.up1(h), h1], dim=1), emb)
        return self.out(h).reshape(-1, PIXELS)
