"""How every command runs, from each of its entries (`python stages/<name>.py`, `torchrun stages/<name>.py`,
`mnist-ldm <name>`): parse its flags, re-run the program under torchrun when `MNIST_LDM_NPROC` asks for
it, run the command with its params, turn errors into one line and an exit status, and shut the torchrun
process group down."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from types import ModuleType
from typing import Callable, Iterator, Sequence

from ..errors import UserError
from ..heap import keep_freed_memory
from ..os_errors import os_error_line
from .args import Parser, add_common, load

NPROC_ENV = "MNIST_LDM_NPROC"
TRAINING_STAGES = ("train_ae", "train_diffusion", "train_evaluator")


def stage_name(command: ModuleType) -> str:
    """`mnist_ldm.commands.train_ae` -> `train_ae`, the name of its DVC stage and `stages/` script."""
    return command.__name__.rpartition(".")[2]


def command_name(command: ModuleType) -> str:
    """`mnist_ldm.commands.train_ae` -> `train-ae`, the word that `mnist-ldm` takes for it."""
    return stage_name(command).replace("_", "-")


def add_command(p: argparse.ArgumentParser, command: ModuleType) -> None:
    """The flags of `command` (a module of `mnist_ldm.commands`), and the command that `run_command` runs."""
    command.add_arguments(p)
    p.set_defaults(command_module=command)


def command_parser(command: ModuleType) -> Parser:
    """One command's parser for its `stages/<name>.py` entry: the flags of `mnist-ldm <name>`, with the
    options every command takes."""
    p = Parser(prog=f"mnist-ldm {command_name(command)}")
    add_common(p)
    add_command(p, command)
    return p


def this_program() -> list[str]:
    """The program this process runs, as torchrun takes it: `-m <module>` under `python -m`, else the script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return ["-m", spec.name] if spec is not None else [sys.argv[0]]


def relaunch_under_torchrun(name: str, argv: Sequence[str]) -> None:
    """`MNIST_LDM_NPROC=N` (N > 1) re-runs this program, with the same arguments, under `torchrun
    --standalone --nproc_per_node N` for a training stage (replacing this process): the switch for DVC
    stage commands, read here and not a param, so it never makes outputs look stale. Nothing happens
    under torchrun already (`WORLD_SIZE` is set) or for other commands."""
    nproc = os.environ.get(NPROC_ENV, "").strip()
    if name not in TRAINING_STAGES or not nproc or "WORLD_SIZE" in os.environ:
        return
    if not nproc.isdigit() or int(nproc) < 1:
        raise UserError(f"{NPROC_ENV}={nproc!r} is not allowed; expected a number of processes >= 1")
    if int(nproc) > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc,
               *this_program(), *argv]
        print(f"{name}: {NPROC_ENV}={nproc}: {' '.join(cmd[1:])}", file=sys.stderr)
        sys.stdout.flush()
        os.execv(sys.executable, cmd)


def interrupted_line() -> str:
    """What an interrupted command says last; under `dvc repro` (DVC_STAGE is set for a stage's command),
    that DVC removed the stage's previous outputs and how to bring them back."""
    name = os.environ.get("DVC_STAGE", "").strip()
    if not name:
        return "interrupted"
    return (f"interrupted: DVC removed the previous outputs of stage '{name}' before running it; "
            f"`dvc checkout {name}` brings them back from the cache")


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt here (main thread only), so it ends like Ctrl-C: one last line."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_interrupt) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def guarded(fn: Callable[[], object]) -> int:
    """Run `fn`: user and OS errors become one `error:` line and exit 2; Ctrl-C (or SIGTERM) exits 130."""
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


def shutdown_process_group() -> None:
    """Leave the torchrun process group, if this process joined one (torch is not imported otherwise)."""
    if "torch.distributed" in sys.modules:
        from ..device import shutdown_distributed

        shutdown_distributed()


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run the command that `parser` (built with `add_command`) reads from `argv`; the exit status.

    A parse error exits 2 before anything runs. A training stage with `MNIST_LDM_NPROC=N` (N > 1) then
    re-runs this program under torchrun; otherwise the command runs with the params file and `--set` overrides,
    glibc keeping freed memory for the next step (`heap.py`), errors as one line (`guarded`), and the process
    group (under torchrun) is shut down."""
    argv = list(argv)
    args = parser.parse_args(argv)
    command = args.command_module
    code = guarded(lambda: relaunch_under_torchrun(stage_name(command), argv))
    if code:
        return code
    keep_freed_memory()
    try:
        return guarded(lambda: command.run(load(args), args))
    finally:
        shutdown_process_group()
