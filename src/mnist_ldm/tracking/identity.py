"""What identifies a run: hashes of a stage's inputs and of the whole pipeline, its params, git and data tags."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import Params
from .store import TAG, _git


def _hash_path(path: Path) -> str:
    """md5 of a file; of a directory, md5 of its listing with each file's md5 (`__pycache__` left out)."""
    if path.is_file():
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if path.is_dir():
        listing = [(str(p.relative_to(path)), _hash_path(p)) for p in sorted(path.rglob("*"))
                   if p.is_file() and "__pycache__" not in p.parts]
        return hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"
    return "missing"


def _param_value(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _load_dvc_yaml(root: Path) -> dict:
    try:
        data = yaml.safe_load((root / "dvc.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_inputs(workdir: Path, stage: str) -> dict:
    """The deps (with hashes) and params of `stage`, as dvc.lock records them."""
    pipeline = _load_dvc_yaml(workdir).get("stages", {})
    if stage not in pipeline:
        return {}
    spec = pipeline[stage]
    raw_params = yaml.safe_load((workdir / "params.yaml").read_text()) if (workdir / "params.yaml").is_file() else {}
    keys = [k for item in spec.get("params", []) for k in ([item] if isinstance(item, str) else list(item))]
    return {
        "cmd": spec.get("cmd"),
        "deps": [{"path": d, "md5": _hash_path(workdir / d)} for d in spec.get("deps", [])],
        "params": {"params.yaml": {k: _param_value(raw_params, k) for k in keys}},
    }


def pipeline_key(workdir: Path, params: Params) -> str:
    """Hash of all params and of every dep that no stage produces (code, raw data).

    A dep inside a stage's output folder (`data/prepared/meta.json` in `data/prepared`) is produced too:
    `prepare` would otherwise hash it as missing and the later stages as present, two pipeline states.
    """
    stages = _load_dvc_yaml(workdir).get("stages", {})
    outs = {str(o if isinstance(o, str) else next(iter(o))).rstrip("/") for s in stages.values()
            for kind in ("outs", "metrics", "plots") for o in s.get(kind, [])}

    def produced(dep: str) -> bool:
        return any(dep == o or dep.startswith(o + "/") for o in outs)

    sources = sorted({d for s in stages.values() for d in s.get("deps", []) if not produced(d)})
    payload = {"params": params.flat(), "sources": {d: _hash_path(workdir / d) for d in sources}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def section_params(params: Params, section: str) -> dict[str, Any]:
    """`{"section.key": value}` for one params section."""
    return {k: v for k, v in params.flat().items() if k.startswith(section + ".")}


def _git_tags(workdir: Path) -> dict[str, str]:
    """The commit (the experiment's baseline under `dvc exp run`), whether the tree is dirty, the DVC experiment."""
    tags = {}
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git(["rev-parse", "HEAD"], workdir)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags[TAG + "git_commit"] = commit
        dirty = _git(["status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"], workdir)
        tags[TAG + "git_dirty"] = str(bool(dirty)).lower()
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(var):
            tags[TAG + var.lower()] = os.environ[var]
    return tags


def _data_tags(meta: Optional[dict]) -> dict[str, str]:
    if not meta:
        return {}
    return {TAG + "data_source": str(meta.get("source")), TAG + "data_hash": str(meta.get("content_hash"))}
