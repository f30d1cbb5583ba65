"""Stage `check_params`, the pipeline's first: DVC deletes a stage's outputs before running it, so every param is
checked here first (loading them checks every value and rule; this adds the cheap checks that need no torch:
evaluate.k against the images it compares, data.source=idx's files). Valid params write the same bytes every time."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_ldm.io.atomic import write_json
from mnist_ldm.config.sections import ConfigError, Params, min_images
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import add_paths

HELP = "check every param in the params file (the pipeline's first stage)"
COMPUTES = False  # no --device/--precision: nothing here runs a network


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, out="marker file written when every param is valid")


def run(params: Params, args: argparse.Namespace) -> None:
    need = min_images(params.evaluate.k)  # `evaluate` compares the fewest of evaluate.n, the samples, the sets
    caps = {"sample.num_images": params.sample.num_images, "data.limit_test": params.data.limit_test,
            "data.limit_train": params.data.limit_train}  # 0: every image
    for key, n in caps.items():
        if 0 < n < need:
            raise ConfigError(f"{args.params}: evaluate.k={params.evaluate.k} needs at least {need} images to compare, "
                              f"and {key}={n} leaves {n}; expected a smaller evaluate.k, or {key} >= {need}")
    if params.data.source == "idx":
        from mnist_ldm.data.sources import require_idx_files  # numpy only: this stage never imports torch

        require_idx_files(Path(params.data.idx_dir))
    check_paths(args, files=["out"])
    write_json(args.out, {"params_file": str(args.params), "valid": True})  # constant while params are valid
    print(f"check_params: every param in {args.params} is valid")
