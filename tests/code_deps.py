"""The project modules a DVC stage runs: the import closure of its `stages/<name>.py` entry, from the source.

Imports are followed wherever they appear (module level or inside a function), relative or absolute,
through package `__init__` files. The `mnist_ldm.tracking` package is deliberately left out: it only
decides how runs are logged to MLflow, never what a stage writes, so a change to it must not retrain
models (the README says so).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "mnist_ldm"
NOT_A_DEP = ("mnist_ldm.tracking",)  # logging only; see the module docstring


def _module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported(path: Path) -> set[str]:
    """Dotted names of the project modules that `path` imports (submodules named in `from X import y` too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = _module_name(path) if path.is_relative_to(SRC) else ""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".") if is_pkg else here.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return {n for n in names if (n == PACKAGE or n.startswith(PACKAGE + ".")) and _module_file(n) is not None}


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(entry: Path) -> set[str]:
    """Repository-relative paths of `entry` and every project module it runs (tracking excluded)."""
    seen: set[Path] = {entry}
    todo = [entry]
    while todo:
        for name in _imported(todo.pop()):
            for mod in _with_parents(name):
                if mod.startswith(NOT_A_DEP):
                    continue
                f = _module_file(mod)
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return {str(p.relative_to(REPO)) for p in seen}


def sync_dvc_yaml(path: Path = REPO / "dvc.yaml") -> list[str]:
    """Rewrite each stage's code deps in dvc.yaml as its closure (entry first), keeping every other line."""
    lines, out, stage, changed = path.read_text().splitlines(), [], None, []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if line.strip() == "deps:" and stage and (REPO / "stages" / f"{stage}.py").is_file():
            out.append(line)
            i += 1
            block = []
            while i < len(lines) and lines[i].startswith("      - "):
                block.append(lines[i][len("      - "):])
                i += 1
            entry = f"stages/{stage}.py"
            code = [entry] + sorted(closure(REPO / entry) - {entry})
            rest = [d for d in block if not d.startswith(("stages/", "src/"))]
            if code + rest != block:
                changed.append(stage)
            out += [f"      - {d}" for d in code + rest]
            continue
        out.append(line)
        i += 1
    path.write_text("\n".join(out) + "\n")
    return changed


if __name__ == "__main__":  # `python tests/code_deps.py`: bring dvc.yaml's code deps up to date
    print("updated:", ", ".join(sync_dvc_yaml()) or "nothing")
