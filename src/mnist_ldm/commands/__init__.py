"""One module per DVC stage (and `infer`, `promote`): read params and flags, call the library, write outputs,
log to MLflow. Each has `HELP`, `add_arguments(parser)` and `run(params, args)`.

What the commands share, by concern: `args` (argparse types, the parser, the options every command
takes, params and runtime from the flags), `outputs` (which torchrun rank writes, publishing a finished
stage's metrics and artifacts) and `entry` (`run_command`: the one way every command runs, whether from
`stages/<name>.py`, `torchrun stages/<name>.py` or `mnist-ldm <name>` through `mnist_ldm.cli`; one-line
errors, interrupts). The paths a command is given are checked by the library's `mnist_ldm.paths` before
any work, and `mnist_ldm.memory` checks that its arrays fit.
"""
