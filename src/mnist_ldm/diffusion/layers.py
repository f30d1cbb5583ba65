"""What the two denoising networks share: the `DenoiserSpec` they are built from, the sinusoidal timestep
embedding, and the `Denoiser` base class (the time and label embedding of one call, the "no label" token).

A denoiser takes x_t (B, D), timesteps (B,) and optional labels (B,) and predicts the noise in x_t, (B, D):
D is the latent size for the MLP of `denoiser.py` and the 784 pixels of a 28x28 image for the U-Net of
`unet.py`. A class-conditional network adds a label embedding to the time embedding; label index
`num_classes` is the "no label" token of classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_ldm.config.sections import DenoiserArch


@dataclass(frozen=True)
class DenoiserSpec:
    latent_dim: int = 16  # D: the latent size, or 784 when the network denoises pixels
    hidden_dim: int = 256
    num_blocks: int = 4
    num_classes: int = 0  # 0 = unconditional
    arch: str = "mlp"  # mlp (FiLM MLP, on latents) | unet (on 28x28 pixels)
    channels: int = 16  # unet only: the width of its first level (widths c, 2c, 2c)

    def __post_init__(self):
        if self.arch not in get_args(DenoiserArch):
            raise ValueError(f"denoiser {self.arch!r} is not one of {', '.join(get_args(DenoiserArch))}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserSpec":
        """Checkpoints written before the U-Net existed hold an MLP without `arch`."""
        ints = {k: int(d[k]) for k in ("latent_dim", "hidden_dim", "num_blocks", "num_classes")}
        return cls(**ints, arch=str(d.get("arch", "mlp")), channels=int(d.get("channels", 16)))


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


class Denoiser(nn.Module):
    """A noise-predicting network: `forward(x_t (B, D), t (B,), y (B,) or None, run=1)` -> eps (B, D).

    Subclasses set `spec`, `time_mlp` (sinusoidal timestep embedding -> the embedding their blocks are
    conditioned on) and `label_emb` (None for an unconditional network)."""

    spec: DenoiserSpec
    time_mlp: nn.Module
    label_emb: nn.Embedding | None

    @property
    def null_label(self) -> int:
        return self.spec.num_classes

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, time_dim: int) -> torch.Tensor:
        """The conditioning embedding of timesteps t and labels y (the "no label" token where y is None):
        (B, E), or (1, E) when the batch shares one timestep and label (`shared_step`)."""
        t, y = shared_step(t, y)
        emb = self.time_mlp(timestep_embedding(t, time_dim))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y if y is not None else torch.full_like(t, self.null_label))
        return emb
