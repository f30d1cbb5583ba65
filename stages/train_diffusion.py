"""DVC stage `train_diffusion` (dvc.yaml): runs `mnist_ldm.commands.train_diffusion` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.train_diffusion import main

sys.exit(main(sys.argv[1:]))
