"""Where runs go: the tracking store, the experiment in it, and where the experiment keeps its artifacts."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from mnist_ldm.io.errors import UserError, first_line

TAG = "mnist_ldm."
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # the MLflow 3 UI then opens the training-runs view, not the GenAI overview
# Fail within seconds instead of retrying for minutes when a server goes away mid-stage (MLflow
# reads these per request; a value the user exported wins), and no "View run" lines on stdout.
ENV_DEFAULTS = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration",
                 "mlflow.tracking._tracking_service.client")
# (table, column): every column of the sqlite store that holds an artifact location
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "source"),
                    ("model_versions", "storage_location"))


class TrackingError(UserError):
    """The tracking store cannot be used."""


def git(args: list[str], cwd: Path) -> Optional[str]:
    """What `git args` prints in `cwd`, stripped; None if git fails."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def repo_root() -> Path:
    """`DVC_ROOT`, else the git top level; a copy under `.dvc/tmp/exps/` (`dvc exp run --temp`) maps to its origin."""
    root = Path(os.environ.get("DVC_ROOT") or git(["rev-parse", "--show-toplevel"], Path.cwd()) or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` (a relative sqlite or file store is taken relative to `root`), else `<root>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{root / uri[len('sqlite:///'):]}"
    has_scheme = ":" in uri.split("/", 1)[0] or uri.startswith("databricks")
    return str(root / uri) if not has_scheme and not Path(uri).is_absolute() else uri  # a plain folder: a file store


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
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str, uri: str, root: Path) -> str:
    """The id of experiment `name`, created if missing (a sqlite store's artifacts in `mlartifacts` beside it)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
        try:
            return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
        except Exception:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment '{name}' at {uri} is deleted; restore it "
                            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
                            f"or choose another tracking.experiment")
    if KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    follow_repository(exp.artifact_location or "", name, root)
    return exp.experiment_id


def follow_repository(location: str, name: str, root: Path) -> None:
    """Re-point a default store whose artifacts go to the `mlartifacts` of the repository it was copied from (the
    location is an absolute path fixed at creation); name any other local location outside `root`."""
    parsed = urlparse(location)
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else \
        Path(location) if not parsed.scheme and Path(location).is_absolute() else None
    if not location or (path is not None and path.resolve().is_relative_to(root.resolve())):
        return
    match = re.match(r"^(file:.*/mlartifacts)(?:/.*)?$", location)
    if match and not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        old, new = match.group(1), (root / "mlartifacts").as_uri()
        n = repoint(root / "mlflow.db", old, new)
        print(f"mlflow: {root / 'mlflow.db'} kept artifacts in {unquote(urlparse(old).path)}, outside this repository "
              f"(it was moved or copied); re-pointed {n.get('experiments', 0)} experiment(s), {n.get('runs', 0)} "
              f"run(s) and {n.get('model_versions', 0)} model version(s) to {root / 'mlartifacts'}", file=sys.stderr)
    elif not location.startswith("mlflow-artifacts:"):  # proxied: the tracking server, named already
        print(f"mlflow: artifacts of experiment '{name}' go to {path or location}, outside this repository",
              file=sys.stderr)


def repoint(db: Path, old: str, new: str) -> dict[str, int]:
    """Replace the prefix `old` by `new` in every artifact location of the sqlite store `db` (MLflow has no call
    for it); the rows changed per table."""
    counts: dict[str, int] = {}
    n = len(old)
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in (tc for tc in ARTIFACT_COLUMNS if tc[0] in tables):
                changed = con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE "
                                      f"substr({column}, 1, ?) = ? AND substr({column}, ?, 1) IN ('', '/')",
                                      (new, n + 1, n, old, n + 1)).rowcount
                counts[table] = max(counts.get(table, 0), changed)  # rows of the table (two columns in one)
    except sqlite3.Error as e:
        raise TrackingError(f"MLflow store {db} keeps artifacts in {old}, outside this repository; re-pointing "
                            f"them to {new} failed ({first_line(e)})") from None
    return counts
