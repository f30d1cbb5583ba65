"""The run lifecycle: a child run per stage under one parent run per pipeline state."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

from ..config import Params
from .identity import _data_tags, _digest, _git_tags, _load_dvc_yaml, pipeline_key, stage_inputs
from .store import (ENV_DEFAULTS, TAG, TrackingError, _check_server, _experiment_id, _first_line, _quiet_mlflow,
                    _warn, repo_root, tracking_uri)

if TYPE_CHECKING:
    import numpy as np


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class StageRun:
    """Logging for one stage. Every call is safe: after the first failure it warns once and stops logging.

    `active` is False when tracking is off, or when the stage re-ran with inputs identical to a
    finished run (nothing more goes into that run); the parent run is still updated then.
    """

    def __init__(self, client: Any = None, run_id: Optional[str] = None, parent_id: Optional[str] = None,
                 stage: str = "", uri: str = "", active: bool = True):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id
        self.stage, self.uri = stage, uri
        self.active = active and client is not None and run_id is not None
        self.lost: Optional[str] = None
        self.headline_metrics: dict[str, float] = {}
        self._last: dict[str, tuple[int, float]] = {}  # key -> (step, value) last logged to this run
        self._not_finite: set[str] = set()  # keys already warned about

    @property
    def logging(self) -> bool:
        """Whether child-run logging still happens (callers skip work, such as preview images, if not)."""
        return self.active and not self.lost

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.client is None or self.lost:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any transport or server error: keep training, report once
            self.lost = what
            _warn(f"warning: mlflow: {self.stage}: logging to {self.uri} failed at {what} ({_first_line(e, 120)}); "
                  f"the stage goes on and writes its outputs, the rest of its MLflow logging is skipped")
            return None

    def _finite(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The numeric entries that MLflow may get; a NaN or infinite value is dropped, with one warning per key."""
        out = {}
        for k, v in metrics.items():
            if not _number(v):
                continue
            if math.isfinite(v):
                out[k] = v
            elif k not in self._not_finite:
                self._not_finite.add(k)
                _warn(f"warning: mlflow: {self.stage}: metric {k} is {v}; not logged")
        return out

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.logging:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None,
                    run_id: Optional[str] = None) -> None:
        """Log the finite numbers of `metrics` at `step` to this run (or to `run_id`, e.g. the parent)."""
        if not (self.logging or (run_id is not None and self.client is not None)):
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in self._finite(metrics).items()]
        if run_id is None or run_id == self.run_id:
            self._last.update({m.key: (m.step, m.value) for m in items})
        for i in range(0, len(items), 500):
            self._call("metrics", self.client.log_batch, run_id or self.run_id, metrics=items[i:i + 500])

    def log_epoch(self, epoch: int, metrics: Mapping[str, float],
                  images: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """One epoch's numbers at step `epoch`, and its pictures (uint8 HxW or HxWxC); the training loops' callback."""
        if not self.logging:
            return
        self.log_metrics(metrics, step=epoch)
        for key, image in (images or {}).items():
            self.log_image(key, image, step=epoch)

    def log_image(self, key: str, image: Any, step: int) -> None:
        if self.logging:
            self._call(f"image {key}", self.client.log_image, self.run_id, image, key=key, step=step)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.logging and Path(path).exists():
            self._call(f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> None:
        if self.logging:
            self._call(f"figure {name}", self.client.log_figure, self.run_id, fig, name)

    def log_dict(self, obj: dict, name: str) -> None:
        if self.logging:
            self._call(f"file {name}", self.client.log_dict, self.run_id, obj, name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.logging:
            for k, v in tags.items():
                self._call(f"tag {k}", self.client.set_tag, self.run_id, k, str(v))

    def log_dataset(self, meta: dict, name: str, context: str, path: Optional[str | Path] = None) -> None:
        """The data as an MLflow dataset input; its digest is the content hash of `meta.json` (MLflow keeps 36 chars)."""
        if not self.logging:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        content_hash = str(meta.get("content_hash", ""))
        source = {"path": str(path) if path is not None else None, "origin": meta.get("source"),
                  "description": meta.get("description"), "content_hash": content_hash}
        ds = Dataset(name=name, digest=content_hash[:36], source_type="local", source=json.dumps(source),
                     profile=json.dumps({"counts": meta.get("counts", {})}))
        tags = [InputTag(key="mlflow.data.context", value=context), InputTag(key=TAG + "content_hash", value=content_hash)]
        self._call("dataset input", self.client.log_inputs, self.run_id, datasets=[DatasetInput(ds, tags)])

    def log_prepared(self, meta: dict, out_dir: Path) -> None:
        """What `prepare` made: data tags (also on the parent), the dataset, its counts and meta.json."""
        tags = _data_tags(meta)
        self.set_tags(tags)
        if self.parent_id and self.client is not None:
            for k, v in tags.items():
                self._call(f"tag {k}", self.client.set_tag, self.parent_id, k, v)
        self.log_dataset(meta, "mnist-prepared", "prepared", out_dir)
        counts = meta.get("counts", {})
        self.headline({f"{split}_images": n for split, n in counts.items()})
        self.log_artifact(Path(out_dir) / "meta.json")

    def headline(self, metrics: Mapping[str, float]) -> None:
        """The stage's final figures, at the last step logged (values already logged there are not repeated).
        The parent gets them through the metrics files dvc.yaml lists; a stage run outside such a
        pipeline puts them on the parent prefixed by its name."""
        self.headline_metrics = self._finite(metrics)
        step = max((s for s, _ in self._last.values()), default=0)
        self.log_metrics({k: v for k, v in self.headline_metrics.items()
                          if not (k in self._last and self._last[k][0] == step and _same(self._last[k][1], v))}, step)


# --------------------------------------------------------------------------- interruption

class _Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. `dvc queue kill`), turned into an exception so that the run is marked KILLED."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- finding and opening runs

def _find_run(client: Any, exp_id: str, tags: dict[str, str]) -> Any:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp_id], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _parent_run(client: Any, exp_id: str, key: str, params: Params, tags: dict[str, str],
                under_dvc: bool) -> tuple[str, bool]:
    """The parent run of this pipeline state (found or created), and whether this stage sets its status:
    a stage that DVC runs does; a stage run by hand leaves a parent that finished alone."""
    from mlflow.entities import Param

    found = _find_run(client, exp_id, {TAG + "pipeline_key": key, TAG + "kind": "pipeline"})
    if found is not None:
        own = under_dvc or found.info.status != "FINISHED"
        if own and found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, own
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{key[:6]}"
    run = client.create_run(exp_id, run_name=name, tags={**tags, TAG + "pipeline_key": key, TAG + "kind": "pipeline"})
    items = [Param(k, str(v)) for k, v in params.flat().items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id, True


@contextlib.contextmanager
def stage_run(stage: str, params: Params, stage_params: dict[str, Any], data_meta: Optional[dict] = None,
              workdir: Optional[Path] = None) -> Iterator[StageRun]:
    """Open (or link, or continue) the child run of `stage`; mark it FAILED (KILLED) if the stage raises (is interrupted)."""
    if not params.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield StageRun(active=False)
        return
    workdir = (workdir or Path.cwd()).resolve()
    root = repo_root()
    uri = tracking_uri(root)
    _check_server(uri)
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    _quiet_mlflow()
    from mlflow import MlflowClient

    inputs = {**(stage_inputs(workdir, stage) or {}), "stage_params": stage_params, "argv": sys.argv[1:]}
    input_hash = _digest(inputs)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, params.tracking.experiment, uri, root)
        tags = {**_git_tags(workdir), **_data_tags(data_meta)}
        under_dvc = bool(os.environ.get("DVC_STAGE"))
        parent_id, own_parent = _parent_run(client, exp_id, pipeline_key(workdir, params), params, tags, under_dvc)
        for k, v in _data_tags(data_meta).items():
            client.set_tag(parent_id, k, v)
        existing = _find_run(client, exp_id, {TAG + "stage": stage, TAG + "input_hash": input_hash})
        if existing is not None and existing.info.status == "FINISHED":
            run_id, mode = existing.info.run_id, "linked"
            client.set_tag(run_id, TAG + "last_relinked", time.strftime("%Y-%m-%dT%H:%M:%S"))
            client.set_tag(parent_id, f"{TAG}linked.{stage}", run_id)
        elif existing is not None:
            run_id, mode = existing.info.run_id, "continued"
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "mlflow.parentRunId", parent_id)
        else:
            run_id, mode = client.create_run(exp_id, run_name=stage, tags={
                **tags, "mlflow.parentRunId": parent_id, TAG + "stage": stage, TAG + "input_hash": input_hash,
                TAG + "kind": "stage"}).info.run_id, "new"
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} could not be used ({type(e).__name__}: {_first_line(e)})") from None

    run = StageRun(client, run_id, parent_id, stage, uri, active=mode != "linked")
    if mode == "new":
        run.log_params(stage_params)
        run.log_dict(inputs, "dvc_inputs.yaml")
    if mode == "linked":
        print(f"mlflow: {stage}: inputs identical to finished run {run_id} (hash {input_hash}); linked to it "
              f"instead of logging a duplicate", file=sys.stderr)
    else:
        where = f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}" if uri.startswith("http") else uri
        print(f"mlflow: {stage}: {'continuing interrupted' if mode == 'continued' else 'logging to'} run {run_id} "
              f"(parent {parent_id}) at {where}", file=sys.stderr)
    try:
        with _sigterm_raises():
            yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        if mode != "linked":
            run._call("run status", client.set_terminated, run_id, status)
        if own_parent:
            run._call("run status", client.set_terminated, parent_id, status)
        raise
    if own_parent:
        _sync_parent_metrics(run, workdir, from_files=under_dvc)
    if mode != "linked":
        run._call("run status", client.set_terminated, run_id, "FINISHED")
    if own_parent:
        run._call("run status", client.set_terminated, parent_id, "FINISHED")


# --------------------------------------------------------------------------- the parent's numbers

def _sync_parent_metrics(run: StageRun, workdir: Path, from_files: bool) -> None:
    """Put the numbers of every metrics file that dvc.yaml lists on the parent (a stage that DVC runs), or
    else the stage's headline prefixed by its name, logging only changed values."""
    if not run.parent_id or run.client is None or run.lost:
        return
    flat: dict[str, float] = {}
    entries = _load_dvc_yaml(workdir).get("metrics", []) if from_files else []
    for entry in entries:
        path = workdir / entry
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            flat.update({f"{path.stem}.{k}": v for k, v in _flatten(data).items()})
    if not entries:
        flat.update({f"{run.stage}.{k}": v for k, v in run.headline_metrics.items()})
    parent = run._call("parent metrics", run.client.get_run, run.parent_id)
    if parent is None:
        return
    current = parent.data.metrics
    changed = {k: v for k, v in flat.items() if k not in current or not _same(current[k], v)}
    run.log_metrics(changed, run_id=run.parent_id)


def _same(a: float, b: float) -> bool:
    return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif _number(v):
            out[f"{prefix}{k}"] = v
    return out
