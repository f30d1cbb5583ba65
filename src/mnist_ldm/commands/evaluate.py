"""Stage `evaluate`: FCD with floors, precision/recall, class balance and memorization, as `metrics/eval.json`.

Also `mnist-ldm evaluate --no-tracking ...` to score any `.npz` of images outside the pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..atomic import atomic_dir, write_json
from ..config import Params, override
from ..data import load_split
from ..paths import check_paths
from .args import PRECISION_TAG, add_paths, runtime_for

HELP = "score an .npz of images: FCD with floors, precision/recall, balance"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, samples=".npz with 'images' (N, 28, 28) uint8", evaluator="evaluator checkpoint",
              data="prepared data folder (the reference images)", ae_ckpt="autoencoder checkpoint (for the floors)",
              latents="latent cache of that autoencoder (for the floors)", output="metrics JSON to write",
              plots="folder for the PNG charts")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (scoring outside the pipeline)")


def _charts(result: dict, plots_dir: Path) -> None:
    from .. import plots

    names = list(result["fcd"])
    fig = plots.bar_chart(names, [result["fcd"][k] for k in names], f"FCD vs MNIST test (n = {result['n']})",
                          "Fréchet classifier distance (log scale, lower is better)", highlight=0, log=True)
    plots.save_figure(fig, plots_dir / "fcd.png")
    counts = result["class_counts"]
    fig = plots.bar_chart(list(counts), list(counts.values()),
                          f"predicted class of generated digits (TV to uniform "
                          f"{result['class_balance']['tv_to_uniform']:.3f})", "samples")
    plots.save_figure(fig, plots_dir / "class_histogram.png")


def run(params: Params, args: argparse.Namespace) -> dict:
    # the library is imported here, not at the top: `--help` and a bad param answer before torch loads
    from .. import tracking
    from ..autoencoder import load_autoencoder
    from ..evaluator import load_evaluator
    from ..latents import check_producer, load_latents
    from ..scoring import load_samples, score

    if args.no_tracking:
        params = dataclasses.replace(params, tracking=override(params.tracking, "tracking", enabled=False))
    cfg = params.evaluate
    check_paths("evaluate", args, {"samples": "a file", "evaluator": "a file", "data": "a folder", "ae_ckpt": "a file",
                                   "latents": "a folder"}, ["output"], ["plots"])
    images, labels = load_samples(args.samples)
    rt = runtime_for(args)
    device = rt.device
    evaluator, ev_meta = load_evaluator(args.evaluator)
    evaluator.to(device)
    train, test = (load_split(args.data, s) for s in ("train", "test"))
    ae = load_autoencoder(args.ae_ckpt)[0].to(device)
    check_producer(args.latents, args.ae_ckpt)
    z_train = load_latents(args.latents, "train")[0]
    stage_params = {**tracking.section_params(params, "evaluate"), "evaluate.samples": str(args.samples)}
    with tracking.stage_run("evaluate", params, stage_params) as run:
        run.set_tags({PRECISION_TAG: rt.precision})
        result = score(images, labels, evaluator, train.images, test.images, ae, z_train, cfg.n, cfg.k, cfg.seed,
                       precision=rt.precision)
        result["evaluator_test_accuracy"] = ev_meta["metrics"]["test_accuracy"]
        with atomic_dir(args.plots) as tmp:
            _charts(result, tmp)
        write_json(args.output, result)
        run.headline({"fcd": result["fcd"]["generated"],
                      **{f"fcd_floor_{k}": v for k, v in result["fcd"].items() if k != "generated"},
                      **result["prdc"], "class_tv": result["class_balance"]["tv_to_uniform"]})
        for p in (args.output, args.plots / "fcd.png", args.plots / "class_histogram.png"):
            run.log_artifact(p)
    rows = "\n".join(f"  {k:<18} {v:10.4f}" for k, v in result["fcd"].items())
    print(f"evaluate: FCD at n = {result['n']} (lower is better)\n{rows}\n"
          f"  precision {result['prdc']['precision']:.3f}  recall {result['prdc']['recall']:.3f}  "
          f"classes present {result['class_balance']['classes_present']}  -> {args.output}")
    return result
