"""Digits as arrays and as tensors: uint8 (N, 28, 28) on disk, float (N, 1, 28, 28) in [0, 1] for the networks."""

from __future__ import annotations

import numpy as np
import torch

SIDE = 28  # MNIST digits are SIDE x SIDE
PIXELS = SIDE * SIDE


def as_batch(images: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1], on `device` (default: where `images` are)."""
    return torch.as_tensor(images).to(device).float().div(255.0).unsqueeze(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 1, 28, 28) in [0, 1] -> uint8 (B, 28, 28), rounded and clamped."""
    return (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
