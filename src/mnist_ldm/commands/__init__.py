"""One module per DVC stage (and `infer`, `promote`, `ui`): read params and flags, call the library, write outputs,
log to MLflow. Each has `HELP`, `add_arguments(parser)` and `run(params, args)`; `mnist_ldm.runtime.command` runs
them."""
