"""dvc.yaml lists the code each stage runs by folder, the layers stay apart, git ignores every cached output and
keeps the baseline's (metrics, curves).

A stage's code deps are its entry in stages/, its command module and the library folders it imports (see
tests/code_deps.py), so editing a module re-runs exactly the stages whose folders hold it.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import networkx as nx
import pytest
import yaml

from code_deps import REPO, SRC, closure, only_docstring

from dvc.repo import Repo

CODE_PREFIXES = ("stages/", "src/")


def _pipeline() -> tuple[dict, dict, set]:
    """Each stage's definition as DVC resolves dvc.yaml (its `${lib}` variable expanded), the stages each stage
    runs after, directly or not, and the (upstream, downstream) pairs that `dvc dag` draws."""
    with Repo(str(REPO), uninitialized=True) as repo:
        graph = repo.index.graph  # an edge from each stage to the stages whose outputs it reads
        return ({s.addressing: {"deps": [str(d.def_path) for d in s.deps],
                                "outs": [str(o.def_path) for o in s.outs]} for s in repo.index.stages},
                {s.addressing: {u.addressing for u in nx.descendants(graph, s)} for s in repo.index.stages},
                {(u.addressing, d.addressing) for d, u in graph.edges})


PIPELINE, UPSTREAM, ARROWS = _pipeline()
RAW = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_code_deps_cover_what_the_stage_imports_and_no_more(stage: str):
    listed = [d for d in PIPELINE[stage]["deps"] if d.startswith(CODE_PREFIXES)]
    runs = {p for p in closure(REPO / "stages" / f"{stage}.py") if not only_docstring(p)}
    missing = sorted(p for p in runs if not covered(p, listed))
    unused = sorted(d for d in listed if not any(covered(p, [d]) for p in runs))
    hints = [f"stages.{stage}.deps in dvc.yaml: add the folder of {p}" for p in missing]
    hints += [f"stages.{stage}.deps in dvc.yaml: remove {d} (the stage runs nothing in it)" for d in unused]
    assert not hints, "\n".join(hints)
    assert len(listed) <= 10, f"{stage}: {len(listed)} code deps; list folders, not files"


def test_tracking_is_no_stage_dep_and_evaluation_only_evaluates():
    """Editing tracking re-runs no stage; editing the metrics re-runs only `evaluate`."""
    for name, stage in PIPELINE.items():
        assert not any(d.startswith("src/mnist_ldm/tracking") for d in stage["deps"]), name
        assert name == "evaluate" or not any(d.startswith("src/mnist_ldm/evaluation") for d in stage["deps"]), name


def test_the_closure_follows_every_kind_of_import_and_skips_tracking():
    """`prepare` imports the library at module level and tracking inside a function; `check_params` imports the
    data sources inside a function."""
    prepare = closure(REPO / "stages" / "prepare.py")
    assert {"src/mnist_ldm/commands/prepare.py", "src/mnist_ldm/data/prepared.py", "src/mnist_ldm/io/atomic.py"} <= prepare
    assert not {p for p in prepare if p.startswith("src/mnist_ldm/tracking")}
    assert "src/mnist_ldm/data/sources.py" in closure(REPO / "stages" / "check_params.py")
    served = closure(SRC / "mnist_ldm" / "diffusion" / "serving.py")  # what package_model copies must hold what serving runs
    assert "src/mnist_ldm/diffusion/pipeline.py" in served
    assert not {p for p in served if p.split("/")[2] in ("commands", "tracking", "evaluator", "evaluation")}


def test_every_stage_has_an_entry_and_checks_params_first():
    """DVC runs a stage after everything upstream of it, so `check_params` upstream of every stage stops a bad
    value before DVC deletes any output; one stage reading its marker keeps `dvc dag` one edge wide there."""
    entries = {p.stem for p in (REPO / "stages").glob("*.py")}
    assert entries == set(PIPELINE)
    for name in set(PIPELINE) - {"check_params"}:
        assert "check_params" in UPSTREAM[name], f"{name} must run after check_params (through its output)"
    assert [n for n, s in PIPELINE.items() if "data/params_ok.json" in s["deps"]] == ["prepare"]


def test_the_chart_in_the_docs_is_dvc_dag():
    """docs/pipeline.md's Mermaid chart (`a --> b & c` lines) has exactly the arrows of DVC's graph."""
    chart = re.search(r"```mermaid\nflowchart TD\n(.*?)```", (REPO / "docs" / "pipeline.md").read_text(), re.S)
    assert chart, "docs/pipeline.md: the ```mermaid chart of the stages is missing"
    drawn = set()
    for line in chart.group(1).splitlines():
        up, _, downs = line.partition("-->")
        drawn |= {(up.strip(), d.strip()) for d in downs.split("&")}
    assert drawn == ARROWS, f"docs/pipeline.md's chart: draw {sorted(ARROWS - drawn)}, remove {sorted(drawn - ARROWS)}"


def committed(out) -> bool:
    """A `cache: false` output: the baseline's small files, which git keeps (docs/pipeline.md)."""
    return not isinstance(out, str) and not out[next(iter(out))].get("cache", True)


def test_only_metrics_and_curves_are_committed_and_the_rest_is_cached():
    """The metrics files and the per-epoch curves are the baseline in git; every other output is DVC's. A `cache:
    false` output is a stage's `metrics` or `plots`: DVC's run-cache skips a stage with one among its `outs`."""
    for name, stage in RAW.items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path = out if isinstance(out, str) else next(iter(out))
                baseline = kind == "metrics" or (kind == "plots" and path.startswith("plots/curves/"))
                assert committed(out) == baseline, f"{name}: {kind} {out} ({'cache: false' if baseline else 'cached'})"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_library_knows_nothing_of_mlflow_dvc_or_stages():
    pkg = SRC / "mnist_ldm"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg)
        if rel.parts[0] in ("commands", "tracking") or rel.name == "cli.py":
            continue
        # serving.py is the pipeline as an MLflow pyfunc model (the `package_model` stage saves it): MLflow
        # is what it adapts to, so it alone may import mlflow; it still knows nothing of stages or tracking
        banned = ("dvc",) if rel.name == "serving.py" else ("mlflow", "dvc")
        bad = {n for n in _imports(path) if n.split(".")[0] in banned
               or n.lstrip(".").split(".")[0] in ("commands", "tracking", "cli")
               or n.startswith(("mnist_ldm.commands", "mnist_ldm.tracking", "mnist_ldm.commands.cli"))}
        assert not bad, f"{rel} imports {sorted(bad)}; the library must not know about stages or MLflow"


def test_no_source_module_is_long():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"modules over 300 lines: {long}"


def test_every_output_is_in_its_folders_committed_gitignore():
    """DVC adds `/<name>` to the .gitignore beside a cached output when it first saves it. Were that entry not
    committed, `dvc repro` in a clean clone would change tracked files, and every run would be tagged `git_dirty`.
    A `cache: false` output is git's: no .gitignore names it, and once dvc.lock is committed so is it."""
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    missing, ignored, untracked = [], [], []
    for spec in RAW.values():
        for out in (o for kind in ("outs", "metrics", "plots") for o in spec.get(kind, [])):
            path = Path((out if isinstance(out, str) else next(iter(out))).rstrip("/"))
            ignore = (path.parent / ".gitignore").as_posix()
            listed = f"/{path.name}" in ((REPO / ignore).read_text().split() if ignore in tracked else [])
            if committed(out):
                ignored += [f"{ignore}: /{path.name}"] if listed else []
                untracked += [] if "dvc.lock" not in tracked or path.as_posix() in tracked else [path.as_posix()]
            elif not listed:
                missing.append(f"{ignore}: /{path.name}")
    assert not missing, f"entries DVC would add to committed files: {missing}"
    assert not ignored, f"the baseline's files must not be git-ignored: {ignored}"
    assert not untracked, f"dvc.lock is committed, these outputs of its run are not: {untracked}"
