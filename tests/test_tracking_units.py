"""Unit tests of `mnist_ldm.tracking`, one group per module, on a real MLflow sqlite store in a temporary folder."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mnist_ldm.config.sections import Params
from mnist_ldm.io.errors import UserError
from mnist_ldm.tracking import StageRun, TrackingError, repo_root, section_params, stage_run, tracking_uri
from mnist_ldm.tracking.runs import dvc_inputs, git_tags, open_run
from mnist_ldm.tracking.stagerun import data_tags
from mnist_ldm.tracking.store import ENV_DEFAULTS, KIND, KIND_TAG, experiment_id

PARAMS = Params()
EXPERIMENT = PARAMS.tracking.experiment


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """A migrated, empty MLflow sqlite store (migrating takes seconds; copying it does not)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def repo(tmp_path: Path, empty_db: Path, monkeypatch) -> Path:
    """A repository folder holding an empty `mlflow.db`, as the default store, with the cwd in it."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(empty_db, root / "mlflow.db")
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in ENV_DEFAULTS.items():  # stage_run sets these; undone after each test
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    return root


def client_of(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def runs_of(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id]) if exp else []


def stage_runs(client: MlflowClient) -> list:
    return [r for r in runs_of(client) if r.data.tags.get("mnist_ldm.kind") == "stage"]


def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return out


# --------------------------------------------------------------------------- store.py

def test_tracking_uri_resolution(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "repo"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(root) == f"sqlite:///{root / 'mlflow.db'}"
    cases = {
        "  ": f"sqlite:///{root / 'mlflow.db'}",
        "sqlite:///team.db": f"sqlite:///{root / 'team.db'}",  # relative: to the repository, not the cwd
        "sqlite:///stores/team.db": f"sqlite:///{root / 'stores/team.db'}",
        "sqlite:////srv/team.db": "sqlite:////srv/team.db",
        "http://127.0.0.1:5000": "http://127.0.0.1:5000",
        "databricks": "databricks",
        "mlruns": str(root / "mlruns"),  # a plain relative folder: a file store in the repository
        "/srv/mlruns": "/srv/mlruns",
        "file:///srv/mlruns": "file:///srv/mlruns",
    }
    for value, expected in cases.items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
        assert tracking_uri(root) == expected, value


def test_repo_root_maps_experiment_copies_back(tmp_path: Path, monkeypatch) -> None:
    origin = (tmp_path / "repo").resolve()
    for copy in (origin, origin / ".dvc/tmp/exps/standalone/tmp1x2y", origin / ".dvc/tmp/exps/tmpabc",
                 origin / ".dvc/tmp/exps/tmpabc/sub"):
        monkeypatch.setenv("DVC_ROOT", str(copy))
        assert repo_root() == origin, copy
    monkeypatch.delenv("DVC_ROOT")
    (origin / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=origin, check=True)
    monkeypatch.chdir(origin / "sub")
    assert repo_root() == origin  # the git top level, not the cwd


def test_new_experiment_is_model_development_with_repo_artifacts(repo: Path, capsys) -> None:
    client = client_of(repo)
    exp_id = experiment_id(client, "fresh", tracking_uri(repo), repo)
    exp = client.get_experiment(exp_id)
    assert exp.tags[KIND_TAG] == KIND == "custom_model_development"
    assert exp.artifact_location == (repo / "mlartifacts").as_uri()
    assert experiment_id(client, "fresh", tracking_uri(repo), repo) == exp_id
    assert capsys.readouterr().err == ""


def test_existing_experiment_gets_the_kind_it_lacks(repo: Path) -> None:
    client = client_of(repo)
    location = (repo / "mlartifacts").as_uri()
    bare = client.create_experiment("bare", artifact_location=location)
    chosen = client.create_experiment("chosen", artifact_location=location, tags={KIND_TAG: "genai_development"})
    for name in ("bare", "chosen"):
        experiment_id(client, name, tracking_uri(repo), repo)
    assert client.get_experiment(bare).tags[KIND_TAG] == KIND
    assert client.get_experiment(chosen).tags[KIND_TAG] == "genai_development"  # a user's choice stays


def test_deleted_experiment_is_a_one_line_user_error(repo: Path) -> None:
    client = client_of(repo)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(TrackingError, match="restore it") as info:
        experiment_id(client, "gone", tracking_uri(repo), repo)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_copied_repository_writes_artifacts_into_the_copy(repo: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    with stage_run("prepare", PARAMS, {"data.seed": 0}) as run:
        (repo / "a.txt").write_text("old")
        run.log_artifact(repo / "a.txt")
    old_run = run.run_id
    registry = client_of(repo)  # a registered version whose files are the run's (as package_model's are)
    registry.create_registered_model("m")
    registry.create_model_version("m", f"{registry.get_run(old_run).info.artifact_uri}/a.txt", old_run)
    copy = tmp_path / "moved" / "repo"
    shutil.copytree(repo, copy)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    monkeypatch.chdir(copy)
    capsys.readouterr()

    with stage_run("train_ae", PARAMS, {"autoencoder.seed": 0}) as run:
        (copy / "b.txt").write_text("new")
        run.log_artifact(copy / "b.txt")
        run.log_epoch(1, {"loss": 0.5}, {"recon": np.zeros((4, 4), np.uint8)})
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if "re-pointed" in x]
    assert str(repo / "mlartifacts") in line and str(copy / "mlartifacts") in line

    assert list((copy / "mlartifacts").rglob("b.txt")) and list((copy / "mlartifacts").rglob("recon*.png"))
    assert not list((repo / "mlartifacts").rglob("b.txt")) and not list((repo / "mlartifacts").rglob("*.png"))
    client = client_of(copy)
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location == (copy / "mlartifacts").as_uri()
    assert client.get_run(old_run).info.artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/")
    assert "a.txt" in artifact_files(client, old_run)  # earlier artifacts are read from the copy too
    version = client.get_model_version("m", "1")  # and a registered model is loaded from the copy
    assert version.source == f"{(copy / 'mlartifacts').as_uri()}/{version.source.split('/mlartifacts/', 1)[1]}"
    assert client_of(repo).get_model_version("m", "1").source.startswith((repo / "mlartifacts").as_uri() + "/")
    assert client_of(repo).get_experiment_by_name(EXPERIMENT).artifact_location == (repo / "mlartifacts").as_uri()

    with stage_run("train_ae", PARAMS, {"autoencoder.seed": 1}):
        pass
    assert "re-pointed" not in capsys.readouterr().err  # once only


def test_a_store_named_by_the_user_is_never_rewritten(repo: Path, tmp_path: Path, empty_db: Path, monkeypatch,
                                                        capsys) -> None:
    team = tmp_path / "team"
    team.mkdir()
    shutil.copy(empty_db, team / "team.db")
    elsewhere = (tmp_path / "old" / "mlartifacts").as_uri()
    uri = f"sqlite:///{team / 'team.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment(EXPERIMENT, artifact_location=elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking_uri(repo) == uri
    experiment_id(client, EXPERIMENT, uri, repo)
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location == elsewhere
    [line] = capsys.readouterr().err.splitlines()
    assert str(tmp_path / "old" / "mlartifacts") in line and "outside this repository" in line


# --------------------------------------------------------------------------- runs.py: identity

def write_pipeline(root: Path) -> None:
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q", "--no-scm"], cwd=root, check=True)
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "a.py").write_text("A = 1\n")
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "x.bin").write_bytes(b"\x00\x01")
    (root / ".dvcignore").write_text("__pycache__/\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"data": {"seed": 3, "source": "bundled"}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prepare": {"cmd": "python prep.py", "deps": ["src/pkg", "data/raw"], "params": ["data.seed"],
                    "outs": ["data/prepared"]},
        "train": {"cmd": "python train.py", "deps": ["src/pkg", "data/prepared/x.npz"], "outs": [{"model.pt": {}}]},
    }}))


def test_stage_inputs_and_pipeline_sources_are_dvc_hashes(tmp_path: Path) -> None:
    write_pipeline(tmp_path)
    inputs, sources = dvc_inputs(tmp_path, "prepare")
    assert inputs["cmd"] == "python prep.py" and inputs["params"] == {"data.seed": 3}
    assert list(inputs["deps"]) == ["src/pkg", "data/raw"] and inputs["deps"]["src/pkg"].endswith(".dir")
    assert sources == inputs["deps"]  # data/prepared/x.npz is a stage's output, not a source
    assert dvc_inputs(tmp_path, "nope")[0] == {} and dvc_inputs(tmp_path / "absent", "prepare") == ({}, {})

    (tmp_path / "src" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "src" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    assert dvc_inputs(tmp_path, "prepare") == (inputs, sources)
    (tmp_path / "src" / "pkg" / "a.py").write_text("A = 2\n")
    changed, _ = dvc_inputs(tmp_path, "prepare")
    assert changed["deps"]["src/pkg"] != inputs["deps"]["src/pkg"] and changed["deps"]["data/raw"] == inputs["deps"]["data/raw"]
    assert dvc_inputs(tmp_path, "train")[0]["deps"]["data/prepared/x.npz"] == "missing"


def test_section_params_and_tags(tmp_path: Path, monkeypatch) -> None:
    assert section_params(PARAMS, "tracking") == {"tracking.enabled": True, "tracking.experiment": EXPERIMENT,
                                                  "tracking.registered_model": PARAMS.tracking.registered_model}
    assert data_tags(None) == {}
    assert data_tags({"source": "bundled", "content_hash": "abc"}) == {
        "mnist_ldm.data_source": "bundled", "mnist_ldm.data_hash": "abc"}
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-exp")
    tags = git_tags(tmp_path)
    assert tags["mlflow.source.git.commit"] == tags["mnist_ldm.git_commit"] == "f" * 40
    assert tags["mnist_ldm.dvc_exp_name"] == "lucky-exp"


# --------------------------------------------------------------------------- stagerun.py, runs.py

@pytest.fixture
def stage(repo: Path) -> StageRun:
    """A StageRun on a bare run of the repository's store."""
    client = client_of(repo)
    exp_id = experiment_id(client, EXPERIMENT, tracking_uri(repo), repo)
    return StageRun(client, client.create_run(exp_id).info.run_id, stage="unit", uri=tracking_uri(repo))


def test_log_epoch_logs_metrics_and_images_at_the_epoch(stage: StageRun) -> None:
    gray, rgb = np.full((8, 8), 200, np.uint8), np.zeros((8, 8, 3), np.uint8)
    stage.log_epoch(1, {"loss": 0.5, "acc": 0.9}, {"recon": gray, "color": rgb})
    stage.log_epoch(2, {"loss": 0.25})
    client = stage.client
    assert [(m.step, m.value) for m in client.get_metric_history(stage.run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert [m.step for m in client.get_metric_history(stage.run_id, "acc")] == [1]
    images = artifact_files(client, stage.run_id, "images")
    assert any(p.startswith("images/recon+step+1+") and p.endswith(".png") for p in images), images
    assert any(p.startswith("images/color+step+1+") for p in images), images
    StageRun(active=False).log_epoch(1, {"loss": 1.0}, {"recon": gray})  # tracking off: nothing, no error


def test_non_finite_metrics_are_never_sent(stage: StageRun, capsys) -> None:
    stage.log_metrics({"nan": math.nan, "inf": math.inf, "ok": 1.0}, step=1)
    stage.log_epoch(2, {"nan": float("nan"), "neg": -math.inf, "ok": 2.0})
    stage.headline({"nan": math.nan, "final": 3.0})
    assert stage.lost is None
    assert set(stage.client.get_run(stage.run_id).data.metrics) == {"ok", "final"}
    warnings = capsys.readouterr().err.splitlines()
    assert sorted(w.split("metric ")[1].split(" ")[0] for w in warnings) == ["inf", "nan", "neg"]  # once per key


def test_a_store_away_warns_once_keeps_the_writes_and_says_at_the_end_what_it_lost(capsys, monkeypatch) -> None:
    """A store that stops answering (a port nothing listens on): the first failure warns, the writes meanwhile are
    kept and a due retry that fails again says nothing more; still away at the stage's end, one more line says how
    many calls were not sent and that the run stays RUNNING."""
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    run = StageRun(MlflowClient(tracking_uri=uri), "r" * 32, stage="unit", uri=uri)
    run.log_epoch(1, {"loss": 0.5})
    assert run.lost == "metrics" and not run.logging and len(run.pending) == 1
    run.next_try = 0.0  # the retry is due
    run.log_epoch(2, {"loss": 0.25})
    run.set_tag("k", "v")
    assert len(run.pending) == 3 and run.wait == 2 * 5.0  # the retry failed: the next one waits twice as long
    assert run.retry(final=True) is False and len(run.pending) == 3
    first, last = capsys.readouterr().err.splitlines()
    assert first.startswith(f"warning: mlflow: unit: logging to {uri} failed at metrics (")
    assert last == (f"warning: mlflow: unit: {uri} still fails at the stage's end; the 3 calls kept since the first "
                    f"warning are not sent, and run {'r' * 32} stays RUNNING there")


def test_same_inputs_link_to_the_finished_run(repo: Path) -> None:
    with stage_run("train_ae", PARAMS, {"autoencoder.seed": 0}) as first:
        first.log_epoch(1, {"loss": 0.5})
        first.headline({"test_bce": 0.1})
    with stage_run("train_ae", PARAMS, {"autoencoder.seed": 0}) as again:
        assert not again.active and not again.logging
        again.log_epoch(1, {"loss": 9.0})
    assert again.run_id == first.run_id and again.parent_id == first.parent_id
    client = client_of(repo)
    [child] = stage_runs(client)
    assert child.info.status == "FINISHED" and child.data.metrics == {"loss": 0.5, "test_bce": 0.1}
    parent = client.get_run(first.parent_id)
    assert parent.data.tags["mnist_ldm.linked.train_ae"] == first.run_id and parent.info.status == "FINISHED"

    with stage_run("train_ae", PARAMS, {"autoencoder.seed": 1}) as other:
        assert other.active
    assert other.run_id != first.run_id and other.parent_id == first.parent_id  # same params.yaml: same parent


def test_failure_marks_the_runs_failed_and_a_rerun_continues(repo: Path) -> None:
    with pytest.raises(RuntimeError):
        with stage_run("sample", PARAMS, {"sample.seed": 0}) as run:
            raise RuntimeError("boom")
    client = client_of(repo)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.parent_id).info.status == "FAILED"
    with stage_run("sample", PARAMS, {"sample.seed": 0}) as again:
        assert again.active
    assert again.run_id == run.run_id and client.get_run(run.run_id).info.status == "FINISHED"
    with pytest.raises(KeyboardInterrupt):
        with stage_run("evaluate", PARAMS, {}) as killed:
            raise KeyboardInterrupt
    assert client.get_run(killed.run_id).info.status == "KILLED"


def test_sigterm_in_a_tracked_command_marks_its_runs_killed(repo: Path) -> None:
    """SIGTERM (`kill`, `dvc queue kill`) while a command is inside its stage's run: exit 130, and the stage run
    and its parent are KILLED, not left RUNNING (the command's SIGTERM handler raises inside the run)."""
    from mnist_ldm.runtime.command import guarded

    assert threading.current_thread() is threading.main_thread()  # else no handler: the signal would end pytest
    runs = []

    def command() -> None:
        with stage_run("evaluate", PARAMS, {"evaluate.seed": 0}) as run:
            runs.append(run)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises KeyboardInterrupt before this ends

    assert guarded(command) == 130
    client = client_of(repo)
    assert client.get_run(runs[0].run_id).info.status == "KILLED"
    assert client.get_run(runs[0].parent_id).info.status == "KILLED"


def test_stages_finding_the_parent_at_once_make_one_parent(repo: Path) -> None:
    """Eight clients released together into the find-or-create of one pipeline state's parent (without the lock,
    each finds nothing and creates one): one run, and all but one were told it was found."""
    uri, n = tracking_uri(repo), 8
    exp_id = experiment_id(client_of(repo), EXPERIMENT, uri, repo)
    start, got = threading.Barrier(n), []

    def find_or_create() -> None:
        client = MlflowClient(tracking_uri=uri)
        start.wait()
        run, new = open_run(client, uri, exp_id, {"mnist_ldm.pipeline_key": "k", "mnist_ldm.kind": "pipeline"}, "p", {})
        got.append((run.info.run_id, new))

    threads = [threading.Thread(target=find_or_create) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs_of(client_of(repo))) == 1 and len({r for r, _ in got}) == 1, got
    assert sorted(new for _, new in got) == [False] * (n - 1) + [True]


def test_tracking_off_logs_nothing(repo: Path) -> None:
    off = PARAMS.model_copy(update={"tracking": PARAMS.tracking.model_copy(update={"enabled": False})})
    with stage_run("prepare", off, {}) as run:
        assert not run.logging
        run.log_epoch(1, {"loss": 1.0})
    assert runs_of(client_of(repo)) == []


def test_parent_gets_the_headline_of_current_stages_fcd_first(repo: Path, monkeypatch) -> None:
    """MLflow's compare view plots the first metric a run received: the FCD; a parameter count is never there."""
    (repo / "metrics").mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "evaluate": {"cmd": "true", "metrics": ["metrics/autoencoder.json", "metrics/eval.json"]},
        "other": {"cmd": "true", "deps": ["absent.txt"], "metrics": ["metrics/other.json"]}}}))
    (repo / "metrics/autoencoder.json").write_text('{"params": 252817, "test_bce": 0.1}')
    (repo / "metrics/eval.json").write_text('{"n": 100, "prdc": {"recall": 0.5}, "fcd": {"generated": 7.5}}')
    (repo / "metrics/other.json").write_text('{"test_accuracy": 0.9}')  # a stage DVC finds out of date
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    with stage_run("evaluate", PARAMS, {}) as run:
        run.headline({"fcd": 7.5})
    client = client_of(repo)
    parent = client.get_run(run.parent_id)
    assert parent.data.metrics == {"autoencoder.test_bce": 0.1, "eval.prdc.recall": 0.5, "eval.fcd.generated": 7.5}
    assert list(parent.data.metrics)[0] == "eval.fcd.generated"  # the order MLflow keeps: first logged first
    assert parent.data.params == {k: str(v) for k, v in PARAMS.flat().items()}


def test_a_registered_models_files_that_dvc_caches_are_stored_once(tmp_path: Path) -> None:
    """A model file whose bytes DVC's cache holds becomes a hard link to the cache file; the others are copied."""
    from mnist_ldm.tracking.registry import store_once

    (tmp_path / "ckpt.pt").write_bytes(b"weights" * 1000)
    for args in (["init", "--no-scm", "-q"], ["add", "-q", "ckpt.pt"]):  # the CLI: DVC's logger stays its own
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, check=True, capture_output=True)
    model = tmp_path / "model"
    (model / "artifacts").mkdir(parents=True)
    shutil.copy(tmp_path / "ckpt.pt", model / "artifacts/ckpt.pt")
    (model / "MLmodel").write_text("flavors: {}\n")
    dest = tmp_path / "mlartifacts/m 1"
    assert store_once(model, dest.as_uri(), tmp_path)
    cached = [p for p in (tmp_path / ".dvc/cache").rglob("*") if p.is_file()]
    assert (dest / "artifacts/ckpt.pt").samefile(cached[0]) and len(cached) == 1
    assert (dest / "MLmodel").read_text() == "flavors: {}\n" and (dest / "MLmodel").stat().st_nlink == 1
    assert not store_once(model, "mlflow-artifacts:/1/models/m", tmp_path)  # a server: MLflow uploads
