"""`benchmarks/compare_seeds.py`: the seed-by-seed rule that says whether a variant is better in both evaluators."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_seeds", REPO / "benchmarks" / "compare_seeds.py")
compare_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_seeds)


def write(folder: Path, first: list[float], second: list[float], floors=(2.0, 0.1)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (f, s) in enumerate(zip(first, second)):
        result = {"fcd": {"generated": f, "ae_reconstruction": floors[0]},
                  "second_evaluator": {"fcd": {"generated": s, "ae_reconstruction": floors[1]}}}
        (folder / f"eval_seed{seed}.json").write_text(json.dumps(result))
    return folder


def test_a_shared_seed_offset_is_not_mistaken_for_spread(tmp_path: Path, capsys) -> None:
    # the seeds move both variants alike (spread 0.3 within each), while B is lower by ~0.1 in every seed
    a = write(tmp_path / "a", [4.0, 4.3, 3.7], [0.22, 0.20, 0.23])
    b = write(tmp_path / "b", [3.9, 4.21, 3.58], [0.21, 0.19, 0.222])
    assert compare_seeds.main([str(a), str(b), "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["evaluator"]["verdict"] == result["second evaluator"]["verdict"] == result["verdict"] == "better"
    assert result["evaluator"]["a_ratio"] == pytest.approx([2.0, 2.15, 1.85])
    assert capsys.readouterr().out.strip().endswith("B against A: better")


@pytest.mark.parametrize("second, first_verdict, second_verdict, overall", [
    ([0.23, 0.21, 0.24], "better", "worse", "not better in both"),   # one evaluator's blind spot
    ([0.21, 0.21, 0.23], "better", "no difference", "not better in both"),  # not lower in every seed
])
def test_better_only_when_both_evaluators_agree(tmp_path: Path, second, first_verdict, second_verdict, overall) -> None:
    a = write(tmp_path / "a", [4.0, 4.3, 3.7], [0.22, 0.20, 0.23])
    b = write(tmp_path / "b", [3.6, 3.9, 3.3], second)
    result = compare_seeds.compare(compare_seeds.read_seeds(a), compare_seeds.read_seeds(b))
    assert (result["evaluator"]["verdict"], result["second evaluator"]["verdict"], result["verdict"]) == \
        (first_verdict, second_verdict, overall)


def test_a_small_mean_inside_the_spread_is_no_difference() -> None:
    assert compare_seeds.verdict([-0.01, -0.02, -0.2]) == "no difference"  # lower every time, but mean < sd
    assert compare_seeds.verdict([-0.1, -0.11, -0.12]) == "better"
    assert compare_seeds.verdict([0.1, 0.11, 0.12]) == "worse"


def test_other_seeds_or_missing_evaluator_is_one_line(tmp_path: Path) -> None:
    a = write(tmp_path / "a", [4.0, 4.3, 3.7], [0.22, 0.20, 0.23])
    b = write(tmp_path / "b", [4.0, 4.3], [0.22, 0.20])
    for folders, words in [((a, b), "different seeds"), ((a, tmp_path / "none"), "no eval_seed")]:
        with pytest.raises(SystemExit) as e:
            compare_seeds.main([str(f) for f in folders])
        assert words in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "eval_seed0.json").write_text(json.dumps({"fcd": {"generated": 1.0, "ae_reconstruction": 1.0}}))
    (tmp_path / "c" / "eval_seed1.json").write_text(json.dumps({"fcd": {"generated": 1.0, "ae_reconstruction": 1.0}}))
    with pytest.raises(SystemExit) as e:
        compare_seeds.main([str(write(tmp_path / "d", [1.0, 1.1], [0.1, 0.1])), str(tmp_path / "c")])
    assert "--second-evaluator" in str(e.value)
