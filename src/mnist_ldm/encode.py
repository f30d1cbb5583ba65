"""Stage `encode`: the frozen encoder turns each split into latents once; diffusion training reads this cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json, write_npz
from .autoencoder import ConvAutoencoder
from .data import load_split
from .errors import UserError
from .trainer import progress
from .train_ae import as_batch, load_autoencoder


@torch.no_grad()
def encode_images(model: ConvAutoencoder, images: np.ndarray, batch_size: int = 2000, desc: str = "encode") -> np.ndarray:
    model.eval()
    out = [model.encode(as_batch(images[i:i + batch_size])).numpy()
           for i in progress(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False)]
    return np.concatenate(out).astype(np.float32)  # (N, latent)


def latent_stats(z: np.ndarray) -> dict:
    """Per-dimension mean and std over the training latents, used to standardize them to ~N(0, I)."""
    z64 = z.astype(np.float64)
    return {"mean": z64.mean(0).tolist(), "std": z64.std(0).tolist(), "raw_std_overall": float(z64.std())}


def load_latents(latent_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(latent_dir) / f"{split}.npz"
    if not path.is_file():
        raise UserError(f"{path}: latent cache not found; run the 'encode' stage first (dvc repro encode)")
    with np.load(path) as f:
        return f["z"], f["labels"]


def load_stats(latent_dir: Path) -> dict:
    path = Path(latent_dir) / "stats.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: latent statistics missing or not JSON; run the 'encode' stage first") from None


def main(data_dir: Path, ae_ckpt: Path, out_dir: Path) -> dict:
    model, _ = load_autoencoder(ae_ckpt)
    splits = {split: load_split(data_dir, split) for split in ("train", "test")}  # both readable before any write
    latents = {split: encode_images(model, data.images, desc=f"encode {split}") for split, data in splits.items()}
    stats = latent_stats(latents["train"])
    for split, data in splits.items():
        write_npz(out_dir / f"{split}.npz", z=latents[split], labels=data.labels)
    stats["ae_checkpoint_md5"] = hashlib.md5(Path(ae_ckpt).read_bytes()).hexdigest()
    write_json(out_dir / "stats.json", stats)
    print(f"encode: latents of std {stats['raw_std_overall']:.2f} (before standardizing) -> {out_dir}")
    return stats
