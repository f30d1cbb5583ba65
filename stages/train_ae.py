"""DVC stage `train_ae` (dvc.yaml): `mnist-ldm train-ae` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.cli import main

sys.exit(main(["train-ae", *sys.argv[1:]]))
