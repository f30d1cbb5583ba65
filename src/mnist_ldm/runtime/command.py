"""How every command runs, whichever entry starts it (`python stages/<name>.py`, `torchrun stages/<name>.py`,
`mnist-ldm <name>`): its flags and the options every command takes, the params they select, the re-run under
torchrun, one-line errors and exit codes, and what a finished stage writes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from mnist_ldm.config.params_file import apply_overrides, load_params, parse_yaml, with_changes
from mnist_ldm.config.sections import ConfigError, Params
from mnist_ldm.io.atomic import write_json
from mnist_ldm.io.errors import UserError, os_error_line
from mnist_ldm.io.hashing import arrays_digest
from mnist_ldm.runtime.memory import keep_freed_memory

if TYPE_CHECKING:
    from mnist_ldm.runtime.device import Runtime


def positive_int(text: str) -> int:
    """An argparse type for a flag that is not a param (a port, a version)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


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
                   help="fp32, or bf16 autocast (CUDA, or a CPU with AMX or AVX-512 BF16) with fp32 weights "
                        "(default: $MNIST_LDM_PRECISION, else fp32)")


def add_paths(p: argparse.ArgumentParser, **flags: str) -> None:
    """Required path arguments, named as keywords: `add_paths(p, ae_ckpt="...")` adds `--ae-ckpt` (dvc.yaml
    passes every path; no path has a default that could drift from it)."""
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=Path, required=True, help=text)


def add_param_flags(p: argparse.ArgumentParser, **keys: str) -> None:
    """One flag per param, named by keyword: `add_param_flags(p, epochs="autoencoder.epochs")` adds `--epochs`
    (`--x/--no-x` for a bool). Its value, read as YAML, overrides params.yaml's and is validated by the param's
    own section model, so a refusal names the flag and the key (`--epochs 0: autoencoder.epochs=0 ...`)."""
    for dest, key in keys.items():
        section, _, name = key.partition(".")
        field = Params.model_fields[section].annotation.model_fields[name]
        flag, text = "--" + dest.replace("_", "-"), f"{key}: {field.description}" if field.description else key
        if dest in {a.dest for a in p._actions}:  # a flag of the command's own making (infer's --ema)
            continue
        if field.annotation is bool:
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=dest, metavar=name.upper(), help=text)
    p.set_defaults(param_flags={**(p.get_default("param_flags") or {}), **keys})


def load(args: argparse.Namespace) -> Params:
    """The params file with the `--set` overrides given before and after the subcommand, in that order, then
    the command's param flags (each validated with its section)."""
    items = [*(getattr(args, "set", None) or []), *(getattr(args, "set_after", None) or [])]
    params = apply_overrides(load_params(args.params), items)
    changes = []
    for dest, key in (getattr(args, "param_flags", None) or {}).items():
        value, flag = getattr(args, dest, None), "--" + dest.replace("_", "-")
        if isinstance(value, str):
            try:
                value = parse_yaml(value)
            except ConfigError as e:
                raise ConfigError(f"{flag} {getattr(args, dest)}: {str(e).removeprefix('params: ')}") from None
        if value is not None:
            changes.append((f"{flag} {getattr(args, dest)}", key, value))
    return with_changes(params, changes, sections_only=True)


# the MLflow tag of every stage run that computes: DVC does not see the precision (see device.py)
PRECISION_TAG = "mnist_ldm.precision"


def runtime_for(args: argparse.Namespace) -> "Runtime":
    """Device, precision and (under torchrun) the process group, from the flags and the environment."""
    from mnist_ldm.runtime.device import runtime  # imported here: stages that never touch torch (check_params) start fast

    return runtime(getattr(args, "device", None), getattr(args, "precision", None))


def add_curves(p: argparse.ArgumentParser) -> None:
    """`--curves FILE`: a training stage's per-epoch figures as JSON, the data of dvc.yaml's curve plots
    (dvc.yaml passes it; by hand it is optional)."""
    p.add_argument("--curves", type=Path, help="per-epoch figures to write as JSON (dvc.yaml's curve plots)")


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


def relaunch_under_torchrun(name: str, argv: Sequence[str]) -> None:
    """`MNIST_LDM_NPROC=N` (N > 1) re-runs this program (`-m <module>` under `python -m`, else the script) with
    the same arguments under `torchrun --standalone --nproc_per_node N`, for a training stage: the switch for
    DVC stage commands, not a param, so it never makes outputs look stale. Nothing happens under torchrun."""
    nproc = os.environ.get(NPROC_ENV, "").strip()
    if name not in TRAINING_STAGES or not nproc or "WORLD_SIZE" in os.environ:
        return
    if not nproc.isdigit() or int(nproc) < 1:
        raise UserError(f"{NPROC_ENV}={nproc!r} is not allowed; expected a number of processes >= 1")
    if int(nproc) > 1:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc,
               *(["-m", spec.name] if spec is not None else [sys.argv[0]]), *argv]
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


def guarded(fn: Callable[[], object]) -> int:
    """Run `fn`: user and OS errors become one `error:` line and exit 2; Ctrl-C or SIGTERM (which raises
    KeyboardInterrupt here, in the main thread) exits 130."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        fn()
    except (UserError, ConfigError) as e:
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
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run the command that `parser` (built with `add_command`) reads from `argv`; the exit status.

    A parse error or a refused param exits 2 before anything runs. A training stage with `MNIST_LDM_NPROC=N`
    (N > 1) then re-runs this program under torchrun; otherwise the command runs with the params (`load`),
    glibc keeping freed memory (`memory.py`), errors as one line (`guarded`), and leaves the torchrun process
    group, if it joined one."""
    argv = list(argv)
    args = parser.parse_args(argv)
    command, loaded = args.command_module, []
    code = guarded(lambda: loaded.append(load(args))) or guarded(
        lambda: relaunch_under_torchrun(stage_name(command), argv))
    if code:
        return code
    keep_freed_memory()
    try:
        return guarded(lambda: command.run(loaded[0], args))
    finally:
        dist = sys.modules.get("torch.distributed")  # torch is not imported by every command
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(command: ModuleType, *argv: str) -> None:
    """A `stages/<name>.py` entry (the command DVC runs): `command` with `argv`, then the arguments given."""
    sys.exit(run_command(command_parser(command), [*argv, *sys.argv[1:]]))


def weights_digest(model) -> str:
    """The sha256 of a model's weights (checkpoints record it; torchrun ranks print it to show they agree)."""
    return arrays_digest((t.detach().cpu().numpy() for t in model.state_dict().values()), shapes=False)


def writes_outputs(rt: "Runtime", name: str, model) -> bool:
    """Whether this process writes the stage's outputs (rank 0 only); every rank of a torchrun job
    prints the hash of its final weights, which must agree."""
    if rt.dist.world > 1:
        print(f"{name}: rank {rt.dist.rank}/{rt.dist.world} final weights {weights_digest(model)[:16]}", file=sys.stderr)
    return rt.dist.main


def publish(run, final: dict, metrics_path: Path, artifacts: Sequence[Path], metrics_file: Optional[dict] = None,
            curves: Optional[Path] = None, history: Sequence[dict] = ()) -> None:
    """A finished stage: write its metrics file (`metrics_file`, else `final`) and, for a training stage, its
    per-epoch `history` as `curves` (the data `dvc plots` draws); log `final` as its headline, and the files."""
    write_json(metrics_path, final if metrics_file is None else metrics_file)
    if curves is not None:
        write_json(curves, list(history))
    run.headline(final)
    for path in [*artifacts, *([curves] if curves is not None else [])]:
        run.log_artifact(path)
