"""A command writes only what it owns: the paths it is given are checked before any work.

An output folder may hold only the names its stage writes (a user's folder given as `--plots` is
refused, never replaced); no output may be, hold or sit inside one of the command's inputs or another
output; an input must be the kind of thing it names (a file or a folder, not a device or a symlink
loop); an output's folder must be writable.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from mnist_ldm.io.errors import UserError
from mnist_ldm.io.os_errors import HINTS, os_error_line

# the names each stage writes into its output folders (DVC removes the folder before the stage runs, so a
# folder that exists here was written by an earlier run of the stage, restored by DVC, or is someone else's)
OWN_NAMES: dict[str, dict[str, frozenset[str]]] = {
    "prepare": {"out": frozenset({"train.npz", "test.npz", "meta.json"})},
    "encode": {"out": frozenset({"train.npz", "test.npz", "stats.json"})},
    "train_ae": {"plots": frozenset({"reconstructions.png", "loss.png"})},
    "train_diffusion": {"plots": frozenset({"loss.png"})},
    "sample": {"plots": frozenset({"grid.png", "trajectory.png", "interpolation.png", "guidance_sweep.png"})},
    "evaluate": {"plots": frozenset({"fcd.png", "class_histogram.png"})},
    "package_model": {"out": frozenset({"MLmodel", "artifacts", "code", "conda.yaml", "generator.py", "metadata",
                                        "input_example.json", "serving_input_example.json", "python_env.yaml",
                                        "requirements.txt", "registered_model_meta"})},
}
KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a named pipe",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFREG: "a file"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def _own_folder(stage: str, name: str, path: Path, real: str) -> None:
    if real == os.path.dirname(real):
        raise UserError(f"{flag(name)} {path}: is the root folder; give a folder of its own")
    cwd = os.path.realpath(os.getcwd())
    if real == cwd or _inside(cwd, real):
        raise UserError(f"{flag(name)} {path}: is or holds the current folder; give a folder of its own")
    if not os.path.isdir(real):
        return
    own = OWN_NAMES.get(stage, {}).get(name, frozenset())
    foreign = sorted(set(os.listdir(real)) - own)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{flag(name)} {path}: holds {shown}, which {stage} does not write; it replaces this "
                        f"folder as a whole, so give a new or empty folder (or remove those files)")


def _output(stage: str, name: str, path: Path, folder: bool) -> str:
    """The real path `path` (an output) will be written to; refused if it cannot be one."""
    kind = what_is(path)
    if kind == "a symlink loop":
        raise UserError(f"{flag(name)} {path}: is a symlink loop; give a {'folder' if folder else 'file'} path")
    real = os.path.realpath(path)
    if os.path.islink(path) and f"{os.sep}.dvc{os.sep}cache{os.sep}" in real:
        raise UserError(f"{flag(name)} {path}: links into DVC's cache ({real}); run `dvc unprotect {path}` first")
    if kind is not None and kind not in ("a file", "a folder") and not kind.startswith("a symlink"):
        raise UserError(f"{flag(name)} {path}: is {kind}, not a regular {'folder' if folder else 'file'}; "
                        f"give a {'folder' if folder else 'file'} path")
    return real


def check_paths(stage: str, args: Any, inputs: Mapping[str, str] = {}, files: Sequence[str] = (),
                folders: Sequence[str] = ()) -> None:
    """Refuse, before any work, paths that `stage` cannot use: an input (`inputs`: name -> "a file" or "a
    folder"; `--params` too) that exists but is something else, an output that is a device, a symlink loop
    or a link into DVC's cache, an output folder holding names the stage does not write, and an output that
    is, holds or sits inside an input or another output. Names are `args` attributes (flag --name). Then
    `check_writable` on the outputs (a symlinked output's target, which is what gets written)."""
    given = {n: Path(p) for n in (*inputs, "params", *files, *folders) if (p := getattr(args, n, None)) is not None}
    ins: dict[str, str] = {}
    for name, want in {**inputs, "params": "a file"}.items():
        if name in given:
            problem = path_problem(given[name], want)
            if problem not in (None, "not found"):
                raise UserError(f"{flag(name)} {given[name]}: {problem}")
            ins[name] = os.path.realpath(given[name])
    outs = {n: _output(stage, n, given[n], n in folders) for n in (*files, *folders) if n in given}
    for name, real in outs.items():
        others = [(n, r, "an input of this command") for n, r in ins.items()]
        others += [(n, r, "another output") for n, r in outs.items() if n != name]
        for other, where, role in others:
            how = ("is also" if real == where else "is inside" if _inside(real, where)
                   else "holds" if _inside(where, real) else None)
            if how:
                raise UserError(f"{flag(name)} {given[name]}: {how} {flag(other)} {given[other]}, {role}; "
                                f"write the output elsewhere")
    for name in folders:
        if name in outs:
            _own_folder(stage, name, given[name], outs[name])
    target = {n: Path(real) if os.path.islink(given[n]) else given[n] for n, real in outs.items()}
    check_writable(files=[target[n] for n in files if n in target], folders=[target[n] for n in folders if n in target])


def check_writable(files: Sequence[Path] = (), folders: Sequence[Path] = ()) -> None:
    """Fail before any expensive work if an output cannot be written (a parent is a file, no permission,
    a file where a folder should be or the reverse)."""
    for path, want_dir in [(Path(f), False) for f in files] + [(Path(d), True) for d in folders]:
        parent = path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{path}: cannot write here: a parent of it is a file, not a folder") from None
        except OSError as e:
            raise UserError(os_error_line(e, parent)) from None
        if path.exists() and path.is_dir() != want_dir:
            raise UserError(f"{path}: is {'a folder' if path.is_dir() else 'a file'}; "
                            f"expected {'a folder' if want_dir else 'a file'} path here")
        if not os.access(parent, os.W_OK) and os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise UserError(f"{path}: {os.strerror(errno.EROFS)}; {HINTS[errno.EROFS]}")  # not a permission
        if not os.access(parent, os.W_OK):
            raise UserError(f"{parent}: no permission to write {path.name} here; fix the folder's permissions")
