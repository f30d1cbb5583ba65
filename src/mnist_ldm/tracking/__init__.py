"""MLflow tracking: one parent run per pipeline state, one child run per stage executed (docs/tracking.md). Not a
code dep of any stage: it decides how a run is logged, never what a stage writes."""

from mnist_ldm.tracking.runs import section_params, stage_run, training_run
from mnist_ldm.tracking.stagerun import StageRun
from mnist_ldm.tracking.store import TrackingError, connect, repo_root, tracking_uri

__all__ = ["StageRun", "TrackingError", "connect", "repo_root", "section_params", "stage_run", "tracking_uri",
           "training_run"]
