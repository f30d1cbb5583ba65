"""Stage `check_params`: every param is checked before DVC deletes any output.

DVC removes a stage's outputs before it runs the stage's command, so a bad value (say
`diffusion.lr: fast`) that only the command would notice costs the previous outputs. This stage
runs first whenever params.yaml changes, and every other stage depends on what it writes. With
valid params it writes the same bytes every time, so it never makes another stage re-run by itself;
with a bad value it fails, and `dvc repro` stops before touching anything downstream.

Loading the params checks every value and every rule between sections (`config.sections`); this stage then
checks what a stage needs beyond valid params and can be checked cheaply, without torch: evaluate.k against
the images `evaluate` will compare, and the IDX files of data.source=idx.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_ldm.io.atomic import write_json
from mnist_ldm.config.sections import ConfigError, Params, min_images
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import add_paths

HELP = "check every param in the params file (the pipeline's first stage)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, out="marker file written when every param is valid")


def check_inputs(params: Params, where: Path) -> None:
    """What stages need beyond valid params: evaluate.k fits the images `evaluate` will compare, and, with
    data.source=idx, the four IDX files that `prepare` reads are in data.idx_dir."""
    need = min_images(params.evaluate.k)  # `evaluate` compares the fewest of evaluate.n, the samples, the sets
    caps = {"sample.num_images": params.sample.num_images, "data.limit_test": params.data.limit_test,
            "data.limit_train": params.data.limit_train}  # 0: every image
    for key, n in caps.items():
        if 0 < n < need:
            raise ConfigError(f"{where}: evaluate.k={params.evaluate.k} needs at least {need} images to compare, "
                              f"and {key}={n} leaves {n}; expected a smaller evaluate.k, or {key} >= {need}")
    if params.data.source == "idx":
        from mnist_ldm.data.sources import require_idx_files  # numpy only: this stage never imports torch

        require_idx_files(Path(params.data.idx_dir))


def run(params: Params, args: argparse.Namespace) -> None:
    check_inputs(params, args.params)
    check_paths(args, files=["out"])
    write_json(args.out, {"params_file": str(args.params), "valid": True})  # constant while params are valid
    print(f"check_params: every param in {args.params} is valid")
