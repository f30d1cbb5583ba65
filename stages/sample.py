"""DVC stage `sample` (dvc.yaml): `mnist-ldm sample` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.cli import main

sys.exit(main(["sample", *sys.argv[1:]]))
