"""DVC stage `train_evaluator` (dvc.yaml): runs `mnist_ldm.commands.train_evaluator` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.train_evaluator import main

sys.exit(main(sys.argv[1:]))
