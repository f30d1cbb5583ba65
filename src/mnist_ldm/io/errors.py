"""One-line errors: the exception the commands turn into `error: ...` and exit 2, and OS errors as a line a
user can act on (`<path>: <strerror>; <hint>`, the hint chosen by errno)."""

from __future__ import annotations

import errno

HINTS = {
    **dict.fromkeys((errno.EACCES, errno.EPERM), "check the permissions of the file and its folder"),
    errno.ENOSPC: "free some disk space and run again",
    errno.EDQUOT: "free some disk space (quota) and run again",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENAMETOOLONG: "use a shorter path",
}


class UserError(Exception):
    """A problem with something the user gave (a file, a param, a flag), stated in one line."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none), cut to `limit` characters."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def os_error_line(e: OSError, where: object = None) -> str:
    """`<path>: <strerror>; <hint>`, naming `where` if given, else the file the error names."""
    where = where if where is not None else e.filename if e.filename is not None else "?"
    return f"{where}: {e.strerror or type(e).__name__}; {HINTS.get(e.errno or 0, 'check the path')}"
