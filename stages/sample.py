"""DVC stage `sample` (dvc.yaml): runs `mnist-ldm sample` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import sample
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(sample), sys.argv[1:]))
