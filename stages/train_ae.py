"""DVC stage `train_ae` (dvc.yaml): runs `mnist-ldm train-ae` with the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import train_ae
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(train_ae), sys.argv[1:]))
