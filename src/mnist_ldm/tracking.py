"""MLflow tracking for the pipeline: one parent run per pipeline execution, one child run per stage.

* Store: `MLFLOW_TRACKING_URI` if set (a team server), else `sqlite:///<repo>/mlflow.db` with
  artifacts in `<repo>/mlartifacts`. `<repo>` is the real repository root, also when DVC runs the
  stage inside an experiment's temporary copy (`.dvc/tmp/exps/...`).
* Parent: identified by a hash of every param and of the pipeline's source inputs (code, raw
  data): stages of one `dvc repro` find it without talking to each other, and `dvc repro -f` finds
  the same one again. It holds every param (`section.key`) and the headline metrics of all stages.
* Child: one per executed stage, tagged with the hash of the stage's deps and params (what
  `dvc.lock` records). A re-execution with the same inputs links to the finished run instead of
  logging a twin; an interrupted run with the same inputs is continued.
* If the server stops answering mid-stage, training goes on and a warning says what was not logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from .config import Params
from .errors import UserError

TAG = "mnist_ldm."


class TrackingError(UserError):
    pass


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
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --------------------------------------------------------------------------- input hashes

def _hash_path(path: Path) -> str:
    if path.is_file():
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if path.is_dir():
        listing = [(str(p.relative_to(path)), _hash_path(p)) for p in sorted(path.rglob("*"))
                   if p.is_file() and "__pycache__" not in p.parts]
        return hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"
    return "missing"


def _param_value(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _load_dvc_yaml(root: Path) -> dict:
    path = root / "dvc.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def stage_inputs(workdir: Path, stage: str) -> dict:
    """The deps (with hashes) and params of `stage`, as dvc.lock records them."""
    pipeline = _load_dvc_yaml(workdir).get("stages", {})
    if stage not in pipeline:
        return {}
    spec = pipeline[stage]
    raw_params = yaml.safe_load((workdir / "params.yaml").read_text()) if (workdir / "params.yaml").is_file() else {}
    keys = [k for item in spec.get("params", []) for k in ([item] if isinstance(item, str) else list(item))]
    return {
        "cmd": spec.get("cmd"),
        "deps": [{"path": d, "md5": _hash_path(workdir / d)} for d in spec.get("deps", [])],
        "params": {"params.yaml": {k: _param_value(raw_params, k) for k in keys}},
    }


def pipeline_key(workdir: Path, params: Params) -> str:
    """Hash of all params and of every dep that no stage produces (code, raw data)."""
    stages = _load_dvc_yaml(workdir).get("stages", {})
    outs = {str(o if isinstance(o, str) else next(iter(o))) for s in stages.values() for o in s.get("outs", [])}
    sources = sorted({d for s in stages.values() for d in s.get("deps", []) if d not in outs})
    payload = {"params": params.flat(), "sources": {d: _hash_path(workdir / d) for d in sources}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- the run objects

class StageRun:
    """Logging for one stage. Every call is safe: after the first failure it warns once and stops logging."""

    def __init__(self, client=None, run_id: Optional[str] = None, parent_id: Optional[str] = None,
                 stage: str = "", uri: str = "", active: bool = True):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id
        self.stage, self.uri, self.active = stage, uri, active and client is not None
        self.lost: Optional[str] = None

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active or self.lost:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # any transport or server error: keep training, report once
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.lost = what
            print(f"warning: mlflow: logging to {self.uri} failed while logging {what} ({first}); "
                  f"the stage goes on and writes its outputs, but the rest of its MLflow logging is skipped",
                  file=sys.stderr)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None, run_id: Optional[str] = None) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        if items:
            self._call("metrics", self.client.log_batch, run_id or self.run_id, metrics=items)

    def log_image(self, key: str, image, step: int) -> None:
        self._call(f"image {key}", self.client.log_image, self.run_id, image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).exists():
            self._call(f"artifact {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_figure(self, fig, name: str) -> None:
        self._call(f"figure {name}", self.client.log_figure, self.run_id, fig, name)

    def log_dict(self, obj: dict, name: str) -> None:
        self._call(f"file {name}", self.client.log_dict, self.run_id, obj, name)

    def log_dataset(self, meta: dict, name: str, context: str) -> None:
        """The training data as an MLflow dataset input, its digest being the content hash of `meta.json`."""
        if not self.active or self.lost:
            return
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import InputTag

        ds = MetaDataset(HTTPDatasetSource(f"file://{meta.get('description', '')}"), name=name,
                         digest=str(meta.get("content_hash", ""))[:36])
        self._call("dataset input", self.client.log_inputs, self.run_id,
                   datasets=[_dataset_input(ds, context, InputTag)])

    def headline(self, metrics: dict[str, float]) -> None:
        """The stage's final figures: on its own run and, prefixed by the stage name, on the parent."""
        self.log_metrics(metrics)
        if self.parent_id:
            self.log_metrics({f"{self.stage}.{k}": v for k, v in metrics.items()}, run_id=self.parent_id)


def _dataset_input(ds, context: str, InputTag):
    from mlflow.entities import DatasetInput
    return DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=context)])


def _check_server(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        r = requests.get(uri.rstrip("/") + "/health", timeout=5)
        r.raise_for_status()
    except Exception as e:
        kind = type(e).__name__
        raise TrackingError(f"MLflow tracking server at MLFLOW_TRACKING_URI={uri} is not answering ({kind}); "
                            f"start it, or unset MLFLOW_TRACKING_URI to log to the local sqlite store") from None


def _experiment_id(client, name: str, root: Path, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def _git_tags(workdir: Path) -> dict[str, str]:
    tags = {}
    commit = _git(["rev-parse", "HEAD"], workdir) or os.environ.get("DVC_EXP_BASELINE_REV")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags[TAG + "git_commit"] = commit
        dirty = _git(["status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"], workdir)
        tags[TAG + "git_dirty"] = str(bool(dirty))
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(var):
            tags[TAG + var.lower()] = os.environ[var]
    return tags


def _find_run(client, exp_id: str, tags: dict[str, str]):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp_id], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _parent_run(client, exp_id: str, key: str, params: Params, tags: dict[str, str]) -> str:
    found = _find_run(client, exp_id, {TAG + "pipeline_key": key})
    if found is not None:
        return found.info.run_id
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{key[:6]}"
    run = client.create_run(exp_id, run_name=name, tags={**tags, TAG + "pipeline_key": key, TAG + "kind": "pipeline"})
    client.log_batch(run.info.run_id, params=[__import__("mlflow").entities.Param(k, str(v))
                                              for k, v in params.flat().items()])
    return run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Params, stage_params: dict[str, Any], data_meta: Optional[dict] = None,
              workdir: Optional[Path] = None) -> Iterator[StageRun]:
    """Open (or link) the child run of `stage`; mark it FAILED if the stage raises."""
    if not params.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield StageRun(active=False)
        return
    workdir = (workdir or Path.cwd()).resolve()
    root = repo_root()
    uri = tracking_uri(root)
    _check_server(uri)
    # Fail fast instead of retrying for minutes when a server goes away mid-stage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        exp_id = _experiment_id(client, params.tracking.experiment, root, uri)
        tags = _git_tags(workdir)
        if data_meta:
            tags.update({TAG + "data_source": str(data_meta.get("source")),
                         TAG + "data_hash": str(data_meta.get("content_hash"))})
        parent_id = _parent_run(client, exp_id, pipeline_key(workdir, params), params, tags)
        inputs = stage_inputs(workdir, stage) or {"params": stage_params}
        input_hash = _digest(inputs)
        existing = _find_run(client, exp_id, {TAG + "stage": stage, TAG + "input_hash": input_hash})
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} could not be used ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]})") from None

    if existing is not None and existing.info.status == "FINISHED":
        print(f"mlflow: stage {stage} ran again with identical inputs (hash {input_hash}); linked to the existing "
              f"run {existing.info.run_id} instead of logging a duplicate", file=sys.stderr)
        client.set_tag(existing.info.run_id, TAG + "last_relinked", time.strftime("%Y-%m-%dT%H:%M:%S"))
        run = StageRun(client, existing.info.run_id, parent_id, stage, uri, active=True)
        run.active = False  # log nothing more into the finished run
        yield run
        return
    if existing is not None:
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        print(f"mlflow: continuing the interrupted run {run_id} of stage {stage}", file=sys.stderr)
    else:
        run_id = client.create_run(exp_id, run_name=stage, tags={
            **tags, "mlflow.parentRunId": parent_id, TAG + "stage": stage, TAG + "input_hash": input_hash,
            TAG + "kind": "stage"}).info.run_id
        run = StageRun(client, run_id, parent_id, stage, uri)
        run.log_params(stage_params)
        run.log_dict(inputs, "dvc_inputs.yaml")
    run = StageRun(client, run_id, parent_id, stage, uri)
    print(f"mlflow: stage {stage} logs to run {run_id} (parent {parent_id}) at {uri}", file=sys.stderr)
    try:
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        run._call("run status", client.set_terminated, run_id, status)
        run._call("run status", client.set_terminated, parent_id, status)
        raise
    _sync_parent_metrics(run, workdir)
    run._call("run status", client.set_terminated, run_id, "FINISHED")
    run._call("run status", client.set_terminated, parent_id, "FINISHED")
    if run.lost:
        print(f"warning: mlflow: stage {stage} finished and wrote its outputs, but its logging to {uri} "
              f"stopped at '{run.lost}'; its metrics files are complete", file=sys.stderr)


def _sync_parent_metrics(run: StageRun, workdir: Path) -> None:
    """Copy the numbers of every metrics file declared in dvc.yaml onto the parent run."""
    if not run.parent_id:
        return
    for entry in _load_dvc_yaml(workdir).get("metrics", []):
        path = workdir / entry
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        flat = {f"{path.stem}.{k}": v for k, v in _flatten(data).items()}
        run.log_metrics(flat, run_id=run.parent_id)


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out
