"""`mnist-ldm summary`: what `make run` ends with after DVC's lines: the data the pipeline used, the generated
digits' FCD against the autoencoder's floor in both evaluators, the registered model version (tracking on) and the
commands to take next. It reads the workspace's files (and the Model Registry); it computes nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_ldm import tracking
from mnist_ldm.config.sections import Params
from mnist_ldm.tracking.registry import read_json

HELP = "print what the last `dvc repro` produced: the data, FCD against its floors, the registered version, next steps"
COMPUTES = False  # no --device/--precision: nothing here runs a network
# README.md's comparison: one row per experiment; the FCDs and their ratios to the floor, then the changed params
COMPARE = ("dvc exp show --only-changed --sort-by fcd.generated --drop '(?!Experiment|(data|autoencoder|diffusion|"
           "sample|evaluate|(second_)?evaluator)\\.\\w+$|(second_evaluator\\.)?fcd(\\.generated|_ratio_to_ae))'")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", type=Path, default=Path("metrics/eval.json"), help="evaluate's metrics file")
    p.add_argument("--meta", type=Path, default=Path("data/prepared/meta.json"), help="prepare's description")


def registered(params: Params, fcd: float) -> str:
    """The registry's version whose fcd.generated tag is this workspace's, as package_model tagged it."""
    name = params.tracking.registered_model
    client = tracking.connect(tracking.tracking_uri(tracking.repo_root()))
    versions = [int(v.version) for v in client.search_model_versions(f"name = '{name}'", max_results=10000)
                if v.tags.get("fcd.generated") == repr(fcd)]
    return f"models:/{name}/{max(versions)}" if versions else f"no version of '{name}' holds this FCD yet"


def run(params: Params, args: argparse.Namespace) -> None:
    meta, ev = read_json(args.meta), read_json(args.eval)
    second = ev.get("second_evaluator", {})
    lines = [f"data:      {meta['counts']['train']:,} train / {meta['counts']['test']:,} test images from "
             f"{meta['source']} ({meta['description']}); FCD on n = {ev['n']:,}",
             f"FCD:       {ev['fcd']['generated']:.3f} = {ev['fcd_ratio_to_ae_reconstruction']:.2f}x the autoencoder's "
             f"floor {ev['fcd']['ae_reconstruction']:.3f} (evaluator)"]
    if "fcd_ratio_to_ae_reconstruction" in second:
        lines.append(f"           {second['fcd']['generated']:.3f} = {second['fcd_ratio_to_ae_reconstruction']:.2f}x "
                     f"its floor {second['fcd']['ae_reconstruction']:.3f} (second evaluator, {second['arch']})")
    if params.tracking.enabled:
        lines.append(f"model:     {registered(params, ev['fcd']['generated'])}")
    lines += ["next:      source .venv/bin/activate",
              "           mnist-ldm ui                                # the runs in the MLflow UI",
              "           dvc exp run --queue -n lr-5e-4 -S diffusion.lr=0.0005 && dvc exp run --run-all",
              f"           {COMPARE}"]
    print("\n".join(["summary:", *(f"  {line}" for line in lines)]))
