"""DVC stage `prepare` (dvc.yaml): `mnist-ldm prepare` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.cli import main

sys.exit(main(["prepare", *sys.argv[1:]]))
