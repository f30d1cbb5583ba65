"""DVC stage `encode` (dvc.yaml): runs `mnist_ldm.commands.encode` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.encode import main

sys.exit(main(sys.argv[1:]))
