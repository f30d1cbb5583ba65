"""What identifies a run, read from DVC: a stage's inputs, the key of the pipeline state, which stages are up to
date; the params, git and data tags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml

from mnist_ldm.config.sections import Params
from mnist_ldm.io.hashing import json_digest, path_hash
from mnist_ldm.config.params_file import dotted_value
from mnist_ldm.tracking.store import TAG, git


def read_yaml(path: Path) -> dict:
    """A YAML file's mapping (dvc.yaml, params.yaml); {} if it is missing or holds no mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_inputs(workdir: Path, stage: str) -> dict:
    """The command, deps (with `path_hash`) and params of `stage` as dvc.lock records them ({} if dvc.yaml lacks
    it); read from the workspace, since a running stage's dvc.lock entry is its previous run's."""
    spec = read_yaml(workdir / "dvc.yaml").get("stages", {}).get(stage)
    if spec is None:
        return {}
    raw = read_yaml(workdir / "params.yaml")
    keys = [k for item in spec.get("params", []) for k in ([item] if isinstance(item, str) else list(item))]
    return {"cmd": spec.get("cmd"), "deps": [{"path": d, "md5": path_hash(workdir / d)} for d in spec.get("deps", [])],
            "params": {"params.yaml": {k: dotted_value(raw, k) for k in keys}}}


def pipeline_key(workdir: Path, params: Params) -> str:
    """Hash of all params and of every dep that no stage produces (code, raw data); a dep inside an output folder
    (`data/prepared/meta.json`) is produced too, or `prepare` and the later stages would see two states."""
    stages = read_yaml(workdir / "dvc.yaml").get("stages", {})
    outs = producers(stages)
    sources = sorted({d for s in stages.values() for d in s.get("deps", []) if producer(outs, d) is None})
    return json_digest({"params": params.flat(), "sources": {d: path_hash(workdir / d) for d in sources}}, 20)


def producers(stages: dict) -> dict[str, str]:
    """Each output path of dvc.yaml's `stages` (outs, metrics, plots) -> the stage that writes it."""
    return {str(o if isinstance(o, str) else next(iter(o))).rstrip("/"): name for name, spec in stages.items()
            for kind in ("outs", "metrics", "plots") for o in spec.get(kind, [])}


def producer(outs: dict[str, str], path: str) -> Optional[str]:
    return next((name for out, name in outs.items() if path == out or path.startswith(out + "/")), None)


def current_stages(workdir: Path, running: str) -> set[str]:
    """`running`, and each stage that DVC finds up to date (its dvc.lock entry against the workspace), with all its
    upstream stages: not one still to run under `dvc repro` (DVC writes its entry once it has run), nor one after a
    failed stage. Asked through DVC's API, not `dvc status`, whose lock the running `dvc repro` holds."""
    from dvc.repo import Repo
    from dvc.repo.graph import collect_pipeline

    with Repo(str(workdir), uninitialized=True) as repo:
        graph = repo.index.graph
        stale = {s for s in graph if s.addressing != running and (s.changed_stage() or any(d.status() for d in s.deps))}
        return {s.addressing for s in graph if s.addressing == running or stale.isdisjoint(collect_pipeline(s, graph))}


def section_params(params: Params, section: str) -> dict[str, Any]:
    """`{"section.key": value}` for one params section."""
    return {k: v for k, v in params.flat().items() if k.startswith(section + ".")}


def git_tags(workdir: Path) -> dict[str, str]:
    """The commit (the experiment's baseline under `dvc exp run`), whether the tree is dirty, the DVC experiment."""
    tags = {}
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git(["rev-parse", "HEAD"], workdir)
    if commit:
        tags["mlflow.source.git.commit"] = tags[TAG + "git_commit"] = commit
        dirty = git(["status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"], workdir)
        tags[TAG + "git_dirty"] = str(bool(dirty)).lower()
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(var):
            tags[TAG + var.lower()] = os.environ[var]
    return tags


def data_tags(meta: Optional[dict]) -> dict[str, str]:
    """The data's source and content hash, from `prepare`'s meta.json."""
    return {TAG + "data_source": str(meta.get("source")), TAG + "data_hash": str(meta.get("content_hash"))} if meta else {}
