"""DVC stage `check_params` (dvc.yaml): runs `mnist_ldm.stages.check_params` before any other stage."""

import sys

from mnist_ldm.stages.check_params import main

sys.exit(main(sys.argv[1:]))
