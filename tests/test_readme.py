"""Every command block of the README and of the pages in docs/, run in order on a shrunk copy of the
trained pipeline, so a documented command that breaks fails `make test`; and every relative link or
image in them points to a file that exists.

Each ```bash block runs as one bash script (`set -euo pipefail`) and each ```python block as one
Python program, in the repository, one after another in the docs' order: README.md's here (the variants,
`mnist-ldm ui`, a teammate's push/clone/pull/infer, promoting, loading and serving the registered model),
docs/tracking.md's in tests/test_docs_tracking.py (the grid search through `dvc queue`, the Python REST client,
the DVC artifact) and the other pages' in tests/test_docs_api.py (the command line and the pipeline API), each in a
workspace of its own. What this machine cannot do is in `NOT_HERE`, with the reason; what a test must change in a
block (a free port instead of 5001, a local folder instead of an S3 bucket) is in `EDITS`, what a block needs
from an earlier page's in `NEEDS`, and a block whose result other tests read too (run once by a session fixture
whose copy is its page's workspace) in `SHARED`, each with the reason. Each entry must still match a block of one
of the files: a stale one fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BIN, REPO, SERVER_JOBS, copy_repo, first_build, free_port, run
from conftest import test_env as user_env
from mnist_ldm.config.params_file import load_params

FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
ANY_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# the pages of docs/, in the order their blocks run (after README.md's): each page must be listed
DOCS = ["tracking.md", "pipeline.md", "results.md", "hardware.md", "troubleshooting.md", "testing.md", "team.md"]

# first line of a block -> why it does not run here
NOT_HERE = {
    "mkdir -p data/raw/mnist": "copies the full MNIST IDX files from ../shared, which this shrunk copy does not have "
                               "(it uses the bundled subset); tests/test_data.py parses IDX files",
    "make baseline": "runs `dvc repro` with the committed params.yaml, as the trained_repo fixture does (on shrunk "
                     "params), and stages what `git add -A` stages here",
    "make run": "`make test` is what CI runs (this test is part of it); `make run` is `make install` plus "
                "`dvc repro`, which the trained_repo fixture runs",
    "MNIST_LDM_DEVICE=cuda dvc repro": "needs a CUDA GPU; tests/test_distributed.py runs --device and torchrun on CPU",
    "dvc exp run -n gpu-set": "the second set of values: about 55 minutes of training on 2 CPU cores; the same "
                              "`dvc exp run -S` runs in the variants block",
    "MNIST_LDM_NPROC=4 MNIST_LDM_DEVICE=cuda dvc repro": "needs 4 CUDA GPUs; tests/test_distributed.py runs 2 CPU ranks",
    "torchrun --nnodes 2": "needs two machines",
    "dvc exp run -n mlp-ae -S autoencoder.kind=mlp": "tests/test_variants.py runs both lines on its own copy of the "
                                                     "trained pipeline (here they would leave the workspace in pixel "
                                                     "space for the blocks after it)",
}

# first line of a block -> (README text, what runs instead, why)
EDITS = {
    "dvc exp run --queue -n lr -S 'diffusion.lr=1e-4,2e-4,4e-4'": [
        ("diffusion.lr=1e-4,2e-4,4e-4", "diffusion.lr=1e-4,2e-4",
         "two values go through the same queue and worker; each value is one more whole experiment")],
    "export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db": [("5001", "{port_a}", "a free port")],
    "import json, urllib.request": [("5001", "{port_a}", "the server above, on its free port")],
    "gto register mnist-ldm-generator": [("<repo-url>", "{origin}", "the repository's git remote"),
                                         ("5001", "{port_b}", "a free port")],
    "mnist-ldm train-ae --data data/prepared": [
        ("--epochs 100 --generate-images", "--epochs 3 --generate-images",
         "the reference design's 100 epochs log 100 image grids: 3 exercise the same flags"),
        ("--epochs 30 --generate-images", "--epochs 3 --generate-images", "likewise, 30 DDIM preview grids"),
        ("mnist-ldm infer ...", "mnist-ldm infer --ckpt models/diffusion.pt --ae-ckpt models/autoencoder.pt",
         "the flags the first infer line spells out"),
        ("mnist-ldm infer --ckpt models/diffusion.pt --ae-ckpt models/autoencoder.pt --digit 7 --guidance 3",
         "! mnist-ldm infer --ckpt models/diffusion.pt --ae-ckpt models/autoencoder.pt --digit 7 --guidance 3 "
         "2> digit.err && grep -q '^error: .*conditional' digit.err",
         "the model trained just above is unconditional: the line must fail with one clear error"),
        ("--set sample.eta=0 infer ...", "--set sample.eta=0 infer --ckpt models/diffusion.pt "
         "--ae-ckpt models/autoencoder.pt", "the flags the first infer line spells out")],
    "dvc remote add -d storage s3://my-bucket/mnist-ldm": [
        ("s3://my-bucket/mnist-ldm", "{storage}", "a local folder: no S3 bucket here (tests/test_remotes.py "
                                                  "round-trips the S3 API on a local SeaweedFS server)"),
        ("dvc remote modify storage endpointurl https://s3.example.com", "true", "an S3-only option")],
    "git clone -q <repo-url> ../bob": [("<repo-url>", "{origin}", "the repository's git remote")],
    "git clone <repo-url> mnist-ldm-2": [
        ("<repo-url>", "{origin}", "the repository's git remote"),
        (" && make install && source .venv/bin/activate", "", "this test runs in the installed environment")],
}

SERVER = re.compile(r"^((?:mlflow (?:ui|server|models serve)|mnist-ldm ui)\b.*)$", re.M)
PREAMBLE = r"""set -euo pipefail
serve() {  # a server line of the README: start it in the background and wait until it answers
  local port=$1; shift
  setsid "$@" >> "$SERVER_LOG" 2>&1 < /dev/null &
  echo $! >> "$SERVER_PIDS"
  for _ in $(seq 360); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
    sleep 0.5
  done
  echo "$* did not answer on port $port" >&2; return 1
}
"""


@dataclass
class Block:
    lang: str
    file: str
    line: int
    text: str

    @property
    def first(self) -> str:
        return self.text.strip().splitlines()[0].split("  #")[0].strip()


    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[str]:
    """README.md, then the pages of docs/ in `DOCS` order (paths relative to the repository)."""
    return ["README.md", *(f"docs/{name}" for name in DOCS)]


def readme_blocks() -> list[Block]:
    blocks = []
    for rel in doc_files():
        text = (REPO / rel).read_text()
        blocks += [Block(m.group(1), rel, text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text)]
    return blocks


def key_of(block: Block, table: dict) -> str | None:
    return next((k for k in table if block.first.startswith(k)), None)


def prepared(block: Block, values: dict[str, str]) -> str:
    text = block.text
    for old, new, why in EDITS.get(key_of(block, EDITS), []):
        assert old in text, f"{block.where}: EDITS expects {old!r} ({why}); update the test"
        text = text.replace(old, new.format(**values))
    if block.lang == "bash":
        def background(m: re.Match) -> str:
            command = m.group(1).split("  #")[0].strip()
            port = re.search(r"(?:-p|--port) (\d+)", command)
            if not port:
                command += f" {'--port' if command.startswith('mnist-ldm') else '-p'} {values['port_ui']}"
            return f"serve {port.group(1) if port else values['port_ui']} {command}"
        text = PREAMBLE + SERVER.sub(background, text)
    return text


@contextlib.contextmanager
def docs_workspace(trained_repo: Path, root: Path):
    """A copy of the trained shrunk repository (tracking on: its own sqlite store) with a git remote
    `origin` and a local DVC remote, as a user's clone has; the servers the README starts are stopped
    at the end."""
    repo = copy_repo(trained_repo, root / "repo")
    origin, team = root / "origin.git", root / "dvc-remote"
    values = {"origin": str(origin), "storage": str(root / "storage"), "port_a": str(free_port()),
              "port_b": str(free_port()), "port_ui": str(free_port())}
    env = user_env(SERVER_LOG=str(root / "servers.log"), SERVER_PIDS=str(root / "servers.pids"),
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=SERVER_JOBS)  # as the README's tip says
    for cmd in (["git", "init", "-q", "--bare", "-b", "main", str(origin)], ["git", "remote", "add", "origin", str(origin)],
                [str(BIN / "dvc"), "remote", "add", "-d", "team", str(team)], ["git", "add", "-A"],
                ["git", "commit", "-qm", "trained", "--allow-empty"], ["git", "push", "-q", "-u", "origin", "main"],
                [str(BIN / "dvc"), "push", "-q"]):
        run(cmd, repo, env=env)
    try:
        yield repo, values, env
    finally:
        pids = root / "servers.pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            try:
                os.killpg(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def workspace(trained_repo: Path, tmp_path_factory):
    with docs_workspace(trained_repo, tmp_path_factory.mktemp("readme")) as ws:
        yield ws


def run_block(block: Block, repo: Path, values: dict, env: dict) -> subprocess.CompletedProcess:
    script = prepared(block, values)
    args = ["bash", "-c", script] if block.lang == "bash" else [str(BIN / "python"), "-c", script]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    print(f"{block.where} {block.first[:60]!r}: {time.monotonic() - start:.0f} s")
    assert proc.returncode == 0, (f"{block.where} ({block.first}) exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


# first line of a block -> the session fixture of tests/conftest.py that runs it once (through `run_grid`) for the
# tests that read what it leaves, and whose copy is the workspace of the page's later blocks
SHARED = {"dvc exp run --queue -n lr -S": "lr_experiments: the MLflow UI and tracking tests read the same two "
                                          "experiments, their runs and their registered versions"}


def run_grid(repo: Path, env: dict) -> None:
    """docs/tracking.md's grid search (the block `SHARED` names, with its `EDITS`) in `repo`, until the queue has
    finished: one MLflow parent run per value, with the params of the commit it started from and that value."""
    [block] = [b for b in readme_blocks() if key_of(b, SHARED)]
    base = logged_params(repo / "params.yaml")  # what a queued variant starts from
    run_block(block, repo, {}, env)
    wait_for_queue(repo, env)
    grid = re.search(r"diffusion\.lr=([\d.e,-]+)", prepared(block, {})).group(1).split(",")
    for lr in grid:
        assert parents_like(repo, {**base, "diffusion.lr": str(float(lr))}) == 1, f"diffusion.lr={lr}"


def wait_for_queue(repo: Path, env: dict) -> None:
    """`dvc queue start` returns at once; a user waits until `dvc queue status` has nothing left to run."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = run([str(BIN / "dvc"), "queue", "status"], repo, env=env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            assert "Failed" not in status, status
            return
        time.sleep(5)
    raise AssertionError(f"the queue did not finish in 15 minutes:\n{status}")


def logged_params(params_file: Path) -> dict[str, str]:
    """The params of `params_file` the way a parent run holds them (`section.key` -> str)."""
    return {k: str(v) for k, v in load_params(params_file).flat().items()}


def parents_like(repo: Path, params: dict[str, str]) -> int:
    """How many MLflow parent runs hold exactly these params (every key both sides have)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mnist-ldm")
    runs = client.search_runs([exp.experiment_id], "tags.`mnist_ldm.kind` = 'pipeline'", max_results=1000)
    return sum(all(v == params[k] for k, v in r.data.params.items() if k in params) for r in runs)


VARIANT = re.compile(r"^dvc exp run --queue -n (\S+)((?: -S [\w.]+=[^\s,']+)+)\s", re.M)  # one value per key


def check_variants(block_text: str, repo: Path, env: dict) -> None:
    """After the README's variants ran from the committed baseline: each differs from HEAD in exactly the params it
    set, `dvc metrics diff` has a HEAD column of numbers, and `dvc exp show` as the README runs it has the changed
    params and both evaluators' FCD among its first 10 columns."""
    dvc = str(BIN / "dvc")
    variants = {m.group(1): {s.split("=")[0] for s in m.group(2).split(" -S ")[1:]}
                for m in VARIANT.finditer(block_text)}
    assert len(variants) >= 2, block_text
    for name, keys in variants.items():
        diff = json.loads(run([dvc, "params", "diff", "HEAD", name, "--json"], repo, env=env).stdout)
        assert set(diff.get("params.yaml", {})) == keys, (name, diff)
        metrics = json.loads(run([dvc, "metrics", "diff", "HEAD", name, "--json"], repo, env=env).stdout)
        head = {k: v["old"] for k, v in metrics["metrics/eval.json"].items()}
        assert isinstance(head.get("fcd.generated"), float), (name, head)
        assert all(isinstance(v, (int, float)) for v in head.values()), (name, head)
    show = re.search(r"^dvc exp show .*?(?<!\\)$", block_text, re.M | re.S).group(0)
    table = run(["bash", "-c", show], repo, env={**env, "COLUMNS": "1000"}).stdout
    header = next(line.split() for line in table.splitlines() if "Experiment" in line)
    changed = set().union(*variants.values())
    assert changed | {"fcd.generated", "second_evaluator.fcd.generated"} <= set(header[:10]), header
    assert all(f"[{name}]" in table for name in variants) and "workspace" in table, table


def test_every_exception_names_a_block_of_the_docs():
    firsts = [b.first for b in readme_blocks()]
    for table in (NOT_HERE, EDITS, NEEDS, SHARED):
        for key in table:
            assert any(f.startswith(key) for f in firsts), f"no block of {doc_files()} starts with {key!r}; update the test"


def test_every_docs_page_has_its_place_in_the_order():
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert pages == sorted(DOCS), f"docs/*.md {pages} against DOCS {DOCS}: list each page once in DOCS"


def test_every_relative_link_and_image_exists():
    broken = []
    for rel in doc_files():
        # a link-like text in a code block is no link (blanked line for line, so line numbers hold)
        text = ANY_FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), (REPO / rel).read_text())
        for m in LINK.finditer(text):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor in the page, or a URL
                continue
            if not ((REPO / rel).parent / target).exists():
                broken.append(f"{rel}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


# Each group of pages runs in a workspace of its own, on its own worker: README.md here, docs/tracking.md in
# tests/test_docs_tracking.py, docs/team.md in tests/test_team.py, the other pages in tests/test_docs_api.py.
GROUPS = {"readme": ("README.md",), "tracking": ("docs/tracking.md",), "team": ("docs/team.md",)}

# first line of a block -> what it needs that an earlier page's block provides when the docs are read in order, and
# the bash that provides it when that page runs in another workspace
NEEDS = {"import json, urllib.request": (
    "README.md's `mlflow models serve` of the champion on port 5001",
    "serve {port_a} env MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db mlflow models serve -m models:/mnist-ldm@champion "
    "--env-manager local -p {port_a}")}


def run_pages(pages: tuple[str, ...], workspace) -> list[str]:
    """Run every block of `pages` (in the docs' order) that this machine can run; their first lines."""
    repo, values, env = workspace
    ran = []
    for block in readme_blocks():
        if key_of(block, NOT_HERE) or block.file not in pages:
            continue
        if key_of(block, SHARED):  # ran in the fixture this workspace is a copy of
            ran.append(block.first)
            continue
        need = key_of(block, NEEDS)
        if need and "README.md" not in pages:
            run_block(Block("bash", block.file, block.line, NEEDS[need][1].format(**values) + "\n"), repo, values, env)
        proc = run_block(block, repo, values, env)
        ran.append(block.first)
        if VARIANT.search(block.text):
            check_variants(block.text, repo, env)
        if block.first.startswith("dvc exp apply"):  # the README's way back to the baseline
            assert not run(["git", "status", "--porcelain", "--untracked-files=no"], repo, env=env).stdout
            assert "up to date" in run([str(BIN / "dvc"), "status"], repo, env=env).stdout
        if "mlflow models serve -m models:/" in block.text:
            assert '"predictions"' in proc.stdout and "HTTP 400" in proc.stdout, proc.stdout[-2000:]
        if block.first.startswith("import json, urllib.request"):
            assert (repo / "digits.png").stat().st_size > 0
        if block.first.startswith("git clone <repo-url>"):
            clone = repo / "mnist-ldm-2"
            assert "Data and pipelines are up to date." in proc.stdout and (clone / "digits.png").exists()
    return ran


def test_every_readme_block_runs(workspace):
    assert len(run_pages(GROUPS["readme"], workspace)) >= 7


def test_the_last_stage_names_the_ui_command(trained_repo):
    """`dvc repro`'s last stage line tells the user how to open the runs (the README shows it)."""
    stdout, _ = first_build(trained_repo)
    lines = [line for line in stdout.splitlines() if line.startswith("package_model:")]
    assert lines and lines[-1].endswith("mnist-ldm ui"), stdout[-2000:]
    assert lines[-1] in (REPO / "README.md").read_text(), lines[-1]


def test_make_run_ends_with_the_summary(trained_repo):
    """`make run` ends with `mnist-ldm summary`: the data, FCD against its floor in both evaluators, the registered
    version and the next commands, among them README.md's comparison as the README spells it."""
    from conftest import cli
    from mnist_ldm.commands.summary import COMPARE

    run_target = re.search(r"^run:.*?\n\n", (REPO / "Makefile").read_text(), re.M | re.S).group(0)
    assert run_target.strip().splitlines()[-1].strip().endswith("mnist-ldm summary"), run_target
    out = cli("summary", cwd=trained_repo).stdout
    assert re.search(r"data: +300 train / 100 test images from bundled", out), out
    assert len(re.findall(r"\d\.\d{3} = \d+\.\d\dx (the autoencoder's|its) floor", out)) == 2, out
    assert "model:     models:/mnist-ldm/1" in out, out
    assert "source .venv/bin/activate" in out and "mnist-ldm ui" in out and COMPARE in out, out
    assert COMPARE in (REPO / "README.md").read_text().replace(" \\\n  ", " ")
