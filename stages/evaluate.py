"""DVC stage `evaluate` (dvc.yaml): runs `mnist_ldm.commands.evaluate` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.evaluate import main

sys.exit(main(sys.argv[1:]))
