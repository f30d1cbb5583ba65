"""Pictures: image grids (PIL) and line/bar charts (matplotlib, headless), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mnist_ldm.io.atomic import atomic_path


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 or (N, 1, 28, 28) float in [0, 1] -> (N, 1, 28, 28) float in [0, 1]."""
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    return t.view(-1, 1, 28, 28)


def grid_array(images, nrow: int, pad: int = 2) -> np.ndarray:
    """An (H, W) uint8 picture of the images in rows of `nrow`, `pad` white pixels around each (the
    layout of torchvision's make_grid, without importing torchvision: seconds at every start-up)."""
    x = to_tensor(images).clamp(0, 1)[:, 0].numpy()  # (N, 28, 28)
    if len(x) == 0:
        raise ValueError("grid_array: no images to draw")
    cols = max(1, min(nrow, len(x)))
    rows = -(-len(x) // cols)
    cell = 28 + pad
    out = np.ones((rows * cell + pad, cols * cell + pad), dtype=np.float32)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        out[pad + r * cell: pad + r * cell + 28, pad + c * cell: pad + c * cell + 28] = img
    return np.rint(out * 255).astype(np.uint8)


def save_grid(images, path: str | Path, nrow: int) -> None:
    """The grid of `grid_array` as a grayscale PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(grid_array(images, nrow), mode="L").save(tmp, format="png")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)


def line_chart(history: Sequence[dict], keys: Sequence[str], title: str, xlabel: str = "epoch"):
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [h["epoch"] for h in history]
    for k in keys:
        ax.plot(xs, [h[k] for h in history], marker="o", ms=3, label=k)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def grouped_bar_chart(labels: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str,
                      log: bool = False):
    """One group of bars per label, one bar per series (a legend names them)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, labels, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return fig


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str, highlight: int = -1,
              log: bool = False):
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    colors = ["tab:orange" if i == highlight else "tab:blue" for i in range(len(values))]
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=20)
    return fig
