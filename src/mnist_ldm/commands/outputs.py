"""What a command writes: a check, before any expensive work, that its outputs can be written; which
torchrun rank writes them; and a finished stage's metrics file, headline and artifacts."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ..atomic import write_json
from ..errors import UserError
from ..hashing import arrays_digest
from .os_errors import HINTS, os_error_line

if TYPE_CHECKING:
    from ..device import Runtime


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


def weights_digest(model) -> str:
    """The sha256 of a model's weights (checkpoints record it; torchrun ranks print it to show they agree)."""
    return arrays_digest((t.detach().cpu().numpy() for t in model.state_dict().values()), shapes=False)


def writes_outputs(rt: "Runtime", name: str, model) -> bool:
    """Whether this process writes the stage's outputs (rank 0 only); every rank of a torchrun job
    prints the hash of its final weights, which must agree."""
    if rt.dist.world > 1:
        print(f"{name}: rank {rt.dist.rank}/{rt.dist.world} final weights {weights_digest(model)[:16]}", file=sys.stderr)
    return rt.dist.main


def publish(run, final: dict, metrics_path: Path, artifacts: Sequence[Path], metrics_file: Optional[dict] = None) -> None:
    """A finished stage: write its metrics file (`metrics_file`, else `final`), log `final` as its headline
    and log its artifacts."""
    write_json(metrics_path, final if metrics_file is None else metrics_file)
    run.headline(final)
    for path in artifacts:
        run.log_artifact(path)
