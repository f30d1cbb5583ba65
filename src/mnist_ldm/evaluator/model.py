"""The evaluators: digit classifiers whose features and softmax score generated digits.

Each is trained on the training split only, with a fixed seed; its penultimate layer (128-d) is the
feature space of the Fréchet classifier distance (FCD) and of precision/recall. Two architectures, so that
two independently trained networks can score the same images (`evaluator` and `second_evaluator` in
params.yaml); a change counts as better only when both agree:

* `cnn`: two 3x3 convolutions with max pooling (28 -> 14 -> 7), a 128-unit layer (the project's evaluator);
* `allconv`: four 3x3 convolutions, three of them strided (28 -> 14 -> 7 -> 4), batch norm, and a global
  average over the 4x4 positions as the 128-d feature (no fully connected layer before the head).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_ldm.io.atomic import write_npz
from mnist_ldm.io.checkpoint import load_model_checkpoint
from mnist_ldm.runtime.device import autocast, model_device
from mnist_ldm.io.errors import UserError
from mnist_ldm.runtime.memory import INFERENCE_BATCH
from mnist_ldm.data.images import as_batch
from mnist_ldm.evaluator.nearest import distances_to_train

FEATURE_DIM = 128


class EvaluatorCNN(nn.Module):
    """`cnn`: the project's evaluator."""

    arch = "cnn"

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


class EvaluatorAllConv(nn.Module):
    """`allconv`: strided convolutions with batch norm and a global average pool (16, 32, 64, 128 channels)."""

    arch = "allconv"

    def __init__(self):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16, 1), *block(16, 32, 2), *block(32, 64, 2), *block(64, FEATURE_DIM, 2),  # 28, 14, 7, 4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


Evaluator = EvaluatorCNN | EvaluatorAllConv
# evaluator.arch -> network; config.sections.EvaluatorArch names the same (tests/test_config.py)
ARCHS = {"cnn": EvaluatorCNN, "allconv": EvaluatorAllConv}


def build_evaluator(arch: str) -> Evaluator:
    if arch not in ARCHS:
        raise ValueError(f"evaluator arch {arch!r} is not one of {', '.join(ARCHS)}")
    return ARCHS[arch]()


@torch.no_grad()
def features_and_probs(model: Evaluator, images: np.ndarray, batch_size: int = INFERENCE_BATCH,
                       precision: str = "fp32"):
    """uint8 (N, 28, 28) -> penultimate features (N, 128) float64 and softmax (N, 10) float64; `precision`
    bf16 runs the network under autocast (the softmax and the float64 copies stay exact)."""
    model.eval()
    feats, probs = [], []
    dev = model_device(model)
    # a channels-last copy: oneDNN's faster layout on CPU (measured 1.6x here), the caller's model untouched
    net = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for i in range(0, len(images), batch_size):
        with autocast(dev, precision):
            f = net.features(as_batch(images[i:i + batch_size], dev))
            logits = net.head(f).float()
        feats.append(f.double().cpu())
        probs.append(F.softmax(logits, dim=-1).double().cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def accuracy(model: Evaluator, images: np.ndarray, labels: np.ndarray, precision: str = "fp32") -> float:
    _, p = features_and_probs(model, images, precision=precision)
    return float((p.argmax(1) == labels).mean())


def load_evaluator(path: str | Path) -> tuple[Evaluator, dict]:
    """The evaluator a checkpoint holds (checkpoints from before `allconv` existed hold a `cnn`) and its payload."""
    return load_model_checkpoint(path, "mnist-ldm/evaluator", "evaluator checkpoint",
                                 lambda cfg: build_evaluator(str(cfg.get("arch", "cnn"))))


# ------------------------------------------------------------------ what `evaluate` compares with, kept per evaluator

def reference_features(model: Evaluator, train_images: np.ndarray, test_images: np.ndarray,
                       precision: str = "fp32", distances: bool = True) -> dict[str, np.ndarray]:
    """What every `evaluate` of one evaluator on one dataset recomputes: the features of the whole training and
    test splits (float64, (N, 128) and (T, 128)) and, with `distances`, each test item's distance to its nearest
    training item in that space ((T,), the memorization ratio's reference). `train_<section>` keeps them beside
    the checkpoint."""
    train = features_and_probs(model, train_images, precision=precision)[0]
    test = features_and_probs(model, test_images, precision=precision)[0]
    return {"train": train, "test": test, **({"test_to_train": distances_to_train(test, train)} if distances else {})}


def save_reference(path: str | Path, ref: dict[str, np.ndarray], **meta: str) -> None:
    """`ref` as an .npz: the features as float32 (they are float32 or bf16 values, so nothing is lost; checked),
    the distances as float64, and `meta` (weights_sha256, data_hash, precision) as JSON."""
    f32 = {k: ref[k].astype(np.float32) for k in ("train", "test")}
    assert all(np.array_equal(f32[k], ref[k]) for k in f32), "features that float32 does not hold exactly"
    write_npz(path, compress=False, **f32, test_to_train=ref["test_to_train"],
              meta=np.array(json.dumps(meta, sort_keys=True)))


def load_reference(path: str | Path, **expected: str) -> tuple[dict[str, np.ndarray] | None, str]:
    """The reference of `save_reference` as float64, checked against the evaluator's weights and the data
    (a mismatch is an error naming the file); (None, why) when it was computed at another precision."""
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            ref = {k: f[k].astype(np.float64) for k in ("train", "test", "test_to_train")}
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not an evaluator's reference features file ({type(e).__name__}); re-run its "
                        f"train_evaluator stage") from None
    for key in ("weights_sha256", "data_hash"):
        if meta.get(key) != expected[key]:
            raise UserError(f"{path}: computed for another {'evaluator' if key == 'weights_sha256' else 'dataset'} "
                            f"({key} {str(meta.get(key))[:12]}, expected {expected[key][:12]}); re-run the stage "
                            f"that trains this evaluator (dvc repro), or leave the file out")
    if meta.get("precision") != expected["precision"]:
        return None, f"computed at {meta.get('precision')}, this run is {expected['precision']}"
    return ref, ""
