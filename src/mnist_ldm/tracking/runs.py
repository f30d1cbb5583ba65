"""The run lifecycle: a child run per stage under one parent run per pipeline state."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import Params
from .identity import _data_tags, _digest, _git_tags, _load_dvc_yaml, pipeline_key, section_params, stage_inputs
from .logger import StageRun, _number, _same
from .store import (ENV_DEFAULTS, TAG, TrackingError, _check_server, _experiment_id, _first_line, _quiet_mlflow,
                    repo_root, tracking_uri)

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


@contextlib.contextmanager
def training_run(stage: str, params: Params, section: str, data_meta: dict, dataset: str,
                 source: Path) -> Iterator[StageRun]:
    """`stage_run` of a training stage: the params of its `section`, and what it trains on (`source`,
    described by `data_meta`) as the MLflow dataset input `dataset`."""
    with stage_run(stage, params, section_params(params, section), data_meta) as run:
        run.log_dataset(data_meta, dataset, "training", source)
        yield run


# --------------------------------------------------------------------------- the parent's numbers

# Sizes, not results (parameter counts, how many images a stage learnt from or scored): tags on the
# parent, `mnist_ldm.size.<name>`, so that comparing runs compares results. MLflow's compare view
# starts its parallel-coordinates plot on the first metric a run received, and lists metrics in that
# order. (The sampler's cost figures, `sample.num_images` and the like, stay metrics.)
SIZE_KEYS = frozenset({"params", "n", "train_latents", "train_images", "test_images"})
SIZE_TAG = TAG + "size."
# the numbers a comparison is about come first in each batch sent to the parent
HEADLINE_ORDER = ("eval.fcd.generated", "eval.fcd_ratio_to_single_gaussian", "eval.fcd.", "eval.prdc.",
                  "autoencoder.test_bce", "diffusion.test_loss", "diffusion.train_loss", "evaluator.test_accuracy")


def _is_size(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SIZE_KEYS


def _headline_rank(key: str) -> int:
    return next((i for i, p in enumerate(HEADLINE_ORDER) if key == p or (p.endswith(".") and key.startswith(p))),
                len(HEADLINE_ORDER))


def _sync_parent_metrics(run: StageRun, workdir: Path, from_files: bool) -> None:
    """Put the numbers of every metrics file that dvc.yaml lists on the parent (a stage that DVC runs), or
    else the stage's headline prefixed by its name, logging only changed values; sizes go as tags."""
    if not run.parent_id or run.client is None or run.lost:
        return
    from mlflow.entities import RunTag

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
    sizes = {SIZE_TAG + k: _tag_value(v) for k, v in flat.items() if _is_size(k)}
    new_tags = [RunTag(k, v) for k, v in sizes.items() if parent.data.tags.get(k) != v]
    if new_tags:
        run._call("parent tags", run.client.log_batch, run.parent_id, tags=new_tags)
    current = parent.data.metrics
    changed = {k: v for k, v in sorted(flat.items(), key=lambda kv: _headline_rank(kv[0]))
               if not _is_size(k) and (k not in current or not _same(current[k], v))}
    run.log_metrics(changed, run_id=run.parent_id)


def _tag_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif _number(v):
            out[f"{prefix}{k}"] = v
    return out
