"""DVC stage `train_ae` (dvc.yaml): runs `mnist_ldm.commands.train_ae` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.train_ae import main

sys.exit(main(sys.argv[1:]))
