"""`mnist-ldm`: one subcommand per pipeline stage, plus `infer`, `promote`, `ui` and `summary`; each is a module of
`mnist_ldm.commands`, run by `mnist_ldm.runtime.command.run_command` as `stages/<name>.py` runs it. Options go
before or after the subcommand."""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from mnist_ldm.runtime.command import Parser, add_command, add_common, run_command

COMMANDS = {name.replace("_", "-"): name for name in (  # subcommand -> its module, the name of its DVC stage
    "check_params", "prepare", "train_ae", "encode", "train_diffusion", "sample", "infer", "train_evaluator",
    "evaluate", "package_model", "promote", "ui", "summary")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = Parser(prog="mnist-ldm", description="Latent diffusion on MNIST: the pipeline's stages and inference.")
    add_common(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command, module in COMMANDS.items():
        mod = importlib.import_module(f"{__package__}.{module}")
        add_command(sub.add_parser(command, help=mod.HELP, description=mod.HELP), mod, suppress=True)
    return run_command(p, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
