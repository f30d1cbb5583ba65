"""DVC stage `sample` (dvc.yaml): runs `mnist_ldm.commands.sample` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.sample import main

sys.exit(main(sys.argv[1:]))
