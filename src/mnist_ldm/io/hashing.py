"""The project's one way to hash things: files (md5, as DVC records them), JSON-able values and arrays (sha256)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes (the hash `dvc.lock` records for a file)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def json_digest(obj: Any, length: Optional[int] = None) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys; values JSON lacks as their `str`), cut to `length`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def arrays_digest(arrays: Iterable[np.ndarray], shapes: bool = True) -> str:
    """sha256 of the arrays' bytes in order, each preceded by its shape when `shapes` (so a reshape differs)."""
    h = hashlib.sha256()
    for a in arrays:
        if shapes:
            h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
