"""`mnist-ldm promote`: give a version of the registered model (`tracking.registered_model`) the alias `champion`:
`--version N`, else the one with the best `--metric` tag (lowest; highest for `prdc.*`), the newest on a tie. Nothing
else moves the alias: the pipeline registers versions, a person promotes one."""

from __future__ import annotations

import argparse
import math

from mnist_ldm import tracking
from mnist_ldm.config.sections import Params
from mnist_ldm.io.errors import UserError
from mnist_ldm.runtime.command import positive_int
from mnist_ldm.tracking.registry import CHAMPION

HELP = "set the registry alias 'champion' on the best version by generated FCD (or on --version N)"
COMPUTES = False  # no --device/--precision: nothing here runs a network
HIGHER_IS_BETTER = ("prdc.", "class_balance.classes_present")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="fcd.generated",
                   help="version tag to compare (default: fcd.generated, lower is better; prdc.*: higher is better)")
    p.add_argument("--version", type=positive_int, help="promote this version instead of the best one")


def metric_of(version, metric: str) -> float | None:
    try:
        value = float(version.tags.get(metric, "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def describe(version, metric: str) -> str:
    if version is None:
        return "none"
    value = metric_of(version, metric)
    return f"version {version.version}" + ("" if value is None else f" ({metric} {value:.4f})")


def run(params: Params, args: argparse.Namespace) -> None:
    if not params.tracking.enabled:  # the registry is part of tracking: never move an alias the user turned off
        raise UserError(f"tracking.enabled is false in {args.params}, so promote leaves the Model Registry alone; "
                        f"enable tracking (or pass --set tracking.enabled=true) to move @{CHAMPION}")
    from mlflow.exceptions import MlflowException

    uri, name = tracking.tracking_uri(tracking.repo_root()), params.tracking.registered_model
    client = tracking.connect(uri)
    versions = sorted(client.search_model_versions(f"name = '{name}'", max_results=10000), key=lambda v: int(v.version))
    if not versions:
        raise tracking.TrackingError(f"model registry: no registered model '{name}' has versions yet; run the "
                                     f"pipeline with tracking.enabled=true (dvc repro) first")
    higher = args.metric.startswith(HIGHER_IS_BETTER)
    scored = [v for v in versions if metric_of(v, args.metric) is not None]
    if args.version is not None:
        chosen = next((v for v in versions if int(v.version) == args.version), None)
        if chosen is None:
            raise UserError(f"--version {args.version}: '{name}' has no such version; it has "
                            f"{', '.join(str(v.version) for v in versions)}")
    elif not scored:
        numeric = sorted(k for k in versions[-1].tags if metric_of(versions[-1], k) is not None)
        raise UserError(f"--metric {args.metric}: no version of '{name}' has a number under this tag; "
                        f"version {versions[-1].version} has {', '.join(numeric) or 'none'}")
    else:  # the best, the newest on a tie
        chosen = (max if higher else min)(reversed(scored), key=lambda v: metric_of(v, args.metric))
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        previous = None
    how = f"--version {args.version}" if args.version else f"{'highest' if higher else 'lowest'} {args.metric}"
    moved = previous is None or str(previous.version) != str(chosen.version)
    if moved:
        client.set_registered_model_alias(name, CHAMPION, str(chosen.version))
    print(f"promote: {name} {describe(chosen, args.metric)} " + (
        f"is now @{CHAMPION} ({how}); previous champion: {describe(previous, args.metric)}" if moved else
        f"is @{CHAMPION} already ({how}); nothing changed"))
    print(f"  load it with mlflow.pyfunc.load_model(\"models:/{name}@{CHAMPION}\") ({uri})")
