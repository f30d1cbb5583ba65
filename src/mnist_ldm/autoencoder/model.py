"""The autoencoders, one per `autoencoder.kind`: `conv` (the default), a convolutional encoder
(1, 28, 28) -> 28->14->7->4 -> 16-d latent and its mirror decoder; `mlp`, an MLP with the same latent
(784 -> 512 -> 256 -> latent and back); and `none`, pixel space: no weights, encoding flattens an image to
its 784 pixels and decoding reshapes them, so the pixel-space DDPM goes through the same stages (what the
stages, files and params call latents are then these 784 pixels)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_ldm.io.checkpoint import load_model_checkpoint
from mnist_ldm.runtime.device import autocast, model_device
from mnist_ldm.runtime.memory import INFERENCE_BATCH
from mnist_ldm.data.images import PIXELS, SIDE, as_batch, to_uint8


@dataclass(frozen=True)
class AutoencoderSpec:
    latent_dim: int = 16
    channels: tuple[int, int, int] = (32, 64, 128)  # kind conv: the three stride-2 convolutions
    kind: str = "conv"
    hidden: tuple[int, int] = (512, 256)  # kind mlp: the two hidden layers

    def __post_init__(self):
        if self.kind not in KINDS:  # defined below, with the classes
            raise ValueError(f"autoencoder kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "none" and self.latent_dim != PIXELS:
            raise ValueError(f"autoencoder kind 'none' (pixel space) has {PIXELS} values, not {self.latent_dim}")

    @classmethod
    def for_kind(cls, kind: str, latent_dim: int) -> "AutoencoderSpec":
        """`autoencoder.kind` and `latent_dim` as params.yaml gives them (pixel space ignores latent_dim)."""
        return cls(latent_dim=PIXELS if kind == "none" else latent_dim, kind=kind)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["hidden"] = list(self.channels), list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderSpec":
        """Checkpoints written before the MLP kind existed hold a conv autoencoder without `kind`."""
        return cls(latent_dim=int(d["latent_dim"]), channels=tuple(d["channels"]), kind=d.get("kind", "conv"),
                   hidden=tuple(d.get("hidden", (512, 256))))


class ConvEncoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        c1, c2, c3 = spec.channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.SiLU(),   # 28 -> 14
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),  # 14 -> 7
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.SiLU(),  # 7 -> 4
            nn.Flatten(),
            nn.Linear(c3 * 4 * 4, spec.latent_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) in [0, 1] -> (B, latent)
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        c1, c2, c3 = spec.channels
        self.c3 = c3
        self.fc = nn.Linear(spec.latent_dim, c3 * 4 * 4)
        self.net = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(c3, c2, 3, stride=2, padding=1), nn.SiLU(),                    # 4 -> 7
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.SiLU(),  # 7 -> 14
            nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1),              # 14 -> 28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent) -> logits (B, 1, 28, 28)
        return self.net(self.fc(z).view(-1, self.c3, 4, 4))


class MLPEncoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        h1, h2 = spec.hidden
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, h1), nn.SiLU(), nn.Linear(h1, h2), nn.SiLU(),
                                 nn.Linear(h2, spec.latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) in [0, 1] -> (B, latent)
        return self.net(x)


class MLPDecoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        h1, h2 = spec.hidden
        self.net = nn.Sequential(nn.Linear(spec.latent_dim, h2), nn.SiLU(), nn.Linear(h2, h1), nn.SiLU(),
                                 nn.Linear(h1, 28 * 28))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent) -> logits (B, 1, 28, 28)
        return self.net(z).view(-1, 1, 28, 28)


class PixelEncoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) in [0, 1] -> (B, 784), unchanged
        return x.flatten(1)


class PixelDecoder(nn.Module):
    """The logits whose sigmoid is the pixel itself (clamped into (0, 1) so the logit is finite)."""

    def __init__(self, spec: AutoencoderSpec):
        super().__init__()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.logit(z.clamp(1e-6, 1 - 1e-6)).view(-1, 1, SIDE, SIDE)


# autoencoder.kind -> (encoder, decoder); config.sections.AutoencoderKind names the same (tests/test_config.py)
KINDS = {"conv": (ConvEncoder, ConvDecoder), "mlp": (MLPEncoder, MLPDecoder), "none": (PixelEncoder, PixelDecoder)}


class Autoencoder(nn.Module):
    """Encoder and decoder of `spec.kind`; the rest of the pipeline sees only encode/decode."""

    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        self.spec = spec
        enc, dec = KINDS[spec.kind]
        self.encoder, self.decoder = enc(spec), dec(spec)

    @property
    def trainable(self) -> bool:
        return self.spec.kind != "none"

    @property
    def fixed_scale(self) -> Optional[tuple[float, float]]:
        """Pixel space uses DDPM's fixed map of [0, 1] to [-1, 1] (mean 0.5, std 0.5 for every pixel: the
        corners of MNIST never change, so a fitted per-pixel scaler would divide by 0); latents are fitted."""
        return (0.5, 0.5) if self.spec.kind == "none" else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1]: the sigmoid of the decoder's logits; pixel space clamps its pixels."""
        if not self.trainable:
            return z.clamp(0, 1).view(-1, 1, 28, 28)
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_logits(self.encode(x))


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, dict]:
    """The autoencoder in `path` (eval mode, on the CPU) and the checkpoint's other fields."""
    return load_model_checkpoint(path, "mnist-ldm/autoencoder", "autoencoder checkpoint",
                                 lambda cfg: Autoencoder(AutoencoderSpec.from_dict(cfg)))


@torch.no_grad()
def encode_images(model: Autoencoder, images: np.ndarray, batch_size: int = INFERENCE_BATCH,
                  precision: str = "fp32") -> np.ndarray:
    """uint8 (N, 28, 28) -> raw latents (N, latent_dim) float32 (pixel space: the 784 pixels in [0, 1]);
    `precision` bf16 encodes under autocast."""
    model.eval()
    dev = model_device(model)
    with autocast(dev, precision):
        out = [model.encode(as_batch(images[i:i + batch_size], dev)).float().cpu().numpy()
               for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def decode_latents(model: Autoencoder, z: torch.Tensor, batch_size: int = INFERENCE_BATCH,
                   precision: str = "fp32") -> np.ndarray:
    """Raw latents (N, latent_dim) -> uint8 images (N, 28, 28); `precision` bf16 decodes under autocast."""
    model.eval()
    dev = model_device(model)
    with autocast(dev, precision):
        out = [model.decode(z[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(z), batch_size)]
    return to_uint8(torch.cat(out))


@torch.no_grad()
def reconstruction_metrics(model: Autoencoder, images: np.ndarray, batch_size: int = 1000,
                           precision: str = "fp32") -> dict:
    """Per-pixel BCE and MSE of the reconstructions of `images` (the network under `precision`, the
    errors in fp32)."""
    model.eval()
    bce = mse = 0.0
    for i in range(0, len(images), batch_size):
        x = as_batch(images[i:i + batch_size], model_device(model))
        with autocast(x.device, precision):
            logits = model(x).float()
        bce += F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item()
        mse += F.mse_loss(torch.sigmoid(logits), x, reduction="sum").item()
    n = len(images) * 28 * 28
    return {"test_bce": bce / n, "test_mse": mse / n}


@torch.no_grad()
def reconstructions(model: Autoencoder, images: np.ndarray, precision: str = "fp32") -> torch.Tensor:
    """Rows of originals above their reconstructions: (2N, 1, 28, 28)."""
    model.eval()
    x = as_batch(images, model_device(model))
    with autocast(x.device, precision):
        y = model.decode(model.encode(x)).float()
    return torch.cat([x, y]).cpu()
