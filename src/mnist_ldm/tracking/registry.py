"""The Model Registry: the packaged generator logged into its stage's run and registered as a new version,
and `promote`, which gives the best version (or a chosen one) the alias `champion`.

A version's tags: `dvc_experiment` (the DVC experiment, or `workspace`), `git_commit`, `git_dirty`,
`mlflow_run` (the `package_model` child run), and the headline numbers of `metrics/eval.json`
under their dotted names (`fcd.generated`, `prdc.precision`, ...), which `promote` compares.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..params_file import dotted_value
from .identity import git_tags
from .stagerun import StageRun, is_number
from .store import TAG, TrackingError, first_line

CHAMPION = "champion"
ARTIFACT_NAME = "generator"
DESCRIPTION = ("MNIST latent-diffusion generator (mnist-ldm): pyfunc model, input n/digit/sampler/steps/eta/guidance/"
               "seed, output one row per image")
# eval.json keys (dotted) put on each version as tags and on the logged model as metrics
HEADLINE = ("fcd.generated", "fcd.train_vs_test", "fcd.single_gaussian", "fcd_ratio_to_single_gaussian",
            "fcd_ratio_to_ae_reconstruction", "second_evaluator.fcd.generated",
            "second_evaluator.fcd_ratio_to_ae_reconstruction",
            "prdc.precision", "prdc.recall", "prdc.density", "prdc.coverage", "class_balance.tv_to_uniform",
            "class_balance.classes_present", "memorization.ratio", "n")
HIGHER_IS_BETTER = ("prdc.", "class_balance.classes_present", "evaluator_test_accuracy")


def headline(result: dict) -> dict[str, float]:
    """The finite numbers of `HEADLINE` found in an eval.json dict."""
    found = {key: dotted_value(result, key) for key in HEADLINE}
    return {k: float(v) for k, v in found.items() if is_number(v) and math.isfinite(v)}


def version_tags(workdir: Path, run_id: Optional[str], metrics: dict[str, float]) -> dict[str, str]:
    git = git_tags(workdir)
    tags = {"dvc_experiment": os.environ.get("DVC_EXP_NAME") or "workspace",
            "git_commit": git.get(TAG + "git_commit", "unknown"), "git_dirty": git.get(TAG + "git_dirty", "unknown")}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    if run_id:
        tags["mlflow_run"] = run_id
    return {**tags, **{k: repr(v) for k, v in metrics.items()}}


def ensure_registered_model(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=DESCRIPTION)
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(name)
    return True


def register(run: StageRun, model_dir: Path, name: str, metrics: dict[str, float],
             workdir: Optional[Path] = None) -> Optional[str]:
    """Log `model_dir` (an MLflow model folder) as a logged model of the stage's run and register it as a new
    version of `name`; its version number, or None when tracking is off or logging failed (after a warning).
    A stage re-run with the inputs of a finished run (a linked run) registers nothing new."""
    client, run_id = run.client, run.run_id
    if client is None or run_id is None:
        return None
    if not run.active:
        try:
            done = list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
        except Exception:  # no such registered model yet
            done = []
        if done:
            print(f"mlflow: {run.stage}: run {run_id} is registered already as version {done[0].version} of "
                  f"'{name}'; no new version", file=sys.stderr)
            return str(done[0].version)
    from mlflow.entities import LoggedModelOutput, Metric

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the stage's log
    info = run.call("run", client.get_run, run_id)
    model = info and run.call("logged model", client.create_logged_model, info.info.experiment_id,
                              name=ARTIFACT_NAME, source_run_id=run_id, tags={TAG + "stage": run.stage})
    if model is None:
        return None
    run.call("run outputs", client.log_outputs, run_id, [LoggedModelOutput(model.model_id, step=0)])
    ts = int(time.time() * 1000)
    run.call("model metrics", client.log_batch, run_id,
             metrics=[Metric(k, v, ts, 0, model_id=model.model_id) for k, v in metrics.items()])
    run.call("model files", client.log_model_artifacts, model.model_id, str(model_dir))
    run.call("model status", client.finalize_logged_model, model.model_id, "READY")
    if run.lost or run.call("registered model", ensure_registered_model, client, name) is None:
        return None
    tags = version_tags((workdir or Path.cwd()).resolve(), run_id, metrics)
    # the source is the logged model's own location: a `models:/<model_id>` source would make MLflow look the
    # model up in the process-wide default store, not in this client's
    mv = run.call("model version", client.create_model_version, name, model.artifact_location, run_id=run_id,
                  tags=tags, model_id=model.model_id)
    if mv is None:
        return None
    fcd = f", fcd.generated {metrics['fcd.generated']:.4f}" if "fcd.generated" in metrics else ""
    print(f"mlflow: {run.stage}: registered version {mv.version} of '{name}' (models:/{name}/{mv.version}{fcd}); "
          f"`mnist-ldm promote` makes the best version @{CHAMPION}", file=sys.stderr)
    return str(mv.version)


def metric_of(version: Any, metric: str) -> Optional[float]:
    """A version's tag `metric` as a finite number, else None."""
    try:
        value = float(version.tags.get(metric, "nan"))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_IS_BETTER)


def promote(client: Any, name: str, metric: str = "fcd.generated",
            version: Optional[int] = None) -> tuple[Any, Optional[Any], bool]:
    """Set the alias `champion` on `version`, or else on the version with the best `metric` tag (lowest; highest
    for precision/recall/density/coverage, classes present). Returns the new champion, the previous one (or
    None), and whether the alias moved."""
    from mlflow.exceptions import MlflowException

    try:
        versions = list(client.search_model_versions(f"name = '{name}'", max_results=10000))
    except MlflowException as e:
        raise TrackingError(f"model registry: cannot list versions of '{name}' ({first_line(e)})") from None
    if not versions:
        raise TrackingError(f"model registry: no registered model '{name}' has versions yet; run the pipeline "
                            f"with tracking.enabled=true (dvc repro) first")
    if version is not None:
        chosen = next((v for v in versions if int(v.version) == version), None)
        if chosen is None:
            have = ", ".join(sorted((str(v.version) for v in versions), key=int))
            raise TrackingError(f"--version {version}: '{name}' has no such version; it has {have}")
    else:
        scored = [(m, v) for v in versions if (m := metric_of(v, metric)) is not None]
        if not scored:
            latest = max(versions, key=lambda v: int(v.version))
            numeric = sorted(k for k in latest.tags if metric_of(latest, k) is not None)
            raise TrackingError(f"--metric {metric}: no version of '{name}' has a number under this tag; "
                                f"version {latest.version} has {', '.join(numeric) or 'none'}")
        sign = -1 if higher_is_better(metric) else 1
        chosen = min(scored, key=lambda mv: (sign * mv[0], -int(mv[1].version)))[1]  # best first; then the newest
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        previous = None
    moved = previous is None or str(previous.version) != str(chosen.version)
    if moved:
        client.set_registered_model_alias(name, CHAMPION, str(chosen.version))
    return chosen, previous, moved
