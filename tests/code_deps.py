"""The project files a DVC stage runs: the import closure of its `stages/<name>.py` entry, read from the source
with `ast` (module-level, relative and in-function imports alike).

`mnist_ldm.tracking` is left out: it decides how runs are logged to MLflow, never what a stage writes, so a change
to it must not retrain models.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE_DIR = SRC / "mnist_ldm"
NOT_A_DEP = ("mnist_ldm.tracking",)  # logging only; see the module docstring


def module_file(name: str) -> Optional[Path]:
    """The file of the package module `name` (`mnist_ldm.a.b`: `a/b.py` or `a/b/__init__.py`), else None."""
    parts = name.split(".")
    if parts[0] != PACKAGE_DIR.name:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def imported(path: Path) -> set[str]:
    """The package modules that `path` imports; `from X import y` counts `X.y` too, in case `y` is a module."""
    here = list(path.parent.relative_to(SRC).parts) if path.is_relative_to(PACKAGE_DIR) else []
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""] if node.level
                            else [node.module or ""]).strip(".")
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in names if module_file(n) is not None}


def closure(entry: Path) -> set[str]:
    """Repository-relative paths of `entry` and every package file it runs (with the `__init__` of each package
    above it), tracking excluded."""
    seen, todo = {entry}, [entry]
    while todo:
        for name in imported(todo.pop()):
            parts = name.split(".")
            for mod in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                f = None if mod.startswith(NOT_A_DEP) else module_file(mod)
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return {str(p.relative_to(REPO)) for p in seen}


def only_docstring(path: str) -> bool:
    """A file with nothing but a docstring (a package's `__init__.py`) cannot change what a stage computes."""
    body = ast.parse((REPO / path).read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)
