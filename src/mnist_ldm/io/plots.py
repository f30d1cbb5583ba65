"""Pictures, written atomically: image grids (PIL) and charts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mnist_ldm.io.atomic import atomic_path


def grid_array(images, nrow: int, pad: int = 2) -> np.ndarray:
    """An (H, W) uint8 picture of uint8 (N, 28, 28) or float (N, 1, 28, 28) images in rows of `nrow`, `pad` white
    pixels around each (torchvision's make_grid layout, without importing torchvision: seconds at start-up)."""
    t = torch.as_tensor(images)
    x = (t.float() / 255.0 if t.dtype == torch.uint8 else t).view(-1, 1, 28, 28).clamp(0, 1)[:, 0].numpy()
    if len(x) == 0:
        raise ValueError("grid_array: no images to draw")
    cols = max(1, min(nrow, len(x)))
    cell = 28 + pad
    out = np.ones((-(-len(x) // cols) * cell + pad, cols * cell + pad), dtype=np.float32)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        out[pad + r * cell: pad + r * cell + 28, pad + c * cell: pad + c * cell + 28] = img
    return np.rint(out * 255).astype(np.uint8)


def save_grid(images, path: str | Path, nrow: int, min_side: int = 0) -> None:
    """`grid_array` as a grayscale PNG, each pixel a k×k block for the smallest whole k that makes the longer side
    at least `min_side` pixels (a few 28-px digits are too small to look at)."""
    from PIL import Image

    grid = grid_array(images, nrow)
    k = max(1, -(-min_side // max(grid.shape)))
    with atomic_path(path) as tmp:
        Image.fromarray(grid.repeat(k, axis=0).repeat(k, axis=1), mode="L").save(tmp, format="png")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)


def line_chart(history: Sequence[dict], keys: Sequence[str], title: str):
    fig, ax = _figure().subplots(figsize=(5.5, 3.5))
    for k in keys:
        ax.plot([h["epoch"] for h in history], [h[k] for h in history], marker="o", ms=3, label=k)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def grouped_bar_chart(labels: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str):
    """One group of bars per label, one bar per series (a legend names them), on a log scale."""
    fig, ax = _figure().subplots(figsize=(7.5, 3.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar_label(ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name), fmt="%.3g", fontsize=7)
    ax.set_xticks(x, labels, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return fig


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str):
    fig, ax = _figure().subplots(figsize=(6.5, 3.5))
    ax.bar_label(ax.bar(labels, values, color=["tab:blue"] * len(values)), fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    return fig
