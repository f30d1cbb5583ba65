"""Is variant B better than variant A? Both evaluators' FCDs, seed by seed.

    python benchmarks/compare_seeds.py A_DIR B_DIR [--json OUT]

Each folder holds `eval_seed<N>.json` files (`metrics/eval.json` written by `evaluate` with the second
evaluator) for the same sampling seeds N, e.g. `mnist-ldm infer --num-images 10000 --seed N` then
`mnist-ldm evaluate --no-tracking --second-evaluator ...` for each variant. Most of the spread over
seeds is shared by two models sampled from the same seeds (the same noise gives similar image sets),
so the difference is taken seed by seed: B is **better** in an evaluator when B's FCD is lower in
every seed and the mean difference exceeds the differences' standard deviation, **worse** in the
mirror case, and otherwise no different beyond the seeds. A change counts as better only when both
evaluators say so. Also printed: each variant's mean ± sd and its ratio to its own autoencoder floor.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

EVALUATORS = (("evaluator", ()), ("second evaluator", ("second_evaluator",)))


def read_seeds(folder: Path) -> dict[int, dict]:
    """`{seed: eval.json dict}` of the `eval_seed<N>.json` files in `folder`."""
    found = {}
    for path in sorted(folder.glob("eval_seed*.json")):
        match = re.fullmatch(r"eval_seed(\d+)\.json", path.name)
        if match:
            try:
                found[int(match.group(1))] = json.loads(path.read_text())
            except ValueError as e:
                raise SystemExit(f"compare_seeds: {path}: not JSON ({e})") from None
    if not found:
        raise SystemExit(f"compare_seeds: {folder}: no eval_seed<N>.json files")
    return found


def fcd(result: dict, path: tuple[str, ...], key: str = "generated") -> float:
    for part in path:
        result = result[part]
    return float(result["fcd"][key])


def verdict(diffs: list[float]) -> str:
    """'better' (every seed lower, mean beyond the spread), 'worse' (the mirror), or 'no difference'."""
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("inf")
    if all(d < 0 for d in diffs) and -mean > sd:
        return "better"
    if all(d > 0 for d in diffs) and mean > sd:
        return "worse"
    return "no difference"


def compare(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """Per evaluator: both variants' FCDs and floor ratios, the seed-by-seed differences B - A and the verdict."""
    if sorted(a) != sorted(b):
        raise SystemExit(f"compare_seeds: the folders hold different seeds ({sorted(a)} and {sorted(b)}); "
                         f"compare the same seeds")
    if len(a) < 2:
        raise SystemExit("compare_seeds: one seed gives no spread; score at least two (three is the project's rule)")
    seeds = sorted(a)
    out = {"seeds": seeds}
    for name, path in EVALUATORS:
        try:
            va, vb = ([fcd(x[s], path) for s in seeds] for x in (a, b))
            floors = [fcd(x[seeds[0]], path, "ae_reconstruction") for x in (a, b)]
        except (KeyError, TypeError):
            raise SystemExit(f"compare_seeds: an eval_seed file lacks the {name}'s fcd.generated or "
                             f"fcd.ae_reconstruction (evaluate with --second-evaluator)") from None
        diffs = [y - x for x, y in zip(va, vb)]
        out[name] = {"a": va, "b": vb, "a_ratio": [v / floors[0] for v in va], "b_ratio": [v / floors[1] for v in vb],
                     "b_minus_a": diffs, "verdict": verdict(diffs)}
    out["verdict"] = ("better" if all(out[n]["verdict"] == "better" for n, _ in EVALUATORS) else
                      "worse" if all(out[n]["verdict"] == "worse" for n, _ in EVALUATORS) else "not better in both")
    return out


def spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="folder of the baseline's eval_seed<N>.json")
    p.add_argument("b", type=Path, help="folder of the variant's eval_seed<N>.json (the same seeds)")
    p.add_argument("--json", type=Path, help="also write the comparison here")
    args = p.parse_args(argv)
    result = compare(read_seeds(args.a), read_seeds(args.b))
    print(f"seeds {', '.join(map(str, result['seeds']))}; B = {args.b}, A = {args.a}")
    for name, _ in EVALUATORS:
        r = result[name]
        print(f"{name:<17} FCD A {spread(r['a'])} ({spread(r['a_ratio'], 2)}x its floor), "
              f"B {spread(r['b'])} ({spread(r['b_ratio'], 2)}x); B - A per seed "
              f"{' / '.join(f'{d:+.3f}' for d in r['b_minus_a'])}, {spread(r['b_minus_a'])}: {r['verdict']}")
    print(f"B against A: {result['verdict']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
