"""The autoencoder's floor for a grid of its training values, without the rest of the pipeline.

For each `--set` combination the autoencoder is trained as `train_ae` trains it (the library's
`train_autoencoder`, the params.yaml values with these changes) and scored the way `evaluate` scores its
floor: training images through the autoencoder, n of them, against the test set, in the features of
both evaluators (`ae_reconstruction`, `scoring.floor_images`). About 6 minutes per 20-epoch combination
on 2 CPU cores; the whole pipeline with the same values is `dvc exp run --queue -S ...`.

    dvc repro train_evaluator train_second_evaluator     # with full MNIST in data/raw/mnist
    python benchmarks/autoencoder_floor.py --set autoencoder.batch_size=256 \\
        --grid autoencoder.lr=0.002,0.004,0.006,0.01 --set autoencoder.epochs=20
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path

from mnist_ldm.evaluation import metrics
from mnist_ldm.autoencoder.model import encode_images
from mnist_ldm.data.prepared import load_meta, load_split
from mnist_ldm.runtime.device import runtime
from mnist_ldm.evaluator.model import features_and_probs, load_evaluator
from mnist_ldm.config.params_file import apply_overrides, load_params
from mnist_ldm.evaluation.scoring import floor_images
from mnist_ldm.autoencoder.train import train_autoencoder

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], help="section.key=value for every combination")
    ap.add_argument("--grid", action="append", default=[], help="section.key=v1,v2,... (one combination per value)")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--evaluators", type=Path, nargs="+",
                    default=[Path("models/evaluator.pt"), Path("models/second_evaluator.pt")])
    ap.add_argument("--n", type=int, default=10_000, help="images per set (default %(default)s, as evaluate.n)")
    ap.add_argument("--out", type=Path, default=RESULTS / "autoencoder_floor.json")
    args = ap.parse_args()
    grid = [[f"{k}={v}" for v in vs.split(",")] for k, vs in (g.split("=", 1) for g in args.grid)]
    train, test = load_split(args.data, "train"), load_split(args.data, "test")
    data_hash = load_meta(args.data)["content_hash"]
    rt = runtime(None, None)
    evaluators = [load_evaluator(p)[0] for p in args.evaluators]
    n = min(args.n, len(test.images), len(train.images))
    f_test = [features_and_probs(e, test.images[:n], precision=rt.precision)[0] for e in evaluators]
    rows = []
    for combo in itertools.product(*grid) if grid else [()]:
        changes = [*args.set, *combo]
        cfg = dataclasses.replace(apply_overrides(load_params(), changes).autoencoder, generate_images=False)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            model, history = train_autoencoder(cfg, train, test, Path(tmp) / "resume.pt", data_hash, rt=rt)
        seconds = time.perf_counter() - start
        z_train = encode_images(model, train.images, precision=rt.precision)
        recon = floor_images(model, z_train, n, 0, rt.precision)["ae_reconstruction"]
        floors = [metrics.frechet_classifier_distance(features_and_probs(e, recon, precision=rt.precision)[0], f)
                  for e, f in zip(evaluators, f_test)]
        rows.append({"changes": changes, "train_s": round(seconds, 1), "test_mse": history[-1]["test_mse"],
                     "floors": [round(x, 4) for x in floors], "evaluators": [e.arch for e in evaluators],
                     "precision": rt.precision, "n": n})
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
