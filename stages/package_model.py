"""DVC stage `package_model` (dvc.yaml): runs `mnist_ldm.commands.package_model` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands.package_model import main

sys.exit(main(sys.argv[1:]))
