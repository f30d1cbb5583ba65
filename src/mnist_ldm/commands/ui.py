"""`mnist-ldm ui`: the MLflow UI on the repository's tracking store, with the addresses of what to look at.

It starts `mlflow ui` (the `mlflow` beside this Python) on `MLFLOW_TRACKING_URI`, else the repository's
`mlflow.db`, on 127.0.0.1 and `--port`, without MLflow's GenAI job runner (nothing here uses it, and it
costs several processes at every start). Once the server answers it prints the addresses of the
experiment's runs table, the compare view of the latest two pipeline runs (the parent runs, one per
`dvc repro` or DVC experiment) and the registered model's page, then waits; Ctrl-C stops the server.
With `MLFLOW_TRACKING_URI` set to an http(s) server, that server already serves the UI: it prints the
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
PARENT_FILTER = "tags.`mnist_ldm.kind` = 'pipeline'"
RUNS_VIEW = "runs?workflowType=machine_learning"  # MLflow 3 opens on its GenAI overview without it
START_TIMEOUT_S = 180


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=positive_int, default=5000, help="port on 127.0.0.1 (default: 5000)")


def addresses(base: str, client, params: Params) -> list[str]:
    """The lines to print: the runs table, the compare view of the latest two parent runs, the model's page."""
    exp = client.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        raise UserError(f"tracking.experiment={params.tracking.experiment!r}: no such experiment in "
                        f"{client.tracking_uri}; run the pipeline first (dvc repro)")
    lines = [f"runs:    {base}/#/experiments/{exp.experiment_id}/{RUNS_VIEW}"]
    parents = client.search_runs([exp.experiment_id], PARENT_FILTER, max_results=2, order_by=["start_time DESC"])
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


def mlflow_binary() -> str:
    """The `mlflow` of the environment this command runs in."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else "mlflow"


def check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(f"--port {port}: something already listens on 127.0.0.1:{port}; pass another --port") from None


def wait_until_answering(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise UserError(f"mlflow ui exited with status {proc.returncode} before answering ({log}: {tail})")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise UserError(f"mlflow ui did not answer on {base} within {START_TIMEOUT_S} s (its log: {log})")


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server and the workers it started (its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(params: Params, args: argparse.Namespace) -> dict:
    from mlflow import MlflowClient

    uri = tracking.tracking_uri(tracking.repo_root())
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except OSError as e:
            raise UserError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not answering "
                            f"({type(e).__name__}); start it, or unset MLFLOW_TRACKING_URI") from None
        for line in addresses(uri.rstrip("/"), MlflowClient(tracking_uri=uri), params):
            print(line, flush=True)
        return {"uri": uri, "started": False}
    check_port_free(args.port)
    base = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.mkstemp(prefix="mnist-ldm-ui-", suffix=".log")[1])
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and `kill` stop the server (also when started with &)
        signal.signal(sig, signal.default_int_handler)
    with open(log, "w") as out:
        proc = subprocess.Popen([mlflow_binary(), "ui", "--backend-store-uri", uri, "--port", str(args.port),
                                 "--host", "127.0.0.1"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        wait_until_answering(proc, base, log)
        print(f"ui: MLflow UI on {uri} at {base} (server log: {log}); Ctrl-C stops it", flush=True)
        for line in addresses(base, MlflowClient(tracking_uri=uri), params):
            print(line, flush=True)
        code = proc.wait()
        raise UserError(f"mlflow ui stopped with status {code} (its log: {log})")
    except KeyboardInterrupt:
        stop(proc)
        log.unlink(missing_ok=True)  # a clean stop: the log holds nothing to look at
        raise
    finally:
        stop(proc)
