"""DVC stage `evaluate` (dvc.yaml): `mnist-ldm evaluate` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
