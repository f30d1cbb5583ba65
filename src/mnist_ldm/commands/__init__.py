"""One module per DVC stage (and `infer`): read params and flags, call the library, write outputs, log to MLflow.

Each module has `add_arguments(parser)` and `run(params, args)`; `stages/<name>.py` at the top of the
repository calls `main()` here, and `mnist-ldm <name>` reaches the same code through `mnist_ldm.cli`.
"""
