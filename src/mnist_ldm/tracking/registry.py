"""The Model Registry: the packaged generator logged into its stage's run and registered as a new version whose
description gives its headline and where it comes from, tagged with its DVC experiment, git commit and the
`VERSION_TAGS` numbers (which `mnist-ldm promote` compares). In a local store each file of the model whose bytes
DVC's cache holds (the checkpoints, the packaged code of an earlier version) is a hard link to that cache file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from mnist_ldm.config.params_file import dotted_value
from mnist_ldm.io.errors import UserError
from mnist_ldm.tracking.runs import HEADLINE, git_tags, note
from mnist_ldm.tracking.stagerun import StageRun
from mnist_ldm.tracking.store import TAG

CHAMPION = "champion"
DESCRIPTION = ("MNIST latent-diffusion generator (mnist-ldm): pyfunc model, input n/digit/sampler/steps/eta/guidance/"
               "seed, output one row per image")
VERSION_TAGS = HEADLINE[:4] + ("prdc.recall",)  # the FCDs, their ratios to the autoencoder floor, recall


def read_json(path: Path) -> dict:
    """A JSON file the pipeline wrote; one line naming it if it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the pipeline's output ({type(e).__name__}); "
                        f"run `dvc repro` first") from None


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


def describe(metrics: dict[str, float]) -> str:
    """A version's description: its headline figures and where it comes from."""
    def fig(key: str, digits: int = 4) -> str:
        return f"{metrics[key]:.{digits}f}" if key in metrics else "-"

    return (f"FCD {fig('fcd.generated')} ({fig('fcd_ratio_to_ae_reconstruction', 3)} x the autoencoder floor); "
            f"second evaluator FCD {fig('second_evaluator.fcd.generated')} "
            f"({fig('second_evaluator.fcd_ratio_to_ae_reconstruction', 3)} x); precision {fig('prdc.precision', 3)}, "
            f"recall {fig('prdc.recall', 3)}; n = {fig('n', 0)}.\n\n{note(Path.cwd())}")


def store_once(model_dir: Path, location: str, workdir: Path) -> bool:
    """Put `model_dir` at the local artifact `location` (file://), each file whose md5 the DVC cache of `workdir`
    holds as a hard link to the cache file, the others copied; False if `location` is not local, there is no DVC
    cache, or a link cannot be made there (MLflow copies then)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from dvc.repo import Repo
    from dvc_data.hashfile.hash import file_md5

    if not location.startswith("file://"):
        return False
    dest = Path(url2pathname(urlparse(location).path))
    try:
        with Repo(str(workdir), uninitialized=True) as repo:
            cache = repo.cache.local
        for src in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
            target = dest / src.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            cached = Path(cache.oid_to_path(file_md5(str(src))))
            if cached.is_file() and cached.stat().st_size == src.stat().st_size:
                os.link(cached, target)
            else:
                shutil.copy2(src, target)
    except Exception:  # no DVC cache, another file system, no hard links
        shutil.rmtree(dest, ignore_errors=True)
        return False
    return True


def new_version(client: Any, run_id: str, stage: str, model_dir: Path, name: str, metrics: dict[str, float]) -> Any:
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="generator",
                                       source_run_id=run_id, tags={TAG + "stage": stage})
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if not store_once(model_dir, model.artifact_location, Path.cwd()):
        client.log_model_artifacts(model.model_id, str(model_dir))
    client.finalize_logged_model(model.model_id, "READY")
    with contextlib.suppress(Exception):  # there already
        client.create_registered_model(name, description=DESCRIPTION)
    tags = {"dvc_experiment": os.environ.get("DVC_EXP_NAME") or "workspace",
            "git_commit": git_tags(Path.cwd()).get(TAG + "git_commit", "unknown"),
            **{k: repr(metrics[k]) for k in VERSION_TAGS if k in metrics}}
    # the source is the logged model's own location: a `models:/<model_id>` source would make MLflow look the
    # model up in the process-wide default store, not in this client's
    return client.create_model_version(name, model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id,
                                       description=describe(metrics))
