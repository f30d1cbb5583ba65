"""Stage `train_evaluator`: a small CNN classifier whose features and softmax score generated digits.

It is trained on the training split only, with a fixed seed; its penultimate layer (128-d) is the
feature space of the Fréchet classifier distance (FCD) and of precision/recall.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import tracking
from .atomic import write_json
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Params
from .data import load_meta, load_split
from .denoiser import count_parameters
from .train_ae import as_batch
from .trainer import adam, fingerprint, resume_path_for, run_training

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 14
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(), nn.Linear(32 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def features_and_probs(model: DigitClassifier, images: np.ndarray, batch_size: int = 2000):
    """uint8 (N, 28, 28) -> penultimate features (N, 128) float64 and softmax (N, 10) float64."""
    model.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(as_batch(images[i:i + batch_size]))
        feats.append(f.double())
        probs.append(F.softmax(model.head(f), dim=-1).double())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    _, p = features_and_probs(model, images)
    return float((p.argmax(1) == labels).mean())


def load_evaluator(path: str | Path) -> tuple[DigitClassifier, dict]:
    ckpt = load_checkpoint(path, "mnist-ldm/evaluator", "evaluator checkpoint")
    model = DigitClassifier()
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def main(params: Params, data_dir: Path, out: Path, metrics_path: Path) -> dict:
    cfg = params.evaluator
    meta = load_meta(data_dir)
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    with tracking.stage_run("train_evaluator", params,
                            {f"evaluator.{k}": v for k, v in dataclasses.asdict(cfg).items()}, meta) as run:
        run.log_dataset(meta, "mnist-train", "training", data_dir)
        torch.manual_seed(cfg.seed)
        model = DigitClassifier()
        optimizer = adam(model, cfg.lr)
        images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels).long()

        def loss_fn(idx, gen):
            return F.cross_entropy(model(as_batch(images[idx])), labels[idx])

        def on_epoch_end(epoch, train_loss):
            acc = accuracy(model, test.images, test.labels)
            run.log_metrics({"train_loss": train_loss, "test_accuracy": acc}, step=epoch)
            return {"test_accuracy": acc}

        history = run_training(model=model, optimizer=optimizer, loss_fn=loss_fn, n_items=len(images),
                               batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed,
                               resume_path=resume_path_for(out), checkpoint_every=10**9, on_epoch_end=on_epoch_end,
                               desc="train_evaluator",
                               run_fingerprint=fingerprint("evaluator", dataclasses.asdict(cfg), meta["content_hash"]))
        weights_hash = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
        final = {"test_accuracy": history[-1]["test_accuracy"], "params": count_parameters(model)}
        save_checkpoint(out, "mnist-ldm/evaluator", {
            "state_dict": model.state_dict(), "model_config": {"feature_dim": FEATURE_DIM},
            "train_config": dataclasses.asdict(cfg), "weights_sha256": weights_hash,
            "trained_on": {k: meta[k] for k in ("source", "content_hash", "counts")}, "metrics": final,
        })
        write_json(metrics_path, {**final, "weights_sha256": weights_hash[:16]})
        run.headline(final)
        for p in (metrics_path, out):
            run.log_artifact(p)
    print(f"train_evaluator: test accuracy {final['test_accuracy']:.4f} (weights {weights_hash[:12]}) -> {out}")
    return final
