"""DVC stage `evaluate` (dvc.yaml): runs `mnist-ldm evaluate` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import evaluate
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(evaluate), sys.argv[1:]))
