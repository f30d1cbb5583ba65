"""Stage `train_ae`: the autoencoder (conv, mlp, or none: pixel space), its checkpoint, metrics and pictures."""

from __future__ import annotations

import argparse

from mnist_ldm.io.atomic import atomic_dir
from mnist_ldm.config.sections import Params
from mnist_ldm.data.prepared import load_meta, load_split
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import PRECISION_TAG, add_param_flags, add_paths, publish, runtime_for, writes_outputs

HELP = "train the autoencoder (conv or mlp; pixel space writes a pass-through one)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, curves=True, data="prepared data folder", out="checkpoint to write", metrics="metrics JSON to write",
              plots="folder for the PNG pictures")
    add_param_flags(p, **{k: f"autoencoder.{k}" for k in ("epochs", "batch_size", "lr", "latent_dim", "generate_images")})


def run(params: Params, args: argparse.Namespace) -> dict:
    from mnist_ldm.io import plots
    from mnist_ldm import tracking
    from mnist_ldm.autoencoder.model import reconstruction_metrics, reconstructions
    from mnist_ldm.io.checkpoint import save_checkpoint
    from mnist_ldm.autoencoder.train import train_autoencoder
    from mnist_ldm.runtime.loop import count_parameters, resume_path_for

    cfg = params.autoencoder
    check_paths(args, {"data": "a folder"}, ["out", "metrics", "curves"], ["plots"])
    rt = runtime_for(args)
    meta = load_meta(args.data)
    train, test = (load_split(args.data, s) for s in ("train", "test"))
    with tracking.training_run("train_ae", params, "autoencoder", meta, "mnist-train", args.data) as run:
        run.set_tag(PRECISION_TAG, rt.precision)
        model, history = train_autoencoder(cfg, train, test, resume_path_for(args.out), meta["content_hash"],
                                           on_epoch=run.log_epoch, previews=cfg.generate_images and run.logging, rt=rt)
        if not writes_outputs(rt, "train_ae", model):
            return {}
        final = {**reconstruction_metrics(model, test.images, precision=rt.precision),
                 "params": count_parameters(model)}
        pictures = ["reconstructions.png"] + (["loss.png"] if history else [])  # pixel space trains nothing
        with atomic_dir(args.plots) as tmp:
            plots.save_grid(reconstructions(model, test.images[:32], rt.precision), tmp / "reconstructions.png",
                            nrow=32)
            if history:
                plots.save_figure(plots.line_chart(history, ["train_loss", "test_bce"], "autoencoder BCE"),
                                  tmp / "loss.png")
            # inside: a checkpoint that cannot be written (a full disk) leaves the plots as they were
            save_checkpoint(args.out, "mnist-ldm/autoencoder", {
                "model_config": model.spec.to_dict(),
                "state_dict": model.state_dict(),
                "train_config": cfg.model_dump(exclude={"generate_images"}),
                "trained_on": {k: meta[k] for k in ("source", "content_hash", "counts")},
                "runtime": rt.record(),
                "history": history,
                "metrics": final,
            })
        resume_path_for(args.out).unlink(missing_ok=True)  # the checkpoint is written: drop the resume state
        publish(run, final, args.metrics, [*(args.plots / p for p in pictures), args.metrics, args.data / "meta.json"],
                curves=args.curves, history=history)
    print(f"train_ae: test BCE {final['test_bce']:.4f}, MSE {final['test_mse']:.5f}, "
          f"{final['params']:,} parameters -> {args.out}")
    return final
