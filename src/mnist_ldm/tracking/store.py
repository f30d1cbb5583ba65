"""Where runs go: the tracking store, the experiment in it, and where the experiment keeps its artifacts."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from ..errors import UserError

TAG = "mnist_ldm."
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # the MLflow 3 UI then opens the training-runs view, not the GenAI overview

# Fail within seconds instead of retrying for minutes when a server goes away mid-stage (MLflow
# reads these per request; a value the user exported wins), and no "View run" lines on stdout.
ENV_DEFAULTS = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration",
                  "mlflow.tracking._tracking_service.client")

# (table, column): every column of the sqlite store that holds an artifact URI (rows are updated by rowid)
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


class TrackingError(UserError):
    """The tracking store cannot be used."""


# --------------------------------------------------------------------------- where things are

def repo_root() -> Path:
    """The repository the runs belong to; an experiment's temporary copy maps back to its origin."""
    root = Path(os.environ.get("DVC_ROOT") or _git(["rev-parse", "--show-toplevel"], Path.cwd()) or Path.cwd()).resolve()
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
    if not has_scheme and not Path(uri).is_absolute():  # a plain directory: a file store
        return str(root / uri)
    return uri


def is_default_store() -> bool:
    """Whether runs go to the repository's own `mlflow.db` (no `MLFLOW_TRACKING_URI`)."""
    return not os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def _artifact_location(uri: str) -> Optional[str]:
    """Artifacts of a sqlite store go next to the database (`<repo>/mlartifacts` by default)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --------------------------------------------------------------------------- reporting

def _first_line(e: BaseException, limit: int = 200) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _warn(message: str) -> None:
    """One line on stderr, on a line of its own even while a progress bar is drawn."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except Exception:
        print(message, file=sys.stderr)


def _quiet_mlflow() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- the store and its experiment

def _check_server(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        r = requests.get(uri.rstrip("/") + "/health", timeout=5)
        r.raise_for_status()
    except Exception as e:
        raise TrackingError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not answering "
                            f"({type(e).__name__}); start it, or unset MLFLOW_TRACKING_URI to log to the "
                            f"repository's sqlite store") from None


def _experiment_id(client: Any, name: str, uri: str, root: Optional[Path] = None) -> str:
    """The id of experiment `name` (created if missing), tagged as model development; with `root`, a default
    store's artifacts are made to follow the repository."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri), tags={KIND_TAG: KIND})
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
    if root is not None:
        _artifacts_follow(exp.artifact_location or "", name, root)
    return exp.experiment_id


def _local_path(location: str) -> Optional[Path]:
    """The directory of a `file:` (or plain absolute) artifact location; None for a remote one."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme and Path(location).is_absolute():
        return Path(location)
    return None


def _is_under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _artifacts_follow(location: str, name: str, root: Path) -> None:
    """Re-point a default store whose artifacts still go to the `mlartifacts` of the copy it came from.

    An experiment's artifact location is an absolute path fixed when it is created, so a repository
    that was moved or copied along with its `mlflow.db` would otherwise write into the old one.
    """
    path = _local_path(location)
    if not location or (path is not None and _is_under(path, root)):
        return
    match = re.match(r"^(file:.*/mlartifacts)(?:/.*)?$", location)
    if is_default_store() and match:
        old, new = match.group(1), (root / "mlartifacts").as_uri()
        counts = _repoint(root / "mlflow.db", old, new)
        print(f"mlflow: {root / 'mlflow.db'} kept artifacts in {_local_path(old)}, outside this repository (it "
              f"was moved or copied); re-pointed {counts['experiments']} experiment(s), {counts['runs']} run(s) "
              f"and {counts['model_versions']} model version(s) to {root / 'mlartifacts'}", file=sys.stderr)
    elif not location.startswith("mlflow-artifacts:"):  # proxied: the tracking server, named already
        print(f"mlflow: artifacts of experiment '{name}' go to {path or location}, outside this repository",
              file=sys.stderr)


def _repoint(db: Path, old: str, new: str) -> dict[str, int]:
    """Replace the prefix `old` by `new` in every artifact URI of the sqlite store `db`; rows changed per table."""
    counts = {table: 0 for table, _ in _ARTIFACT_COLUMNS}
    try:
        con = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in _ARTIFACT_COLUMNS:
                if table not in tables:
                    continue
                rows = con.execute(f"SELECT rowid, {column} FROM {table} WHERE substr({column}, 1, ?) = ?",
                                   (len(old), old)).fetchall()
                updates = [(new + value[len(old):], k) for k, value in rows
                           if value[len(old):len(old) + 1] in ("", "/")]
                con.executemany(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", updates)
                counts[table] = max(counts[table], len(updates))  # rows of the table (two columns in one)
            con.execute("COMMIT")
        finally:
            con.close()
    except sqlite3.Error as e:
        raise TrackingError(f"MLflow store {db} keeps artifacts in {old}, outside this repository; re-pointing "
                            f"them to {new} failed ({_first_line(e)})") from None
    return counts
