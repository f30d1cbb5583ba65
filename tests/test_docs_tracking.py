"""The blocks of docs/tracking.md (the grid search through `dvc queue`, promoting, the REST client, the DVC
artifact), run as tests/test_readme.py runs README.md's, in a workspace of their own so that the two run side by
side: a copy of `lr_experiments`, the grid search that the MLflow UI and tracking tests read too, run once."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_readme import GROUPS, docs_workspace, run_pages


@pytest.fixture(scope="module")
def workspace(lr_experiments: Path, tmp_path_factory):
    with docs_workspace(lr_experiments, tmp_path_factory.mktemp("docs_tracking")) as ws:
        yield ws


def test_every_tracking_block_runs(workspace):
    assert len(run_pages(GROUPS["tracking"], workspace)) >= 4
