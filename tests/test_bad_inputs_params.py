"""Nothing lost, nothing ignored: a value that only a later stage would refuse is refused by `check_params`,
before DVC deletes any output, and a value given that would change nothing is refused, never silently
replaced by a default.

* `dvc repro` with a bad param stops at `check_params`, with one `error:` line naming the key and every
  other stage's outputs byte-identical (evaluate.k above the images compared, missing IDX files), and so does
  one with a valid change that a stage would refuse to run (MNIST_LDM_PRECISION=bf16 on a CPU without bf16
  units, a locked or read-only tracking store); the other rules (a digit or a guidance scale for an
  unconditional model, steps for DDPM, a registered-model name MLflow rejects, ...) through `check-params`
  in-process, with the same one line;
* `mnist-ldm infer` refuses `--steps`/`--eta` with DDPM and `--guidance` for an unconditional model;
* `mlflow models serve` answers HTTP 400 for NaN or inf in a number, for a field that would change nothing,
  for an unknown field and for a field sent in `params`.

One private copy of the shared trained repository serves the whole module.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import BIN, REPO, cli, copy_trained, free_port, merge, run
from conftest import test_env as shell_env
from test_bad_inputs import idx_images, idx_labels
from test_bad_inputs_os import UNSHARE_PROBLEM
from test_serving import post, stop, wait_until_up

WATCHED = ("models", "data/prepared", "data/latents", "outputs", "metrics", "plots", "mlartifacts")
MARKER = "data/params_ok.json"  # check_params' own output, which DVC deletes before running it


def md5s(repo: Path) -> dict[str, str]:
    """md5 of every file a stage may write (and dvc.lock, mlflow.db), by path."""
    paths = [p for d in WATCHED for p in (repo / d).rglob("*") if p.is_file()]
    paths += [repo / f for f in ("dvc.lock", "mlflow.db") if (repo / f).is_file()]
    return {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(paths)}


@pytest.fixture(scope="module")
def repo(trained_repo, tmp_path_factory) -> Path:
    """A private copy of the shrunk trained repository (unconditional model, T=50, ddim 5 steps, evaluate.n 100)."""
    return copy_trained(trained_repo, tmp_path_factory.mktemp("bad_params") / "repo")


def one_error(proc: subprocess.CompletedProcess, context: str) -> str:
    """The single `error:` line of a failed command, checked to be its last line; exit status 2."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    context = f"{context}\n--- stdout (tail)\n{proc.stdout[-2000:]}\n--- stderr (tail)\n" + "\n".join(lines[-15:])
    assert proc.returncode != 0, context
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, context
    return errors[0]


def idx_folder(root: Path, gz: bool = False, drop: str = "") -> Path:
    """The four IDX files (10 train, 10 test images), gzipped with `gz`, without the one named `drop`."""
    files = {"train-images-idx3-ubyte": idx_images(10), "train-labels-idx1-ubyte": idx_labels(list(range(10))),
             "t10k-images-idx3-ubyte": idx_images(10), "t10k-labels-idx1-ubyte": idx_labels(list(range(10)))}
    root.mkdir(parents=True)
    for name, data in files.items():
        if name != drop:
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return root


# --------------------------------------------------------------------------- dvc repro stops at check_params

def in_mount_namespace(script: str, *args: str) -> list[str]:
    """The command prefix that runs `dvc repro` after the `mount`s of `script` ($0, ... = `args`) in a mount
    namespace of its own (nothing outside it sees them; tests/test_bad_inputs_os.py)."""
    if UNSHARE_PROBLEM:
        pytest.skip(UNSHARE_PROBLEM)
    return ["unshare", "-m", "sh", "-c", f'{script} && exec "$@"', *args]


@contextlib.contextmanager
def bf16_on_a_cpu_without_it(repo: Path, tmp: Path):
    """MNIST_LDM_PRECISION=bf16 on the CPU, whose /proc/cpuinfo lists no bf16 units (a file bound over it)."""
    (tmp / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    yield (in_mount_namespace('mount --bind "$0" /proc/cpuinfo', str(tmp / "cpuinfo")),
           {"MNIST_LDM_PRECISION": "bf16", "MNIST_LDM_DEVICE": "cpu"})


@contextlib.contextmanager
def store_locked(repo: Path, tmp: Path):
    """Another process holds the write lock of the repository's mlflow.db."""
    holder = sqlite3.connect(repo / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield [], {}
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@contextlib.contextmanager
def store_read_only(repo: Path, tmp: Path):
    """The repository's mlflow.db on a read-only mount."""
    yield in_mount_namespace('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"', str(repo / "mlflow.db")), {}


# case -> (params changed from the trained repository's, what the error line must contain[, what runs it:
# a context manager of (repo, tmp_path) giving a command prefix and environment variables]): one param rule, the
# IDX files, and what check_params refuses of the environment; the other param rules run in-process (CHECK_CASES)
NEW_LR = {"autoencoder": {"lr": 0.005}}  # a valid change: without the refusal every stage would run again
REPRO_CASES = {
    "idx-files-missing": (lambda tmp: {"data": {"source": "idx", "idx_dir": str(tmp / "empty")}},
                          lambda tmp: ["data.idx_dir", str(tmp / "empty"), "IDX files are missing"]),
    "k-above-n": ({"evaluate": {"k": 200}}, ["evaluate.k=200", "evaluate.n=100"]),
    "bf16-on-a-cpu-without-it": (NEW_LR, ["MNIST_LDM_PRECISION=bf16", "no native bf16 units", "use fp32"],
                                 bf16_on_a_cpu_without_it),
    "tracking-store-locked": (NEW_LR, ["mlflow.db cannot be written (database is locked)", "tracking.enabled: false"],
                              store_locked),
    "tracking-store-read-only": (NEW_LR, ["mlflow.db cannot be written (attempt to write a readonly database)"],
                                 store_read_only),
}


@pytest.mark.parametrize("name", list(REPRO_CASES))
def test_dvc_repro_stops_at_check_params_and_deletes_nothing(name: str, repo: Path, tmp_path: Path):
    changes, culprits, how = (*REPRO_CASES[name], None)[:3]
    changes, culprits = (f(tmp_path) if callable(f) else f for f in (changes, culprits))
    (tmp_path / "empty").mkdir()
    params = repo / "params.yaml"
    text, before = params.read_text(), md5s(repo)
    params.write_text(yaml.safe_dump(merge(yaml.safe_load(text), changes), sort_keys=False))
    try:
        with how(repo, tmp_path) if how else contextlib.nullcontext(([], {})) as (prefix, env):
            proc = run([*prefix, str(BIN / "dvc"), "repro"], repo, check=False,
                       env=shell_env(PYTHONPATH=str(repo / "src"), **env))
    finally:
        params.write_text(text)
    line = one_error(proc, f"dvc repro with {changes}")
    assert re.findall(r"Running stage '(\w+)'", proc.stdout) == ["check_params"], proc.stdout
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in {line!r}"
    assert md5s(repo) == before, "an output changed"
    assert not (repo / MARKER).exists() or json.loads((repo / MARKER).read_text())["valid"] is True


def test_a_diverging_stage_under_dvc_repro_names_dvc_checkout(repo: Path):
    """autoencoder.lr=1 trains to a loss of 10^7 at its second step (it used to finish, and replace a good
    autoencoder): the stage stops with one line, then says how to bring back what DVC removed, which works."""
    params = repo / "params.yaml"
    text, before = params.read_text(), md5s(repo)
    params.write_text(yaml.safe_dump(merge(yaml.safe_load(text), {"autoencoder": {"lr": 1.0}}), sort_keys=False))
    try:
        proc = run([str(BIN / "dvc"), "repro", "train_ae"], repo, check=False,
                   env=shell_env(PYTHONPATH=str(repo / "src")))
    finally:
        params.write_text(text)
    line = one_error(proc, "dvc repro train_ae with autoencoder.lr=1")
    assert line.startswith("error: train_ae: loss became") and "1000x its first" in line, line
    lines = [ln.split("\r")[-1] for ln in proc.stderr.splitlines() if ln.strip()]
    kept = "metrics/autoencoder.json plots/curves/autoencoder.json"  # cache: false, in git
    assert lines[lines.index(line) + 1] == ("DVC removed the previous outputs of stage 'train_ae' before running "
                                            "it; `dvc checkout train_ae` brings them back from the cache, "
                                            f"`git checkout HEAD -- {kept}` the ones git keeps"), lines
    assert not (repo / "models/autoencoder.pt").exists()
    run(["git", "checkout", "dvc.lock"], repo)  # check_params passed with the changed params: its entry changed
    run([str(BIN / "dvc"), "checkout", "train_ae"], repo)
    run(["git", "checkout", "HEAD", "--", *kept.split()], repo)
    def kept(md5: dict) -> dict:  # what the failed run's own tracking wrote aside
        return {k: v for k, v in md5.items() if not k.startswith(("mlflow.db", "mlartifacts"))}

    assert kept(md5s(repo)) == kept(before)


# --------------------------------------------------------------------------- the same rules, without DVC

CHECK_CASES = {
    "digit-on-unconditional": ({"sample": {"digit": 3}}, ["sample.digit=3", "unconditional",
                                                          "diffusion.conditional=true"]),
    "registered-model-colon": ({"tracking": {"registered_model": "my model:v1"}},
                               ["tracking.registered_model='my model:v1'", "':'"]),
    "ddpm-with-steps": ({"sample": {"sampler": "ddpm", "steps": 10}}, ["sample.steps=10", "sampler ddpm"]),
    "guidance-on-unconditional": ({"sample": {"guidance": 3.0}}, ["sample.guidance=3.0", "unconditional"]),
    "k-above-num-images": ({"sample": {"num_images": 5}}, ["evaluate.k=5", "sample.num_images=5"]),
    "k-above-limit-test": ({"data": {"limit_test": 6}}, ["evaluate.k=5", "data.limit_test=6"]),
    "ddpm-with-eta": ({"sample": {"sampler": "ddpm", "steps": 250, "eta": 0.0}}, ["sample.eta=0.0", "sampler ddpm"]),
    "registered-model-percent": ({"tracking": {"registered_model": "a%b"}}, ["tracking.registered_model='a%b'"]),
    "registered-model-dotdot": ({"tracking": {"registered_model": "..x"}}, ["tracking.registered_model='..x'"]),
    "idx-one-file-missing": (None, ["data.idx_dir", "missing (t10k-labels-idx1-ubyte)"]),
    # the bundled set (auto without IDX files, offline) has 1,000 test images, fewer than evaluate.n's 10,000
    "k-above-bundled-test-set": ({"evaluate": {"k": 999}}, ["evaluate.k=999", "data.source=auto", "leaves 1000"]),
    "hidden-dim-1e9": ({"diffusion": {"hidden_dim": 10 ** 9}}, ["diffusion.hidden_dim=1000000000", "<= 8192"]),
    "denoiser-beyond-memory": ({"diffusion": {"hidden_dim": 8192, "num_blocks": 64}},
                               ["diffusion.hidden_dim=8192", "num_blocks=64", "of memory to train"]),
    "T-1e12": ({"diffusion": {"T": 10 ** 12}}, ["diffusion.T=1000000000000", "<= 100000"]),
}


@pytest.mark.parametrize("name", list(CHECK_CASES))
def test_check_params_refuses_with_one_line(name: str, tmp_path: Path):
    changes, culprits = CHECK_CASES[name]
    if changes is None:
        d = idx_folder(tmp_path / "idx", drop="t10k-labels-idx1-ubyte")
        changes = {"data": {"source": "idx", "idx_dir": str(d)}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge(yaml.safe_load((REPO / "params.yaml").read_text()), changes)))
    proc = cli("check-params", "--params", str(params), "--out", str(tmp_path / "ok.json"), cwd=tmp_path,
               check=False)
    line = one_error(proc, f"check-params with {changes}")
    where = "data.idx_dir=" if name.startswith("idx") else f"{params}: "  # the folder, or the params file
    assert proc.returncode == 2 and line.startswith(f"error: {where}"), line
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in {line!r}"
    assert not (tmp_path / "ok.json").exists()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_check_params_accepts_idx_files_plain_or_gzipped(gz: bool, tmp_path: Path):
    d = idx_folder(tmp_path / "idx", gz=gz)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                                           {"data": {"source": "idx", "idx_dir": str(d)}})))
    cli("check-params", "--params", str(params), "--out", str(tmp_path / "ok.json"), cwd=tmp_path)
    assert json.loads((tmp_path / "ok.json").read_text())["valid"] is True


def test_param_rules_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`Params.validate` (what every command and `check_params` load) states each rule once; values at their
    defaults are not refused, and a conditional model takes a digit and a guidance scale."""
    from mnist_ldm.config.sections import ConfigError, registry_name_ok
    from mnist_ldm.config.params_file import params_from_dict

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    ok = [{}, {"sample": {"sampler": "ddpm"}}, {"evaluate": {"n": 10, "k": 8}},
          {"diffusion": {"conditional": True}, "sample": {"digit": 3, "guidance": 4.0}},
          {"tracking": {"registered_model": "my model v1"}}]
    for changes in ok:
        params_from_dict(merge(base, changes))
    for changes, start in [({"sample": {"sampler": "ddpm", "steps": 10}}, "params: sample.steps=10 is not used"),
                           ({"sample": {"digit": 0}}, "params: sample.digit=0 needs a class-conditional model"),
                           ({"evaluate": {"n": 10, "k": 9}}, "params: evaluate.k=9 is not allowed; expected an "
                                                              "integer <= 8"),
                           ({"sample": {"guidance": 0.0}}, "params: sample.guidance=0.0 is not used by an "
                                                           "unconditional model")]:
        with pytest.raises(ConfigError) as e:
            params_from_dict(merge(base, changes))
        assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)

    # the same names as MLflow's own registry accepts (its file store's rule, the strictest), spaces aside:
    # each name is registered through MLflow's public client into a file store of its own
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "runs").as_uri(), registry_uri=(tmp_path / "registry").as_uri())
    for name in ["mnist-ldm", "my model", "a.b", "v1_2", "x..y", ".hidden", "", "a/b", "a:b", "a%b", ".", "..",
                 "..x", "a/./b", "/a"]:
        try:
            client.create_registered_model(name)
            mlflow_ok = True
        except MlflowException:
            mlflow_ok = False
        assert registry_name_ok(name) == mlflow_ok, name
    # stricter: surrounding spaces, and '\\' (a path separator of the file store on Windows)
    assert not any(map(registry_name_ok, [" mnist-ldm", "mnist-ldm ", "a\\b"]))


def test_score_names_evaluate_k_when_too_few_images():
    from mnist_ldm.io.errors import UserError
    from mnist_ldm.evaluation.scoring import score

    images = np.zeros((6, 28, 28), np.uint8)
    with pytest.raises(UserError) as e:
        score(images, None, None, np.zeros((50, 28, 28), np.uint8), images, None, None, n=100, k=5, seed=0)
    assert str(e.value).startswith("evaluate.k=5: only 6 images to compare") and "need at least 7" in str(e.value)


# --------------------------------------------------------------------------- infer flags that would change nothing

INFER_CASES = {
    "ddpm-steps": (["--sampler", "ddpm", "--steps", "10"], ["--steps/sample.steps=10", "sampler ddpm"]),
    "ddpm-eta": (["--sampler", "ddpm", "--eta", "0"], ["--eta/sample.eta=0.0", "sampler ddpm"]),
    "guidance-unconditional": (["--guidance", "3"], ["--guidance/sample.guidance=3.0", "unconditional"]),
}


@pytest.mark.parametrize("name", list(INFER_CASES))
def test_infer_refuses_a_flag_that_would_change_nothing(name: str, repo: Path, tmp_path: Path):
    flags, culprits = INFER_CASES[name]
    before = md5s(repo)
    out = tmp_path / "x.npz"
    proc = cli("infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt", "--num-images", "2",
               *flags, "--output", str(out), cwd=repo, check=False)
    line = one_error(proc, f"infer {' '.join(flags)}")
    assert proc.returncode == 2 and line.startswith("error: models/diffusion.pt: "), line
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in {line!r}"
    assert not out.exists() and md5s(repo) == before


# --------------------------------------------------------------------------- REST

def test_rest_refuses_nan_inf_and_fields_that_would_change_nothing(repo: Path, tmp_path: Path):
    before = md5s(repo)
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", str(repo / "models/generator"), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=shell_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    nan, inf = float("nan"), float("inf")
    bad = [({"eta": nan}, "eta=nan is not allowed"), ({"guidance": nan}, "guidance=nan is not allowed"),
           ({"seed": nan}, "seed=nan is not allowed"), ({"steps": nan}, "steps=nan is not allowed"),
           ({"n": nan}, "n=nan is not allowed"), ({"eta": inf}, "eta=inf is not allowed"),
           ({"guidance": -inf}, "guidance=-inf is not allowed"),
           ({"sampler": "ddpm", "steps": 10}, "steps=10 is not used by sampler ddpm"),
           ({"sampler": "ddpm", "eta": 0.0}, "eta=0.0 is not used by sampler ddpm"),
           ({"guidance": 3.0}, "guidance=3.0 is not used by an unconditional model"),
           ({"colour": 3}, "unknown field(s) colour; valid: n, sampler")]  # no input schema to drop it
    try:
        wait_until_up(proc, port, log)
        for fields, reason in bad:
            record = {"n": 2, **fields}
            for body in ({"dataframe_records": [record]}, {"inputs": record}):
                status, answer = post(port, body)  # json.dumps writes NaN, Infinity and -Infinity
                assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (body, status, answer)
                ours = answer["message"].rsplit("Error: ", 1)[-1]
                assert ours.startswith(reason) and "\n" not in ours, (body, answer)
        for params in ({"steps": 5}, {"n": 3}, {"sampler": "ddpm"}):  # not dropped by MLflow: they reach the model
            status, answer = post(port, {"dataframe_records": [{"n": 2}], "params": params})
            (k, v), = params.items()
            ours = answer["message"].rsplit("Error: ", 1)[-1]
            assert status == 400 and ours.startswith(f"params {k}={v!r} is not read; send {k} in the record"), answer
        status, answer = post(port, {"dataframe_records": [{"n": 2, "sampler": "ddpm", "seed": 1}]})
        assert status == 200 and len(answer["predictions"]) == 2, answer  # ddpm without steps or eta is served
    finally:
        stop(proc)
    assert md5s(repo) == before


def test_resolve_request_refuses_nan_in_process():
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from mnist_ldm.diffusion.serving import resolve_request

    defaults = {"digit": None, "sampler": "ddim", "steps": 5, "eta": 1.0, "guidance": 2.0, "seed": 0}
    for name in ("eta", "guidance", "seed", "steps", "n"):
        for request in ({"n": 1, name: float("nan")}, pd.DataFrame([{"n": 1, name: np.nan}])):
            with pytest.raises(MlflowException) as e:
                resolve_request(request, defaults, 10)
            assert e.value.get_http_status_code() == 400 and e.value.message.startswith(f"{name}=nan is not allowed")
    assert resolve_request({"n": 1, "eta": None}, defaults, 10)["eta"] == 1.0  # null: the packaged default
