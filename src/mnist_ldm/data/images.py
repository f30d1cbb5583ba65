"""Digits as arrays and as tensors: uint8 (N, 28, 28) on disk, float (N, 1, 28, 28) in [0, 1] for the networks."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mnist_ldm.runtime.device import autocast, model_device

SIDE = 28  # MNIST digits are SIDE x SIDE
PIXELS = SIDE * SIDE


def as_batch(images: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1], on `device` (default: where `images` are)."""
    return torch.as_tensor(images).to(device).float().div(255.0).unsqueeze(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 1, 28, 28) in [0, 1] -> uint8 (B, 28, 28), rounded and clamped."""
    return (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def batched(fn: Callable, model: torch.nn.Module, xs, batch_size: int, precision: str) -> torch.Tensor:
    """`fn(batch, device)` over `xs` in batches, with `model` in eval mode on its device under `precision`; the
    results concatenated in fp32 on the CPU."""
    model.eval()
    dev = model_device(model)
    with autocast(dev, precision):
        return torch.cat([fn(xs[i:i + batch_size], dev).float().cpu() for i in range(0, len(xs), batch_size)])
