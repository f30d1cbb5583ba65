"""DVC stage `check_params` (dvc.yaml): runs `mnist-ldm check-params` before any other stage."""

import sys

from mnist_ldm.commands import check_params
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(check_params), sys.argv[1:]))
