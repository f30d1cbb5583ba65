"""Scoring generated digits in the evaluator's feature space (and in a second evaluator's), beside honest floors.

Every set is compared with the MNIST test set at the same n:
* `train_vs_test`: real training images, the floor that real data reaches at this n;
* `ae_reconstruction`: training images through the autoencoder, the best this decoder allows (not
  the test images themselves: a set paired with the reference shares its sampling noise and would
  read lower than an independent one);
* `single_gaussian`: decodes of one Gaussian fitted to the training latents, the trivial
  baseline the diffusion model must beat;
* `standard_normal`: decodes of raw N(0, I) latents, a sanity check that must score far worse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mnist_ldm.evaluation import metrics
from mnist_ldm.autoencoder.model import decode_latents
from mnist_ldm.evaluator.model import features_and_probs, reference_features
from mnist_ldm.io.errors import UserError
from mnist_ldm.config.sections import min_images


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not Path(path).is_file():
        raise UserError(f"{path}: samples file not found")
    try:
        with np.load(path) as f:
            if "images" not in f:
                raise UserError(f"{path}: no array 'images' in the file; expected images (N, 28, 28) uint8")
            images = f["images"]
            labels = f["labels"] if "labels" in f else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"{path}: 'images' has shape {images.shape}; expected (N, 28, 28)")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 1:
            raise UserError(f"{path}: 'images' must be uint8 0-255 or floats in [0, 1], got {images.dtype} "
                            f"in [{images.min():.3g}, {images.max():.3g}]")
        images = (images * 255).round().astype(np.uint8)
    return images, labels


def floor_images(ae, z_train: np.ndarray, n: int, seed: int, precision: str = "fp32") -> dict[str, np.ndarray]:
    """Image sets for the floors (see the module docstring), n each, all independent of the test set;
    `z_train` are the training images' latents; decoded under `precision`."""
    rng = np.random.default_rng(seed)
    z64 = z_train.astype(np.float64)
    mu, cov = z64.mean(0), np.cov(z64, rowvar=False)
    gauss = rng.multivariate_normal(mu, cov, size=n).astype(np.float32)
    normal = rng.standard_normal((n, z_train.shape[1])).astype(np.float32)

    def dec(z: np.ndarray) -> np.ndarray:
        return decode_latents(ae, torch.from_numpy(z), precision=precision)

    recon = dec(z_train[rng.choice(len(z_train), min(n, len(z_train)), replace=False)])
    return {"ae_reconstruction": recon, "single_gaussian": dec(gauss), "standard_normal": dec(normal)}


def score(images: np.ndarray, labels, evaluator, train_images: np.ndarray, test_images: np.ndarray, ae,
          z_train: np.ndarray | None, n: int, k: int, seed: int, precision: str = "fp32", second=None,
          references: tuple = (None, None)) -> dict:
    """The scores of `images` against `test_images` (see the module docstring); the evaluators and the
    decoder run under `precision`, every metric in float64. With a `second` evaluator, the same image sets
    are also scored in its feature space (`second_evaluator`: its FCDs with their floors, and PRDC).
    `references` are each evaluator's `reference_features` of these splits, or None to compute them here."""
    rng = np.random.default_rng(seed)
    sizes = {"evaluate.n": n, "samples": len(images), "test images": len(test_images),
             "train images": len(train_images)}
    n = min(sizes.values())
    if n < min_images(k):
        fewest = min(sizes, key=sizes.get)
        raise UserError(f"evaluate.k={k}: only {n} images to compare ({fewest}: {n}); need at least "
                        f"{min_images(k)} for {k} neighbours: lower evaluate.k, or give more images")
    pick = rng.choice(len(images), n, replace=False) if len(images) > n else np.arange(len(images))
    train_pick = rng.choice(len(train_images), n, replace=False)
    sets = {"generated": images[pick]}
    if ae is not None and z_train is not None:
        sets.update(floor_images(ae, z_train, n, seed, precision))

    def fcds(net, ref, distances: bool) -> tuple[dict, dict, np.ndarray]:
        """FCDs of every set against the test set in `net`'s features, those features (train: all of it; the
        test items' nearest-training distances when `distances`) and the class probabilities of the generated
        images."""
        ref = ref or reference_features(net, train_images, test_images, precision, distances=distances)
        out = {name: features_and_probs(net, ims, precision=precision) for name, ims in sets.items()}
        f = {"train": ref["train"], "test": ref["test"][:n], **{name: feats for name, (feats, _) in out.items()}}
        if distances:
            f["test_to_train"] = ref["test_to_train"][:n]
        fcd = {"generated": metrics.frechet_classifier_distance(f["generated"], f["test"]),
               "train_vs_test": metrics.frechet_classifier_distance(f["train"][train_pick], f["test"])}
        fcd.update({name: metrics.frechet_classifier_distance(f[name], f["test"]) for name in sets if name != "generated"})
        return fcd, f, out["generated"][1]

    fcd, f, p_gen = fcds(evaluator, references[0], distances=True)
    balance = metrics.class_balance(p_gen)
    result = {
        "n": int(n),
        "fcd": fcd,
        "prdc": metrics.prdc(f["test"], f["generated"], k=k),
        "prdc_train_vs_test": metrics.prdc(f["test"], f["train"][train_pick], k=k),
        "class_balance": {"tv_to_uniform": balance["tv_to_uniform"], "classes_present": balance["classes_present"],
                          "mean_top_confidence": balance["mean_top_confidence"]},
        "class_counts": {str(d): int(c) for d, c in enumerate(balance["class_counts"])},
        "memorization": metrics.memorization_ratio(f["generated"], f["train"], f["test"],
                                                   test_to_train=f["test_to_train"]),
    }
    if labels is not None:
        result["label_accuracy"] = float((p_gen.argmax(1) == labels[pick]).mean())
    if "ae_reconstruction" not in fcd:
        result["absent"] = {f"fcd.{k}": "no autoencoder and training latents were given"
                            for k in ("ae_reconstruction", "single_gaussian", "standard_normal")}
    if "single_gaussian" in fcd:
        result["fcd_ratio_to_single_gaussian"] = fcd["generated"] / fcd["single_gaussian"]
        result["fcd_ratio_to_ae_reconstruction"] = fcd["generated"] / fcd["ae_reconstruction"]
    if second is not None:
        fcd2, f2, _ = fcds(second, references[1], distances=False)  # no memorization check here
        result["second_evaluator"] = {"arch": second.arch, "fcd": fcd2,
                                      "prdc": metrics.prdc(f2["test"], f2["generated"], k=k)}
        if "ae_reconstruction" in fcd2:
            result["second_evaluator"]["fcd_ratio_to_ae_reconstruction"] = fcd2["generated"] / fcd2["ae_reconstruction"]
    return result
