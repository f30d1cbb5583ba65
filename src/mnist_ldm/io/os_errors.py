"""OS errors as one line a user can act on: `<path>: <strerror>; <hint>`, the hint chosen by errno."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional

HINTS = {
    errno.EACCES: "check the permissions of the file and its folder",
    errno.EPERM: "check the permissions of the file and its folder",
    errno.ENOSPC: "free some disk space and run again",
    errno.EDQUOT: "free some disk space (quota) and run again",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENAMETOOLONG: "use a shorter path",
}


def os_error_line(e: OSError, fallback: Optional[Path] = None) -> str:
    where = e.filename if e.filename is not None else fallback or "?"
    hint = HINTS.get(e.errno or 0, "check the path")
    return f"{where}: {e.strerror or type(e).__name__}; {hint}"
