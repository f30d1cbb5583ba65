"""`mnist-ldm ui`: the MLflow UI on the repository's tracking store on 127.0.0.1:`--port` (without MLflow's GenAI
job runner), then the addresses of the runs table (one row per pipeline run: the params that differ between them
and the FCDs, best first), of the charts comparing them (the FCD first) and of the registered model; Ctrl-C stops it.
An http(s) tracking server serves its own UI: only the addresses on it are printed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from mnist_ldm import tracking
from mnist_ldm.config.sections import Params
from mnist_ldm.io.errors import UserError
from mnist_ldm.runtime.command import positive_int

HELP = "start the MLflow UI on the repository's runs and print the addresses of the runs, the compare view and the model"
COMPUTES = False  # no --device/--precision: nothing here runs a network
START_TIMEOUT_S = 180
# the parent runs' columns after the params that differ: the FCD and its ratio to the autoencoder floor, both evaluators
HEADLINE = ("eval.fcd.generated", "eval.fcd_ratio_to_ae_reconstruction", "eval.second_evaluator.fcd.generated",
            "eval.second_evaluator.fcd_ratio_to_ae_reconstruction")
MAX_PARAMS = 6  # changed params shown as columns
VIEWS = {"runs": "mnist-ldm-runs", "compare": "mnist-ldm-compare"}  # the experiment's shared views
PIPELINE = "tags.`mnist_ldm.kind` = 'pipeline'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=positive_int, default=5000, help="port on 127.0.0.1 (default: 5000)")


def save_views(client, exp_id: str, parents: list) -> bool:
    """Write the runs view and the compare view as shared views of the experiment: the tag
    `mlflow.sharedViewState.<key>` that the UI's *Share* button writes and `?viewStateShareKey=<key>` opens (MLflow's
    URL sets no columns). Both list the pipeline runs only, lowest FCD first; False if the store refuses the tag."""
    changed = sorted({k for r in parents for k, v in r.data.params.items()
                      if any(p.data.params.get(k) != v for p in parents)})[:MAX_PARAMS]
    columns = [f"params.`{k}`" for k in changed] + [f"metrics.`{k}`" for k in HEADLINE]
    table = {"searchFilter": PIPELINE, "orderByKey": f"metrics.`{HEADLINE[0]}`", "orderByAsc": True,
             "selectedColumns": columns, "columnOrder": columns}
    chart = {"metricSectionId": "headline", "deleted": False, "isGenerated": True}
    charts = [*({"uuid": k, "type": "BAR", "metricKey": k, **chart} for k in HEADLINE),
              {"uuid": "params", "type": "PARALLEL", "selectedParams": changed, "selectedMetrics": list(HEADLINE[::2]),
               **chart}]
    sections = [{"uuid": "headline", "name": "FCD (lower is better)", "display": True, "isReordered": False,
                 "deleted": False, "isGenerated": True}]
    try:
        for view, state in ((VIEWS["runs"], table),
                            (VIEWS["compare"], {**table, "compareRunCharts": charts, "compareRunSections": sections})):
            client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{view}", json.dumps(state))
    except Exception:  # a read-only server: the plain addresses
        return False
    return True


def addresses(base: str, uri: str, params: Params) -> str:
    """The runs, compare and model addresses on the UI at `base`, after writing the shared views."""
    client = tracking.connect(uri)
    exp, name = client.get_experiment_by_name(params.tracking.experiment), params.tracking.registered_model
    if exp is None:
        raise UserError(f"tracking.experiment={params.tracking.experiment!r}: no such experiment in {uri}; run the "
                        f"pipeline first (dvc repro)")
    parents = client.search_runs([exp.experiment_id], PIPELINE, max_results=500, order_by=["start_time DESC"])
    runs = f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"  # else the GenAI pages
    shared = save_views(client, exp.experiment_id, parents)
    ids = [quote(json.dumps(x, separators=(",", ":")), safe="") for x in ([r.info.run_id for r in parents[:2]],
                                                                          [exp.experiment_id])]
    return "\n".join([
        f"runs:    {runs}" + (f"&viewStateShareKey={VIEWS['runs']}" if shared else ""),
        f"compare: needs two pipeline runs; {len(parents)} so far (try a variant: dvc exp run -S ...)"
        if len(parents) < 2 else
        f"compare: {runs}&viewStateShareKey={VIEWS['compare']}&compareRunsMode=CHART" if shared else
        f"compare: {base}/#/compare-runs?runs={ids[0]}&experiments={ids[1]}",
        f"model:   {base}/#/models/{quote(name, safe='')}" if client.search_registered_models(f"name = '{name}'") else
        f"model:   no registered model {name!r} yet (tracking.registered_model; package_model adds it)"])


def run(params: Params, args: argparse.Namespace) -> None:
    uri = tracking.tracking_uri(tracking.repo_root())
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        print(addresses(uri.rstrip("/"), uri, params), flush=True)
        return
    with socket.socket() as s:  # a server already there would answer in place of ours
        try:
            s.bind(("127.0.0.1", args.port))
        except OSError:
            raise UserError(f"--port {args.port}: something already listens on 127.0.0.1:{args.port}; pass another "
                            f"--port") from None
    base, log = f"http://127.0.0.1:{args.port}", Path(tempfile.mkstemp(prefix="mnist-ldm-ui-", suffix=".log")[1])
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and `kill` stop the server (also when started with &)
        signal.signal(sig, signal.default_int_handler)
    with open(log, "w") as out:
        # one worker: one person's browser; MLflow's default 4 import the server 4 times (14 vs 6 CPU-s, 8 vs 5 s)
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--workers", "1",
                                 "--port", str(args.port), "--host", "127.0.0.1"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(base + "/health", timeout=2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"no answer in {START_TIMEOUT_S} s" if proc.poll() is None else f"exit status {proc.returncode}"
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise UserError(f"mlflow ui did not come up on {base} ({why}; its log {log}: {tail})")
            time.sleep(0.3)
        print(f"ui: MLflow UI on {uri} at {base} (server log: {log}); Ctrl-C stops it", flush=True)
        print(addresses(base, uri, params), flush=True)
        raise UserError(f"mlflow ui stopped with status {proc.wait()} (its log: {log})")
    except KeyboardInterrupt:
        log.unlink(missing_ok=True)  # a clean stop: the log holds nothing to look at
        raise
    finally:  # the server and the workers it started: its own process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
