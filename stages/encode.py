"""DVC stage `encode` (dvc.yaml): `mnist-ldm encode` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.cli import main

sys.exit(main(["encode", *sys.argv[1:]]))
