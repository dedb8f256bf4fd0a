"""A real browser on the MLflow UI and on the report: Debian's chromium, headless, driven by playwright.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the `playwright` PyPI package (the dev
extra); playwright's own browser download is never used. Skipped, naming what is missing, otherwise.
Screenshots go to the test's tmp dir, or to $HELIX_SCREENSHOTS when set (CI keeps them).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helix_sweep.report.loading import load_sweep
from helix_sweep.report.page import write_report
from helix_sweep.report.tables import pct
from helix_sweep.sweep.runs import ensure_parent_runs, update_parent_aggregates
from mlflow_server import log_trial, mlflow_server  # noqa: F401  (fixture)

CHROMIUM = os.environ.get("HELIX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"browser test needs chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test needs the playwright package (pip install playwright; "
                    "its browser download is not needed)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=120_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    d = Path(os.environ.get("HELIX_SCREENSHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _smoke_sweep(client, eid) -> dict:
    """A finished two-variant sweep: a 2-fold task and a single-split one."""
    best = {}
    tasks = (("synth-textures", ["1", "2"]), ("synth-commands", ["split"]))
    parents = ensure_parent_runs(client, eid, {(d, v): folds for d, folds in tasks for v in ("mamba-raw", "helix-raw")})
    for v in ("mamba-raw", "helix-raw"):
        for dataset, folds in tasks:
            parent = parents[dataset, v]
            for i, f in enumerate(folds):
                accs = [0.3 + 0.1 * i, 0.5 + 0.05 * i + (0.1 if v == "helix-raw" else 0.0)]
                log_trial(client, eid, parent, dataset, v, f, "finished", accs)
                best[(dataset, v, f)] = max(accs)
            update_parent_aggregates(client, eid, dataset, v)
    return best


@pytest.mark.slow  # headless Chromium, ~20-30 s each
@pytest.mark.timeout(600)
def test_mlflow_ui_and_report_in_chromium(browser, mlflow_server, tmp_path, shots):
    client = MlflowClient(mlflow_server.uri)
    name, eid = mlflow_server.new_experiment("helix-smoke-browser")
    best = _smoke_sweep(client, eid)
    index = write_report(load_sweep(client, name), tmp_path / "dashboards")

    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    page.set_default_timeout(90_000)
    # The experiment's runs table (workflowType selects MLflow 3's model-training view).
    page.goto(f"{mlflow_server.uri}/#/experiments/{eid}/runs?workflowType=machine_learning")
    for parent in ("synth-textures/mamba-raw", "synth-textures/helix-raw", "synth-commands/helix-raw"):
        page.get_by_text(parent, exact=True).wait_for(state="visible")
    page.get_by_text("10 matching runs").wait_for(state="visible")  # 4 parents + 6 trials
    # Trials are nested under their parent: expand one and see its fold runs.
    cell = page.locator("[role=gridcell]", has_text="synth-textures/helix-raw").first
    cell.locator("button").first.click()
    for fold in ("fold1", "fold2"):
        page.get_by_text(f"synth-textures/helix-raw/{fold}", exact=True).wait_for(state="visible")
    page.screenshot(path=str(shots / "mlflow_experiment.png"))

    # The report, from disk: table cells hold the runs' numbers, figures are rendered.
    page.goto(index.as_uri())
    mean = [best[("synth-textures", "helix-raw", f)] for f in "12"]
    expected = f"{pct(statistics.mean(mean))} ± {pct(statistics.stdev(mean))}"
    for text in (expected, pct(best[("synth-commands", "mamba-raw", "split")]),
                 pct(best[("synth-textures", "mamba-raw", "2")])):
        cells = page.locator("td", has_text=text)
        assert cells.count() >= 1, text
        cells.first.scroll_into_view_if_needed()
        assert cells.first.is_visible(), text
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert sizes and all(done and width > 100 for done, width in sizes), sizes
    page.screenshot(path=str(shots / "report_index.png"), full_page=True)
    page.close()
    for shot in ("mlflow_experiment.png", "report_index.png"):
        assert (shots / shot).stat().st_size > 10_000


@pytest.mark.slow  # headless Chromium, ~20-30 s each
@pytest.mark.timeout(600)
def test_paper_report_fits_a_laptop_page(browser, mlflow_server, tmp_path, shots):
    """Every table (Table 1 with all six variants too) and figure of the paper sweep fits a 1280 px page."""
    from test_report_paper import log_paper_sweep

    client = MlflowClient(mlflow_server.uri)
    name, eid = mlflow_server.new_experiment("helix-paper-browser")
    log_paper_sweep(client, eid)
    index = write_report(load_sweep(client, name), tmp_path / "dashboards")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(index.as_uri())
    width = page.evaluate("document.documentElement.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # no horizontal scrolling
    feasibility = page.locator("section#feasibility table").bounding_box()
    assert feasibility["x"] >= 0 and feasibility["x"] + feasibility["width"] <= width, (feasibility, width)
    assert page.locator("section#feasibility th").count() == 2 + 6 + 1  # dataset, tokens, six variants, paper
    boxes = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.getBoundingClientRect().right)")
    assert len(boxes) >= 12 and max(boxes) <= width, boxes
    page.screenshot(path=str(shots / "report_paper_1280.png"), full_page=True)
    # a smaller laptop: Table 1's cells break into lines (and its headers wrap), still no horizontal scrolling
    page.set_viewport_size({"width": 1024, "height": 900})
    width = page.evaluate("document.documentElement.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    feasibility = page.locator("section#feasibility table").bounding_box()
    assert feasibility["x"] + feasibility["width"] <= width, (feasibility, width)
    assert "ruled OOM" in page.locator("section#feasibility").inner_text()
    page.locator("section#feasibility").screenshot(path=str(shots / "table1_1024.png"))
    page.close()
    assert (shots / "report_paper_1280.png").stat().st_size > 10_000
