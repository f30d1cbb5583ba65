"""The prepared data set that `prepare` writes and every other stage reads: `{train,test}.npz` (uint8 images
and labels) and `meta.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mnist_ldm.config.sections import error_line
from mnist_ldm.io.atomic import write_json, write_npz
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.hashing import arrays_digest
from mnist_ldm.io.paths import input_error


class DataError(UserError):
    pass


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) uint8


def limit(split: Split, n: int) -> Split:
    """The first n images (0 keeps all)."""
    return split if n == 0 else Split(split.images[:n], split.labels[:n])


def write_prepared(out_dir: Path, train: Split, test: Split, source: str, description: str) -> dict:
    if len(train.labels) == 0 or len(test.labels) == 0:
        raise DataError(f"{out_dir}: no images to write ({len(train.labels)} train / {len(test.labels)} test); "
                        f"check data.limit_train, data.limit_test and the source files")
    splits = {"train": train, "test": test}
    meta = {"source": source, "description": description,
            "counts": {s: int(len(p.labels)) for s, p in splits.items()},
            "class_counts": {s: np.bincount(p.labels, minlength=10).tolist() for s, p in splits.items()},
            "content_hash": arrays_digest((train.images, train.labels, test.images, test.labels))}
    for s, p in splits.items():
        write_npz(out_dir / f"{s}.npz", images=p.images, labels=p.labels)
    write_json(out_dir / "meta.json", meta)
    return meta


def read_npz(path: Path, keys: tuple[str, ...], what: str, stage: str) -> tuple[np.ndarray, ...]:
    """The arrays `keys` of an .npz that stage `stage` writes; a missing or unreadable file is one line."""
    error = input_error(path, "a file", f"{what} not found; run the '{stage}' stage first (dvc repro {stage})",
                        f"expected the {what} that '{stage}' writes")
    if error:
        raise DataError(error)
    try:
        with np.load(path) as f:
            return tuple(f[k] for k in keys)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise DataError(f"{path}: not a readable {what} ({type(e).__name__}); re-run the '{stage}' stage "
                        f"(dvc repro -f {stage})") from None


def load_split(prepared_dir: Path, split: str) -> Split:
    path = Path(prepared_dir) / f"{split}.npz"
    images, labels = read_npz(path, ("images", "labels"), "prepared-data file", "prepare")
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.dtype != np.uint8 or \
            labels.shape != images.shape[:1] or labels.max(initial=0) > 9:
        raise DataError(f"{path}: expected uint8 images (N, 28, 28) and N uint8 labels 0-9, got {images.dtype} "
                        f"{images.shape} and {labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise DataError(f"{path}: holds no images; re-run 'prepare' "
                        f"(dvc repro -f prepare; data.limit_train / data.limit_test = 0 keeps every image)")
    return Split(images, labels)


class Meta(BaseModel):
    """`meta.json`'s fields that the stages read (other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow", strict=True)
    source: str
    description: str
    counts: dict[Literal["train", "test"], Annotated[int, Field(ge=1)]]
    content_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def load_meta(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    missing = "missing or not JSON; run the 'prepare' stage first"
    error = input_error(path, "a file", missing, "expected the JSON file that 'prepare' writes")
    try:
        if error is None:  # a FIFO or a folder is never opened
            meta = json.loads(path.read_bytes())
            Meta.model_validate(meta)
            return meta
    except ValidationError as e:
        error = f"{error_line(e, str(path), Meta)}; re-run the 'prepare' stage (dvc repro -f prepare)"
    except (OSError, ValueError):
        error = f"{path}: {missing}"
    raise DataError(error)
