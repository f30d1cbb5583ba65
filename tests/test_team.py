"""A team on real servers (docs/team.md, run as written): PostgreSQL, SeaweedFS's S3 API and `mlflow server` on both,
started by `tools/team.py`; Alice and Bob in two clones of one git remote share experiments (git + the S3 DVC remote)
and runs (the tracking server: parent and stage runs, metrics, artifacts served from S3, the registry). Then the
faults a team meets: a wrong S3 secret, the S3 server down at `dvc push`, PostgreSQL stopped for 10 s while a stage
trains. What the user saw is printed (pytest -s)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, run
from test_readme import GROUPS, docs_workspace, run_pages

TEAM = [str(BIN / "python"), str(REPO / "tools" / "team.py")]


@pytest.fixture(scope="module")
def workspace(trained_repo: Path, tmp_path_factory):
    """Alice's clone (docs_workspace's), the team stack under its .team/ once the first block starts it."""
    with docs_workspace(trained_repo, tmp_path_factory.mktemp("team")) as ws:
        try:
            yield ws
        finally:
            subprocess.run([*TEAM, "down", "--root", str(ws[0] / ".team")], capture_output=True, timeout=120)


def settings(env_file: Path) -> dict[str, str]:
    lines = env_file.read_text().splitlines()
    uri = next(line.split("=", 1)[1] for line in lines if line.startswith("export MLFLOW_TRACKING_URI="))
    secret = next(line.split()[-1] for line in lines if "secret_access_key" in line)
    endpoint = next(line.split()[-1] for line in lines if "endpointurl" in line)
    return {"uri": uri, "secret": secret, "endpoint": endpoint}


def test_two_clones_share_experiments_runs_and_the_registry(workspace):
    alice, values, env = workspace
    t0 = time.monotonic()
    ran = run_pages(GROUPS["team"], workspace)
    print(f"docs/team.md round trip: {time.monotonic() - t0:.0f} s")
    assert len(ran) == 4, ran
    bob, team = alice.parent / "bob", settings(alice.parent / "team.env")

    # the secret is in each clone's .dvc/config.local (git-ignored), never in git
    for clone in (alice, bob):
        assert team["secret"] in (clone / ".dvc/config.local").read_text()
        assert team["secret"] not in (clone / ".dvc/config").read_text()
        tracked = run(["git", "grep", "-l", team["secret"]], clone, check=False, env=env)
        assert tracked.returncode == 1, tracked.stdout
    # each sees the other's experiment
    for clone in (alice, bob):
        names = run([str(BIN / "dvc"), "exp", "list", "--name-only", "--all-commits"], clone, env=env).stdout.split()
        assert {"alice-steps", "bob-steps"} <= set(names), names

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team["uri"])
    exp = client.get_experiment_by_name("mnist-ldm")
    parents = client.search_runs([exp.experiment_id], "tags.`mnist_ldm.kind` = 'pipeline'")
    by_steps = {r.data.params.get("sample.steps"): r for r in parents}
    assert {"10", "3"} <= set(by_steps), sorted(by_steps)
    for steps in ("10", "3"):
        parent = by_steps[steps]
        stages = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert {"sample", "evaluate", "package_model"} <= {r.data.tags["mnist_ldm.stage"] for r in stages}
        assert parent.info.status == "FINISHED" and "eval.fcd.generated" in parent.data.metrics, parent.data.metrics
    # an artifact of a stage run, served by the tracking server from the S3 bucket
    sample = next(r for r in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = "
                                                f"'{by_steps['10'].info.run_id}'")
                  if r.data.tags["mnist_ldm.stage"] == "sample")
    assert sample.info.artifact_uri.startswith("mlflow-artifacts:"), sample.info.artifact_uri
    files = [f.path for f in client.list_artifacts(sample.info.run_id)]
    assert files, "the sample run has no artifacts"
    got = Path(client.download_artifacts(sample.info.run_id, files[0], str(alice.parent)))
    assert got.exists()

    import boto3

    s3 = boto3.client("s3", endpoint_url=team["endpoint"], aws_access_key_id="mnist-ldm",
                      aws_secret_access_key=team["secret"], region_name="us-east-1")
    def keys(bucket: str) -> list[str]:
        return [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in p.get("Contents", [])]

    assert keys("mlflow-artifacts") and keys("dvc-remote")
    # the champion Bob chose, on the shared registry
    champion = client.get_model_version_by_alias("mnist-ldm", "champion")
    assert champion.run_id in {r.info.run_id for r in client.search_runs([exp.experiment_id], "")}


def test_wrong_s3_secret_fails_the_push_and_writes_nothing(workspace, tmp_path: Path):
    """DVC's line names the S3 call and its 403, not the remote (docs/team.md says what to check)."""
    alice, values, env = workspace
    run([*TEAM, "up", "--root", str(alice / ".team")], alice, env=env)
    (alice / "extra.txt").write_text("extra\n")
    run([str(BIN / "dvc"), "add", "extra.txt"], alice, env=env)
    before = run([str(BIN / "dvc"), "status", "-c"], alice, env=env).stdout
    local, secret = alice / ".dvc/config.local", settings(alice.parent / "team.env")["secret"]
    config = local.read_text()
    local.write_text(config.replace(secret, "wrong"))  # as `dvc remote modify --local shared secret_access_key wrong`
    try:
        proc = run([str(BIN / "dvc"), "push"], alice, check=False, env=env)
    finally:
        local.write_text(config)
    print("wrong secret:", proc.stderr.strip())
    assert proc.returncode != 0
    assert proc.stderr.startswith("ERROR: ") and "Forbidden" in proc.stderr.splitlines()[0], proc.stderr
    assert run([str(BIN / "dvc"), "status", "-c"], alice, env=env).stdout == before  # nothing half-written


def test_s3_down_during_push_then_the_next_push_completes(workspace):
    alice, values, env = workspace
    root = str(alice / ".team")
    run([*TEAM, "up", "--root", root], alice, env=env)
    (alice / "more.txt").write_text("more\n" * 1000)
    run([str(BIN / "dvc"), "add", "more.txt"], alice, env=env)
    run([*TEAM, "down", "s3", "--root", root], alice, env=env)
    try:
        proc = run([str(BIN / "dvc"), "push"], alice, check=False, env=env, timeout=300)
    finally:
        run([*TEAM, "up", "s3", "--root", root], alice, env=env)
    print("S3 down at push:", proc.stderr.strip())
    assert proc.returncode != 0 and "ERROR" in proc.stderr, proc.stderr
    run([str(BIN / "dvc"), "push"], alice, env=env)
    status = run([str(BIN / "dvc"), "status", "-c"], alice, env=env).stdout
    assert "Cache and remote 'shared' are in sync." in status, status


def test_postgres_stopped_during_training_warns_once_and_the_figures_arrive(workspace, tmp_path: Path):
    """PostgreSQL stops while `train_diffusion` trains: one warning, the stage goes on and finishes, and every
    epoch's figures and the headline reach the run once the server's store is back. The stage is paused (SIGSTOP)
    from its warning until PostgreSQL is back, so that it cannot reach its end while the store is away, whatever
    the machine's speed (that case has a line of its own: tests/test_tracking.py's server that never comes back)."""
    alice, values, env = workspace
    root = str(alice / ".team")
    run([*TEAM, "up", "--root", root], alice, env=env)
    uri = settings(alice.parent / "team.env")["uri"]
    epochs, out = 80, tmp_path / "diffusion.pt"
    proc = subprocess.Popen(
        [str(BIN / "mnist-ldm"), "train-diffusion", "--ae-ckpt", "models/autoencoder.pt", "--latents", "data/latents",
         "--data", "data/prepared", "--out", str(out), "--metrics", str(tmp_path / "m.json"), "--plots",
         str(tmp_path / "plots"), "--epochs", str(epochs)], cwd=alice, env={**env, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def until(text: str) -> str:
        """The stage's stderr up to the line holding `text` (its bar draws no newline of its own)."""
        while not lines or text not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], f"the stage ended before printing {text!r}: " + "".join(lines)
        return lines[-1]

    try:
        run_id = until("logging to run").split("logging to run ")[1].split()[0]  # training starts
        run([*TEAM, "down", "postgres", "--root", root], alice, env=env)
        until("warning: mlflow: train_diffusion")  # its next epoch's figures found the store away
        proc.send_signal(signal.SIGSTOP)
        run([*TEAM, "up", "postgres", "--root", root], alice, env=env)
    finally:
        proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=600)
    stderr = "".join(lines) + stderr
    print("PostgreSQL stopped while the stage trained:", stderr.strip())
    assert proc.returncode == 0, stderr
    assert stderr.count("warning: mlflow: train_diffusion") == 1, stderr
    assert f"mlflow: train_diffusion: {uri} answers again; the " in stderr, stderr
    assert out.stat().st_size > 0
    final = json.loads((tmp_path / "m.json").read_text())

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, epochs + 1))
    headline = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert headline and {k: got.data.metrics.get(k) for k in headline} == pytest.approx(headline), got.data.metrics


def test_four_stages_logging_at_once_lose_no_metric_and_make_no_twin(workspace, tmp_path: Path):
    """Load: 4 `train-diffusion` processes (each its own outputs, so its own stage run) log to the server at once;
    every run gets every epoch's figures, and the 4 share one parent run (the same params and sources)."""
    alice, values, env = workspace
    run([*TEAM, "up", "--root", str(alice / ".team")], alice, env=env)
    uri = settings(alice.parent / "team.env")["uri"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("mnist-ldm").experiment_id
    before = {r.info.run_id for r in client.search_runs([exp_id], "")}
    epochs, t0 = 4, time.monotonic()
    procs = [subprocess.Popen(
        [str(BIN / "mnist-ldm"), "train-diffusion", "--ae-ckpt", "models/autoencoder.pt", "--latents", "data/latents",
         "--data", "data/prepared", "--out", str(tmp_path / f"d{i}.pt"), "--metrics", str(tmp_path / f"m{i}.json"),
         "--plots", str(tmp_path / f"plots{i}"), "--epochs", str(epochs), "--set", "diffusion.generate_images=false"],
        cwd=alice, env={**env, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    wall = time.monotonic() - t0
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0 and "warning: mlflow" not in err, err
    new = [r for r in client.search_runs([exp_id], "") if r.info.run_id not in before]
    stages = [r for r in new if r.data.tags.get("mnist_ldm.kind") == "stage"]
    parent_ids = {r.data.tags["mlflow.parentRunId"] for r in stages}
    key = client.get_run(next(iter(parent_ids))).data.tags["mnist_ldm.pipeline_key"]
    twins = client.search_runs([exp_id], f"tags.`mnist_ldm.pipeline_key` = '{key}'")
    points = {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")] for r in stages}
    print(f"4 stages at once: {wall:.0f} s; {len(new)} new runs ({len(stages)} stage runs, parents of this "
          f"pipeline: {len(twins)}); train_loss points per run: {sorted(map(len, points.values()))}; "
          f"metrics per run: {sorted(len(r.data.metrics) for r in stages)}")
    assert len(stages) == 4 and len(parent_ids) == 1 and len(twins) == 1, (len(stages), parent_ids, len(twins))
    assert all(steps == list(range(1, epochs + 1)) for steps in points.values()), points
    assert len(new) - len(stages) <= 1  # at most the one parent
