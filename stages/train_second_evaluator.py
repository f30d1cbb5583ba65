"""DVC stage `train_second_evaluator` (dvc.yaml): runs `mnist-ldm train-evaluator --section second_evaluator` with
the paths that dvc.yaml passes."""

import sys

from mnist_ldm.commands import train_evaluator
from mnist_ldm.runtime.command import command_parser, run_command

sys.exit(run_command(command_parser(train_evaluator), ["--section", "second_evaluator", *sys.argv[1:]]))
