"""The runs of a pipeline: one parent run per pipeline state and, nested under it, one run per stage executed,
both identified by what DVC hashes (each dep as dvc.lock records it, the params)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from mnist_ldm.config.params_file import dotted_value, load_params, params_from_dict, parse_yaml
from mnist_ldm.config.sections import Params
from mnist_ldm.io.errors import first_line
from mnist_ldm.io.hashing import json_digest
from mnist_ldm.runtime.memory import long_lived
from mnist_ldm.tracking.stagerun import StageRun, data_tags
from mnist_ldm.tracking.store import TAG, TrackingError, connect, experiment_id, git, repo_root, tracking_uri

# eval.json's figures that a comparison is about, in the order the parent run shows them (MLflow's compare page
# plots the first metric a run received): the first eight go on the parent run, the first four tag each registered
# version (tracking/registry.py) and all describe it. A new headline metric is one line here.
HEADLINE = ("fcd.generated", "second_evaluator.fcd.generated", "fcd_ratio_to_ae_reconstruction",
            "second_evaluator.fcd_ratio_to_ae_reconstruction", "fcd.train_vs_test", "prdc.precision", "prdc.recall",
            "class_balance.tv_to_uniform", "fcd_ratio_to_single_gaussian", "fcd.single_gaussian", "prdc.density",
            "prdc.coverage", "class_balance.classes_present", "memorization.ratio", "n")
PARENT_METRICS = (*(f"eval.{k}" for k in HEADLINE[:8]), "autoencoder.test_bce", "diffusion.test_loss",
                  "evaluator.test_accuracy", "second_evaluator.test_accuracy")


def dvc_inputs(workdir: Path, stage: str) -> tuple[dict, dict]:
    """DVC's hashes of `stage`'s command, deps and params ({} if dvc.yaml lacks it), and of each dep no stage writes
    (code, raw data, params.yaml), from the workspace: a running stage's dvc.lock entry is its previous run's."""
    from dvc.dependency import ParamsDependency
    from dvc.repo import Repo

    def hashed(dep) -> Any:
        with contextlib.suppress(Exception):
            return dep.get_hash().value
        return "missing"

    try:
        with Repo(str(workdir), uninitialized=True) as repo:
            stages = repo.index.stages
            outs = [o.fs_path for s in stages for o in s.outs]
            mine = next((s for s in stages if s.name == stage), None)
            inputs = {"cmd": mine.cmd, "deps": {d.def_path: hashed(d) for d in mine.deps
                                                if not isinstance(d, ParamsDependency)},
                      "params": {k: v for d in mine.deps if isinstance(d, ParamsDependency)
                                 for k, v in (hashed(d) or {}).items()}} if mine else {}
            sources = {d.def_path: hashed(d) for s in stages for d in s.deps if not isinstance(d, ParamsDependency)
                       and not any(d.fs_path == o or d.fs_path.startswith(o + "/") for o in outs)}
    except Exception:  # not a DVC pipeline, or dvc.yaml unreadable: the params and command line identify the run
        return {}, {}
    return inputs, sources


def section_params(params: Params, section: str) -> dict[str, Any]:
    """`{"section.key": value}` for one params section."""
    return {k: v for k, v in params.flat().items() if k.startswith(section + ".")}


def git_tags(workdir: Path) -> dict[str, str]:
    """The commit (the experiment's baseline under `dvc exp run`), whether the tree is dirty, the DVC experiment."""
    tags = {}
    if commit := os.environ.get("DVC_EXP_BASELINE_REV") or git(["rev-parse", "HEAD"], workdir):
        dirty = git(["status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"], workdir)
        tags = {"mlflow.source.git.commit": commit, TAG + "git_commit": commit,
                TAG + "git_dirty": str(bool(dirty)).lower()}
    return {**tags, **{TAG + v.lower(): os.environ[v] for v in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
                       if os.environ.get(v)}}


def note(workdir: Path) -> str:
    """Where a run or a registered version comes from (a parent run's `mlflow.note.content`): the DVC experiment or
    the workspace, its commit (the experiment's baseline, else HEAD), and each param of params.yaml that differs
    from that commit's."""
    tags = git_tags(workdir)
    rev = tags.get(TAG + "git_commit", "")
    try:
        old = params_from_dict(parse_yaml(git(["show", f"{rev or 'HEAD'}:params.yaml"], workdir))).flat()
        diff = [f"`{k}` {old.get(k)} -> {v}" for k, v in load_params(workdir / "params.yaml").flat().items()
                if old.get(k) != v]
    except Exception:  # no commit, no params.yaml in it, or one this version cannot read
        diff = []
    name = (f"DVC experiment `{os.environ['DVC_EXP_NAME']}`" if os.environ.get("DVC_EXP_NAME") else
            "The workspace" + (" (uncommitted changes)" if tags.get(TAG + "git_dirty") == "true" else ""))
    return f"{name} against commit `{rev[:12] or 'none'}`: {', '.join(diff) or 'the same params (the baseline)'}."


def open_run(client: Any, uri: str, exp_id: str, key: dict[str, str], name: str,
             tags: dict[str, str]) -> tuple[Any, bool]:
    """The newest run of `exp_id` tagged `key`, else a new one named `name`, tagged `key` and `tags`; and if new.
    Found or created under an exclusive lock per store and experiment on this machine, so that two stages of one
    pipeline state starting at once (two `dvc queue` workers) get one run, not twins."""
    lock = Path(tempfile.gettempdir()) / f"mnist-ldm-{os.getuid()}-runs-{json_digest([uri, exp_id], 16)}.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        found = client.search_runs([exp_id], " and ".join(f"tags.`{k}` = '{v}'" for k, v in key.items()),
                                   max_results=1, order_by=["attributes.start_time DESC"])
        return (found[0], False) if found else (client.create_run(exp_id, run_name=name, tags={**tags, **key}), True)


@long_lived()  # MLflow's and DVC's modules and clients, kept to the end
def open_runs(stage: str, params: Params, stage_params: dict[str, Any], data_meta: Optional[dict],
              workdir: Path, under_dvc: bool) -> tuple[StageRun, bool]:
    """`stage_run`'s run, opened (new, continued or linked to) under its parent, and whether this process sets the
    parent's status (always under DVC)."""
    from dvc.utils import dict_md5
    from mlflow.entities import Param, RunTag

    root = repo_root()
    uri = tracking_uri(root)
    dvc_stage, sources = dvc_inputs(workdir, stage)
    # the command line and the run-time choices set in the environment (MNIST_LDM_PRECISION, ...) are inputs too
    inputs = {**dvc_stage, "stage_params": stage_params, "argv": sys.argv[1:],
              "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MNIST_LDM_")}}
    input_hash = dict_md5(json.loads(json.dumps(inputs, default=str)))
    try:
        client = connect(uri)
        exp_id = experiment_id(client, params.tracking.experiment, uri, root)
        tags = {**git_tags(workdir), **data_tags(data_meta)}
        key = dict_md5(json.loads(json.dumps({"params": params.flat(), "sources": sources}, default=str)))
        name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{key[:6]}"
        parent, new_parent = open_run(client, uri, exp_id, {TAG + "pipeline_key": key, TAG + "kind": "pipeline"},
                                      name, tags)
        parent_id = parent.info.run_id
        own_parent = new_parent or under_dvc or parent.info.status != "FINISHED"
        client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in params.flat().items()] if new_parent else [],
                         tags=[RunTag(k, v) for k, v in data_tags(data_meta).items()]
                         + ([RunTag("mlflow.note.content", note(workdir))] if new_parent else []))
        child, new = open_run(client, uri, exp_id, {TAG + "stage": stage, TAG + "input_hash": input_hash}, stage,
                              {**tags, "mlflow.parentRunId": parent_id, TAG + "kind": "stage"})
        run_id, linked = child.info.run_id, child.info.status == "FINISHED"
        for rid, run_info, own in ((parent_id, parent.info, own_parent), (run_id, child.info, not linked)):
            if own and run_info.status != "RUNNING":
                client.update_run(rid, status="RUNNING")
        if linked:
            client.set_tag(run_id, TAG + "last_relinked", time.strftime("%Y-%m-%dT%H:%M:%S"))
            client.set_tag(parent_id, f"{TAG}linked.{stage}", run_id)
        elif not new:
            client.set_tag(run_id, "mlflow.parentRunId", parent_id)
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} could not be used ({type(e).__name__}: {first_line(e)})") from None

    run = StageRun(client, run_id, parent_id, stage, uri, active=not linked)
    if new:
        run.log_batch(params=[Param(k, str(v)) for k, v in stage_params.items()])
        run.log_dict(inputs, "dvc_inputs.yaml")
    if linked:
        print(f"mlflow: {stage}: inputs identical to finished run {run_id} (hash {input_hash}); linked to it "
              f"instead of logging a duplicate", file=sys.stderr)
    else:
        where = f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}" if uri.startswith("http") else uri
        print(f"mlflow: {stage}: {'logging to' if new else 'continuing interrupted'} run {run_id} "
              f"(parent {parent_id}) at {where}", file=sys.stderr)
    return run, own_parent


@contextlib.contextmanager
def stage_run(stage: str, params: Params, stage_params: dict[str, Any],
              data_meta: Optional[dict] = None) -> Iterator[StageRun]:
    """The run of `stage` under the parent run of the pipeline's state: a new one; the interrupted one with the same
    inputs, continued; or the finished one, linked to (tagged, and named on the parent) instead of a twin. Both are
    marked FAILED if the stage raises (KILLED on Ctrl-C, or on SIGTERM such as `dvc queue kill`'s, which every
    command turns into KeyboardInterrupt). A stage run by hand leaves a parent that finished alone; one that DVC runs
    sets the parent's status and headline metrics."""
    if not params.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield StageRun(active=False)
        return
    workdir, under_dvc = Path.cwd().resolve(), bool(os.environ.get("DVC_STAGE"))
    run, own_parent = open_runs(stage, params, stage_params, data_meta, workdir, under_dvc)
    status = "FINISHED"
    try:
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        run.retry(final=True)  # what the store missed, if it answers now
        if own_parent and under_dvc:  # a failed stage's own figures are not taken
            run.call("parent metrics", parent_metrics, run, workdir, stage if status == "FINISHED" else "")
        for rid, own in ((run.run_id, run.active), (run.parent_id, own_parent)):
            if own:
                run.call("run status", run.client.set_terminated, rid, status)


@contextlib.contextmanager
def training_run(stage: str, params: Params, section: str, data_meta: dict, dataset: str,
                 source: Path) -> Iterator[StageRun]:
    """`stage_run` of a training stage: the params of its `section`, and what it trains on (`source`,
    described by `data_meta`) as the MLflow dataset input `dataset`."""
    with stage_run(stage, params, section_params(params, section), data_meta) as run:
        run.log_dataset(data_meta, dataset, "training", source)
        yield run


def parent_metrics(run: StageRun, workdir: Path, finished: str) -> None:
    """Put `PARENT_METRICS` on the parent, in that order, each value once, from the metrics files of `finished` (the
    running stage, or "" if it failed) and of each stage that DVC finds up to date (its dvc.lock entry against the
    workspace) with all its upstream stages: not one still to run under `dvc repro`, nor one after a failed stage.
    Asked through DVC's API, not `dvc status`, whose lock the running `dvc repro` holds."""
    from dvc.repo import Repo
    from dvc.repo.graph import collect_pipeline

    with Repo(str(workdir), uninitialized=True) as repo:
        graph = repo.index.graph
        stale = {s for s in graph if s.name != finished and (s.changed_stage() or any(d.status() for d in s.deps))}
        paths = sorted(o.def_path for s in graph for o in s.outs if o.metric
                       and (s.name == finished or stale.isdisjoint(collect_pipeline(s, graph))))
    found = {}
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((workdir / path).read_text())
            found.update({k: dotted_value(data, k.split(".", 1)[1]) for k in PARENT_METRICS
                          if k.split(".", 1)[0] == Path(path).stem})
    if found:
        logged = run.client.get_run(run.parent_id).data.metrics
        run.log_metrics({k: found[k] for k in PARENT_METRICS if k in found and logged.get(k) != found[k]},
                        run_id=run.parent_id)
