"""Where runs go: the tracking store, the experiment in it, and where the experiment keeps its artifacts."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from mnist_ldm.io.errors import UserError, first_line
from mnist_ldm.runtime.memory import long_lived

TAG = "mnist_ldm."
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow 3's UI: the training-runs view
# Fail within seconds instead of retrying for minutes when a server goes away mid-stage (a value the user exported
# wins), and no "View run" lines on stdout.
ENV_DEFAULTS = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class TrackingError(UserError):
    """The tracking store cannot be used."""


def git(args: list[str], cwd: Path) -> Optional[str]:
    """What `git args` prints in `cwd`, stripped; None if git fails."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None


def repo_root() -> Path:
    """`DVC_ROOT`, else the git top level; a copy under `.dvc/tmp/exps/` (`dvc exp run --temp`) maps to its origin."""
    root = Path(os.environ.get("DVC_ROOT") or git(["rev-parse", "--show-toplevel"], Path.cwd()) or Path.cwd()).resolve()
    return Path(f"{root}/".split("/.dvc/tmp/exps/")[0])


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` (a relative sqlite or file store is taken relative to `root`), else `<root>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
    has_scheme = ":" in uri.split("/", 1)[0] or uri.startswith("databricks")
    return str(root / uri) if not has_scheme and not Path(uri).is_absolute() else uri  # a plain folder: a file store


def check_writable(uri: str) -> None:
    """One line for a read-only or locked sqlite store (SQLAlchemy's pages at the first write); `check_params` asks."""
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    try:
        if db is not None and db.exists():
            with contextlib.closing(sqlite3.connect(db, timeout=10, isolation_level=None)) as con:
                con.execute("BEGIN IMMEDIATE")  # the write lock, then a write that is rolled back
                con.execute(f"PRAGMA user_version = {con.execute('PRAGMA user_version').fetchone()[0]}")
                con.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise TrackingError(f"MLflow store {db} cannot be written ({first_line(e)}); make it writable, wait for "
                            f"the process holding it, or set tracking.enabled: false") from None


@long_lived()  # its modules and client, kept to the end
def connect(uri: str) -> Any:
    """An MlflowClient of `uri`, once a server there answers /health; MLflow's own log lines are silenced."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except Exception as e:
            raise TrackingError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not answering "
                                f"({type(e).__name__}); start it, or unset MLFLOW_TRACKING_URI to log to the "
                                f"repository's sqlite store") from None
    check_writable(uri)
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.tracking._tracking_service.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str, uri: str, root: Path) -> str:
    """The id of experiment `name`, created if missing (a sqlite store's artifacts in `mlartifacts` beside it)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        sqlite = uri.startswith("sqlite:///")
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if sqlite else None
        with contextlib.suppress(Exception):  # created meanwhile by another process: found below
            client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
        exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment '{name}' at {uri} is deleted; restore it (mlflow experiments restore "
                            f"--experiment-id {exp.experiment_id}) or choose another tracking.experiment")
    if KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    location = exp.artifact_location or ""
    if location.startswith("file:") and not (location + "/").startswith(root.resolve().as_uri() + "/"):
        if location.endswith("/mlartifacts") and uri == f"sqlite:///{root / 'mlflow.db'}":
            repoint(root / "mlflow.db", location, (root / "mlartifacts").as_uri())
        else:
            print(f"mlflow: artifacts of experiment '{name}' go to {location}, outside this repository", file=sys.stderr)
    return exp.experiment_id


def repoint(db: Path, old: str, new: str) -> None:
    """Replace the prefix `old` by `new` in every artifact location of the sqlite store `db` (a copied or moved
    repository's): MLflow makes each local location absolute and copies it into every run, model and version, and
    has no call to change them."""
    columns = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
               ("model_versions", "source"), ("model_versions", "storage_location"))
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
            for table, col in columns:
                con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE substr({col}, 1, ?) = ?",
                            (new, len(old) + 1, len(old), old))
    except sqlite3.Error as e:
        raise TrackingError(f"MLflow store {db} keeps artifacts in {old}, outside this repository; re-pointing them "
                            f"to {new} failed ({first_line(e)})") from None
    print(f"mlflow: {db} kept artifacts in {old}, outside this repository (it was moved or copied); re-pointed them "
          f"to {new}", file=sys.stderr)
