"""Stage `sample`: the samples that `evaluate` scores, a grid, a denoising trajectory, a latent
interpolation and, for a class-conditional model, a guidance sweep."""

from __future__ import annotations

import argparse
import math
import time

from mnist_ldm.io.atomic import atomic_dir, write_npz
from mnist_ldm.config.sections import Params, SamplingRequest
from mnist_ldm.runtime.memory import check_sampling_memory
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import PRECISION_TAG, add_paths, publish, runtime_for

HELP = "generate the digits evaluate scores (sample.num_images) and their grids, trajectory and interpolation"
GUIDANCE_SWEEP = (0.0, 1.0, 2.0, 4.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, ckpt="diffusion checkpoint", ae_ckpt="autoencoder checkpoint",
              latents="latent cache (reference size, digits to interpolate)", out=".npz of the samples to write",
              plots="folder for the PNG pictures", metrics="metrics JSON to write")


def run(params: Params, args: argparse.Namespace) -> dict:
    import numpy as np
    from mnist_ldm.io import plots
    from mnist_ldm import tracking
    from mnist_ldm.data.latents import check_producer, load_latents
    from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline

    cfg = params.sample
    if args.out.suffix != ".npz":
        raise UserError(f"--out {args.out}: expected a file name ending in .npz (sample writes NumPy arrays there)")
    check_paths(args, {"ckpt": "a file", "ae_ckpt": "a file", "latents": "a folder"}, ["out", "metrics"],
                ["plots"])
    check_producer(args.latents, args.ae_ckpt)
    z_test, _ = load_latents(args.latents, "test")  # the reference set's size, and digits to interpolate
    if cfg.num_images == 0:  # as many as the test set, the reference that `evaluate` compares with
        cfg = cfg.model_copy(update={"num_images": len(z_test)})
    pipe = LatentDiffusionPipeline.from_checkpoints(args.ckpt, args.ae_ckpt, use_ema=cfg.use_ema).to(runtime_for(args))
    request = pipe.check(SamplingRequest.of(cfg))  # steps beyond T, a digit for an unconditional model
    check_sampling_memory(f"sample.num_images={cfg.num_images}", cfg.num_images, cfg.batch_size, pipe.latent_dim)
    with tracking.stage_run("sample", params, tracking.section_params(params.model_copy(update={"sample": cfg}),
                                                                      "sample")) as run:
        run.set_tag(PRECISION_TAG, pipe.rt.precision)
        t0 = time.perf_counter()
        out = pipe.generate(cfg.num_images, request, batch_size=cfg.batch_size, trajectory_points=10)
        seconds = time.perf_counter() - t0
        n_evals = pipe.network_evals(cfg.sampler, cfg.steps)
        with atomic_dir(args.plots) as tmp:
            plots.save_grid(out.images[:cfg.grid_size], tmp / "grid.png", nrow=math.isqrt(cfg.grid_size))
            strip = np.stack(out.trajectory, 1).reshape(-1, 28, 28)  # rows: samples, columns: time
            plots.save_grid(strip, tmp / "trajectory.png", nrow=len(out.trajectory))
            z_std = pipe.scaler.standardize(z_test[:12])
            plots.save_grid(pipe.interpolate(z_std[:6], z_std[6:12]), tmp / "interpolation.png", nrow=10)
            if pipe.num_classes:
                plots.save_grid(pipe.guidance_sweep(GUIDANCE_SWEEP), tmp / "guidance_sweep.png",
                                nrow=len(GUIDANCE_SWEEP))
        write_npz(args.out, images=out.images, labels=out.labels)
        summary = {"num_images": int(len(out.images)), "sampler": cfg.sampler, "network_evals": int(n_evals)}
        speed = {"seconds": round(seconds, 2), "images_per_second": round(len(out.images) / seconds, 1)}
        run.log_image(plots.grid_array(out.images[:64], 8), key="samples", step=0)
        # the time goes to MLflow, not to the metrics file git keeps: it differs at every run
        publish(run, {**summary, **speed}, args.metrics, sorted(args.plots.glob("*.png")) + [args.metrics],
                metrics_file=summary)
    print(f"sample: {len(out.images)} images with {cfg.sampler} ({n_evals} network evaluations) in {seconds:.1f} s "
          f"-> {args.out}")
    return summary
