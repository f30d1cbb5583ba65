"""Training an evaluator (a digit classifier) on the training split only."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mnist_ldm.config.sections import EvaluatorConfig
from mnist_ldm.data.images import as_batch
from mnist_ldm.data.prepared import Split
from mnist_ldm.evaluator.model import accuracy, build_evaluator
from mnist_ldm.runtime.device import CPU, Runtime
from mnist_ldm.runtime.loop import adam, fingerprint, run_training


def train_evaluator(cfg: EvaluatorConfig, train: Split, test: Split, resume_path: Path, data_hash: str,
                    on_epoch: Optional[Callable[[int, dict, dict], None]] = None, rt: Runtime = CPU,
                    stage: str = "train_evaluator"):
    """The trained classifier (`cfg.arch`) and its per-epoch history (train loss, test accuracy)."""
    torch.manual_seed(cfg.seed)
    model = build_evaluator(cfg.arch).to(rt.device)
    model.to(memory_format=torch.channels_last)  # 1.4x faster steps on CPU; converted back at the end
    net = rt.wrap(model)
    images = torch.from_numpy(train.images).to(rt.device)
    labels = torch.from_numpy(train.labels).long().to(rt.device)

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mine = rt.dist.shard(idx)
        return F.cross_entropy(net(as_batch(images[mine])).float(), labels[mine])

    def on_epoch_end(epoch: int, train_loss: float) -> dict:
        acc = accuracy(model, test.images, test.labels, rt.precision)
        if on_epoch is not None:
            on_epoch(epoch, {"train_loss": train_loss, "test_accuracy": acc}, {})
        return {"test_accuracy": acc}

    history = run_training(model=model, optimizer=adam(model, cfg.lr), loss_fn=loss_fn, n_items=len(images),
                           batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, resume_path=resume_path,
                           checkpoint_every=cfg.checkpoint_every, on_epoch_end=on_epoch_end, desc=stage,
                           run_fingerprint=fingerprint("evaluator", cfg.model_dump(), data_hash), rt=rt)
    return model.to(memory_format=torch.contiguous_format), history
