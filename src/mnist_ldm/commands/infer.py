"""`mnist-ldm infer`: digits from a trained pair of checkpoints, as a PNG grid or arrays.

Every default comes from params.yaml's `sample` section; each flag overrides one value there.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mnist_ldm.io.atomic import write_npz
from mnist_ldm.config.sections import SAMPLERS, Params, override
from mnist_ldm.io.errors import UserError
from mnist_ldm.runtime.memory import check_sampling_memory
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import add_paths, digit, finite_float, positive_int, runtime_for, seed

HELP = "generate digits from a trained pair of checkpoints"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, ckpt="diffusion checkpoint", ae_ckpt="autoencoder checkpoint")
    p.add_argument("--output", type=Path, default=Path("generated_digits.png"), help=".png grid or .npz arrays")
    p.add_argument("--num-images", type=positive_int,
                   help="sample.num_images (when that is 0, 'as many as the test set', sample.grid_size)")
    p.add_argument("--seed", type=seed, help="sample.seed")
    p.add_argument("--sampler", choices=SAMPLERS, help="sample.sampler")
    p.add_argument("--steps", type=positive_int, help="sample.steps (DDIM only)")
    p.add_argument("--eta", type=finite_float, help="sample.eta: DDIM noise, 0 deterministic, 1 DDPM-like")
    p.add_argument("--digit", type=digit, help="sample.digit: class-conditional models, which digit")
    p.add_argument("--guidance", type=finite_float, help="sample.guidance: classifier-free guidance scale w")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="use_ema", action="store_const", const=True,
                         help="sample with the EMA of the weights (sample.use_ema: true)")
    weights.add_argument("--raw-weights", dest="use_ema", action="store_const", const=False,
                         help="sample with the weights as trained (sample.use_ema: false)")


def run(params: Params, args: argparse.Namespace) -> Path:
    # the library is imported here, not at the top: `--help` and a bad param answer before torch loads
    from mnist_ldm.io import plots
    from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline
    from mnist_ldm.diffusion.request import SamplingRequest

    cfg = override(params.sample, "sample", num_images=args.num_images, seed=args.seed, sampler=args.sampler,
                   steps=args.steps, eta=args.eta, digit=args.digit, guidance=args.guidance,
                   use_ema=args.use_ema)
    n = cfg.num_images or cfg.grid_size
    suffix = args.output.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise UserError(f"--output {args.output}: unsupported file type '{args.output.suffix}'; "
                        f"use .png (a grid) or .npz (arrays)")
    check_paths(args, {"ckpt": "a file", "ae_ckpt": "a file"}, ["output"])
    pipe = LatentDiffusionPipeline.from_checkpoints(args.ckpt, args.ae_ckpt, use_ema=cfg.use_ema).to(runtime_for(args))
    given = [name for name, value in vars(args).items() if value is not None]  # the flags given: used, or refused
    request = pipe.check(SamplingRequest.from_config(cfg), given)  # steps beyond T, --steps for ddpm, ...
    asked = f"--num-images {n}" if args.num_images else f"sample.{'num_images' if cfg.num_images else 'grid_size'}={n}"
    check_sampling_memory(asked, n, cfg.batch_size, pipe.latent_dim)
    out = pipe.generate(n, request, batch_size=cfg.batch_size)
    if suffix == ".npz":
        write_npz(args.output, **({"images": out.images} if out.labels is None else
                                  {"images": out.images, "labels": out.labels}))
    else:
        plots.save_grid(out.images, args.output, nrow=max(1, int(math.ceil(math.sqrt(n)))))
    print(f"infer: {n} images ({cfg.sampler}, seed {cfg.seed}) -> {args.output}")
    return args.output
