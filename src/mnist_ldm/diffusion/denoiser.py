"""The latent denoiser (`diffusion.denoiser: mlp`): an MLP of FiLM residual blocks that predicts the noise
in a latent, and `build_denoiser`, which makes the network a `DenoiserSpec` names: this MLP or the
pixel-space U-Net of `unet.py` (`unet`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_ldm.diffusion.layers import Denoiser, DenoiserSpec, timestep_embedding
from mnist_ldm.diffusion.unet import UNetDenoiser


def build_denoiser(spec: DenoiserSpec) -> Denoiser:
    """The network `spec.arch` names; both take (B, D) inputs, (B,) timesteps and optional (B,) labels."""
    return DENOISERS[spec.arch](spec)


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


class LatentDenoiser(Denoiser):
    """`num_blocks` FiLM residual blocks of width `hidden_dim` between projections from and to the latent."""

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
        """z (B, latent), t (B,) long, y (B,) long or None -> predicted noise (B, latent).

        `run` > 1 says that every `run` consecutive rows share their timestep (the last run may be shorter), as
        `diffusion.samples_per_timestep` draws them in training: the time embedding and the FiLM scale and shift,
        about two thirds of the multiply-adds, are then computed once per run. The result is the same as with
        `run` = 1. Conditional models take the per-row path (their labels differ within a run)."""
        if run > 1 and self.label_emb is None:
            return self._forward_runs(z, t[::run], run)
        emb = self.embed(t, y, self.spec.hidden_dim)  # (B, H) or (1, H)
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


# diffusion.denoiser -> network; config.sections.DenoiserArch names the same (tests/test_config.py)
DENOISERS = {"mlp": LatentDenoiser, "unet": UNetDenoiser}
