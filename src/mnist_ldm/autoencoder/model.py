"""The autoencoders, one per `autoencoder.kind`: `conv` (28->14->7->4 -> latent, and its mirror), `mlp`
(784 -> 512 -> 256 -> latent and back) and `none`, pixel space, whose "latents" are the 784 pixels."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import TypeAdapter

from mnist_ldm.config.sections import AutoencoderKind, Width, spec_from
from mnist_ldm.io.checkpoint import load_model_checkpoint
from mnist_ldm.runtime.device import autocast, batched, model_device
from mnist_ldm.runtime.memory import INFERENCE_BATCH
from mnist_ldm.data.images import PIXELS, SIDE, as_batch, to_uint8


@dataclass(frozen=True)
class AutoencoderSpec:
    latent_dim: Width = 16
    channels: tuple[Width, Width, Width] = (32, 64, 128)  # kind conv: the three stride-2 convolutions
    kind: AutoencoderKind = "conv"
    hidden: tuple[Width, Width] = (512, 256)  # kind mlp: the two hidden layers

    def __post_init__(self):
        if self.kind == "none" and self.latent_dim != PIXELS:
            raise ValueError(f"autoencoder kind 'none' (pixel space) has {PIXELS} values, not {self.latent_dim}")

    @classmethod
    def for_kind(cls, kind: str, latent_dim: int) -> "AutoencoderSpec":
        """`autoencoder.kind` and `latent_dim` as params.yaml gives them (pixel space ignores latent_dim)."""
        return cls(latent_dim=PIXELS if kind == "none" else latent_dim, kind=kind)

    def to_dict(self) -> dict:
        return TypeAdapter(AutoencoderSpec).dump_python(self, mode="json")  # the tuples as lists

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderSpec":
        """A checkpoint's `model_config`, checked (a ValidationError names the field)."""
        return TypeAdapter(cls).validate_python(d)


def _named(**parts: nn.Module) -> nn.Sequential:
    """`parts` run in order under the names checkpoints hold (`encoder.net.0.weight`, ...)."""
    return nn.Sequential(OrderedDict(parts))


class _Logit(nn.Module):
    """Pixel space's decoder: the logits whose sigmoid is the pixel (clamped into (0, 1) so they are finite)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.logit(z.clamp(1e-6, 1 - 1e-6)).view(-1, 1, SIDE, SIDE)


def _parts(spec: AutoencoderSpec) -> tuple[nn.Module, nn.Module]:
    """Encoder (B, 1, 28, 28) in [0, 1] -> (B, latent) and decoder (B, latent) -> logits (B, 1, 28, 28)."""
    if spec.kind == "none":
        return nn.Flatten(), _Logit()
    if spec.kind == "mlp":
        (h1, h2), d = spec.hidden, spec.latent_dim
        return (_named(net=nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, h1), nn.SiLU(), nn.Linear(h1, h2), nn.SiLU(),
                                         nn.Linear(h2, d))),
                _named(net=nn.Sequential(nn.Linear(d, h2), nn.SiLU(), nn.Linear(h2, h1), nn.SiLU(),
                                         nn.Linear(h1, PIXELS), nn.Unflatten(1, (1, SIDE, SIDE)))))
    c1, c2, c3 = spec.channels
    encoder = _named(net=nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.SiLU(),   # 28 -> 14
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),  # 14 -> 7
        nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.SiLU(),  # 7 -> 4
        nn.Flatten(), nn.Linear(c3 * 4 * 4, spec.latent_dim)))
    fc = nn.Linear(spec.latent_dim, c3 * 4 * 4)  # drawn before the convolutions, as the weights always were
    return encoder, _named(fc=fc, shape=nn.Unflatten(1, (c3, 4, 4)), net=nn.Sequential(
        nn.SiLU(),
        nn.ConvTranspose2d(c3, c2, 3, stride=2, padding=1), nn.SiLU(),                    # 4 -> 7
        nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.SiLU(),  # 7 -> 14
        nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1)))             # 14 -> 28


KINDS = ("conv", "mlp", "none")  # what `_parts` builds, as config.sections.AutoencoderKind names them


class Autoencoder(nn.Module):
    """Encoder and decoder of `spec.kind`; the rest of the pipeline sees only encode/decode."""

    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        self.spec = spec
        self.encoder, self.decoder = _parts(spec)

    @property
    def trainable(self) -> bool:
        return self.spec.kind != "none"

    @property
    def fixed_scale(self) -> Optional[tuple[float, float]]:
        """Pixel space maps [0, 1] to [-1, 1] (a fitted per-pixel scaler would divide by MNIST's 0-std corners)."""
        return (0.5, 0.5) if self.spec.kind == "none" else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1]."""
        return torch.sigmoid(self.decoder(z)) if self.trainable else z.clamp(0, 1).view(-1, 1, SIDE, SIDE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits
        return self.decoder(self.encode(x))


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, dict]:
    """The autoencoder in `path` (eval mode, on the CPU) and the checkpoint's other fields."""
    return load_model_checkpoint(path, "mnist-ldm/autoencoder", "autoencoder checkpoint",
                                 lambda cfg: Autoencoder(spec_from(AutoencoderSpec, cfg)))


def encode_images(model: Autoencoder, images: np.ndarray, batch_size: int = INFERENCE_BATCH,
                  precision: str = "fp32") -> np.ndarray:
    """uint8 (N, 28, 28) -> raw latents (N, latent_dim) float32."""
    return batched(lambda x, dev: model.encode(as_batch(x, dev)), model, images, batch_size, precision).numpy()


def decode_latents(model: Autoencoder, z: torch.Tensor, batch_size: int = INFERENCE_BATCH,
                   precision: str = "fp32") -> np.ndarray:
    """Raw latents (N, latent_dim) -> uint8 images (N, 28, 28)."""
    return to_uint8(batched(lambda x, dev: model.decode(x.to(dev)), model, z, batch_size, precision))


@torch.no_grad()
def reconstruction_metrics(model: Autoencoder, images: np.ndarray, batch_size: int = 1000,
                           precision: str = "fp32") -> dict:
    """Per-pixel BCE and MSE of the reconstructions (the errors in fp32)."""
    model.eval()
    bce = mse = 0.0
    for i in range(0, len(images), batch_size):
        x = as_batch(images[i:i + batch_size], model_device(model))
        with autocast(x.device, precision):
            logits = model(x).float()
        bce += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
        mse += F.mse_loss(torch.sigmoid(logits), x, reduction="sum").item()
    return {"test_bce": bce / (len(images) * PIXELS), "test_mse": mse / (len(images) * PIXELS)}


def reconstructions(model: Autoencoder, images: np.ndarray, precision: str = "fp32") -> torch.Tensor:
    """Originals above their reconstructions: (2N, 1, 28, 28)."""
    y = batched(lambda x, dev: model.decode(model.encode(as_batch(x, dev))), model, images, max(1, len(images)),
                 precision)
    return torch.cat([as_batch(images), y])
