"""DVC stage `prepare` (dvc.yaml): runs `mnist_ldm.commands.prepare` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.prepare import main

sys.exit(main(sys.argv[1:]))
