"""Scoring generated digits in an evaluator's feature space against the MNIST test set at the same n, beside
floors: `train_vs_test` (real training images), `ae_reconstruction` (training images through the autoencoder),
`single_gaussian` (decodes of one Gaussian fitted to the training latents: the baseline to beat) and
`standard_normal` (decodes of N(0, I): must score far worse)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mnist_ldm.autoencoder.model import decode_latents
from mnist_ldm.evaluation import metrics
from mnist_ldm.evaluator.model import features_and_probs, reference_features
from mnist_ldm.io.errors import UserError
from mnist_ldm.config.sections import min_images


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz's `images` as uint8 (N, 28, 28) (from uint8 or floats in [0, 1]) and its `labels` if any."""
    if not Path(path).is_file():
        raise UserError(f"{path}: samples file not found")
    try:
        with np.load(path) as f:
            images, labels = (f["images"], f["labels"] if "labels" in f else None) if "images" in f else (None, None)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    if images is None:
        raise UserError(f"{path}: no array 'images' in the file; expected images (N, 28, 28) uint8")
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{path}: 'images' has shape {images.shape}; expected (N, 28, 28)")
    if images.dtype != np.uint8:
        if images.dtype.kind not in "fiub" or not ((images >= 0) & (images <= 1)).all():  # a NaN is neither
            got = "" if images.dtype.kind not in "fiu" else f" in [{np.min(images):.3g}, {np.max(images):.3g}]"
            raise UserError(f"{path}: 'images' must be uint8 0-255 or floats in [0, 1], got {images.dtype}{got}")
        images = (images * 255).round().astype(np.uint8)
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"
                               or not ((labels >= 0) & (labels <= 9)).all()):
        raise UserError(f"{path}: 'labels' must be {len(images)} integers 0-9 (one digit per image), got "
                        f"{labels.dtype} {labels.shape}")
    return images, labels


def floor_images(ae, z_train: np.ndarray, n: int, seed: int, precision: str = "fp32") -> dict[str, np.ndarray]:
    """The floors' image sets from the training latents `z_train`, n each, all independent of the test set."""
    rng = np.random.default_rng(seed)
    z64 = z_train.astype(np.float64)
    gauss = rng.multivariate_normal(z64.mean(0), np.cov(z64, rowvar=False), size=n).astype(np.float32)
    normal = rng.standard_normal((n, z_train.shape[1])).astype(np.float32)
    recon = z_train[rng.choice(len(z_train), min(n, len(z_train)), replace=False)]
    return {name: decode_latents(ae, torch.from_numpy(z), precision=precision)
            for name, z in (("ae_reconstruction", recon), ("single_gaussian", gauss), ("standard_normal", normal))}


def score(images: np.ndarray, labels, evaluator, train_images: np.ndarray, test_images: np.ndarray, ae,
          z_train: np.ndarray | None, n: int, k: int, seed: int, precision: str = "fp32", second=None,
          references: tuple = (None, None)) -> dict:
    """The scores of `images`, and a `second` evaluator's FCDs and PRDC; `references`: each evaluator's
    `reference_features`, or None to compute them."""
    rng = np.random.default_rng(seed)
    sizes = {"evaluate.n": n, "samples": len(images), "test images": len(test_images),
             "train images": len(train_images)}
    n = min(sizes.values())
    if n < min_images(k):
        raise UserError(f"evaluate.k={k}: only {n} images to compare ({min(sizes, key=sizes.get)}: {n}); need at "
                        f"least {min_images(k)} for {k} neighbours: lower evaluate.k, or give more images")
    pick = rng.choice(len(images), n, replace=False) if len(images) > n else np.arange(len(images))
    train_pick = rng.choice(len(train_images), n, replace=False)
    sets = {"generated": images[pick]}
    if ae is not None and z_train is not None:
        sets.update(floor_images(ae, z_train, n, seed, precision))

    def fcds(net, ref, distances: bool):
        ref = ref or reference_features(net, train_images, test_images, precision, distances=distances)
        out = {name: features_and_probs(net, ims, precision=precision) for name, ims in sets.items()}
        f = {"train": ref["train"], "test": ref["test"][:n], **{name: feats for name, (feats, _) in out.items()}}
        fcd = {"generated": metrics.frechet_classifier_distance(f["generated"], f["test"]),
               "train_vs_test": metrics.frechet_classifier_distance(f["train"][train_pick], f["test"])}
        fcd.update({name: metrics.frechet_classifier_distance(f[name], f["test"]) for name in list(sets)[1:]})
        return fcd, f, out["generated"][1], ref

    fcd, f, p_gen, ref = fcds(evaluator, references[0], distances=True)
    balance = metrics.class_balance(p_gen)
    result = {
        "n": int(n),
        "fcd": fcd,
        "prdc": metrics.prdc(f["test"], f["generated"], k=k),
        "prdc_train_vs_test": metrics.prdc(f["test"], f["train"][train_pick], k=k),
        "class_balance": {key: balance[key] for key in ("tv_to_uniform", "classes_present", "mean_top_confidence")},
        "class_counts": {str(d): int(c) for d, c in enumerate(balance["class_counts"])},
        "memorization": metrics.memorization_ratio(f["generated"], f["train"], f["test"],
                                                   test_to_train=ref["test_to_train"][:n]),
    }
    if labels is not None:
        result["label_accuracy"] = float((p_gen.argmax(1) == labels[pick]).mean())
    if "single_gaussian" in fcd:
        result["fcd_ratio_to_single_gaussian"] = fcd["generated"] / fcd["single_gaussian"]
        result["fcd_ratio_to_ae_reconstruction"] = fcd["generated"] / fcd["ae_reconstruction"]
    else:
        result["absent"] = {f"fcd.{k}": "no autoencoder and training latents were given"
                            for k in ("ae_reconstruction", "single_gaussian", "standard_normal")}
    if second is not None:
        fcd2, f2, _, _ = fcds(second, references[1], distances=False)  # no memorization check here
        result["second_evaluator"] = {"arch": second.arch, "fcd": fcd2,
                                      "prdc": metrics.prdc(f2["test"], f2["generated"], k=k)}
        if "ae_reconstruction" in fcd2:
            result["second_evaluator"]["fcd_ratio_to_ae_reconstruction"] = fcd2["generated"] / fcd2["ae_reconstruction"]
    return result
