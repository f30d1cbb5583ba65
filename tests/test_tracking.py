"""MLflow tracking end to end: real `dvc repro` / `dvc exp run`, the real sqlite store, a real `mlflow server` (the
team's stack: PostgreSQL, artifacts in S3).

The runs are read back with MlflowClient, the way a user would look at them.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import conftest
from conftest import BIN, LR_VARIANTS, cli, copy_trained, free_port, make_repo_copy, run
from test_pipeline import downstream, extra_stages, pipeline

from mnist_ldm.config.params_file import load_params

EXPERIMENT = "mnist-ldm"
# the stages that log a run, by name; `check_params` only reads params.yaml and logs nothing (dvc.yaml
# may add stages downstream of these: they log a run too)
STAGES = {"prepare", "train_ae", "encode", "train_diffusion", "sample", "train_evaluator", "train_second_evaluator",
          "evaluate"}
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3's UI: the training-runs view


# --------------------------------------------------------------------------- helpers

def dvc(*args: str, repo: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], repo, env=env)


def git(*args: str, repo: Path) -> str:
    return run(["git", *args], repo).stdout.strip()


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sqlite_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def all_runs(client) -> dict:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return {}
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=5000)}


def parents(runs: dict) -> list:
    return [r for r in runs.values() if r.data.tags.get("mnist_ldm.kind") == "pipeline"]


def children(runs: dict, parent_id: str) -> dict:
    """stage name -> child run of `parent_id` (asserting one per stage)."""
    kids = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent_id]
    by_stage = {r.data.tags["mnist_ldm.stage"]: r for r in kids}
    assert len(by_stage) == len(kids), f"two child runs of one stage under {parent_id}"
    return by_stage


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def flat_params(repo: Path) -> dict[str, str]:
    return {k: str(v) for k, v in load_params(repo / "params.yaml").flat().items()}


def stderr_lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tracked_repo(request, trained_repo, tmp_path_factory) -> Path:
    """A shrunk `dvc repro` logged to the default store, then committed (the state a user experiments from):
    a private copy of the session's trained repository."""
    if any("served" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("served")  # start the server tests' pipeline first: it runs beside this one
    source_commit = git("rev-parse", "HEAD", repo=trained_repo)  # what the runs were logged from
    repo = copy_trained(trained_repo, tmp_path_factory.mktemp("tracked") / "repo")
    (repo.parent / "source_commit").write_text(source_commit)
    return repo


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The team's server (PostgreSQL store, artifacts in S3; the tests above use the sqlite store), and (in a
    background thread, so that it overlaps the sqlite tests) the pipeline up to the latent cache logged to it with
    `dvc repro encode`."""
    srv = conftest.TeamServer(tmp_path_factory.mktemp("mlflow-server"))
    repo = make_repo_copy(tmp_path_factory.mktemp("served") / "repo")

    def pipeline() -> Path:
        srv.wait_healthy()
        dvc("repro", "encode", repo=repo, env=conftest.test_env(MLFLOW_TRACKING_URI=srv.uri))
        return repo

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(pipeline)
    try:
        yield srv, future
    finally:
        future.cancel()
        with contextlib.suppress(Exception):
            future.result(timeout=600)
        pool.shutdown()
        srv.kill()


@pytest.fixture(scope="module")
def server(served) -> conftest.TeamServer:
    return served[0]


@pytest.fixture(scope="module")
def server_repo(served) -> Path:
    return served[1].result(timeout=600)


# --------------------------------------------------------------------------- the default sqlite store

def test_store_location_resolves_to_the_origin_repo(tmp_path, monkeypatch):
    from mnist_ldm import tracking

    origin = tmp_path / "repo"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # DVC 3.67 runs `--temp` and queued experiments in <repo>/.dvc/tmp/exps/[standalone/]tmpXXXX
    # and sets DVC_ROOT to <repo>; a DVC_ROOT pointing into such a copy maps back as well.
    for root in (origin, origin / ".dvc/tmp/exps/standalone/tmp1x2y", origin / ".dvc/tmp/exps/tmpabc"):
        monkeypatch.setenv("DVC_ROOT", str(root))
        assert tracking.repo_root() == origin.resolve()
    assert tracking.tracking_uri(origin) == f"sqlite:///{origin / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")  # relative: to the repository, not the copy
    assert tracking.tracking_uri(origin) == f"sqlite:///{origin / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(origin) == "http://127.0.0.1:5000"


def test_default_store_holds_one_parent_with_a_child_per_stage(tracked_repo):
    repo = tracked_repo
    client = client_for(sqlite_uri(repo))
    exp = client.get_experiment_by_name(load_params(repo / "params.yaml").tracking.experiment)
    assert exp.artifact_location == (repo / "mlartifacts").as_uri()
    assert exp.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1], exp.tags
    assert not (repo / "mlruns").exists()
    runs = all_runs(client)

    [parent] = parents(runs)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == flat_params(repo)
    metrics = parent.data.metrics
    for key in ("autoencoder.test_bce", "diffusion.test_loss", "evaluator.test_accuracy",
                "second_evaluator.test_accuracy", "eval.fcd.generated", "eval.prdc.precision",
                "eval.second_evaluator.fcd.generated", "eval.fcd.train_vs_test"):
        assert key in metrics, f"parent run lacks headline metric {key}: {sorted(metrics)}"
    assert len(metrics) <= 12, sorted(metrics)  # the headline; the rest stays on the stage runs
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    tags = parent.data.tags
    assert tags["mnist_ldm.git_commit"] == (repo.parent / "source_commit").read_text()
    # a clean checkout stays clean under `dvc repro`: the .gitignore entries DVC writes for the outputs are committed
    assert tags["mnist_ldm.git_dirty"] == "false"
    assert tags["mnist_ldm.data_source"] == "bundled"
    assert tags["mnist_ldm.data_hash"] == meta["content_hash"]
    assert "mnist_ldm.dvc_exp_name" not in tags  # a plain `dvc repro`

    kids = children(runs, parent.info.run_id)
    logging = STAGES | extra_stages(repo)
    assert set(kids) == logging and set(pipeline(repo)) == logging | {"check_params"}
    assert len(runs) == 1 + len(logging)
    for stage, r in kids.items():
        assert r.info.status == "FINISHED", stage
        assert r.data.tags["mnist_ldm.git_commit"] == tags["mnist_ldm.git_commit"]
        assert "dvc_inputs.yaml" in artifact_paths(client, r.info.run_id), stage

    # the evaluate run: every number of eval.json, under the dotted key `dvc metrics show` gives it
    def numbers(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(numbers(v, f"{prefix}{k}."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix + k] = v
        return out

    evaluated = numbers(json.loads((repo / "metrics/eval.json").read_text()))
    assert {"fcd.generated", "second_evaluator.fcd.generated", "prdc.recall"} <= evaluated.keys()
    assert kids["evaluate"].data.metrics == pytest.approx(evaluated)

    # each stage's own params, as dvc.yaml lists them (`sample` logs num_images=0 resolved to the test set size)
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    flat = flat_params(repo)
    for stage, spec in dvc_yaml.items():
        for key in spec.get("params", []):
            wanted = {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}
            assert wanted and wanted.keys() <= kids[stage].data.params.keys(), (stage, key)
            if stage != "sample":
                assert wanted.items() <= kids[stage].data.params.items(), (stage, key)
    assert kids["sample"].data.params["sample.num_images"] == str(meta["counts"]["test"])

    # per-epoch metric histories of the training stages
    for stage, key in (("train_ae", "train_bce"), ("train_diffusion", "train_loss"),
                       ("train_evaluator", "train_loss")):
        history = client.get_metric_history(kids[stage].info.run_id, key)
        assert len(history) >= 1 and min(m.step for m in history) >= 1, (stage, key, history)

    # pictures and files; the checkpoints only in DVC's cache
    arts = {s: artifact_paths(client, kids[s].info.run_id) for s in ("train_ae", "train_diffusion", "sample",
                                                                    "train_evaluator", "evaluate", "prepare")}
    assert {"reconstructions.png", "loss.png", "meta.json", "autoencoder.json"} <= arts["train_ae"]
    assert not [a for s in arts.values() for a in s if a.endswith((".pt", ".npz"))], arts
    assert any(re.match(r"images/reconstructions\+step\+1\+.*\.png$", p) for p in arts["train_ae"]), arts["train_ae"]
    assert {"loss.png", "diffusion.json"} <= arts["train_diffusion"]
    assert any(re.match(r"images/samples\+step\+1\+.*\.png$", p) for p in arts["train_diffusion"])
    assert {"grid.png", "trajectory.png", "interpolation.png", "sample.json"} <= arts["sample"]
    assert {"fcd.png", "class_histogram.png", "eval.json"} <= arts["evaluate"]
    assert {"evaluator.json"} <= arts["train_evaluator"]
    assert "meta.json" in arts["prepare"]
    assert any((repo / "mlartifacts").rglob("reconstructions.png"))

    # the training data as a dataset input whose digest is the content hash
    for stage in ("train_ae", "train_evaluator", "train_diffusion"):
        [ds_input] = kids[stage].inputs.dataset_inputs
        assert ds_input.dataset.digest == meta["content_hash"][:36], stage
        input_tags = {t.key: t.value for t in ds_input.tags}
        assert input_tags["mlflow.data.context"] == "training"
        assert input_tags["mnist_ldm.content_hash"] == meta["content_hash"]


def test_reruns_link_instead_of_duplicating(tracked_repo):
    repo = tracked_repo
    client = client_for(sqlite_uri(repo))
    before = all_runs(client)

    out = dvc("repro", repo=repo)
    assert "up to date" in out.stdout
    assert all_runs(client).keys() == before.keys()

    out = dvc("repro", "-f", "-s", "train_evaluator", repo=repo)  # re-executes with identical inputs
    assert "linked" in out.stdout + out.stderr
    after_force = all_runs(client)
    assert after_force.keys() == before.keys()
    assert any(r.data.tags.get("mnist_ldm.last_relinked") for r in after_force.values()
               if r.data.tags.get("mnist_ldm.stage") == "train_evaluator")


def test_a_variant_never_shows_another_models_figures(trained_repo, tmp_path):
    """A variant's parent run holds the figures of this pipeline's models only: after its new diffusion model
    is trained and before its samples are (`dvc exp run ... train_diffusion`), not the workspace's previous
    samples and FCD; and when its training diverges, the figures of the stages it shares with the baseline
    (the autoencoder, the evaluator) and none of the previous diffusion model's, samples' or FCD. The first runs
    with `--temp`, in a copy under .dvc/tmp/exps/, and logs to the origin's store all the same."""
    repo = copy_trained(trained_repo, tmp_path / "repo")  # with the runs the pipeline logged to its own store
    client = client_for(sqlite_uri(repo))
    before = all_runs(client)
    # up to train_diffusion only; without the per-epoch preview grids (generate_images only changes what MLflow gets)
    dvc("exp", "run", "--temp", "-n", "halfway", "-S", "diffusion.lr=0.0005", "-S", "diffusion.generate_images=false",
        "train_diffusion", repo=repo)
    runs = all_runs(client)
    new = {k: r for k, r in runs.items() if k not in before}
    [halfway] = parents(new)
    shown = set(halfway.data.metrics)
    assert not {k for k in shown if k.split(".")[0] in ("sample", "eval")}, sorted(shown)
    kids = children(runs, halfway.info.run_id)
    assert set(kids) == {"train_diffusion"} and len(new) == 2
    trained = kids["train_diffusion"]
    assert halfway.data.metrics["diffusion.test_loss"] == trained.data.metrics["test_loss"]
    assert trained.data.params["diffusion.lr"] == "0.0005" and trained.data.params["diffusion.generate_images"] == "False"
    assert trained.info.status == halfway.info.status == "FINISHED"
    assert client.get_metric_history(trained.info.run_id, "train_loss")
    arts = artifact_paths(client, trained.info.run_id)
    assert "loss.png" in arts and not any(a.startswith("images/") for a in arts), arts
    assert halfway.data.tags["mnist_ldm.dvc_exp_name"] == halfway.info.run_name == "halfway"
    assert not list((repo / ".dvc").rglob("mlflow.db"))
    assert {"autoencoder.test_bce", "evaluator.test_accuracy"} <= shown, sorted(shown)

    # a learning rate written without an exponent: DVC writes `-S` values back as YAML, where 1e+15 is text
    before = all_runs(client)
    proc = run([str(BIN / "dvc"), "exp", "run", "-n", "diverges", "-S", "diffusion.lr=1000000000000000.0",
                "-S", "diffusion.generate_images=false"], repo, check=False)
    assert proc.returncode != 0 and "loss became" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    [parent] = parents({k: r for k, r in all_runs(client).items() if k not in before})
    assert parent.info.status == "FAILED" and parent.info.run_name == "diverges"
    shown = set(parent.data.metrics)
    foreign = {k for k in shown if k.split(".")[0] in ("diffusion", "sample", "eval")}
    assert not foreign, f"the failed variant's parent shows the previous model's {sorted(foreign)}"
    assert {"autoencoder.test_bce", "evaluator.test_accuracy"} <= shown, sorted(shown)


def test_unreachable_server_fails_before_training(tracked_repo, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = cli("train-ae", "--data", "data/prepared", "--out", str(tmp_path / "ae.pt"),
               "--metrics", str(tmp_path / "ae.json"), "--plots", str(tmp_path / "plots"), cwd=tracked_repo, check=False,
               env=conftest.test_env(MLFLOW_TRACKING_URI=uri))
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and uri in lines[0], proc.stderr
    assert not (tmp_path / "ae.pt").exists() and not (tmp_path / "plots").exists()
    assert "train_ae:" not in proc.stdout + proc.stderr
    assert elapsed < 20, elapsed


def test_bad_input_fails_before_a_run_is_opened(tracked_repo, tmp_path):
    """Inputs are read before the stage's run is opened: a missing checkpoint logs nothing."""
    client = client_for(sqlite_uri(tracked_repo))
    before = all_runs(client)
    proc = cli("sample", "--ckpt", str(tmp_path / "missing.pt"), "--ae-ckpt", "models/autoencoder.pt",
               "--latents", "data/latents", "--out", str(tmp_path / "s.npz"), "--plots", str(tmp_path / "plots"),
               "--metrics", str(tmp_path / "s.json"), cwd=tracked_repo, check=False)
    assert proc.returncode == 2
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.pt" in lines[0], proc.stderr
    assert all_runs(client).keys() == before.keys()
    assert not (tmp_path / "s.npz").exists()


def test_failed_stage_marks_its_run_failed(tracked_repo, tmp_path):
    """A stage that fails while its run is open (training diverges at lr 1e30) marks the run FAILED, and the
    parent that this command opened for its own params too; the pipeline's runs are left as they were."""
    client = client_for(sqlite_uri(tracked_repo))
    before = all_runs(client)
    proc = cli("train-diffusion", "--set", "diffusion.lr=1.0e+30", "--set", "diffusion.generate_images=false",
               "--ae-ckpt", "models/autoencoder.pt", "--latents", "data/latents", "--data", "data/prepared",
               "--out", str(tmp_path / "d.pt"), "--metrics", str(tmp_path / "d.json"),
               "--plots", str(tmp_path / "plots"), cwd=tracked_repo, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert stderr_lines(proc.stderr)[-1].startswith("error: train_diffusion: loss became"), proc.stderr[-3000:]
    after = all_runs(client)
    new = {k: r for k, r in after.items() if k not in before}
    [child] = [r for r in new.values() if r.data.tags.get("mnist_ldm.stage") == "train_diffusion"]
    assert child.info.status == "FAILED"
    assert child.data.params["diffusion.lr"] == "1e+30"
    parent = after[child.data.tags["mlflow.parentRunId"]]
    assert parent.info.run_id in new and parent.data.tags["mnist_ldm.kind"] == "pipeline"
    assert parent.info.status == "FAILED" and parent.data.params["diffusion.lr"] == "1e+30"
    assert len(new) == 2
    assert {k: r.info.status for k, r in after.items() if k in before} == {k: r.info.status for k, r in before.items()}
    assert not (tmp_path / "d.pt").exists()


# --------------------------------------------------------------------------- a tracking server

def test_tracking_server_gets_the_same_run_structure(server, server_repo):
    assert not (server_repo / "mlflow.db").exists()
    client = client_for(server.uri)
    assert client.get_experiment_by_name(EXPERIMENT).tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1]
    runs = all_runs(client)
    [parent] = parents(runs)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == flat_params(server_repo)
    assert "autoencoder.test_bce" in parent.data.metrics
    kids = children(runs, parent.info.run_id)
    assert set(kids) == {"prepare", "train_ae", "encode"}
    assert all(r.info.status == "FINISHED" for r in kids.values())
    ae = kids["train_ae"]
    assert ae.data.params["autoencoder.epochs"] == "1" and ae.data.params["autoencoder.batch_size"] == "64"
    assert [m.step for m in client.get_metric_history(ae.info.run_id, "train_bce")] == [1]
    arts = artifact_paths(client, ae.info.run_id)
    assert {"reconstructions.png", "loss.png", "meta.json", "dvc_inputs.yaml"} <= arts
    assert any(p.startswith("images/reconstructions+step+1") for p in arts), arts
    meta = json.loads((server_repo / "data/prepared/meta.json").read_text())
    assert ae.inputs.dataset_inputs[0].dataset.digest == meta["content_hash"][:36]
    assert ae.data.tags["mnist_ldm.data_hash"] == parent.data.tags["mnist_ldm.data_hash"] == meta["content_hash"]


def test_server_lost_mid_training_warns_and_finishes(server, server_repo, tmp_path):
    """Runs last among the server tests: it kills the server."""
    client = client_for(server.uri)
    before = all_runs(client).keys()
    out = tmp_path / "diffusion.pt"
    proc = subprocess.Popen(
        [str(BIN / "mnist-ldm"), "train-diffusion", "--epochs", "60", "--ae-ckpt", "models/autoencoder.pt",
         "--latents", "data/latents", "--data", "data/prepared",
         "--out", str(out), "--metrics", str(tmp_path / "diffusion.json"), "--plots", str(tmp_path / "plots")],
        cwd=server_repo, env=conftest.test_env(MLFLOW_TRACKING_URI=server.uri), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no metric logged to the server"
            new = [r for k, r in all_runs(client).items() if k not in before
                   and r.data.tags.get("mnist_ldm.stage") == "train_diffusion"]
            if new and client.get_metric_history(new[0].info.run_id, "train_loss"):
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGSTOP)  # paused while the server dies, so that it cannot end training first
        server.kill()
        t_kill = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert time.monotonic() - t_kill < 90
    assert out.is_file() and json.loads((tmp_path / "diffusion.json").read_text())["train_latents"] > 0
    warnings = [line for line in stderr_lines(stderr) if line.startswith("warning: mlflow")]
    assert len(warnings) == 2 and server.uri in warnings[0], stderr[-3000:]  # the first failure, and the end:
    assert f"{server.uri} still fails at the stage's end;" in warnings[1], warnings  # the server never came back
    assert "Traceback" not in stderr and "View run" not in stdout


# --------------------------------------------------------------------------- experiments

def test_an_experiment_adds_one_parent_with_a_child_per_stage_it_reruns(lr_experiments):
    """docs/tracking.md's grid search of two `diffusion.lr` values (`lr_experiments`: its store held no runs before
    them)."""
    repo = lr_experiments
    runs = all_runs(client_for(sqlite_uri(repo)))
    assert sorted(p.info.run_name for p in parents(runs)) == sorted(LR_VARIANTS)  # one parent per experiment
    name, lr = next(iter(LR_VARIANTS.items()))
    [parent] = [p for p in parents(runs) if p.info.run_name == name]
    kids = children(runs, parent.info.run_id)
    assert set(kids) == downstream(pipeline(repo), {"train_diffusion"})
    assert set(kids) & STAGES == {"train_diffusion", "sample", "evaluate"}
    assert len(runs) == len(LR_VARIANTS) * (1 + len(kids))  # and a child per stage it re-ran, nothing more
    assert kids["train_diffusion"].data.params["diffusion.lr"] == lr
    assert parent.data.params["diffusion.lr"] == lr
    assert parent.data.tags["mnist_ldm.dvc_exp_name"] == parent.info.run_name
    assert parent.data.tags["mnist_ldm.dvc_exp_baseline_rev"] == git("rev-parse", "HEAD", repo=repo)
    assert "autoencoder.test_bce" in parent.data.metrics  # from the stage the experiment did not re-run
    assert parent.data.metrics["diffusion.test_loss"] == kids["train_diffusion"].data.metrics["test_loss"]
