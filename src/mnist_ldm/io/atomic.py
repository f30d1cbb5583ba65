"""Atomic outputs: write beside the target under a temporary name, then rename it into place.

An interrupted or failing stage therefore never leaves a file, or a folder of files, that looks
finished (DVC would cache it) or that mixes old and new contents.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mnist_ldm.io.errors import UserError


def _naming_target(e: OSError, tmp: Path, path: Path) -> OSError:
    """`e` naming `path`, the output the user asked for, where it named nothing (a write through a file
    object, e.g. a full disk) or the temporary file or folder standing in for it."""
    name = None if e.filename is None else os.fsdecode(e.filename)
    if name is not None and name != str(tmp) and not name.startswith(str(tmp) + os.sep):
        return e
    where = str(path) if name is None else str(path) + name[len(str(tmp)):]
    return OSError(e.errno, e.strerror or str(e), where)


def _raise_naming_target(e: OSError, tmp: Path, path: Path) -> None:
    named = _naming_target(e, tmp, path)
    if named is e:
        raise e
    raise named from None


def write_target(path: str | Path) -> Path:
    """The path an output is written to: a symlink's target (the link stays, its target gets the new
    contents, replaced atomically in the target's folder), an absolute path for `.` or `..`."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    if not path.name:
        raise UserError(f"{path}: is the root folder; give a path of its own")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (a symlink: its target); on success it replaces `path`, on
    error it is removed."""
    path = write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _raise_naming_target(e, tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `path` (a symlink: its target); on success it replaces `path` as a
    whole, on error it is removed and `path` keeps its previous contents."""
    path = write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.[to][ml][pd]-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir():
            os.replace(path, old)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        _raise_naming_target(e, tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finite_json(obj: Any, where: str = "") -> Any:
    """`obj` with every non-finite float replaced by None and its key listed under `"absent"` with why.

    A metrics file must never carry NaN (DVC, MLflow and JSON readers disagree on it)."""
    absent: dict[str, str] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, (np.generic, np.ndarray)):  # numpy scalars and arrays: plain Python for json
            node = node.tolist()
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, float) and not math.isfinite(node):
            absent[key] = f"not finite ({float(node)})"
            return None
        return node

    clean = walk(obj, "")
    if absent and isinstance(clean, dict):
        clean["absent"] = {**clean.get("absent", {}), **absent}
    return clean


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_npz(path: str | Path, compress: bool = True, **arrays: np.ndarray) -> None:
    """`arrays` as an .npz, written atomically; `compress=False` for float data that zlib barely shrinks."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
