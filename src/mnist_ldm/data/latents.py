"""The latent cache that `encode` writes (`{train,test}.npz`: z, labels; `stats.json`: the scaler, and the md5
of the autoencoder that produced it, which every reader checks) and the scaler that standardizes latents."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mnist_ldm.data.prepared import read_npz
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.hashing import file_md5


@dataclass(frozen=True)
class LatentScaler:
    """z_std = (z - mean) / std per dimension, fitted on the training latents (raw AE latents have std 4-9)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, z: np.ndarray) -> "LatentScaler":
        z64 = z.astype(np.float64)
        return cls(tuple(z64.mean(0).tolist()), tuple(z64.std(0).tolist()))

    @classmethod
    def from_dict(cls, d: dict, where: str = "latent statistics") -> "LatentScaler":
        try:
            mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: expected 'mean' and 'std' lists of numbers") from None
        if len(mean) != len(std) or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise UserError(f"{where}: 'mean' and 'std' must be finite lists of one length, std > 0")
        return cls(mean, std)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @property
    def dim(self) -> int:
        return len(self.mean)

    def standardize(self, z: np.ndarray | torch.Tensor) -> torch.Tensor:
        z = torch.as_tensor(z).double()
        return ((z - z.new_tensor(self.mean)) / z.new_tensor(self.std)).float()

    def unstandardize(self, z_std: torch.Tensor) -> torch.Tensor:
        return z_std * z_std.new_tensor(self.std) + z_std.new_tensor(self.mean)


def latent_stats(z: np.ndarray, fixed: Optional[tuple[float, float]] = None) -> dict:
    """`stats.json` without the producer: the scaler (fitted, or `fixed` (mean, std) for every dimension) and
    the overall raw std."""
    scaler = LatentScaler.fit(z) if fixed is None else LatentScaler((fixed[0],) * z.shape[1], (fixed[1],) * z.shape[1])
    return {**scaler.to_dict(), "raw_std_overall": float(z.astype(np.float64).std())}


def load_latents(latent_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(latent_dir) / f"{split}.npz"
    z, labels = read_npz(path, ("z", "labels"), "latent file", "encode")
    if z.ndim != 2 or len(z) != len(labels) or not np.issubdtype(z.dtype, np.floating):
        raise UserError(f"{path}: expected float latents (N, D) and N labels, got {z.dtype} {z.shape}")
    if not np.isfinite(z).all():
        raise UserError(f"{path}: latents hold NaN or infinite values; re-run the 'encode' stage")
    return z, labels


def check_producer(latent_dir: str | Path, ae_ckpt: str | Path) -> dict:
    """The cache's `stats.json`, after checking it was encoded by the autoencoder in `ae_ckpt`."""
    path = Path(latent_dir) / "stats.json"
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: latent statistics missing or not JSON; run the 'encode' stage first") from None
    recorded, actual = stats.get("ae_checkpoint_md5") if isinstance(stats, dict) else None, file_md5(ae_ckpt)
    if not recorded:
        raise UserError(f"{path}: records no autoencoder md5 (ae_checkpoint_md5), so it cannot be checked against "
                        f"{ae_ckpt}; re-run 'encode' (dvc repro -f encode)")
    if recorded != actual:
        raise UserError(f"{path}: these latents were encoded by another autoencoder (md5 {recorded[:12]}) than "
                        f"{ae_ckpt} (md5 {actual[:12]}); re-run 'encode' (dvc repro encode)")
    return stats
