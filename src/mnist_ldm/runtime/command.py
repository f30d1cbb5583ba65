"""How every command runs, whichever entry starts it (`mnist-ldm <name>`, `python stages/<name>.py`, torchrun):
its options and params, the re-run under torchrun, one-line errors (exit 2), exit 130 on Ctrl-C or SIGTERM, and
what a finished stage writes."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from mnist_ldm.config.params_file import apply_overrides, load_params, parse_yaml, with_changes
from mnist_ldm.config.sections import ConfigError, Params
from mnist_ldm.io.atomic import write_json
from mnist_ldm.io.errors import UserError, os_error_line
from mnist_ldm.io.hashing import arrays_digest
from mnist_ldm.runtime.memory import keep_freed_memory
from mnist_ldm.runtime.progress import close_bars

NPROC_ENV = "MNIST_LDM_NPROC"
TRAINING_STAGES = ("train_ae", "train_diffusion", "train_evaluator")
PRECISION_TAG = "mnist_ldm.precision"  # the MLflow tag of every stage run that computes: DVC does not see it


def positive_int(text: str) -> int:
    """An argparse type for a flag that is not a param (a port, a version)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(2, f"error: {self.prog}: {message}\n")


def add_common(p: argparse.ArgumentParser, suppress: bool = False, computes: bool = True) -> None:
    """`--params`, `--set` and, for a command that computes, `--device`, `--precision`; `suppress` for a
    subcommand's copy, so that they work before and after the subcommand."""
    default = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--params", type=Path, default=default(Path("params.yaml")), help="params file (default: params.yaml)")
    # the subcommand's copy appends to a list of its own: argparse would otherwise drop the items given before it
    p.add_argument("--set", action="append", dest="set_after" if suppress else "set", default=default([]),
                   metavar="SECTION.KEY=VALUE",
                   help="override one param for this command (repeatable), e.g. --set diffusion.lr=0.0005")
    if not computes:
        return
    p.add_argument("--device", default=default(None), metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps (default: $MNIST_LDM_DEVICE, else auto: CUDA, else MPS, "
                        "else CPU); not a param, so choosing one never makes outputs look stale")
    p.add_argument("--precision", default=default(None), choices=("fp32", "bf16"),
                   help="fp32, or bf16 autocast (CUDA, or a CPU with AMX or AVX-512 BF16) with fp32 weights "
                        "(default: $MNIST_LDM_PRECISION, else fp32)")


def add_paths(p: argparse.ArgumentParser, curves: bool = False, **flags: str) -> None:
    """Required paths: `add_paths(p, ae_ckpt="...")` adds `--ae-ckpt` (dvc.yaml passes every path); `curves`: the
    optional `--curves`."""
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=Path, required=True, help=text)
    if curves:
        p.add_argument("--curves", type=Path, help="per-epoch figures to write as JSON (dvc.yaml's curve plots)")


def add_param_flags(p: argparse.ArgumentParser, **keys: str) -> None:
    """One flag per param: `add_param_flags(p, epochs="autoencoder.epochs")` adds `--epochs` (`--x/--no-x` for a
    bool), read as YAML and validated by the param's section (`load`)."""
    for dest, key in keys.items():
        section, _, name = key.partition(".")
        field = Params.model_fields[section].annotation.model_fields[name]
        text = f"{key}: {field.description}" if field.description else key
        if dest in {a.dest for a in p._actions}:  # a flag of the command's own making (infer's --ema)
            continue
        kind = {"action": argparse.BooleanOptionalAction} if field.annotation is bool else {"metavar": name.upper()}
        p.add_argument("--" + dest.replace("_", "-"), help=text, **kind)
    p.set_defaults(param_flags={**(p.get_default("param_flags") or {}), **keys})


def load(args: argparse.Namespace) -> Params:
    """The params file, the `--set` overrides given before and after the subcommand, then the param flags."""
    params = apply_overrides(load_params(args.params), [*getattr(args, "set", []), *getattr(args, "set_after", [])])
    changes = []
    for dest, key in getattr(args, "param_flags", {}).items():
        value = given = getattr(args, dest, None)
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, str):
            try:
                value = parse_yaml(value)
            except ConfigError as e:
                raise ConfigError(f"{flag} {given}: {str(e).removeprefix('params: ')}") from None
        if value is not None:
            changes.append((f"{flag} {given}", key, value))
    return with_changes(params, changes, sections_only=True)


def runtime_for(args: argparse.Namespace):
    """Device, precision and (under torchrun) the process group, from the flags and the environment."""
    from mnist_ldm.runtime.device import runtime  # here: check-params never imports torch

    return runtime(getattr(args, "device", None), getattr(args, "precision", None))


def add_command(p: argparse.ArgumentParser, command: ModuleType, suppress: bool = False) -> argparse.ArgumentParser:
    """`command`'s flags and the common ones, on `p`."""
    add_common(p, suppress, getattr(command, "COMPUTES", True))
    command.add_arguments(p)
    p.set_defaults(command_module=command)
    return p


def command_parser(command: ModuleType) -> Parser:
    """The parser of `stages/<name>.py`: the flags of `mnist-ldm <name>`."""
    name = command.__name__.rpartition(".")[2].replace("_", "-")
    return add_command(Parser(prog=f"mnist-ldm {name}", description=command.HELP), command)


def relaunch_under_torchrun(name: str, argv: Sequence[str]) -> None:
    """`MNIST_LDM_NPROC=N` (N > 1) re-runs a training stage with the same arguments under `torchrun --standalone
    --nproc_per_node N` (a switch for DVC's commands, not a param). Nothing happens under torchrun."""
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


def dvc_line() -> str:
    """Under `dvc repro` (DVC_STAGE set), how to bring back the outputs DVC removed before running the stage: from
    its cache, and those dvc.yaml marks `cache: false` from git."""
    name, kept = os.environ.get("DVC_STAGE", "").strip(), []
    if not name:
        return ""
    with contextlib.suppress(Exception):
        spec = parse_yaml(Path("dvc.yaml").read_text())["stages"][name]
        kept = [path for key in ("outs", "metrics", "plots") for entry in spec.get(key) or [] if isinstance(entry, dict)
                for path, opts in entry.items() if isinstance(opts, dict) and opts.get("cache") is False]
    return (f"DVC removed the previous outputs of stage '{name}' before running it; `dvc checkout {name}` brings "
            f"them back from the cache" + (f", `git checkout HEAD -- {' '.join(kept)}` the ones git keeps" if kept
                                           else ""))


def interrupted_line() -> str:
    """What an interrupted command says last."""
    return f"interrupted: {dvc_line()}" if dvc_line() else "interrupted"


def failed(line: str, code: int) -> int:
    """Print `line` after closing the progress bars, then, under `dvc repro`, `dvc_line`; return `code`."""
    close_bars()
    print(line, file=sys.stderr)
    if dvc_line() and code != 130:  # the interrupted line says it already
        print(dvc_line(), file=sys.stderr)
    return code


def guarded(fn) -> int:
    """Run `fn`: user and OS errors become one `error:` line and exit 2; Ctrl-C or SIGTERM exits 130."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        fn()
    except (UserError, ConfigError) as e:
        return failed(f"error: {e}", 2)
    except OSError as e:
        return failed(f"error: {os_error_line(e)}", 2)
    except KeyboardInterrupt:
        return failed(interrupted_line(), 130)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Parse `argv` and run its command (`add_command`) with its params; the exit status. A bad flag or param
    exits 2 before anything runs; the torchrun process group, if joined, is left at the end."""
    args, params = parser.parse_args(argv), []
    name = args.command_module.__name__.rpartition(".")[2]
    if not getattr(args.command_module, "COMPUTES", True):  # the flags given before the subcommand
        for flag in ("device", "precision"):
            if getattr(args, flag, None) is not None:
                parser.error(f"--{flag}: {name.replace('_', '-')} runs no network; expected it without --{flag}")
    code = (guarded(lambda: params.append(load(args)))
            or guarded(lambda: relaunch_under_torchrun(name, list(argv))))
    if code:
        return code
    keep_freed_memory()
    try:
        return guarded(lambda: args.command_module.run(params[0], args))
    finally:
        dist = sys.modules.get("torch.distributed")  # torch is not imported by every command
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(command: ModuleType, *argv: str) -> None:
    """A `stages/<name>.py` entry (what DVC runs)."""
    sys.exit(run_command(command_parser(command), [*argv, *sys.argv[1:]]))


def weights_digest(model) -> str:
    """The sha256 of a model's weights (checkpoints record it; torchrun ranks print it to show they agree)."""
    return arrays_digest((t.detach().cpu().numpy() for t in model.state_dict().values()), shapes=False)


def writes_outputs(rt, name: str, model) -> bool:
    """Whether this process writes the stage's outputs (rank 0); every torchrun rank prints its weights' hash."""
    if rt.dist.world > 1:
        print(f"{name}: rank {rt.dist.rank}/{rt.dist.world} final weights {weights_digest(model)[:16]}", file=sys.stderr)
    return rt.dist.main


def publish(run, final: dict, metrics_path: Path, artifacts: Sequence[Path], metrics_file: Optional[dict] = None,
            curves: Optional[Path] = None, history: Sequence[dict] = ()) -> None:
    """A finished stage: its metrics file (`metrics_file`, else `final`), its per-epoch `history` as `curves`,
    `final` as the run's headline and the files as its artifacts."""
    write_json(metrics_path, final if metrics_file is None else metrics_file)
    if curves is not None:
        write_json(curves, list(history))
    run.headline(final)
    for path in [*artifacts, *([curves] if curves is not None else [])]:
        run.log_artifact(path)
