"""DVC stage `prepare` (dvc.yaml): runs `mnist-ldm prepare` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import prepare
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(prepare), sys.argv[1:]))
