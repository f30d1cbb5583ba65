"""The package's own import graph, read from the source with `ast`: which of its files a module runs.

One rule, two users: `package_model` copies the files `mnist_ldm.serving` runs into the MLflow model, and
`tests/code_deps.py` lists the files each `stages/<name>.py` runs as that stage's code deps in dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def module_file(name: str) -> Optional[Path]:
    """The file of the package module `name` (`mnist_ldm.a.b`: `a/b.py` or `a/b/__init__.py`), else None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def imported(path: Path) -> set[str]:
    """The package modules that the file `path` imports, wherever the import stands (module level or in a
    function), relative or absolute; `from X import y` counts `X.y` too, in case `y` is a submodule."""
    path = path.resolve()
    here = list(path.parent.relative_to(PACKAGE_DIR.parent).parts) if path.is_relative_to(PACKAGE_DIR) else []
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


def closure(entry: Path, skip: tuple[str, ...] = ()) -> set[Path]:
    """`entry` and every package file it runs: its imports, theirs, and so on, each with the `__init__` of the
    packages above it (they run first). Modules whose name starts with a `skip` prefix are left out."""
    seen, todo = {entry}, [entry]
    while todo:
        for name in imported(todo.pop()):
            parts = name.split(".")
            for mod in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                f = None if mod.startswith(skip) else module_file(mod)
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return seen
