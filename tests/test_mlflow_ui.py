"""The MLflow UI in a real browser: two variants of a shrunk pipeline, served by a real `mlflow server`,
found in the runs view, compared side by side, and found in the Model Registry with the champion that
`mnist-ldm promote` chose, the way a user does it; and `mnist-ldm ui`, whose printed runs address opens,
in a fresh browser profile, the runs table of both variants with their changed param and FCD, and whose
compare address opens the charts of both, an FCD first.

The browser is Debian's `chromium` package driven by Playwright (never a downloaded browser build);
without it the module is skipped. Screenshots go to a temporary folder (printed); with
`MLFLOW_UI_SCREENSHOTS=docs` the three that docs/tracking.md shows are also copied there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest
import yaml

import conftest
from conftest import BIN, LR_VARIANTS, copy_repo, free_port, run

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium): no browser for the MLflow UI test",
                allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from mnist_ldm.tracking.runs import PARENT_METRICS  # noqa: E402

EXPERIMENT = "mnist-ldm"
VARIANTS = LR_VARIANTS  # DVC experiment name -> diffusion.lr
FCD = "eval.fcd.generated"
# MLflow 3.17's UI takes the experiment kind from this switch, not from the experiment's tag
RUNS_VIEW = "?workflowType=machine_learning"
TIMEOUT_MS = 60_000  # a page of the UI on two busy cores
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def server(lr_experiments, tmp_path_factory):
    """A real `mlflow server` on a copy of the variants' sqlite store (`srv.db`); the repository they ran in is
    `repo` beside it."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    (copy_repo(lr_experiments, root / "repo") / "mlflow.db").rename(root / "srv.db")
    server = conftest.MlflowServer(root)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def logged(lr_experiments, server):
    """Two `dvc exp run -S diffusion.lr=...` of a shrunk pipeline (its store holds only the variants) served by
    the server, and `mnist-ldm promote`: (uri, experiment, what promote printed)."""
    server.wait_healthy()
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=server.uri).get_experiment_by_name(EXPERIMENT)
    yield server.uri, exp, (lr_experiments.parent / "promoted.txt").read_text()


@pytest.fixture(scope="module")
def parents(logged) -> dict:
    """DVC experiment name -> its parent run, read back through the server."""
    from mlflow import MlflowClient

    uri, exp, _ = logged
    runs = MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id], "tags.`mnist_ldm.kind` = 'pipeline'")
    return {r.info.run_name: r for r in runs}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    print(f"\nMLflow UI screenshots: {folder}")
    target = os.environ.get("MLFLOW_UI_SCREENSHOTS")
    if target:
        dest = conftest.REPO / target
        for name in ("mlflow_runs.png", "mlflow_compare.png", "mlflow_registry.png"):
            if (folder / name).exists():
                shutil.copy(folder / name, dest / name)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 720})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    yield pg
    context.close()


def close_assistant(pg: Page) -> None:
    """The assistant panel takes a third of the width; a user closes it once."""
    button = pg.get_by_role("button", name="Close", exact=True)
    if button.count():
        button.first.click()


def toggle_columns(pg: Page, names: tuple[str, ...]) -> None:
    """Tick (or untick) columns of the runs table in its *Columns* menu."""
    pg.get_by_role("button", name="Columns").click()
    search = pg.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        node = pg.locator("[class*=tree-treenode]", has=pg.get_by_text(name, exact=True))
        node.locator("[class*=tree-checkbox]").first.click()
    pg.keyboard.press("Escape")


def plot_metric(pg: Page, key: str) -> None:
    """Make `key` the one metric axis of the compare view's parallel-coordinates plot."""
    select = pg.get_by_text("Metrics:", exact=True).locator("xpath=following-sibling::div[1]")
    chips = select.locator("[class*=selection-item-content]")
    expect(chips.first).to_be_visible()
    if not chips.filter(has_text=key).count():  # picking an axis that is already there would drop it
        box = select.bounding_box()
        select.click(position={"x": box["width"] - 40, "y": box["height"] / 2})  # not on a chip's remove cross
        pg.keyboard.type(key)
        option = pg.locator("[class*=select-item-option]").filter(has_text=re.compile(rf"^{re.escape(key)}$")).first
        expect(option).to_be_visible()  # on two busy cores the list can lag the typing: pick the option itself
        option.click()
        pg.keyboard.press("Escape")
    expect(chips.filter(has_text=key)).to_have_count(1)
    for chip in select.locator("span[class$=-select-selection-item]").filter(has_not_text=key).all():
        chip.locator("[class*=item-remove]").click()
    expect(select.locator("[class*=selection-item-content]")).to_have_text([key])


def shown_number(value: float) -> str:
    """How the MLflow UI writes a metric: rounded to 3 decimals."""
    return f"{round(value, 3):g}"


# --------------------------------------------------------------------------- what the parent runs carry

def test_parent_runs_carry_params_and_results_not_sizes(logged, parents):
    uri, exp, _ = logged
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert set(parents) == set(VARIANTS), f"parent runs: {sorted(parents)}"
    for name, lr in VARIANTS.items():
        data = parents[name].data
        assert data.params["diffusion.lr"] == lr and data.tags["mnist_ldm.dvc_exp_name"] == name
        assert FCD in data.metrics and "autoencoder.test_bce" in data.metrics and "eval.prdc.recall" in data.metrics
        assert set(data.metrics) <= set(PARENT_METRICS), sorted(data.metrics)  # results, never a size
        note = data.tags["mlflow.note.content"]  # what differs from the baseline, in the run's description
        assert name in note and "`diffusion.lr`" in note and f"-> {lr}" in note, note


# --------------------------------------------------------------------------- the browser

def test_runs_view_lists_both_variants_with_their_lr_and_fcd(logged, parents, page, shots):
    uri, exp, _ = logged
    page.goto(f"{uri}/#/experiments/{exp.experiment_id}{RUNS_VIEW}")
    for name in VARIANTS:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    assert re.search(rf"#/experiments/{exp.experiment_id}/runs\b", page.url), page.url  # not .../overview (GenAI)
    expect(page.get_by_text("Token Usage")).to_have_count(0)
    close_assistant(page)

    # the parents carry no dataset, source or model (their stages' runs do): room for what differs
    toggle_columns(page, ("Dataset", "Source", "Models", "diffusion.lr", FCD, "diffusion.test_loss"))
    expect(page.get_by_role("columnheader", name=FCD).first).to_be_visible()

    for name, lr in VARIANTS.items():
        [index] = page.locator("[role=row]").evaluate_all(
            "(rows, name) => rows.flatMap(r => r.innerText.includes(name) ? [r.getAttribute('row-index')] : [])",
            name)
        cells = " ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts())
        assert lr in cells.split() and str(parents[name].data.metrics[FCD]) in cells, (name, cells)


def test_compare_view_shows_both_lr_values_and_the_fcd(logged, parents, page):
    uri, exp, _ = logged
    page.set_viewport_size({"width": 1400, "height": 1500})
    page.goto(f"{uri}/#/experiments/{exp.experiment_id}{RUNS_VIEW}")
    close_assistant(page)
    for name in VARIANTS:  # tick both parents, press Compare
        row = page.locator("[role=row]", has=page.get_by_role("link", name=name, exact=True))
        row.get_by_role("checkbox", name=re.compile("row selection")).check()
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible()
    assert "#/compare-runs?runs=" in page.url, page.url
    runs = json.loads(parse_qs(unquote(page.url).split("?", 1)[1])["runs"][0])
    assert sorted(runs) == sorted(r.info.run_id for r in parents.values()), page.url
    close_assistant(page)

    expect(page.get_by_text("Parallel Coordinates Plot")).to_be_visible()
    axis = page.inner_text("body").split("Metrics:", 1)[1].split("Clear All", 1)[0].strip()
    assert axis in PARENT_METRICS, f"the parallel-coordinates plot starts on a size: {axis}"
    plot_metric(page, FCD)  # the default is the first metric the first-ticked run received

    page.get_by_text("Run details", exact=True).click()  # collapsed: the params and metrics come up
    for switch in page.get_by_role("switch").all()[:2]:  # "Show diff only" for params and metrics
        switch.click()
    body = page.inner_text("body")
    params = body.split("Parameters\nShow diff only", 1)[1].split("Metrics\nShow diff only", 1)[0]
    metrics = body.split("Metrics\nShow diff only", 1)[1].split("Artifacts", 1)[0]
    assert "diffusion.lr" in params and all(lr in params.split() for lr in VARIANTS.values()), params
    assert FCD in metrics, metrics
    for parent in parents.values():
        shown = shown_number(parent.data.metrics[FCD])
        assert shown in metrics.split(), (shown, metrics)


def test_registry_page_lists_a_version_per_variant_and_the_champion(logged, page, shots):
    from mlflow import MlflowClient

    uri, exp, promoted = logged
    client = MlflowClient(tracking_uri=uri)
    versions = {v.tags["dvc_experiment"]: v for v in client.search_model_versions(f"name='{EXPERIMENT}'")}
    assert set(versions) == set(VARIANTS), sorted(versions)
    for name, version in versions.items():  # a handful of tags; the headline in the description
        assert len(version.tags) <= 8 and version.description.startswith("FCD "), (version.tags, version.description)
        assert f"`{name}`" in version.description and "`diffusion.lr` " in version.description
        assert f"-> {VARIANTS[name]}" in version.description, version.description
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    best = min(versions.values(), key=lambda v: (float(v.tags["fcd.generated"]), -int(v.version)))
    assert champion.version == best.version and f"version {best.version} " in promoted, promoted

    page.set_viewport_size({"width": 1400, "height": 1400})  # each version lists a dozen tags
    page.goto(f"{uri}/#/models/{EXPERIMENT}")
    close_assistant(page)
    for name, version in versions.items():
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version.version}", exact=True))
        expect(row).to_contain_text(re.compile(rf"dvc_experiment\s*:\s*{re.escape(name)}"))
        expect(row).to_contain_text("fcd.generated")
    expect(page.get_by_role("row").filter(has_text="@ champion")).to_contain_text(f"Version {champion.version}")
    bottom = page.get_by_text("Previous", exact=True).bounding_box()["y"] - 8  # the versions table's end
    page.screenshot(path=shots / "mlflow_registry.png", clip={"x": 0, "y": 0, "width": 1400, "height": bottom})


# --------------------------------------------------------------------------- mnist-ldm ui

def printed_addresses(proc: subprocess.Popen, out: Path, timeout: float = 240) -> dict[str, str]:
    """What `mnist-ldm ui` printed once it printed its last address: {"runs": url, "compare": url, "model": url}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text()
        if re.search(r"^model: ", text, re.M):
            return dict(re.findall(r"^(runs|compare|model):\s+(\S+)", text, re.M))
        assert proc.poll() is None, f"mnist-ldm ui exited {proc.returncode}:\n{text}"
        time.sleep(0.5)
    raise AssertionError(f"mnist-ldm ui printed no addresses in {timeout} s:\n{out.read_text()}")


def test_mnist_ldm_ui_opens_the_runs_table_of_both_variants(logged, parents, server, browser, tmp_path, shots):
    uri, exp, _ = logged
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = conftest.test_env(MLFLOW_TRACKING_URI=f"sqlite:///{server.db}")  # the store of both variants' runs
    out, err = tmp_path / "ui.out", tmp_path / "ui.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([str(BIN / "mnist-ldm"), "ui", "--port", str(port)], cwd=server.db.parent / "repo",
                                env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    try:
        urls = printed_addresses(proc, out)
        runs = f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        assert urls["runs"] == f"{runs}&viewStateShareKey=mnist-ldm-runs", urls
        assert urls["compare"] == f"{runs}&viewStateShareKey=mnist-ldm-compare&compareRunsMode=CHART", urls
        assert urls["model"] == f"{base}/#/models/{EXPERIMENT}", urls

        page = fresh_page(browser, 1400, 720)  # the runs table: each variant's lr and FCD, without a click
        page.goto(urls["runs"])
        for name in VARIANTS:
            expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        expect(page.get_by_text("Token Usage")).to_have_count(0)
        for column in ("diffusion.lr", FCD, "eval.second_evaluator.fcd.generated"):
            expect(page.get_by_role("columnheader", name=column, exact=True).first).to_be_in_viewport()
        rows = page.locator("[role=row]").filter(has=page.get_by_role("link"))
        for name, lr in VARIANTS.items():
            row = rows.filter(has=page.get_by_role("link", name=name, exact=True)).first
            index = row.get_attribute("row-index")
            cells = " ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts())
            assert lr in cells.split() and str(parents[name].data.metrics[FCD]) in cells, (name, cells)
        expect(rows).to_have_count(len(VARIANTS))  # the pipeline runs only, lowest FCD first
        assert [n for n in page.locator("[role=row] a").all_inner_texts() if n in VARIANTS] == sorted(
            VARIANTS, key=lambda n: parents[n].data.metrics[FCD])
        page.screenshot(path=shots / "mlflow_runs.png")
        page.context.close()

        page = fresh_page(browser, 1400, 900)  # the charts of both: the FCD first
        page.goto(urls["compare"])
        expect(page.get_by_text("FCD (lower is better)")).to_be_visible()
        charts = page.inner_text("body").split("FCD (lower is better)", 1)[1]
        first = next(line.strip() for line in charts.splitlines() if line.strip().startswith(("eval.", "second")))
        assert first == FCD, charts[:500]
        for name in VARIANTS:
            expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        page.screenshot(path=shots / "mlflow_compare.png")
        page.context.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
    assert proc.returncode in (0, 130) and "Traceback" not in err.read_text(), (proc.returncode, err.read_text())
    with pytest.raises(OSError):  # the server it started is gone with it
        urllib.request.urlopen(base + "/health", timeout=5)


def fresh_page(browser, width: int, height: int) -> Page:
    """A page in a browser context of its own: a fresh profile, nothing remembered."""
    pg = browser.new_context(viewport={"width": width, "height": height}).new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    return pg


# the curve charts of dvc.yaml, top-level and the stages' own plots outputs (name -> title)
DVC_YAML = yaml.safe_load((conftest.REPO / "dvc.yaml").read_text())
CURVES = DVC_YAML["plots"] + [p for s in DVC_YAML["stages"].values() for p in s.get("plots", [])]
CURVE_TITLES = {next(iter(p)): p[next(iter(p))]["title"] for p in CURVES if isinstance(p, dict)}


def test_dvc_plots_diff_overlays_both_experiments_curves_offline(logged, server, page, shots):
    """`dvc plots diff <exp-a> <exp-b>` draws each training curve once, with both experiments' lines, from the
    vendored Vega of .dvc/plots_offline.html: the page loads nothing but itself."""
    repo = server.db.parent / "repo"
    out = repo.parent / "plots-diff"
    run([str(BIN / "dvc"), "plots", "diff", *VARIANTS, "-o", str(out)], repo)
    history = json.loads((repo / "plots/curves/diffusion.json").read_text())
    assert history and {"epoch", "train_loss", "test_loss", "test_loss_ema", "lr"} <= set(history[0])
    requested = []
    page.route("**/*", lambda route: (requested.append(route.request.url), route.continue_()
                                      if route.request.url.startswith("file:") else route.abort()))
    page.goto((out / "index.html").as_uri())
    page.wait_for_function(f"window.dvcPlotViews && window.dvcPlotViews.length >= {len(CURVE_TITLES)}")
    charts = page.evaluate("""() => Array.from(document.querySelectorAll('.vega-embed svg.marks')).map(svg => ({
        text: Array.from(svg.querySelectorAll('text')).map(t => t.textContent),
        lines: svg.querySelectorAll('path[aria-roledescription="line mark"]').length}))""")
    for name, title in CURVE_TITLES.items():
        drawn = [c for c in charts if title in c["text"]]
        assert len(drawn) == 1, (name, title, [c["text"][-1] for c in charts])
        assert set(VARIANTS) <= set(drawn[0]["text"]) and drawn[0]["lines"] >= len(VARIANTS), (name, drawn[0])
    assert requested and all(u.startswith(out.as_uri() + "/") for u in requested), requested  # no CDN: the page
    # and its own PNGs only
    page.screenshot(path=str(shots / "dvc_plots_diff.png"), full_page=True)
