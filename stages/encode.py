"""DVC stage `encode` (dvc.yaml): runs `mnist-ldm encode` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import encode
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(encode), sys.argv[1:]))
