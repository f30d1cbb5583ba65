"""MLflow tracking for the pipeline: one parent run per pipeline state, one child run per stage executed.

* `store.py`: where runs go: `MLFLOW_TRACKING_URI`, else `<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`
  (`<repo>` is the origin repository also inside `dvc exp run --temp` and `dvc queue` copies; a repository moved
  or copied with its store has its artifact locations re-pointed to itself).
* `identity.py`: what identifies a run: the parent's key hashes every param and the pipeline's sources (code,
  raw data), so the stages of one `dvc repro` find the same parent, and `dvc repro -f` finds it again; a
  child's hash covers the stage's deps and params (as `dvc.lock` records them), its params and command line;
  which stages are current (their `dvc.lock` entry matches the workspace), so only their figures reach the parent.
* `runs.py`: opening the runs. A stage re-executed with identical inputs links to the finished child run,
  an interrupted one is continued. The parent holds every param and the numbers of every metrics file
  dvc.yaml lists (`<file stem>.<key>`, the evaluation's headline first); sizes (parameter and image counts)
  are tags `mnist_ldm.size.<file stem>.<key>`, as MLflow's compare view plots a run's first metric.
* `stagerun.py`: `StageRun`, what a stage logs. If the server does not answer when a stage starts, the stage
  fails before any work; if it stops answering, the stage goes on and one warning says what was not
  logged. NaN and infinite metrics are never sent (one warning per key).
* `registry.py`: the packaged generator as a registered model version; `promote`.
"""

from .identity import pipeline_key, section_params, stage_inputs
from .runs import stage_run, training_run
from .stagerun import StageRun
from .store import TrackingError, repo_root, tracking_uri

__all__ = ["StageRun", "TrackingError", "pipeline_key", "repo_root", "section_params", "stage_inputs",
           "stage_run", "tracking_uri", "training_run"]
