"""The project modules a DVC stage runs: the import closure of its `stages/<name>.py` entry, from the source
(`mnist_ldm.imports`, the rule `package_model` also uses for the files it packages).

The `mnist_ldm.tracking` package is deliberately left out: it only decides how runs are logged to MLflow,
never what a stage writes, so a change to it must not retrain models (the README says so).
"""

from __future__ import annotations

from pathlib import Path

from mnist_ldm import imports

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
NOT_A_DEP = ("mnist_ldm.tracking",)  # logging only; see the module docstring


def closure(entry: Path) -> set[str]:
    """Repository-relative paths of `entry` and every project module it runs (tracking excluded)."""
    return {str(p.relative_to(REPO)) for p in imports.closure(entry, NOT_A_DEP)}


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
