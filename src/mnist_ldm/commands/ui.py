"""`mnist-ldm ui`: the MLflow UI on the repository's tracking store, with the addresses of what to look at.

It starts `mlflow ui` (the `mlflow` beside this Python) on `MLFLOW_TRACKING_URI`, else the repository's
`mlflow.db`, on 127.0.0.1 and `--port`, without MLflow's GenAI job runner (nothing here uses it, and it costs
several processes at every start). Once the server answers it prints the addresses of the experiment's runs
table, the compare view of the latest two pipeline runs and the registered model's page, then waits; Ctrl-C stops
the server. With `MLFLOW_TRACKING_URI` set to an http(s) server, that server already serves the UI: it prints the
addresses on it and exits.
"""

from __future__ import annotations

import argparse
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
START_TIMEOUT_S = 180


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=positive_int, default=5000, help="port on 127.0.0.1 (default: 5000)")


def addresses(base: str, client, params: Params) -> list[str]:
    """The lines to print: the runs table, the compare view of the latest two parent runs, the model's page."""
    exp = client.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        raise UserError(f"tracking.experiment={params.tracking.experiment!r}: no such experiment in "
                        f"{client.tracking_uri}; run the pipeline first (dvc repro)")
    # MLflow 3 opens on its GenAI overview without `workflowType`
    lines = [f"runs:    {base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"]
    parents = client.search_runs([exp.experiment_id], "tags.`mnist_ldm.kind` = 'pipeline'", max_results=2,
                                 order_by=["start_time DESC"])
    if len(parents) == 2:
        runs, experiments = (quote(json.dumps(ids, separators=(",", ":")), safe="")
                             for ids in ([r.info.run_id for r in parents], [exp.experiment_id]))
        lines.append(f"compare: {base}/#/compare-runs?runs={runs}&experiments={experiments}")
    else:
        lines.append(f"compare: needs two pipeline runs; {len(parents)} so far (try a variant: dvc exp run -S ...)")
    name = params.tracking.registered_model
    if client.search_registered_models(f"name = '{name}'"):
        lines.append(f"model:   {base}/#/models/{quote(name, safe='')}")
    else:
        lines.append(f"model:   no registered model {name!r} yet (tracking.registered_model; package_model adds it)")
    return lines


def answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run(params: Params, args: argparse.Namespace) -> dict:
    from mlflow import MlflowClient

    uri = tracking.tracking_uri(tracking.repo_root())
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        if not answers(uri.rstrip("/")):
            raise UserError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not answering; start it, or "
                            f"unset MLFLOW_TRACKING_URI")
        print("\n".join(addresses(uri.rstrip("/"), MlflowClient(tracking_uri=uri), params)), flush=True)
        return {"uri": uri, "started": False}
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", args.port))
        except OSError:
            raise UserError(f"--port {args.port}: something already listens on 127.0.0.1:{args.port}; pass another "
                            f"--port") from None
    base = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.mkstemp(prefix="mnist-ldm-ui-", suffix=".log")[1])
    mlflow = Path(sys.executable).parent / "mlflow"
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and `kill` stop the server (also when started with &)
        signal.signal(sig, signal.default_int_handler)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", uri,
                                 "--port", str(args.port), "--host", "127.0.0.1"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(base):
            if proc.poll() is not None:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise UserError(f"mlflow ui exited with status {proc.returncode} before answering ({log}: {tail})")
            if time.monotonic() > deadline:
                raise UserError(f"mlflow ui did not answer on {base} within {START_TIMEOUT_S} s (its log: {log})")
            time.sleep(0.3)
        print(f"ui: MLflow UI on {uri} at {base} (server log: {log}); Ctrl-C stops it", flush=True)
        print("\n".join(addresses(base, MlflowClient(tracking_uri=uri), params)), flush=True)
        raise UserError(f"mlflow ui stopped with status {proc.wait()} (its log: {log})")
    except KeyboardInterrupt:
        log.unlink(missing_ok=True)  # a clean stop: the log holds nothing to look at
        raise
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server and the workers it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
