"""DVC stage `train_evaluator` (dvc.yaml): `mnist-ldm train-evaluator` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.cli import main

sys.exit(main(["train-evaluator", *sys.argv[1:]]))
