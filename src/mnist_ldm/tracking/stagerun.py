"""`StageRun`: a stage's MLflow run, where every call is safe: the first failure of the store warns once, the stage
goes on, and what it logs meanwhile is sent when the store answers again."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from mnist_ldm.io.errors import first_line
from mnist_ldm.runtime.progress import warn
from mnist_ldm.tracking.store import ENV_DEFAULTS, TAG

RETRY_S = 5.0  # a store that failed is tried again after this, then after twice as long each time, and at the end
RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


def data_tags(meta: Optional[dict]) -> dict[str, str]:
    """The data's source and content hash, from `prepare`'s meta.json."""
    return {TAG + "data_source": str(meta.get("source")), TAG + "data_hash": str(meta.get("content_hash"))} if meta else {}


class StageRun:
    """An MlflowClient bound to one run: `run.set_tag(k, v)` is `client.set_tag(run_id, k, v)`, and so on for each
    client method. `active` is False when tracking is off or the run is a finished one linked to: nothing goes into
    it (the parent is still updated)."""

    def __init__(self, client: Any = None, run_id: Optional[str] = None, parent_id: Optional[str] = None,
                 stage: str = "", uri: str = "", active: bool = True):
        self.client, self.run_id, self.parent_id, self.stage, self.uri = client, run_id, parent_id, stage, uri
        self.active = active and client is not None and run_id is not None
        self.lost: Optional[str] = None  # what failed, while the store is away
        self.pending: list[tuple[str, Callable[..., Any], tuple, dict]] = []  # the writes to send when it is back
        self.wait, self.next_try, self.warned = RETRY_S, 0.0, False
        self.last: dict[str, tuple[int, float]] = {}  # key -> (step, value) last logged to this run
        self.not_finite: set[str] = set()  # keys already warned about

    @property
    def logging(self) -> bool:
        """Whether the store answers (callers skip optional work, such as preview images, if not)."""
        return self.active and not self.lost

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`; None if the store fails (the first failure warns, naming `what`). While it is away
        a write (MLflow's log_*/set_* methods) is kept, to be sent after the writes before it (`retry`), and a read
        gives None."""
        if self.client is None:
            return None
        write = getattr(fn, "__name__", "").startswith(("log_", "set_"))
        if self.lost:
            if write:
                self.pending.append((what, fn, args, kwargs))
            if not self.retry() or write:
                return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any transport or server error: keep training, report once
            if write:
                self.pending.append((what, fn, args, kwargs))
            self.failed(what, e)
            return None

    def failed(self, what: str, e: Exception) -> None:
        if not self.warned:
            warn(f"warning: mlflow: {self.stage}: logging to {self.uri} failed at {what} ({first_line(e, 120)}); "
                 f"the stage goes on and writes its outputs, and sends what it logs meanwhile when the store answers "
                 f"again (tried after {RETRY_S:.0f} s, {2 * RETRY_S:.0f} s, {4 * RETRY_S:.0f} s, ... and at the end)")
        self.wait = self.wait * 2 if self.lost else RETRY_S
        self.lost, self.warned, self.next_try = what, True, time.monotonic() + self.wait

    def retry(self, final: bool = False) -> bool:
        """Send the kept writes, in order, if the store is due to be tried again (always if `final`, with MLflow's
        own retries; else one try, a moment's cost if it is still away); whether the store answers."""
        if self.lost and (final or time.monotonic() >= self.next_try):
            retries = os.environ.get(RETRIES, ENV_DEFAULTS[RETRIES])
            os.environ[RETRIES], sent = retries if final else "0", 0
            try:
                for what, fn, args, kwargs in self.pending:
                    try:
                        fn(*args, **kwargs)
                    except Exception as e:
                        del self.pending[:sent]
                        self.failed(what, e)
                        if final:
                            warn(f"warning: mlflow: {self.stage}: {self.uri} still fails at the stage's end; the "
                                 f"{len(self.pending)} calls kept since the first warning are not sent, and run "
                                 f"{self.run_id} stays RUNNING there")
                        return False
                    sent += 1
            finally:
                os.environ[RETRIES] = retries
            self.pending.clear()
            self.lost = None
            if sent:
                warn(f"mlflow: {self.stage}: {self.uri} answers again; the {sent} calls kept meanwhile were sent")
        return not self.lost

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kw: (self.call(name, getattr(self.client, name), self.run_id, *args, **kw)
                                    if self.active else None)

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0, run_id: Optional[str] = None) -> None:
        """The finite numbers of `metrics` at `step`, to this run or to `run_id` (the parent); a NaN or infinite
        value is dropped with one warning per key."""
        if self.client is None or not (self.active or run_id):
            return
        from mlflow.entities import Metric

        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k in sorted(k for k, v in numbers.items() if not math.isfinite(v) and k not in self.not_finite):
            self.not_finite.add(k)
            warn(f"warning: mlflow: {self.stage}: metric {k} is {numbers[k]}; not logged")
        items = [Metric(k, v, int(time.time() * 1000), step) for k, v in numbers.items() if math.isfinite(v)]
        if run_id is None:
            self.last.update({m.key: (step, m.value) for m in items})
        self.call("metrics", self.client.log_batch, run_id or self.run_id, metrics=items)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], images: Optional[Mapping[str, Any]] = None) -> None:
        """One epoch's numbers at step `epoch`, and its pictures (uint8 HxW or HxWxC); the training loops' callback."""
        self.log_metrics(metrics, step=epoch)
        for key, image in (images or {}).items():
            self.log_image(image, key=key, step=epoch)

    def headline(self, metrics: Mapping[str, Any]) -> None:
        """The stage's final figures, nested ones under DVC's dotted names (`fcd.generated`), at the last step logged
        (a value logged there already is not repeated)."""
        if not self.active:
            return
        from dvc.utils.flatten import flatten

        step = max((s for s, _ in self.last.values()), default=0)
        self.log_metrics({k: v for k, v in flatten(dict(metrics)).items() if self.last.get(k) != (step, v)}, step)

    def log_artifact(self, path: str | Path) -> None:
        if self.active and Path(path).exists():
            self.call(f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path))

    def log_dataset(self, meta: dict, name: str, context: str, path: Path) -> None:
        """The data as an MLflow dataset input, its digest the content hash of `meta.json` (MLflow keeps 36 chars)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        digest = str(meta.get("content_hash", ""))
        source = {"path": str(path), "origin": meta.get("source"),
                  "description": meta.get("description"), "content_hash": digest}
        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps(source),
                          profile=json.dumps({"counts": meta.get("counts", {})}))
        self.log_inputs(datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context),
                                                         InputTag(TAG + "content_hash", digest)])])

    def log_prepared(self, meta: dict, out_dir: Path) -> None:
        """What `prepare` made: data tags (also on the parent), the dataset, its counts and meta.json."""
        from mlflow.entities import RunTag

        tags = [RunTag(k, v) for k, v in data_tags(meta).items()]
        for run_id in ([self.run_id] if self.active else []) + ([self.parent_id] if self.parent_id else []):
            self.call("data tags", self.client.log_batch, run_id, tags=tags)
        self.log_dataset(meta, "mnist-prepared", "prepared", out_dir)
        self.headline({f"{split}_images": n for split, n in meta.get("counts", {}).items()})
        self.log_artifact(out_dir / "meta.json")
