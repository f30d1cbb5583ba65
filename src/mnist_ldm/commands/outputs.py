"""What a finished command writes: which torchrun rank writes the outputs, and a stage's metrics file,
headline and artifacts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ..atomic import write_json
from ..hashing import arrays_digest

if TYPE_CHECKING:
    from ..device import Runtime


def weights_digest(model) -> str:
    """The sha256 of a model's weights (checkpoints record it; torchrun ranks print it to show they agree)."""
    return arrays_digest((t.detach().cpu().numpy() for t in model.state_dict().values()), shapes=False)


def writes_outputs(rt: "Runtime", name: str, model) -> bool:
    """Whether this process writes the stage's outputs (rank 0 only); every rank of a torchrun job
    prints the hash of its final weights, which must agree."""
    if rt.dist.world > 1:
        print(f"{name}: rank {rt.dist.rank}/{rt.dist.world} final weights {weights_digest(model)[:16]}", file=sys.stderr)
    return rt.dist.main


def publish(run, final: dict, metrics_path: Path, artifacts: Sequence[Path], metrics_file: Optional[dict] = None,
            curves: Optional[Path] = None, history: Sequence[dict] = ()) -> None:
    """A finished stage: write its metrics file (`metrics_file`, else `final`) and, for a training stage, its
    per-epoch `history` as `curves` (the data `dvc plots` draws); log `final` as its headline, and the files."""
    write_json(metrics_path, final if metrics_file is None else metrics_file)
    if curves is not None:
        write_json(curves, list(history))
    run.headline(final)
    for path in [*artifacts, *([curves] if curves is not None else [])]:
        run.log_artifact(path)
