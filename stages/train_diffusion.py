"""DVC stage `train_diffusion` (dvc.yaml): `mnist-ldm train-diffusion` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.cli import main

sys.exit(main(["train-diffusion", *sys.argv[1:]]))
