"""`mnist-ldm`: one subcommand per pipeline stage, plus `infer` (the seed's infer.py) and `promote` (the
Model Registry's alias `champion`).

Each subcommand is a module in `mnist_ldm.commands`; `stages/<name>.py` at the top of the repository
runs the same module for DVC. Paths are required arguments (dvc.yaml holds them); params come from
`--params` (default params.yaml), `--set section.key=value` and the seed's flags. Errors a user can
fix are printed as one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .commands.common import Parser, add_common, guarded, load

# subcommand -> module in mnist_ldm.commands (imported by name, so a stage's code deps stay its own)
COMMANDS = {
    "check-params": "check_params",
    "prepare": "prepare",
    "train-ae": "train_ae",
    "encode": "encode",
    "train-diffusion": "train_diffusion",
    "sample": "sample",
    "infer": "infer",
    "train-evaluator": "train_evaluator",
    "evaluate": "evaluate",
    "package-model": "package_model",
    "promote": "promote",
    "ui": "ui",
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; with `only`, the other subcommands are names without their
    arguments, so their modules (and torch) are not imported to run one command."""
    p = Parser(prog="mnist-ldm", description="Latent diffusion on MNIST: the pipeline's stages and inference.")
    add_common(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command, module in COMMANDS.items():
        if only is not None and command != only:
            sub.add_parser(command)
            continue
        mod = importlib.import_module(f"{__package__}.commands.{module}")
        s = sub.add_parser(command, help=mod.HELP)
        add_common(s, suppress=True)  # `mnist-ldm --params X cmd` and `mnist-ldm cmd --params X` both work
        mod.add_arguments(s)
        s.set_defaults(_run=mod.run)
    return p


def chosen_command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand in `argv`: the first word that is not an option or the value of a top-level option."""
    top = Parser(add_help=False)
    add_common(top)  # the top-level options that take a value, read from the parser that defines them
    takes_value = {o for a in top._actions if a.nargs != 0 for o in a.option_strings}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    return guarded(lambda: args._run(load(args), args))


if __name__ == "__main__":
    raise SystemExit(main())
