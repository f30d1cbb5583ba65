"""The runs of a pipeline: one parent run per pipeline state (`pipeline_key`), a child run per stage executed."""

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

from mnist_ldm.config.sections import Params
from mnist_ldm.io.errors import first_line
from mnist_ldm.io.hashing import json_digest
from mnist_ldm.tracking.identity import (current_stages, data_tags, git_tags, pipeline_key, producer, producers, read_yaml,
                       section_params, stage_inputs)
from mnist_ldm.tracking.registry import HEADLINE
from mnist_ldm.tracking.stagerun import StageRun, is_number, log_params, same
from mnist_ldm.tracking.store import TAG, TrackingError, connect, experiment_id, repo_root, tracking_uri

# Sizes (parameter counts, how many images a stage learnt from or scored) are tags on the parent, so that
# comparing runs compares results: MLflow's compare view plots the first metric a run received, and lists
# metrics in that order, so the numbers a comparison is about are sent first. (The sampler's cost figures,
# `sample.num_images` and the like, stay metrics.)
SIZE_KEYS = frozenset({"params", "n", "train_latents", "train_images", "test_images"})
SIZE_TAG = TAG + "size."
HEADLINE_ORDER = (*(f"eval.{k}" for k in HEADLINE), "eval.fcd.", "eval.second_evaluator.fcd.", "autoencoder.test_bce",
                  "diffusion.test_loss", "diffusion.train_loss", "evaluator.test_accuracy")


def find_run(client: Any, exp_id: str, tags: dict[str, str]) -> Any:
    """The newest run of `exp_id` with these tags, or None."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp_id], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def parent_run(client: Any, exp_id: str, key: str, params: Params, tags: dict[str, str],
               under_dvc: bool) -> tuple[str, bool]:
    """The parent run of this pipeline state (found or created), and whether this stage sets its status:
    a stage that DVC runs does; a stage run by hand leaves a parent that finished alone."""
    found = find_run(client, exp_id, {TAG + "pipeline_key": key, TAG + "kind": "pipeline"})
    if found is not None:
        own = under_dvc or found.info.status != "FINISHED"
        if own and found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, own
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{key[:6]}"
    run_id = client.create_run(exp_id, run_name=name, tags={**tags, TAG + "pipeline_key": key,
                                                             TAG + "kind": "pipeline"}).info.run_id
    log_params(client, run_id, params.flat())
    return run_id, True


def child_run(client: Any, exp_id: str, stage: str, input_hash: str, parent_id: str,
              tags: dict[str, str]) -> tuple[str, str]:
    """The run of `stage` with these inputs under `parent_id`, and how it is used: "new"; "continued", the
    interrupted run with the same inputs; or "linked", the finished one (tagged, and named on the parent)."""
    existing = find_run(client, exp_id, {TAG + "stage": stage, TAG + "input_hash": input_hash})
    if existing is None:
        return client.create_run(exp_id, run_name=stage, tags={
            **tags, "mlflow.parentRunId": parent_id, TAG + "stage": stage, TAG + "input_hash": input_hash,
            TAG + "kind": "stage"}).info.run_id, "new"
    run_id = existing.info.run_id
    if existing.info.status == "FINISHED":
        client.set_tag(run_id, TAG + "last_relinked", time.strftime("%Y-%m-%dT%H:%M:%S"))
        client.set_tag(parent_id, f"{TAG}linked.{stage}", run_id)
        return run_id, "linked"
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "mlflow.parentRunId", parent_id)
    return run_id, "continued"


@contextlib.contextmanager
def stage_run(stage: str, params: Params, stage_params: dict[str, Any], data_meta: Optional[dict] = None,
              workdir: Optional[Path] = None) -> Iterator[StageRun]:
    """The run of `stage` (`child_run`) under the pipeline's parent run; both are marked FAILED if the stage raises
    (KILLED on Ctrl-C or SIGTERM, e.g. `dvc queue kill`)."""
    if not params.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield StageRun(active=False)
        return
    workdir = (workdir or Path.cwd()).resolve()
    root = repo_root()
    uri = tracking_uri(root)
    # the command line and the run-time choices set in the environment (MNIST_LDM_PRECISION, ...) are inputs too
    runtime_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MNIST_LDM_")}
    inputs = {**stage_inputs(workdir, stage), "stage_params": stage_params, "argv": sys.argv[1:], "env": runtime_env}
    input_hash = json_digest(inputs, 20)
    under_dvc = bool(os.environ.get("DVC_STAGE"))
    try:
        client = connect(uri)
        exp_id = experiment_id(client, params.tracking.experiment, uri, root)
        tags = {**git_tags(workdir), **data_tags(data_meta)}
        parent_id, own_parent = parent_run(client, exp_id, pipeline_key(workdir, params), params, tags, under_dvc)
        for k, v in data_tags(data_meta).items():
            client.set_tag(parent_id, k, v)
        run_id, mode = child_run(client, exp_id, stage, input_hash, parent_id, tags)
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} could not be used ({type(e).__name__}: {first_line(e)})") from None

    run = StageRun(client, run_id, parent_id, stage, uri, active=mode != "linked")
    if mode == "new":
        run.log_params(stage_params)
        run.call("file dvc_inputs.yaml", client.log_dict, run_id, inputs, "dvc_inputs.yaml")
    if mode == "linked":
        print(f"mlflow: {stage}: inputs identical to finished run {run_id} (hash {input_hash}); linked to it "
              f"instead of logging a duplicate", file=sys.stderr)
    else:
        where = f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}" if uri.startswith("http") else uri
        print(f"mlflow: {stage}: {'continuing interrupted' if mode == 'continued' else 'logging to'} run {run_id} "
              f"(parent {parent_id}) at {where}", file=sys.stderr)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None  # SIGTERM: KeyboardInterrupt
    status = "FINISHED"
    try:
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if own_parent and (status == "FINISHED" or under_dvc):  # a failed stage's own figures are not taken
            sync_parent_metrics(run, workdir, from_files=under_dvc, finished=status == "FINISHED")
        for rid, own in ((run_id, mode != "linked"), (parent_id, own_parent)):
            if own:
                run.call("run status", client.set_terminated, rid, status)


@contextlib.contextmanager
def training_run(stage: str, params: Params, section: str, data_meta: dict, dataset: str,
                 source: Path) -> Iterator[StageRun]:
    """`stage_run` of a training stage: the params of its `section`, and what it trains on (`source`,
    described by `data_meta`) as the MLflow dataset input `dataset`."""
    with stage_run(stage, params, section_params(params, section), data_meta) as run:
        run.log_dataset(data_meta, dataset, "training", source)
        yield run


def is_size(key: str) -> bool:
    """Whether a metrics-file number is a size (a tag on the parent), not a result."""
    return key.rsplit(".", 1)[-1] in SIZE_KEYS


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict under dotted keys."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v} if is_number(v) else {})
    return out


def sync_parent_metrics(run: StageRun, workdir: Path, from_files: bool, finished: bool = True) -> None:
    """Put on the parent the changed numbers of the metrics files of dvc.yaml that `current_stages` wrote (the running
    stage's only if it `finished`), or else (a stage run by hand) its headline prefixed by its name; sizes as tags."""
    if not run.parent_id or run.client is None or run.lost:
        return
    from mlflow.entities import RunTag

    flat: dict[str, float] = {}
    pipeline = read_yaml(workdir / "dvc.yaml") if from_files else {}
    live = run.call("dvc stage status", current_stages, workdir, run.stage if finished else "") if from_files else set()
    if live is None:
        return
    outs = producers(pipeline.get("stages", {}))
    entries = [m for m in pipeline.get("metrics", []) if producer(outs, m) in live | {None}]
    for path in (workdir / entry for entry in entries):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        flat.update({f"{path.stem}.{k}": v for k, v in flatten(data).items()} if isinstance(data, dict) else {})
    if not pipeline.get("metrics"):
        flat.update({f"{run.stage}.{k}": v for k, v in run.headline_metrics.items()})
    parent = run.call("parent metrics", run.client.get_run, run.parent_id)
    if parent is None:
        return
    sizes = {SIZE_TAG + k: str(int(v)) if float(v).is_integer() else str(v) for k, v in flat.items() if is_size(k)}
    new_tags = [RunTag(k, v) for k, v in sizes.items() if parent.data.tags.get(k) != v]
    if new_tags:
        run.call("parent tags", run.client.log_batch, run.parent_id, tags=new_tags)
    rank = {k: next((i for i, p in enumerate(HEADLINE_ORDER) if k == p or (p.endswith(".") and k.startswith(p))),
                    len(HEADLINE_ORDER)) for k in flat}
    current = parent.data.metrics
    run.log_metrics({k: v for k, v in sorted(flat.items(), key=lambda kv: rank[kv[0]])
                     if not is_size(k) and (k not in current or not same(current[k], v))}, run_id=run.parent_id)
