"""`mnist-ldm promote`: give a version of the registered model (`tracking.registered_model`) the alias `champion`.

Without `--version`, the version with the best `--metric` tag wins (default `fcd.generated`, lowest; for
`prdc.*` the highest). It prints what it did and the previous champion. Nothing else moves the alias: the
pipeline registers versions, a person promotes one. The store is `MLFLOW_TRACKING_URI`, else the
repository's `mlflow.db`.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from .. import tracking
from ..config import Params
from ..errors import UserError
from ..tracking import registry
from .args import positive_int

HELP = "set the registry alias 'champion' on the best version by generated FCD (or on --version N)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="fcd.generated",
                   help="version tag to compare (default: fcd.generated, lower is better; prdc.*: higher is better)")
    p.add_argument("--version", type=positive_int, help="promote this version instead of the best one")


def _describe(version: Optional[Any], metric: str) -> str:
    if version is None:
        return "none"
    value = registry.metric_of(version, metric)
    return f"version {version.version}" + (f" ({metric} {value:.4f})" if value is not None else "")


def run(params: Params, args: argparse.Namespace) -> dict:
    from ..tracking.store import connect

    if not params.tracking.enabled:  # the registry is part of tracking: never move an alias the user turned off
        raise UserError(f"tracking.enabled is false in {args.params}, so promote leaves the Model Registry alone; "
                        f"enable tracking (or pass --set tracking.enabled=true) to move @{registry.CHAMPION}")
    uri = tracking.tracking_uri(tracking.repo_root())
    name = params.tracking.registered_model
    chosen, previous, moved = registry.promote(connect(uri), name, args.metric, args.version)
    how = (f"--version {args.version}" if args.version else
           f"{'highest' if registry.higher_is_better(args.metric) else 'lowest'} {args.metric}")
    if moved:
        print(f"promote: {name} {_describe(chosen, args.metric)} is now @{registry.CHAMPION} ({how}); "
              f"previous champion: {_describe(previous, args.metric)}")
    else:
        print(f"promote: {name} {_describe(chosen, args.metric)} is @{registry.CHAMPION} already ({how}); "
              f"nothing changed")
    print(f"  load it with mlflow.pyfunc.load_model(\"models:/{name}@{registry.CHAMPION}\") ({uri})")
    return {"version": str(chosen.version), "previous": None if previous is None else str(previous.version),
            "moved": moved}
