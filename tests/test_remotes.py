"""DVC remotes round trip: push the pipeline's outputs, clone the git repository elsewhere, pull, and
get byte-identical models, data, samples, metrics and plots, with nothing left to re-run and
`mnist-ldm infer` giving the same digits as in the source repository (a teammate's path). Remotes: a
local directory, and the S3 API of a SeaweedFS server on loopback (as the team's stack runs it).

Every output is DVC-cached (metrics and plots included), so git carries none of them and a clone gets
all of them from the remote."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import BIN, REPO, run
from conftest import test_env as user_env
from test_pipeline import pipeline as stages_of  # the stages of a repository's dvc.yaml

# where the pipeline's outputs live (the fixture checks that the files here are exactly dvc.lock's outputs)
OUTPUTS = ("models", "data/prepared", "data/latents", "data/features", "data/params_ok.json", "outputs", "metrics",
           "plots")
GIT_KEPT = ("metrics/", "plots/curves/")  # `cache: false` outputs: the baseline travels in git, not in a remote


def md5s(repo: Path) -> dict[str, str]:
    out = {}
    for rel in OUTPUTS:
        p = repo / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file() and f.name != ".gitignore":  # DVC's, kept in git
                out[str(f.relative_to(repo))] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def dvc(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], repo, env=env)


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], repo)


def objects(root: Path) -> set[str]:
    """The content-addressed objects under a DVC cache or a local remote, as "ab/cdef...[.dir]"."""
    root = root / "files/md5"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def locked_outs(repo: Path) -> dict[str, str]:
    """Every output that dvc.lock records: path -> md5 (a directory's ends in `.dir`)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}


def assert_pushed(pushed: set[str], repo: Path, hashes: dict[str, str]) -> None:
    """Every cached output file's content and the listing of every directory output (data/prepared, data/latents,
    plots/*) are in the remote, and nothing the local cache does not hold (the run cache is not pushed
    by default)."""
    outs = {path: md5 for path, md5 in locked_outs(repo).items() if not path.startswith(GIT_KEPT)}
    assert set(locked_outs(repo)) >= {"models/autoencoder.pt", "models/diffusion.pt", "models/evaluator.pt",
                                      "data/prepared", "data/latents", "data/params_ok.json", "outputs/samples.npz",
                                      "metrics/eval.json", "plots/evaluate"}
    assert {f"{h[:2]}/{h[2:]}" for f, h in hashes.items() if not f.startswith(GIT_KEPT)} <= pushed
    assert {f"{h[:2]}/{h[2:]}" for h in outs.values()} <= pushed
    assert {o for o in pushed if o.endswith(".dir")} == {f"{h[:2]}/{h[2:]}" for h in outs.values() if h.endswith(".dir")}
    assert pushed <= objects(repo / ".dvc/cache")


@pytest.fixture(scope="module")
def pipeline(untracked_repo) -> tuple[Path, dict[str, str]]:
    """A shrunk copy after `dvc repro` (tracking off), committed to git (`untracked_repo`, read only), and the md5
    of every DVC-tracked output."""
    repo = untracked_repo
    hashes = md5s(repo)
    # the files under OUTPUTS are exactly the DVC outputs' files: none is missed, none is extra
    outs = locked_outs(repo)
    untracked = [f for f in hashes if not any(f == o or f.startswith(o + "/") for o in outs)]
    assert not untracked, (untracked, sorted(outs))
    missed = [o for o in outs if not any(f == o or f.startswith(o + "/") for f in hashes)]
    assert not missed, (missed, sorted(hashes))
    return repo, hashes


def working_copy(pipeline: tuple[Path, dict], dest: Path) -> Path:
    """A private copy of the committed pipeline repository, its DVC cache included."""
    shutil.copytree(pipeline[0], dest, symlinks=True)
    return dest


def add_remote(repo: Path, name: str, url: str, *options: tuple[str, str]) -> None:
    dvc(repo, "remote", "add", "-d", name, url)
    for key, value in options:
        dvc(repo, "remote", "modify", name, key, value)
    git(repo, "add", ".dvc/config")
    git(repo, "commit", "-qm", f"remote {name}")


def clone(src: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", str(src), str(dest)], src.parent)
    carried = md5s(dest)  # git carries the baseline's files, and of the rest only DVC's .gitignore files
    assert carried and all(f.startswith(GIT_KEPT) for f in carried), f"git carried DVC-cached outputs: {carried}"
    return dest


def assert_up_to_date(repo: Path, env: dict | None = None) -> None:
    assert "Data and pipelines are up to date." in dvc(repo, "status", env=env).stdout
    out = dvc(repo, "repro", env=env).stdout
    assert "Running stage" not in out, out
    for stage in stages_of(repo):
        assert f"Stage '{stage}' didn't change, skipping" in out, out


def test_local_directory_remote_round_trip(pipeline, tmp_path: Path):
    src = working_copy(pipeline, tmp_path / "src")
    store = tmp_path / "store"
    add_remote(src, "local", str(store))
    dvc(src, "push")
    assert_pushed(objects(store), src, pipeline[1])

    dst = clone(src, tmp_path / "clone")
    assert "local" in dvc(dst, "remote", "list").stdout and str(store) in dvc(dst, "remote", "list").stdout
    dvc(dst, "pull")
    assert md5s(dst) == pipeline[1]
    assert_up_to_date(dst)

    # the teammate generates digits from the pulled models: the same pixels as in the source repository
    flags = ["infer", "--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt", "--num-images", "8",
             "--sampler", "ddim", "--steps", "5", "--seed", "3"]
    for repo in (src, dst):
        run([str(BIN / "mnist-ldm"), *flags, "--output", str(tmp_path / f"{repo.name}.npz")], repo)
    with np.load(tmp_path / "src.npz") as a, np.load(tmp_path / "clone.npz") as b:
        assert a["images"].shape == (8, 28, 28) and np.array_equal(a["images"], b["images"])
    assert "Data and pipelines are up to date." in dvc(dst, "status").stdout  # infer wrote nothing tracked


def test_repro_pull_fetches_instead_of_running(pipeline, tmp_path: Path):
    src = working_copy(pipeline, tmp_path / "src")
    add_remote(src, "local", str(tmp_path / "store"))
    dvc(src, "push")

    dst = clone(src, tmp_path / "clone")
    t0 = time.monotonic()
    out = dvc(dst, "repro", "--pull").stdout
    seconds = time.monotonic() - t0
    assert "Running stage" not in out, out
    for stage in stages_of(dst):  # every stage's outputs come from the remote, metrics and plots included
        assert f"Pulling data for stage: '{stage}'" in out, out
    assert md5s(dst) == pipeline[1]
    assert_up_to_date(dst)
    assert seconds < 60, f"dvc repro --pull took {seconds:.0f} s; did it train?"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> tuple[str, str]:
    """SeaweedFS's S3 API on 127.0.0.1 as the team's stack runs it (`tools/team.py up s3`, its buckets made), stopped
    when the module ends: (endpoint, secret)."""
    root = tmp_path_factory.mktemp("s3") / ".team"
    team = [str(BIN / "python"), str(REPO / "tools" / "team.py")]
    run([*team, "up", "s3", "--root", str(root)], root.parent)
    try:
        state = json.loads((root / "stack.json").read_text())
        yield f"http://127.0.0.1:{state['ports']['s3']}", state["secret"]
    finally:
        run([*team, "down", "s3", "--root", str(root)], root.parent)


def test_s3_remote_round_trip(pipeline, s3_server: tuple[str, str], tmp_path: Path):
    import boto3

    endpoint, secret = s3_server
    env = user_env(AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"))
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="mnist-ldm", aws_secret_access_key=secret,
                      region_name="us-east-1")

    src = working_copy(pipeline, tmp_path / "src")
    add_remote(src, "s3remote", "s3://dvc-remote/pipeline", ("endpointurl", endpoint))
    for key, value in (("access_key_id", "mnist-ldm"), ("secret_access_key", secret)):  # per clone, not in git
        dvc(src, "remote", "modify", "--local", "s3remote", key, value)
    dvc(src, "push", env=env)
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="dvc-remote", Prefix="pipeline/")
            for o in page.get("Contents", [])}
    assert_pushed({k.removeprefix("pipeline/files/md5/") for k in keys}, src, pipeline[1])

    dst = clone(src, tmp_path / "clone")
    config = (dst / ".dvc/config").read_text()
    assert "s3://dvc-remote/pipeline" in config and endpoint in config
    assert secret not in config and not (dst / ".dvc/config.local").exists()
    for key, value in (("access_key_id", "mnist-ldm"), ("secret_access_key", secret)):
        dvc(dst, "remote", "modify", "--local", "s3remote", key, value)
    dvc(dst, "pull", env=env)
    assert md5s(dst) == pipeline[1]
    assert_up_to_date(dst, env)
