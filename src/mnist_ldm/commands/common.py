"""What every command shares: argument types, `--params` and `--set`, writable outputs, one-line errors."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..atomic import write_json
from ..config import Params
from ..params_file import apply_overrides, load_params
from ..errors import UserError
from ..hashing import arrays_digest
from ..outputs import interrupted_line, terminate_as_interrupt

if TYPE_CHECKING:
    from ..device import Runtime


NPROC_ENV = "MNIST_LDM_NPROC"
TRAINING_STAGES = ("train_ae", "train_diffusion", "train_evaluator")


def checked(cast, ok, expected: str):
    """An argparse type: `cast` the text, then require `ok(value)`; errors say what was expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


digit = checked(int, lambda v: 0 <= v <= 9, "a digit 0-9")
positive_int = checked(int, lambda v: v >= 1, "a positive integer")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
finite_float = checked(float, math.isfinite, "a finite number")
seed = checked(int, lambda v: 0 <= v < 2**63, "an integer seed in [0, 2^63)")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(2, f"error: {self.prog}: {message}\n")


def add_common(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """`--params FILE` and `--set section.key=value` (repeatable); `suppress` for a subcommand's copy."""
    default = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--params", type=Path, default=default(Path("params.yaml")), help="params file (default: params.yaml)")
    # the subcommand's copy appends to its own list: argparse would otherwise replace the items given
    # before the subcommand with those given after it
    p.add_argument("--set", action="append", dest="set_after" if suppress else "set", default=default([]),
                   metavar="SECTION.KEY=VALUE",
                   help="override one param for this command (repeatable), e.g. --set diffusion.lr=0.0005")
    p.add_argument("--device", default=default(None), metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps (default: $MNIST_LDM_DEVICE, else auto: CUDA, else MPS, "
                        "else CPU); not a param, so choosing one never makes outputs look stale")
    p.add_argument("--precision", default=default(None), choices=("fp32", "bf16"),
                   help="fp32, or bf16 autocast on CUDA (default: $MNIST_LDM_PRECISION, else fp32)")


def add_paths(p: argparse.ArgumentParser, **flags: str) -> None:
    """Required path arguments, named as keywords: `add_paths(p, ae_ckpt="...")` adds `--ae-ckpt` (dvc.yaml
    passes every path; no path has a default that could drift from it)."""
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=Path, required=True, help=text)


def publish(run, final: dict, metrics_path: Path, artifacts: Sequence[Path], resume: Optional[Path] = None,
            metrics_file: Optional[dict] = None) -> None:
    """A finished stage: drop its resume state, write its metrics file, log its headline and artifacts."""
    if resume is not None:
        resume.unlink(missing_ok=True)
    write_json(metrics_path, final if metrics_file is None else metrics_file)
    run.headline(final)
    for path in artifacts:
        run.log_artifact(path)


def load(args: argparse.Namespace) -> Params:
    items = [*(getattr(args, "set", None) or []), *(getattr(args, "set_after", None) or [])]
    return apply_overrides(load_params(args.params), items)


def runtime_for(args: argparse.Namespace) -> "Runtime":
    """Device, precision and (under torchrun) the process group, from the flags and the environment."""
    from ..device import runtime  # imported here: stages that never touch torch (check_params) start fast

    return runtime(getattr(args, "device", None), getattr(args, "precision", None))


def weights_digest(model) -> str:
    """The sha256 of a model's weights (checkpoints record it; torchrun ranks print it to show they agree)."""
    return arrays_digest((t.detach().cpu().numpy() for t in model.state_dict().values()), shapes=False)


def writes_outputs(rt: "Runtime", name: str, model) -> bool:
    """Whether this process writes the stage's outputs (rank 0 only); every rank of a torchrun job
    prints the hash of its final weights, which must agree."""
    if rt.dist.world > 1:
        print(f"{name}: rank {rt.dist.rank}/{rt.dist.world} final weights {weights_digest(model)[:16]}", file=sys.stderr)
    return rt.dist.main


def maybe_torchrun(name: str, argv: Sequence[str]) -> None:
    """`MNIST_LDM_NPROC=N` (N > 1) runs a training stage under `torchrun --nproc_per_node N`: the switch
    for DVC stage commands, read here and not a param, so it never makes outputs look stale."""
    nproc = os.environ.get(NPROC_ENV, "").strip()
    if name not in TRAINING_STAGES or not nproc or "WORLD_SIZE" in os.environ:
        return
    if not nproc.isdigit() or int(nproc) < 1:
        raise UserError(f"{NPROC_ENV}={nproc!r} is not allowed; expected a number of processes >= 1")
    if int(nproc) > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc,
               sys.argv[0], *argv]
        print(f"{name}: {NPROC_ENV}={nproc}: {' '.join(cmd[1:])}", file=sys.stderr)
        sys.stdout.flush()
        os.execv(sys.executable, cmd)


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


def guarded(fn: Callable[[], object]) -> int:
    """Run a command: user and OS errors become one `error:` line and exit 2; Ctrl-C (or SIGTERM) exits 130."""
    try:
        with terminate_as_interrupt():
            fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except OverflowError as e:
        print(f"error: a number is too large ({e}); check seeds and sizes in params.yaml and the flags",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_line(), file=sys.stderr)
        return 130
    return 0


def run_stage(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
              run: Callable[[Params, argparse.Namespace], object], argv: Optional[Sequence[str]] = None) -> int:
    """`python stages/<name>.py ...`: parse this stage's flags and run it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    code = guarded(lambda: maybe_torchrun(name, argv))
    if code:
        return code
    p = Parser(prog=f"mnist-ldm {name}")
    add_common(p)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return guarded(lambda: run(load(args), args))
    finally:
        if "torch.distributed" in sys.modules:
            from ..device import shutdown_distributed

            shutdown_distributed()
