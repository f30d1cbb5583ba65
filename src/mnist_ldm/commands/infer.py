"""`mnist-ldm infer`: digits from a trained pair of checkpoints, as a PNG grid or arrays.

Every default comes from params.yaml's `sample` section; each flag overrides one value there.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Optional

from mnist_ldm.io.atomic import write_npz
from mnist_ldm.config.params_file import parse_yaml
from mnist_ldm.config.sections import REQUEST_FIELDS, Params, SamplingRequest
from mnist_ldm.io.errors import UserError
from mnist_ldm.runtime.memory import check_sampling_memory
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import add_param_flags, add_paths, runtime_for

HELP = "generate digits from a trained pair of checkpoints"
GRID_PX = 384  # a .png grid is scaled up (whole pixels) to at least this width or height, so 16 digits can be seen


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, ckpt="diffusion checkpoint", ae_ckpt="autoencoder checkpoint")
    p.add_argument("--output", type=Path, default=Path("generated_digits.png"),
                   help=f".png grid (at least {GRID_PX} px) or .npz arrays")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="use_ema", action="store_const", const=True,
                         help="sample with the EMA of the weights (sample.use_ema: true)")
    weights.add_argument("--raw-weights", dest="use_ema", action="store_const", const=False,
                         help="sample with the weights as trained (sample.use_ema: false)")
    add_param_flags(p, **{k: f"sample.{k}" for k in ("num_images", *REQUEST_FIELDS, "use_ema")})


def pipeline_stage_of(path: Path) -> Optional[str]:
    """The stage that dvc.lock says writes `path` or a folder holding it; None if none does."""
    real = Path(os.path.realpath(path))
    try:
        return next((name for name, st in parse_yaml(Path("dvc.lock").read_text())["stages"].items()
                     for o in st.get("outs", []) if real.is_relative_to(os.path.realpath(o["path"]))), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # ConfigError is a ValueError
        return None


def run(params: Params, args: argparse.Namespace) -> Path:
    from mnist_ldm.io import plots
    from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline

    cfg = params.sample  # with the flags given
    if args.num_images is not None and cfg.num_images == 0:  # 0 means "the test set's size" to the sample stage
        raise UserError(f"--num-images {args.num_images}: expected an integer >= 1 (the images to draw)")
    n = cfg.num_images or cfg.grid_size
    suffix = args.output.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise UserError(f"--output {args.output}: unsupported file type '{args.output.suffix}'; "
                        f"use .png (a grid) or .npz (arrays)")
    check_paths(args, {"ckpt": "a file", "ae_ckpt": "a file"}, ["output"])
    if owner := pipeline_stage_of(args.output):
        raise UserError(f"--output {args.output}: is an output of the pipeline's stage '{owner}' (dvc.lock); "
                        f"write elsewhere")
    pipe = LatentDiffusionPipeline.from_checkpoints(args.ckpt, args.ae_ckpt, use_ema=cfg.use_ema).to(runtime_for(args))
    given = [name for name in REQUEST_FIELDS if getattr(args, name) is not None]  # the flags given: used, or refused
    request = pipe.check(SamplingRequest.of(cfg), given)  # steps beyond T, --steps for ddpm, ...
    key = "num_images" if cfg.num_images else "grid_size"
    asked = f"--num-images {n}" if args.num_images is not None else f"sample.{key}={n}"
    check_sampling_memory(asked, n, cfg.batch_size, pipe.latent_dim)
    out = pipe.generate(n, request, batch_size=cfg.batch_size)
    if suffix == ".npz":
        write_npz(args.output, images=out.images, labels=out.labels)
    else:
        plots.save_grid(out.images, args.output, nrow=math.ceil(math.sqrt(n)), min_side=GRID_PX)
    print(f"infer: {n} images ({cfg.sampler}, seed {cfg.seed}) -> {args.output}")
    return args.output
