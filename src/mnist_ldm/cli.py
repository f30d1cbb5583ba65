"""`mnist-ldm`: one subcommand per pipeline stage, plus `infer` (the seed's infer.py) and `promote` (the
Model Registry's alias `champion`).

Each subcommand is a module in `mnist_ldm.stages`; `stages/<name>.py` at the top of the repository
runs the same module for DVC. Paths are required arguments (dvc.yaml holds them); params come from
`--params` (default params.yaml), `--set section.key=value` and the seed's flags. Errors a user can
fix are printed as one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

from .stages.common import Parser, add_common, guarded, load

# subcommand -> module in mnist_ldm.stages (imported by name, so a stage's code deps stay its own)
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
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mnist-ldm", description="Latent diffusion on MNIST: the pipeline's stages and inference.")
    add_common(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command, module in COMMANDS.items():
        mod = importlib.import_module(f"{__package__}.stages.{module}")
        s = sub.add_parser(command, help=mod.HELP)
        add_common(s, suppress=True)  # `mnist-ldm --params X cmd` and `mnist-ldm cmd --params X` both work
        mod.add_arguments(s)
        s.set_defaults(_run=mod.run)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args._run(load(args), args))


if __name__ == "__main__":
    raise SystemExit(main())
