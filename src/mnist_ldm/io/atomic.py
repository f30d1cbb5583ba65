"""Atomic outputs: written beside their target under a temporary name, then renamed into place, so an interrupted
stage never leaves a file that looks finished and a folder given as an output keeps every file of its own."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path` (a symlink: its target); on success it replaces `path`, on error it
    is removed. `folder`: an empty folder, whose entries on success replace those of their names in `path`."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}" + ("" if folder else path.suffix))
    if folder:
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
        if folder:
            _move_into(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:  # one about `tmp` (or naming no file: a write through a file object) names `path` instead
        name = str(tmp) if e.filename is None else os.fsdecode(e.filename)
        if name != str(tmp) and not name.startswith(str(tmp) + os.sep):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path) + name[len(str(tmp)):]) from None
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_dir(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """`atomic_path` for a folder: on error `path` stays as it was."""
    return atomic_path(path, folder=True)


def _move_into(src: Path, dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    for entry in src.iterdir():
        if entry.is_dir():
            _move_into(entry, dest / entry.name)
        else:
            os.replace(entry, dest / entry.name)


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float as None, its key listed under `"absent"` (JSON readers disagree on NaN)."""
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
    """`arrays` (those not None) as an .npz, written atomically; `compress=False` for float data that zlib barely
    shrinks."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **{k: a for k, a in arrays.items() if a is not None})
