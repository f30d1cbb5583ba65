"""Stage `evaluate`: FCD with floors, precision/recall, class balance and memorization, as `metrics/eval.json`
(`mnist-ldm evaluate --no-tracking ...` scores any `.npz` of images outside the pipeline)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_ldm.io.atomic import atomic_dir, write_json
from mnist_ldm.config.sections import Params
from mnist_ldm.data.prepared import load_meta, load_split
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import PRECISION_TAG, add_paths, runtime_for

HELP = "score an .npz of images: FCD with floors, precision/recall, balance"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, samples=".npz with 'images' (N, 28, 28) uint8", evaluator="evaluator checkpoint",
              data="prepared data folder (the reference images)", ae_ckpt="autoencoder checkpoint (for the floors)",
              latents="latent cache of that autoencoder (for the floors)", output="metrics JSON to write",
              plots="folder for the PNG charts")
    p.add_argument("--second-evaluator", type=Path, default=None,
                   help="checkpoint of a second, independently trained evaluator: its FCDs and floors too")
    p.add_argument("--features", type=Path, default=None,
                   help="the evaluator's features of the splits (train_evaluator --features): not recomputed")
    p.add_argument("--second-features", type=Path, default=None, help="the same for the second evaluator")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (scoring outside the pipeline)")


def _charts(result: dict, plots_dir: Path) -> None:
    from mnist_ldm.io import plots

    series = {"evaluator": list(result["fcd"].values())}
    if "second_evaluator" in result:
        second = result["second_evaluator"]
        series[f"second evaluator ({second['arch']})"] = [second["fcd"][k] for k in result["fcd"]]
    plots.save_figure(plots.grouped_bar_chart(list(result["fcd"]), series, f"FCD vs MNIST test (n = {result['n']})",
                                              "Fréchet classifier distance (log scale, lower is better)"),
                      plots_dir / "fcd.png")
    counts = result["class_counts"]
    plots.save_figure(plots.bar_chart(list(counts), list(counts.values()), f"predicted class of generated digits "
                                      f"(TV to uniform {result['class_balance']['tv_to_uniform']:.3f})", "samples"),
                      plots_dir / "class_histogram.png")


def reference_for(path, meta: dict, data_hash: str, precision: str):
    """The reference features at `path` if given and computed at this precision (else `score` computes them)."""
    if path is None:
        return None
    from mnist_ldm.evaluator.model import load_reference

    ref, why = load_reference(path, weights_sha256=meta["weights_sha256"], precision=precision, data_hash=data_hash)
    if ref is None:
        print(f"evaluate: {path}: {why}; computing the features again", file=sys.stderr)
    return ref


def run(params: Params, args: argparse.Namespace) -> dict:
    from mnist_ldm import tracking
    from mnist_ldm.autoencoder.model import load_autoencoder
    from mnist_ldm.evaluator.model import load_evaluator
    from mnist_ldm.data.latents import check_producer, load_latents
    from mnist_ldm.evaluation.scoring import load_samples, score

    if args.no_tracking:
        params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    cfg = params.evaluate
    inputs = {"samples": "a file", "evaluator": "a file", "data": "a folder", "ae_ckpt": "a file",
              "latents": "a folder", "second_evaluator": "a file", "features": "a file", "second_features": "a file"}
    if args.second_features is not None and args.second_evaluator is None:
        raise UserError("--second-features without --second-evaluator: give the checkpoint they belong to too")
    check_paths(args, inputs, ["output"], ["plots"])
    images, labels = load_samples(args.samples)
    rt = runtime_for(args)
    evaluator, ev_meta = load_evaluator(args.evaluator)
    evaluator.to(rt.device)
    second, second_meta = load_evaluator(args.second_evaluator) if args.second_evaluator else (None, {})
    if second is not None:
        if second_meta.get("weights_sha256") == ev_meta.get("weights_sha256"):
            raise UserError(f"--second-evaluator {args.second_evaluator}: holds the weights of --evaluator "
                            f"{args.evaluator}; expected an evaluator trained on its own (second_evaluator params)")
        second.to(rt.device)
    train, test = (load_split(args.data, s) for s in ("train", "test"))
    ae = load_autoencoder(args.ae_ckpt)[0].to(rt.device)
    check_producer(args.latents, args.ae_ckpt)
    z_train = load_latents(args.latents, "train")[0]
    data_hash = load_meta(args.data)["content_hash"]
    references = (reference_for(args.features, ev_meta, data_hash, rt.precision),
                  reference_for(args.second_features, second_meta, data_hash, rt.precision))
    stage_params = {**tracking.section_params(params, "evaluate"), "evaluate.samples": str(args.samples)}
    with tracking.stage_run("evaluate", params, stage_params) as run:
        run.set_tag(PRECISION_TAG, rt.precision)
        result = score(images, labels, evaluator, train.images, test.images, ae, z_train, cfg.n, cfg.k, cfg.seed,
                       precision=rt.precision, second=second, references=references)
        result["evaluator_test_accuracy"] = ev_meta["metrics"]["test_accuracy"]
        if second is not None:
            result["second_evaluator"]["test_accuracy"] = second_meta["metrics"]["test_accuracy"]
        with atomic_dir(args.plots) as tmp:
            _charts(result, tmp)
        write_json(args.output, result)
        run.headline(result)  # every number of eval.json, under its dotted key
        for p in (args.output, args.plots / "fcd.png", args.plots / "class_histogram.png"):
            run.log_artifact(p)
    second_fcd = result.get("second_evaluator", {}).get("fcd", {})
    head = "  set                  evaluator" + ("  second" if second_fcd else "")
    rows = "\n".join(f"  {k:<18} {v:10.4f}" + (f" {second_fcd[k]:10.4f}" if k in second_fcd else "")
                     for k, v in result["fcd"].items())
    print(f"evaluate: FCD at n = {result['n']} (lower is better)\n{head}\n{rows}\n"
          f"  precision {result['prdc']['precision']:.3f}  recall {result['prdc']['recall']:.3f}  "
          f"classes present {result['class_balance']['classes_present']}  -> {args.output}")
    return result
