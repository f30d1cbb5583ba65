"""MLflow tracking for the pipeline: one parent run per pipeline execution, one child run per stage.

* Store (`store.py`): `MLFLOW_TRACKING_URI` if set (a team server), else `sqlite:///<repo>/mlflow.db`
  with artifacts in `<repo>/mlartifacts`. `<repo>` is the real repository root, also when DVC runs
  the stage inside an experiment's temporary copy (`dvc exp run --temp`, `dvc queue`): DVC then sets
  `DVC_ROOT` to the origin repository, and a working copy under `.dvc/tmp/exps/` maps back to it.
  A repository moved or copied with its `mlflow.db` and `mlartifacts/` has its artifact locations
  re-pointed to itself, so it never writes into the copy it came from.
* Parent (`runs.py`): identified by a hash of every param and of the pipeline's source inputs (code,
  raw data; `identity.py`): stages of one `dvc repro` find it without talking to each other, and
  `dvc repro -f` finds the same one again. It holds every param (`section.key`) and the numbers of
  every metrics file that dvc.yaml lists (`<file stem>.<key>`, the evaluation's headline first), so
  it also shows the stages an experiment did not re-run. Sizes (parameter and image counts:
  `autoencoder.params`, `eval.n`, ...) are tags `mnist_ldm.size.<file stem>.<key>` there, not metrics:
  MLflow's compare view plots a run's first metric, and a count makes a useless axis.
* Child: one per executed stage, tagged with the hash of the stage's inputs (deps and params as
  `dvc.lock` records them, the effective params, the command line). A re-execution with the same
  inputs links to the finished run instead of logging a twin; an interrupted one is continued.
* If the server does not answer when a stage starts, the stage fails before any work. If it stops
  answering mid-stage, training goes on and one warning says what was not logged. NaN and infinite
  metrics are never sent (one warning per key).
"""

from .identity import pipeline_key, section_params, stage_inputs
from .logger import StageRun
from .runs import stage_run, training_run
from .store import TrackingError, repo_root, tracking_uri

__all__ = ["StageRun", "TrackingError", "pipeline_key", "repo_root", "section_params", "stage_inputs",
           "stage_run", "tracking_uri", "training_run"]
