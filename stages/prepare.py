"""DVC stage `prepare` (dvc.yaml): runs `mnist_ldm.stages.prepare` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.stages.prepare import main

sys.exit(main(sys.argv[1:]))
