"""The paths a command is given, checked before any work: an input is the kind of thing it names; an output is not,
holds or sits inside an input or another output, is not the root or the current folder, and can be written."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from mnist_ldm.io.errors import UserError, os_error_line

KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a named pipe",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFREG: "a file"}


def what_is(path: str | Path) -> Optional[str]:
    """What `path` is ("a file", "a folder", "a character device", "a symlink loop", ...), None if nothing."""
    try:
        return KINDS.get(stat.S_IFMT(os.stat(path).st_mode), "not a file")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(path):
            return f"a symlink to {os.readlink(path)}, which does not exist"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def path_problem(path: str | Path, want: str) -> Optional[str]:
    """Why `path` cannot be read as `want` ("a file" or "a folder"): "not found", or what it is instead."""
    kind = what_is(path)
    if kind is None:
        return "not found"
    if kind.startswith("a symlink to"):
        return f"is {kind}"
    return None if kind == want else f"is {kind}, not {want}"


def input_error(path: str | Path, want: str, missing: str, expected: str) -> Optional[str]:
    """The one line for an input `path` that is not `want`: `missing` where nothing is there, else what is
    there and then `expected`; None if it is `want`."""
    problem = path_problem(path, want)
    if problem is None:
        return None
    return f"{path}: {missing}" if problem == "not found" else f"{path}: {problem}; {expected}"


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_paths(args: Any, inputs: Mapping[str, str] = {}, files: Sequence[str] = (),
                folders: Sequence[str] = ()) -> None:
    """Refuse, before any work, the paths a command cannot use. `inputs` maps an `args` attribute (flag
    --name) to "a file" or "a folder" (`--params` is one too); `files` and `folders` name the outputs."""
    given = {n: Path(p) for n in (*inputs, "params", *files, *folders) if (p := getattr(args, n, None)) is not None}
    flag = {n: f"--{n.replace('_', '-')} {p}" for n, p in given.items()}
    real: dict[str, str] = {}
    for name, want in {**inputs, "params": "a file"}.items():
        if name in flag:
            problem = path_problem(given[name], want)
            if problem not in (None, "not found"):
                raise UserError(f"{flag[name]}: {problem}")
            real[name] = os.path.realpath(given[name])
    outs = [n for n in (*files, *folders) if n in flag]
    for name in outs:
        path, kind, noun = given[name], what_is(given[name]), "folder" if name in folders else "file"
        if kind == "a symlink loop":
            raise UserError(f"{flag[name]}: is a symlink loop; give a {noun} path")
        real[name] = os.path.realpath(path)
        if path.is_symlink() and f"{os.sep}.dvc{os.sep}cache{os.sep}" in real[name]:
            raise UserError(f"{flag[name]}: links into DVC's cache ({real[name]}); run `dvc unprotect {path}` first")
        if kind not in (None, "a file", "a folder") and not kind.startswith("a symlink"):
            raise UserError(f"{flag[name]}: is {kind}, not a regular {noun}; give a {noun} path")
    for name in outs:
        for other, where in real.items():
            how = (None if other == name else "is also" if real[name] == where else
                   "is inside" if _inside(real[name], where) else "holds" if _inside(where, real[name]) else None)
            if how:
                role = "another output" if other in outs else "an input of this command"
                raise UserError(f"{flag[name]}: {how} {flag[other]}, {role}; write the output elsewhere")
    cwd = os.path.realpath(os.getcwd())
    for name in outs:
        root = real[name] == os.path.dirname(real[name])
        if name in folders and (root or real[name] == cwd or _inside(cwd, real[name])):
            raise UserError(f"{flag[name]}: is {'the root folder' if root else 'or holds the current folder'}; "
                            f"give a folder of its own")
        check_writable(Path(real[name]) if given[name].is_symlink() else given[name], name in folders)


def check_writable(path: Path, folder: bool) -> None:
    """Fail before any expensive work if `path` cannot be written: a parent is a file, a file where a folder
    should be or the reverse, a read-only file system, no permission."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{path}: cannot write here: a parent of it is a file, not a folder") from None
    except OSError as e:
        raise UserError(os_error_line(e, path.parent)) from None
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{path}: is {'a folder' if path.is_dir() else 'a file'}; "
                        f"expected {'a folder' if folder else 'a file'} path here")
    if not os.access(path.parent, os.W_OK):
        code = errno.EROFS if os.statvfs(path.parent).f_flag & os.ST_RDONLY else errno.EACCES
        raise UserError(os_error_line(OSError(code, os.strerror(code)), path))

