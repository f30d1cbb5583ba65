"""Stage `check_params`: every param is checked before DVC deletes any output.

DVC removes a stage's outputs before it runs the stage's command, so a bad value (say
`diffusion.lr: fast`) that only the command would notice costs the previous outputs. This stage
runs first whenever params.yaml changes, and every other stage depends on what it writes. With
valid params it writes the same bytes every time, so it never makes another stage re-run by itself;
with a bad value it fails, and `dvc repro` stops before touching anything downstream.
"""

from __future__ import annotations

import argparse

from ..atomic import write_json
from ..config import Params
from ..paths import check_paths
from .args import add_paths

HELP = "check every param in the params file (the pipeline's first stage)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, out="marker file written when every param is valid")


def run(params: Params, args: argparse.Namespace) -> None:
    check_paths("check_params", args, files=["out"])
    write_json(args.out, {"params_file": str(args.params), "valid": True})  # constant while params are valid
    print(f"check_params: every param in {args.params} is valid")
