"""DVC stage `train_diffusion` (dvc.yaml): runs `mnist-ldm train-diffusion` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import train_diffusion
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(train_diffusion), sys.argv[1:]))
