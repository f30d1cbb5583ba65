"""DVC stage `package_model` (dvc.yaml): runs `mnist-ldm package-model` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import package_model
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(package_model), sys.argv[1:]))
