"""A command's flags: argparse types whose errors say what was expected, the one-line-error parser, the
options every command takes (`--params`, `--set`, `--device`, `--precision`), required paths, and the
params and runtime they select."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Params
from ..params_file import apply_overrides, load_params

if TYPE_CHECKING:
    from ..device import Runtime


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
                   help="fp32, or bf16 autocast (CUDA, or a CPU with AMX or AVX-512 BF16) with fp32 weights "
                        "(default: $MNIST_LDM_PRECISION, else fp32)")


def add_paths(p: argparse.ArgumentParser, **flags: str) -> None:
    """Required path arguments, named as keywords: `add_paths(p, ae_ckpt="...")` adds `--ae-ckpt` (dvc.yaml
    passes every path; no path has a default that could drift from it)."""
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=Path, required=True, help=text)


def load(args: argparse.Namespace) -> Params:
    """The params file with the `--set` overrides given before and after the subcommand, in that order."""
    items = [*(getattr(args, "set", None) or []), *(getattr(args, "set_after", None) or [])]
    return apply_overrides(load_params(args.params), items)


# the MLflow tag of every stage run that computes: DVC does not see the precision (see device.py)
PRECISION_TAG = "mnist_ldm.precision"


def runtime_for(args: argparse.Namespace) -> "Runtime":
    """Device, precision and (under torchrun) the process group, from the flags and the environment."""
    from ..device import runtime  # imported here: stages that never touch torch (check_params) start fast

    return runtime(getattr(args, "device", None), getattr(args, "precision", None))


def add_curves(p: argparse.ArgumentParser) -> None:
    """`--curves FILE`: a training stage's per-epoch figures as JSON, the data of dvc.yaml's curve plots
    (dvc.yaml passes it; by hand it is optional)."""
    p.add_argument("--curves", type=Path, help="per-epoch figures to write as JSON (dvc.yaml's curve plots)")
