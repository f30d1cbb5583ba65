"""The blocks of the docs pages other than README.md and docs/tracking.md (the command line and the pipeline API of
docs/pipeline.md, ...), run as tests/test_readme.py runs the others, in a workspace of their own so that the two
run side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_readme import GROUPS, doc_files, docs_workspace, run_pages


@pytest.fixture(scope="module")
def workspace(trained_repo: Path, tmp_path_factory):
    with docs_workspace(trained_repo, tmp_path_factory.mktemp("docs")) as ws:
        yield ws


def test_every_block_of_the_other_pages_runs(workspace):
    assert len(run_pages(tuple(f for f in doc_files() if not any(f in g for g in GROUPS.values())), workspace)) >= 2
