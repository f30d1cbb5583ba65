"""What DVC does with this pipeline beyond a plain build, on one shrunk repository shared by the module:

* a bad param fails in `check_params`, before DVC deletes any other stage's outputs (`dvc repro` and
  `dvc exp run -S`), with one `error:` line naming the key;
* DVC's run-cache: after run A and run B (another `diffusion.lr`), going back to A's params executes no
  stage command; every stage is checked out from the cache, byte-identical to A;
* a code change marks exactly the stages that import the changed file (tracking code marks none).

Every test leaves the repository as the fixture built it (params, dvc.lock and outputs of run A) and
checks that it finds it so.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from code_deps import closure
from conftest import BIN, REPO, copy_repo, run, write_params
from conftest import test_env as user_env
from test_pipeline import downstream, extra_stages, pipeline

OUTPUT_DIRS = ("models", "data/prepared", "data/latents", "outputs", "metrics", "plots")
SKIPPED = "Stage '{}' didn't change, skipping"


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """DVC in `repo`, whose stages import the copy's own `src` (not the editable install's), so that the
    code DVC hashes is the code that runs, and runs minutes apart run the same code."""
    return run([str(BIN / "dvc"), *args], repo, check=check, env=user_env(PYTHONPATH=str(repo / "src")))


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def stages_cached(output: str) -> list[str]:
    return re.findall(r"Stage '(\w+)' is cached - skipping run, checking out outputs", output)


def snapshot(repo: Path) -> dict[str, str]:
    """md5 of every file under the pipeline's output folders."""
    out = {}
    for rel in OUTPUT_DIRS:
        for f in sorted((repo / rel).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(repo))] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def status(repo: Path) -> dict:
    """`dvc status --json`: stage -> what changed (empty when everything is up to date)."""
    return json.loads(dvc(repo, "status", "--json").stdout or "{}")


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def built(untracked_repo, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Run A: the shrunk `dvc repro` of every stage, with MLflow then turned off (it only adds time here),
    committed (a private copy of `untracked_repo`); and its outputs' md5s."""
    repo = copy_repo(untracked_repo, tmp_path_factory.mktemp("semantics") / "repo")
    assert status(repo) == {}
    files = snapshot(repo)
    assert any(f.startswith("models/") for f in files) and any(f.startswith("plots/") for f in files)
    return repo, files


@pytest.fixture
def repo(built) -> Path:
    """The shared repository, found and left in the state of run A."""
    repo, files = built
    assert status(repo) == {}, "a previous test left the repository changed"
    assert snapshot(repo) == files
    yield repo
    assert not git(repo, "status", "--porcelain", "--untracked-files=no"), "a test left tracked files changed"


def back_to_a(repo: Path, files: dict[str, str], restored: set[str]) -> None:
    """Put params.yaml back to run A's and `dvc repro`: the run-cache restores `restored`, nothing runs."""
    git(repo, "checkout", "--", "params.yaml")  # what a user edits; dvc.lock is left as the last run wrote it
    out = dvc(repo, "repro").stdout
    assert stages_run(out) == [], out
    assert set(stages_cached(out)) == restored, out
    for stage in set(pipeline(repo)) - restored:
        assert SKIPPED.format(stage) in out, (stage, out)
    assert snapshot(repo) == files
    assert status(repo) == {}


# --------------------------------------------------------------------------- a bad param costs no output

@pytest.mark.parametrize("change, key", [
    ({"lr": "fast"}, "diffusion.lr"),
    ({"beta_start": 0.001, "beta_end": 0.0005}, "diffusion.beta_end"),  # below beta_start
], ids=["lr-text", "beta_end-below-beta_start"])
def test_repro_with_a_bad_param_fails_before_touching_any_output(built, repo, change, key):
    files = built[1]
    write_params(repo, {"diffusion": change})
    proc = dvc(repo, "repro", check=False)
    assert proc.returncode != 0, proc.stdout
    assert stages_run(proc.stdout) == ["check_params"], proc.stdout  # DVC stops at the first failed stage
    errors = error_lines(proc)
    assert len(errors) == 1 and key in errors[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(repo) == files, "a failed check cost outputs"
    # DVC deleted check_params' own marker before running it; back to A's params it comes from the run-cache
    assert not (repo / "data/params_ok.json").exists()
    back_to_a(repo, files, {"check_params"})


def test_exp_run_with_a_bad_param_fails_before_touching_any_output(built, repo):
    files = built[1]
    proc = dvc(repo, "exp", "run", "-S", "diffusion.lr=fast", check=False)
    assert proc.returncode != 0, proc.stdout
    assert stages_run(proc.stdout) == ["check_params"], proc.stdout
    errors = error_lines(proc)
    assert len(errors) == 1 and "diffusion.lr" in errors[0], proc.stdout + proc.stderr
    assert snapshot(repo) == files, "a failed check cost outputs"
    assert yaml.safe_load((repo / "params.yaml").read_text())["diffusion"]["lr"] == "fast"  # the workspace keeps it
    back_to_a(repo, files, {"check_params"})


# --------------------------------------------------------------------------- the run-cache

def test_going_back_to_earlier_params_runs_nothing(built, repo):
    """A (the fixture's run), B (another diffusion.lr), A again: every stage of the third comes from the
    run-cache, byte-identical to A. `check_params` too: it depends on params.yaml's bytes, which are A's."""
    files = built[1]
    changed = {"check_params"} | downstream(pipeline(repo), {"train_diffusion"})
    assert changed - extra_stages(repo) == {"check_params", "train_diffusion", "sample", "evaluate"}
    params_ok = (repo / "data/params_ok.json").read_bytes()
    b = dvc(repo, "exp", "run", "-S", "diffusion.lr=0.0005")
    ran = stages_run(b.stdout)
    assert sorted(ran) == sorted(changed) and ran[:2] == ["check_params", "train_diffusion"], b.stdout
    assert ran.index("train_diffusion") < ran.index("sample") < ran.index("evaluate"), b.stdout
    for stage in set(pipeline(repo)) - changed:
        assert SKIPPED.format(stage) in b.stdout, (stage, b.stdout)
    # check_params re-ran (params.yaml is its dep) but wrote the same bytes: nothing re-ran because of it
    assert (repo / "data/params_ok.json").read_bytes() == params_ok
    assert "diffusion.lr: 0.0005" in (repo / "dvc.lock").read_text()
    b_files = snapshot(repo)
    assert b_files["models/diffusion.pt"] != files["models/diffusion.pt"]
    assert b_files["models/autoencoder.pt"] == files["models/autoencoder.pt"]
    assert b_files["data/prepared/train.npz"] == files["data/prepared/train.npz"]

    back_to_a(repo, files, changed)

    # and B again, through `dvc exp run`: the run-cache serves experiments too
    again = dvc(repo, "exp", "run", "-S", "diffusion.lr=0.0005")
    assert stages_run(again.stdout) == [], again.stdout
    assert set(stages_cached(again.stdout)) == changed, again.stdout
    assert snapshot(repo) == b_files
    back_to_a(repo, files, changed)


# --------------------------------------------------------------------------- code changes

def changed_stages(repo: Path, rel: str) -> dict:
    """`dvc status` after appending a comment to `rel` (put back afterwards)."""
    path = repo / rel
    original = path.read_bytes()
    path.write_bytes(original + b"\n# edited by test_dvc_semantics\n")
    try:
        return status(repo)
    finally:
        path.write_bytes(original)


def importers(repo: Path, rel: str) -> set[str]:
    """The stages whose entry `stages/<name>.py` runs `rel`, from the source's imports (tests/code_deps.py)."""
    return {stage for stage in pipeline(repo) if rel in closure(REPO / "stages" / f"{stage}.py")}


def test_a_code_change_marks_exactly_the_stages_that_import_it(built, repo):
    metrics = changed_stages(repo, "src/mnist_ldm/evaluation/metrics.py")
    assert importers(repo, "src/mnist_ldm/evaluation/metrics.py") == {"evaluate"}
    assert metrics == {"evaluate": [{"changed deps": {"src/mnist_ldm/evaluation": "modified"}}]}, metrics

    denoiser = changed_stages(repo, "src/mnist_ldm/diffusion/denoiser.py")
    assert denoiser.keys() == importers(repo, "src/mnist_ldm/diffusion/denoiser.py"), denoiser
    # by name: the stages that build, run or package the denoiser; not the autoencoder's nor the evaluators'
    assert denoiser.keys() == {"train_diffusion", "sample", "package_model"}, denoiser
    for stage in denoiser:
        assert denoiser[stage] == [{"changed deps": {"src/mnist_ldm/diffusion": "modified"}}], denoiser
    # evaluate does not import the denoiser: it follows only through sample's output, if that changes
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert "outputs/samples.npz" in spec["sample"]["outs"] and "outputs/samples.npz" in spec["evaluate"]["deps"]

    tracking = sorted((repo / "src/mnist_ldm/tracking").glob("*.py"))
    assert len(tracking) >= 4
    for path in tracking:  # MLflow logging decides nothing a stage writes
        rel = str(path.relative_to(repo))
        assert changed_stages(repo, rel) == {}, rel


def test_a_code_change_reruns_only_its_stage_and_undoing_it_is_served_by_the_run_cache(built, repo):
    files = built[1]
    path = repo / "src/mnist_ldm/evaluation/metrics.py"
    original = path.read_bytes()
    path.write_bytes(original + b"\n# edited by test_dvc_semantics\n")
    try:
        out = dvc(repo, "repro").stdout
        assert stages_run(out) == ["evaluate"], out
        for stage in set(pipeline(repo)) - {"evaluate"}:
            assert SKIPPED.format(stage) in out, (stage, out)
    finally:
        path.write_bytes(original)
    assert snapshot(repo) == files  # a comment changes no number
    out = dvc(repo, "repro").stdout
    assert stages_run(out) == [] and stages_cached(out) == ["evaluate"], out
    assert status(repo) == {}
