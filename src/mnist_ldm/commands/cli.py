"""`mnist-ldm`: one subcommand per pipeline stage, plus `infer` (digits from trained checkpoints) and `promote` (the
Model Registry's alias `champion`).

Each subcommand is a module in `mnist_ldm.commands`. `mnist-ldm <name>`, `python stages/<name>.py` (what
dvc.yaml runs) and `torchrun stages/<name>.py` run it through one function,
`mnist_ldm.runtime.command.run_command`: the same flags, the same `MNIST_LDM_NPROC` re-run under torchrun
for the training stages, the same errors and the same process-group shutdown. Options go before or after
the subcommand; only the chosen subcommand's module is imported (check-params never imports torch).
Paths are required arguments (dvc.yaml holds them); params come from `--params` (default params.yaml),
`--set section.key=value` and the per-command flags (`--epochs`, `--lr`, `--digit`, ...). Errors a user can
fix are printed as one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from mnist_ldm.runtime.command import Parser, add_common
from mnist_ldm.runtime.command import add_command, run_command

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
        mod = importlib.import_module(f"{__package__}.{module}")
        s = sub.add_parser(command, help=mod.HELP)
        add_common(s, suppress=True)  # `mnist-ldm --params X cmd` and `mnist-ldm cmd --params X` both work
        add_command(s, mod)
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
    """`mnist-ldm [options] <command> [options]`: the exit status of `run_command`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(build_parser(chosen_command(argv)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
