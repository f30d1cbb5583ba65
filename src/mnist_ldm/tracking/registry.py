"""The Model Registry: the packaged generator logged into its stage's run and registered as a new version, tagged
with its DVC experiment, git commit, run and `HEADLINE` numbers (which `mnist-ldm promote` compares)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from mnist_ldm.config.params_file import dotted_value
from mnist_ldm.tracking.runs import HEADLINE, git_tags
from mnist_ldm.tracking.stagerun import StageRun
from mnist_ldm.tracking.store import TAG

CHAMPION = "champion"
DESCRIPTION = ("MNIST latent-diffusion generator (mnist-ldm): pyfunc model, input n/digit/sampler/steps/eta/guidance/"
               "seed, output one row per image")


def headline(result: dict) -> dict[str, float]:
    """The finite numbers of `HEADLINE` found in an eval.json dict."""
    found = {key: dotted_value(result, key) for key in HEADLINE}
    return {k: float(v) for k, v in found.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def register(run: StageRun, model_dir: Path, name: str, metrics: dict[str, float]) -> Optional[str]:
    """Log `model_dir` (an MLflow model folder) as a logged model of the stage's run and register it as a new
    version of `name` (a linked run's version is kept); its number, or None if tracking is off or logging failed."""
    if run.client is None or run.run_id is None:
        return None
    if not run.active:
        with contextlib.suppress(Exception):  # no such registered model yet
            for mv in run.client.search_model_versions(f"name = '{name}' and run_id = '{run.run_id}'"):
                print(f"mlflow: {run.stage}: run {run.run_id} is registered already as version {mv.version} of "
                      f"'{name}'; no new version", file=sys.stderr)
                return str(mv.version)
    mv = run.call("model registry", new_version, run.client, run.run_id, run.stage, model_dir, name, metrics)
    if mv is None:
        return None
    fcd = f", fcd.generated {metrics['fcd.generated']:.4f}" if "fcd.generated" in metrics else ""
    print(f"mlflow: {run.stage}: registered version {mv.version} of '{name}' (models:/{name}/{mv.version}{fcd}); "
          f"`mnist-ldm promote` makes the best version @{CHAMPION}", file=sys.stderr)
    return str(mv.version)


def new_version(client: Any, run_id: str, stage: str, model_dir: Path, name: str, metrics: dict[str, float]) -> Any:
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="generator",
                                       source_run_id=run_id, tags={TAG + "stage": stage})
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    client.log_model_artifacts(model.model_id, str(model_dir))
    client.finalize_logged_model(model.model_id, "READY")
    with contextlib.suppress(Exception):  # there already
        client.create_registered_model(name, description=DESCRIPTION)
    git = git_tags(Path.cwd())
    tags = {"dvc_experiment": os.environ.get("DVC_EXP_NAME") or "workspace",
            "git_commit": git.get(TAG + "git_commit", "unknown"), "git_dirty": git.get(TAG + "git_dirty", "unknown"),
            **({"dvc_baseline": os.environ["DVC_EXP_BASELINE_REV"]} if os.environ.get("DVC_EXP_BASELINE_REV") else {}),
            "mlflow_run": run_id, **{k: repr(v) for k, v in metrics.items()}}
    # the source is the logged model's own location: a `models:/<model_id>` source would make MLflow look the
    # model up in the process-wide default store, not in this client's
    return client.create_model_version(name, model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id)
