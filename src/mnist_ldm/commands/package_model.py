"""Stage `package_model`: the trained checkpoints as an MLflow pyfunc model (`models/generator`, the DVC artifact
`mnist-ldm-generator`) with the `sample` params as request defaults and the `mnist_ldm` modules that serving runs,
and, with tracking on, a new version of `tracking.registered_model` (`mnist-ldm promote` moves `champion`)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from mnist_ldm import tracking
from mnist_ldm.tracking import registry
from mnist_ldm.io.atomic import atomic_dir
from mnist_ldm.config.sections import Params, SamplingRequest
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import add_paths

HELP = "package the checkpoints as an MLflow model (models/generator) and register a version"
NOT_SERVED = ("__pycache__", "commands", "tracking", "evaluator", "evaluation")  # folders left out of the model
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "tqdm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, ckpt="diffusion checkpoint", ae_ckpt="autoencoder checkpoint",
              eval="metrics JSON of `evaluate` (its headline numbers tag the registered version)",
              out="folder of the MLflow model to write")


def run(params: Params, args: argparse.Namespace) -> None:
    from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline
    from mnist_ldm.diffusion.serving import save_generator

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the stage's log
    cfg = params.sample
    check_paths(args, {"ckpt": "a file", "ae_ckpt": "a file", "eval": "a file"}, folders=["out"])
    metrics = registry.headline(registry.read_json(args.eval))
    pipe = LatentDiffusionPipeline.from_checkpoints(args.ckpt, args.ae_ckpt, use_ema=cfg.use_ema)
    pipe.check(SamplingRequest.of(cfg))  # the packaged defaults must be a valid request for this model
    stage_params = {**tracking.section_params(params, "sample"), **tracking.section_params(params, "tracking")}
    with tracking.stage_run("package_model", params, stage_params) as run:
        with atomic_dir(args.out) as tmp, tempfile.TemporaryDirectory() as code_dir:
            pkg_root = Path(__file__).resolve().parents[1]  # the package without what serving never runs
            shutil.copytree(pkg_root, Path(code_dir) / pkg_root.name, ignore=shutil.ignore_patterns(*NOT_SERVED))
            save_generator(tmp, args.ckpt, args.ae_ckpt, cfg.model_dump(), Path(code_dir) / pkg_root.name,
                           [f"{n}=={re.sub(r'[+].*$', '', metadata.version(n))}" for n in REQUIREMENTS],  # no +cu130
                           {"num_classes": pipe.num_classes, "T": pipe.schedule.T, "latent_dim": pipe.latent_dim})
        version = registry.register(run, args.out, params.tracking.registered_model, metrics)
    where = f"; version {version} of '{params.tracking.registered_model}'" if version else ""
    print(f"package_model: MLflow model ({'conditional' if pipe.num_classes else 'unconditional'}, defaults "
          f"{cfg.sampler}, seed {cfg.seed}) -> {args.out}{where}")
    if params.tracking.enabled:
        print("package_model: compare runs and models in the MLflow UI: mnist-ldm ui")
