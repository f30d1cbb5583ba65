"""Outputs the operating system will not take: a read-only location and a full disk.

The tests run as root, where `chmod` does not stop a write, so each command runs in its own mount
namespace (`unshare -m`) in which one folder is made read-only (a read-only bind mount of itself) or a
tiny tmpfs (a full disk). Nothing outside that process sees the mounts. Each case is refused with one
line, `error: <path>: <strerror>; <hint>`, naming the output, exit 2, no traceback, nothing half-written.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, run

READ_ONLY = "Read-only file system; the file system is read-only; write elsewhere"
FULL = "No space left on device; free some disk space and run again"
LEFT = "--- left in the folder:"

# the script run in the namespace: $1 what to mount, $2 the folder, then the command;
# it lists what the command left in the folder (a tmpfs vanishes with the namespace)
SCRIPT = """set -e
case "$1" in
  ro) mount --bind "$2" "$2"; mount -o remount,bind,ro "$2" ;;
  full) mount -t tmpfs -o size=4k tmpfs "$2" ;;  # one page: the first file of more than 4 KB fails
esac
dir="$2"; shift 2
set +e
"$@"; rc=$?
echo "%s"; ls -A "$dir"
exit $rc
""" % LEFT


def _can_unshare() -> str:
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro,size=4k tmpfs /mnt"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"cannot make a private read-only mount here: {probe.stderr.strip()}"


UNSHARE_PROBLEM = _can_unshare()
pytestmark = pytest.mark.skipif(bool(UNSHARE_PROBLEM), reason=UNSHARE_PROBLEM or "n/a")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, md5(p)) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo(trained_repo: Path):
    """The shared trained repository, only read here (tracking is switched off on every command)."""
    before = tree(trained_repo)
    yield trained_repo
    assert tree(trained_repo) == before


def mnist_ldm(repo: Path, mount: str, folder: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`mnist-ldm args` with `folder` mounted as `mount` ("ro" or "full"); and what was left in the folder."""
    cmd = ["unshare", "-m", "sh", "-c", SCRIPT, "sh", mount, str(folder), str(BIN / "mnist-ldm"),
           "--set", "tracking.enabled=false", *args]
    proc = run(cmd, repo, check=False)
    assert LEFT in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, proc.stdout.split(LEFT, 1)[1].split()


def assert_one_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    context = "--- stderr (tail)\n" + "\n".join(lines[-10:])
    assert proc.returncode == 2, context
    assert "Traceback" not in proc.stderr, context
    assert sum(line.startswith("error:") for line in lines) == 1, context
    # the last line; a progress bar may share it (it rewrites its line with \r)
    assert lines[-1].split("\r")[-1].strip() == f"error: {expected}", context


INFER = ["infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt"]
SAMPLE_PATHS = ["sample", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt",
                "--latents", "data/latents"]


# --------------------------------------------------------------------------- a read-only location

@pytest.fixture
def ro(tmp_path: Path) -> Path:
    """A folder holding one earlier output (old.npz) and an earlier plots folder, both to stay untouched."""
    d = tmp_path / "ro"
    (d / "plots").mkdir(parents=True)
    (d / "old.npz").write_bytes(b"earlier output")
    (d / "plots" / "grid.png").write_bytes(b"earlier picture")
    return d


def test_infer_into_read_only_folder_fails_before_sampling(repo: Path, ro: Path):
    before = tree(ro)
    t0 = time.monotonic()
    proc, left = mnist_ldm(repo, "ro", ro, *INFER, "--num-images", "500000", "--sampler", "ddpm",
                           "--output", str(ro / "x.npz"))
    assert time.monotonic() - t0 < 20, "refused only after sampling"
    assert_one_error(proc, f"{ro / 'x.npz'}: {READ_ONLY}")
    assert sorted(left) == ["old.npz", "plots"] and tree(ro) == before


def test_infer_over_a_file_in_read_only_folder(repo: Path, ro: Path):
    before = tree(ro)
    proc, _ = mnist_ldm(repo, "ro", ro, *INFER, "--num-images", "4", "--output", str(ro / "old.npz"))
    assert_one_error(proc, f"{ro / 'old.npz'}: {READ_ONLY}")
    assert tree(ro) == before


def test_infer_into_new_subfolder_of_read_only_folder(repo: Path, ro: Path):
    before = tree(ro)
    proc, left = mnist_ldm(repo, "ro", ro, *INFER, "--num-images", "4", "--output", str(ro / "sub" / "x.png"))
    assert_one_error(proc, f"{ro / 'sub'}: {READ_ONLY}")  # the folder it could not create
    assert "sub" not in left and tree(ro) == before


def test_sample_plots_in_read_only_folder(repo: Path, ro: Path, tmp_path: Path):
    before = tree(ro)
    proc, _ = mnist_ldm(repo, "ro", ro, *SAMPLE_PATHS, "--out", str(tmp_path / "s.npz"), "--plots",
                        str(ro / "plots"), "--metrics", str(tmp_path / "s.json"))
    assert_one_error(proc, f"{ro / 'plots'}: {READ_ONLY}")
    assert tree(ro) == before
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.json").exists()  # checked before any work


def test_train_diffusion_metrics_in_read_only_folder(repo: Path, ro: Path, tmp_path: Path):
    t0 = time.monotonic()
    proc, _ = mnist_ldm(repo, "ro", ro, "train-diffusion", "--ae-ckpt", "models/autoencoder.pt", "--latents",
                        "data/latents", "--data", "data/prepared", "--out", str(tmp_path / "d.pt"), "--metrics",
                        str(ro / "d.json"), "--plots", str(tmp_path / "plots"))
    assert time.monotonic() - t0 < 20, "refused only after training"
    assert_one_error(proc, f"{ro / 'd.json'}: {READ_ONLY}")
    assert not (tmp_path / "d.pt").exists()


# --------------------------------------------------------------------------- a full disk (16 KiB tmpfs)
# Caught only while writing: the error names the output (not a temporary file, not "?") and no temporary
# file or folder is left behind.

def test_infer_png_on_full_disk(repo: Path, tmp_path: Path):
    full = tmp_path / "full"
    full.mkdir()
    proc, left = mnist_ldm(repo, "full", full, *INFER, "--num-images", "300", "--output", str(full / "x.png"))
    assert_one_error(proc, f"{full / 'x.png'}: {FULL}")
    assert left == [], left


def test_sample_plots_on_full_disk(repo: Path, tmp_path: Path):
    full = tmp_path / "full"
    full.mkdir()
    proc, left = mnist_ldm(repo, "full", full, *SAMPLE_PATHS, "--out", str(tmp_path / "s.npz"), "--plots",
                           str(full / "plots"), "--metrics", str(tmp_path / "s.json"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1].split("\r")[-1] if lines else ""
    # which picture overflows first is the pictures' business; it is one inside the plots folder
    assert last.startswith(f"error: {full / 'plots'}/") and last.endswith(f".png: {FULL}"), proc.stderr[-2000:]
    assert_one_error(proc, last.removeprefix("error: "))
    assert left == [], left  # no half-written plots folder, no temporary one
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.json").exists()


def test_encode_on_full_disk(repo: Path, tmp_path: Path):
    full = tmp_path / "full"
    full.mkdir()
    proc, left = mnist_ldm(repo, "full", full, "encode", "--data", "data/prepared", "--ae-ckpt",
                           "models/autoencoder.pt", "--out", str(full / "latents"))
    assert_one_error(proc, f"{full / 'latents' / 'train.npz'}: {FULL}")
    assert left == [], left


def test_checkpoint_on_full_disk_leaves_no_plots(repo: Path, tmp_path: Path):
    """The checkpoint does not fit (torch's writer raised `RuntimeError: [enforce fail at inline_container.cc]`
    after the whole training, and the new plots were already in place): one line naming it, no plots, no metrics."""
    full = tmp_path / "full"
    full.mkdir()
    proc, left = mnist_ldm(repo, "full", full, "--set", "autoencoder.checkpoint_every=100000", "train-ae", "--data",
                           "data/prepared", "--out", str(full / "ae.pt"), "--metrics", str(tmp_path / "ae.json"),
                           "--plots", str(tmp_path / "plots"))
    assert_one_error(proc, f"{full / 'ae.pt'}: {FULL}")
    assert left == [] and sorted(p.name for p in tmp_path.iterdir()) == ["full"], left


def test_a_read_only_tracking_store_is_one_line(repo: Path, tmp_path: Path):
    """mlflow.db on a read-only mount: one line (it was SQLAlchemy's 60), before any output is written."""
    db = repo / "mlflow.db"
    cmd = ["unshare", "-m", "sh", "-c", SCRIPT, "sh", "ro", str(db), str(BIN / "mnist-ldm"), "evaluate", "--samples",
           "outputs/samples.npz", "--evaluator", "models/evaluator.pt", "--data", "data/prepared", "--ae-ckpt",
           "models/autoencoder.pt", "--latents", "data/latents", "--output", str(tmp_path / "e.json"), "--plots",
           str(tmp_path / "plots")]
    proc = run(cmd, repo, check=False)
    assert_one_error(proc, f"MLflow store {db} cannot be written (attempt to write a readonly database); make it "
                           f"writable, wait for the process holding it, or set tracking.enabled: false")
    assert list(tmp_path.iterdir()) == []


def test_infer_through_a_symlink_into_read_only_folder_fails_before_sampling(repo: Path, ro: Path, tmp_path: Path):
    """`--output link.npz` whose target is in a read-only folder: refused before sampling, naming the target
    (where the file would be written); the link and the folder stay as they were."""
    link = tmp_path / "link.npz"
    link.symlink_to(ro / "old.npz")
    before = tree(ro)
    t0 = time.monotonic()
    proc, _ = mnist_ldm(repo, "ro", ro, *INFER, "--num-images", "500000", "--sampler", "ddpm", "--output", str(link))
    assert time.monotonic() - t0 < 20, "refused only after sampling"
    assert_one_error(proc, f"{ro / 'old.npz'}: {READ_ONLY}")
    assert tree(ro) == before and link.is_symlink() and link.readlink() == ro / "old.npz"
