"""Pictures: image grids (torchvision) and line/bar charts (matplotlib, headless), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .atomic import atomic_path


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 or (N, 1, 28, 28) float in [0, 1] -> (N, 1, 28, 28) float in [0, 1]."""
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    return t.view(-1, 1, 28, 28)


def grid_array(images, nrow: int) -> np.ndarray:
    """An (H, W) uint8 picture of the images in rows of `nrow`, the form MLflow's log_image takes."""
    from torchvision.utils import make_grid  # imported here: torchvision costs seconds at start-up

    g = make_grid(to_tensor(images), nrow=nrow, padding=2, pad_value=1.0)[0]  # (H, W)
    return (g.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def save_grid(images, path: str | Path, nrow: int) -> None:
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image(to_tensor(images), tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")


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
