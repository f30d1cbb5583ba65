"""The trained generator as an MLflow model: the `package_model` stage registers a version, a fresh process
loads it by `models:/` URI and gets the pixels `mnist-ldm infer` gives, `mlflow models serve` answers over
REST (400 with a one-line reason for a bad request), `mnist-ldm promote` moves `@champion`, and the DVC
artifact `mnist-ldm-generator` can be fetched with `dvc artifacts get`.

One shrunk `dvc repro` (tracking on, the copy's own sqlite store) is shared by every test here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import BIN, cli, copy_trained, free_port, run
from conftest import test_env as shell_env

NAME = "mnist-ldm"
SEED = 7


@pytest.fixture(scope="module")
def registered(trained_repo, tmp_path_factory) -> dict:
    """A shrunk pipeline run with tracking on; its repo, tracking URI, registered version and `infer` images."""
    from mlflow import MlflowClient

    repo = copy_trained(trained_repo, tmp_path_factory.mktemp("serving") / "repo")
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    found = [str(v.version) for v in MlflowClient(tracking_uri=uri).search_model_versions(f"name = '{NAME}'")]
    assert len(found) == 1, found  # package_model registered the pipeline's one version
    # the same sampler settings as the packaged defaults (params.yaml's `sample` section)
    cli("infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt", "--num-images", "8",
        "--seed", str(SEED), "--output", "infer.npz", cwd=repo)
    with np.load(repo / "infer.npz") as f:
        expected = f["images"]
    return {"repo": repo, "uri": uri, "version": found[-1], "expected": expected,
            "env": shell_env(MLFLOW_TRACKING_URI=uri)}


LOAD = """
import json, sys
import numpy as np
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1], dst_path=sys.argv[2])
import mnist_ldm
out = model.predict({"n": 8, "seed": int(sys.argv[3])})
images = np.stack(out["image"].tolist())
np.save(sys.argv[4], images)
print(json.dumps({"package": mnist_ldm.__file__, "columns": list(out.columns), "labels": out["label"].tolist(),
                  "dtype": str(images.dtype), "shape": list(images.shape)}))
"""


def test_a_fresh_process_loads_the_registered_version_and_matches_infer(registered, tmp_path):
    uri = f"models:/{NAME}/{registered['version']}"
    (tmp_path / "model").mkdir()
    out = run([sys.executable, "-c", LOAD, uri, str(tmp_path / "model"), str(SEED), str(tmp_path / "images.npy")],
              tmp_path, env=registered["env"])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # the package came with the model (code_paths), not from this checkout
    assert Path(got["package"]).is_relative_to(tmp_path / "model"), got["package"]
    assert got["columns"] == ["label", "image"] and got["labels"] == [None] * 8  # the shrunk model is unconditional
    assert got["shape"] == [8, 784] and got["dtype"] == "uint8"
    images = np.load(tmp_path / "images.npy").reshape(-1, 28, 28)
    assert images.shape == (8, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, registered["expected"])


def post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_until_up(proc: subprocess.Popen, port: int, log: Path, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer /ping within {limit_s} s\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (the CLI and its uvicorn worker), then SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def test_mlflow_models_serve_answers_with_digits_and_400s_for_bad_requests(registered, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{registered['version']}",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=registered["env"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_up(proc, port, log)
        status, body = post(port, {"dataframe_records": [{"n": 8, "seed": SEED}]})
        assert status == 200, body
        rows = body["predictions"]
        images = np.array([r["image"] for r in rows])
        assert images.shape == (8, 784) and images.min() >= 0 and images.max() <= 255
        assert np.array_equal(images.reshape(-1, 28, 28).astype(np.uint8), registered["expected"])
        assert [r["label"] for r in rows] == [None] * 8

        status, body = post(port, {"inputs": {"n": 2, "sampler": "ddim", "steps": 3, "eta": 0.0, "seed": 1}})
        assert status == 200 and len(body["predictions"]) == 2, body

        bad = [({"n": 4, "sampler": "euler"}, "sampler='euler' is not allowed; expected one of ddpm, ddim"),
               ({"n": 4, "digit": 12}, "digit=12 "),
               ({"n": 5000}, "n=5000 is not allowed; expected 1 to 1000"),
               ({"n": "eight"}, "n='eight' is not allowed; expected an integer")]
        for record, reason in bad:
            status, body = post(port, {"dataframe_records": [record]})
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", (record, status, body)
            # MLflow puts "Failed to predict data '<the request>'. \nError: " before the model's message
            ours = body["message"].rsplit("Error: ", 1)[-1]
            assert ours.startswith(reason) and "\n" not in ours and "Traceback" not in body["message"], body
    finally:
        stop(proc)
    assert proc.poll() is not None


def test_promote_moves_champion_to_the_lowest_fcd_or_the_given_version(registered, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])  # MLflow's process-wide store, too
    client = MlflowClient(tracking_uri=registered["uri"])
    first = client.get_model_version(NAME, registered["version"])
    fcd = float(first.tags["fcd.generated"])
    assert first.tags["git_commit"] and first.tags["dvc_experiment"] == "workspace"
    # two more versions of the same model files, tagged as if a worse and a better run had made them
    made = {}
    for label, value in (("worse", fcd + 1.0), ("better", fcd / 2)):
        tags = {**first.tags, "fcd.generated": repr(value)}
        made[label] = str(client.create_model_version(NAME, first.source, run_id=first.run_id, tags=tags,
                                                      model_id=first.model_id).version)
    repo = registered["repo"]
    out = cli("promote", cwd=repo, env=registered["env"]).stdout
    assert f"version {made['better']} " in out and "previous champion: none" in out, out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == made["better"]

    from mnist_ldm.commands.cli import main as mnist_ldm  # the same command in this process (a second CLI start costs seconds)

    monkeypatch.chdir(repo)
    assert mnist_ldm(["promote", "--version", registered["version"]]) == 0
    out = capsys.readouterr().out
    assert f"is now @champion (--version {registered['version']}); previous champion: version {made['better']} " \
        in out, out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == registered["version"]
    assert mnist_ldm(["promote", "--version", "99"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --version 99: '{NAME}' has no such version; it has 1, ")


def test_the_model_is_a_dvc_artifact(registered, tmp_path):
    repo, env = registered["repo"], shell_env()
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "pipeline"],
                ["git", "tag", "-a", "mnist-ldm-generator@v0.0.1", "-m", "Registering artifact version v0.0.1"]):
        run(cmd, repo, env=env)
    run([str(BIN / "dvc"), "artifacts", "get", ".", "mnist-ldm-generator", "-o", str(tmp_path / "got")], repo,
        env=env)
    assert (tmp_path / "got" / "MLmodel").read_bytes() == (repo / "models/generator/MLmodel").read_bytes()
    assert (tmp_path / "got" / "artifacts" / "diffusion.pt").read_bytes() == (repo / "models/diffusion.pt").read_bytes()


def test_packaging_again_gives_the_same_folder(registered):
    """`dvc repro -f package_model` with the same checkpoints and params writes the same files: the folder's hash
    in dvc.lock (which git keeps) changes only when what it packages does."""
    repo, env = registered["repo"], shell_env()
    def outs() -> list:
        return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["package_model"]["outs"]

    before = outs()
    run([str(BIN / "dvc"), "repro", "-f", "-s", "package_model"], repo, env=env)
    assert outs() == before
    assert "utc_time_created" not in (repo / "models/generator/MLmodel").read_text()


def test_request_fields_are_checked_with_one_line_messages():
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from mnist_ldm.diffusion.serving import resolve_request

    defaults = {"digit": None, "sampler": "ddim", "steps": 5, "eta": 1.0, "guidance": 2.0, "seed": 0}
    req = resolve_request(pd.DataFrame([{"n": 3, "seed": np.int64(4), "digit": np.nan}]), defaults, 1000)
    assert req == {**defaults, "n": 3, "seed": 4}
    assert resolve_request([{"n": 2.0, "eta": 0}], defaults, 10)["eta"] == 0.0
    for request, message in [({"n": True}, "n=True is not allowed; expected an integer"),
                             ({"n": 1, "sampler": 3}, "sampler=3 is not allowed; expected one of ddpm, ddim"),
                             ({"n": 1, "eta": "x"}, "eta='x' is not allowed; expected a number"),
                             ({"n": 1, "seed": -1}, "seed=-1 is not allowed; expected an integer >= 0"),
                             ({"n": 0}, "n=0 is not allowed; expected 1 to 10 images per request"),
                             ({"seed": 1}, "n is missing"),
                             ({"n": 1, "sampel": "ddim"}, "unknown field(s) sampel; valid: n, sampler, steps"),
                             (pd.DataFrame([{"n": 1}, {"n": 2}]), "the request has 2 rows; send one row")]:
        with pytest.raises(MlflowException) as e:
            resolve_request(request, defaults, 10)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE" and e.value.get_http_status_code() == 400
        assert e.value.message.startswith(message) and "\n" not in e.value.message, e.value.message
