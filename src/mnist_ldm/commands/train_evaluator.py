"""Stages `train_evaluator` and `train_second_evaluator`: a network whose features score generated digits, trained
on the training split only. `--section` picks the params section (`evaluator`, the default, or `second_evaluator`);
the stage is `train_<section>`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_ldm.config.sections import Params
from mnist_ldm.data.prepared import load_meta, load_split
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import PRECISION_TAG, add_paths, publish, runtime_for, weights_digest, writes_outputs

HELP = "train a network that scores samples (the evaluator, or the second evaluator)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, curves=True, data="prepared data folder", out="checkpoint to write", metrics="metrics JSON to write")
    p.add_argument("--features", type=Path, default=None,
                   help=".npz to write: the network's features of both splits, which `evaluate --features` reuses")
    p.add_argument("--section", choices=("evaluator", "second_evaluator"), default="evaluator",
                   help="params section that says which network and how to train it (default: evaluator)")


def run(params: Params, args: argparse.Namespace) -> dict:
    from mnist_ldm import tracking
    from mnist_ldm.io.checkpoint import save_checkpoint
    from mnist_ldm.evaluator.model import FEATURE_DIM, reference_features, save_reference
    from mnist_ldm.evaluator.train import train_evaluator
    from mnist_ldm.runtime.loop import count_parameters, resume_path_for

    cfg, stage = getattr(params, args.section), f"train_{args.section}"
    check_paths(args, {"data": "a folder"}, ["out", "metrics", "curves", "features"])
    rt = runtime_for(args)
    meta = load_meta(args.data)
    train, test = (load_split(args.data, s) for s in ("train", "test"))
    with tracking.training_run(stage, params, args.section, meta, "mnist-train", args.data) as run:
        model, history = train_evaluator(cfg, train, test, resume_path_for(args.out), meta["content_hash"],
                                         on_epoch=run.log_epoch, rt=rt, stage=stage)
        run.set_tag(PRECISION_TAG, rt.precision)
        if not writes_outputs(rt, stage, model):
            return {}
        weights_hash = weights_digest(model)
        final = {"test_accuracy": history[-1]["test_accuracy"], "params": count_parameters(model)}
        save_checkpoint(args.out, "mnist-ldm/evaluator", {
            "state_dict": model.state_dict(), "model_config": {"arch": cfg.arch, "feature_dim": FEATURE_DIM},
            "train_config": cfg.model_dump(), "weights_sha256": weights_hash,
            "trained_on": {k: meta[k] for k in ("source", "content_hash", "counts")}, "runtime": rt.record(),
            "metrics": final,
        })
        resume_path_for(args.out).unlink(missing_ok=True)  # the checkpoint is written: drop the resume state
        if args.features is not None:
            save_reference(args.features, reference_features(model, train.images, test.images, rt.precision),
                           weights_sha256=weights_hash, data_hash=meta["content_hash"], precision=rt.precision)
        publish(run, final, args.metrics, [args.metrics],
                metrics_file={**final, "weights_sha256": weights_hash[:16]}, curves=args.curves, history=history)
    print(f"{stage}: {cfg.arch} test accuracy {final['test_accuracy']:.4f} (weights {weights_hash[:12]}) -> {args.out}")
    return final
