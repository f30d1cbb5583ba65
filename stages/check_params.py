"""DVC stage `check_params` (dvc.yaml): runs `mnist_ldm.commands.check_params` before any other stage."""

import sys

from mnist_ldm.commands.check_params import main

sys.exit(main(sys.argv[1:]))
