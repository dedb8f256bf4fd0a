"""End to end: `python -m helix_sweep.run` through a real local Ray and a real MLflow server on loopback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helix_sweep.config import load_config
from helix_sweep.models.frontends import num_tokens
from helix_sweep.sweep import schema as S
from helix_sweep.sweep.tracking import stop_tracking_server
from test_report_browser import browser  # noqa: F401  (fixture: headless chromium)

ARGS = ["datasets=[synth-commands]", "variants=[helix-mel,attention-mel]", "train.epochs=2"]


def run_sweep(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(workdir / "home"), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}  # see sweep_process.env_for
    return subprocess.run([sys.executable, "-m", "helix_sweep.run", f"workdir={workdir}", *ARGS, *extra],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    (workdir / "home").mkdir()
    first = run_sweep(workdir)
    try:
        uri = json.loads((workdir / "mlflow" / "server.json").read_text())["uri"]
        yield workdir, first, uri
    finally:
        stop_tracking_server(workdir)


def trial_runs(uri):
    client = MlflowClient(uri)
    exps = [e for e in client.search_experiments() if e.name.startswith("helix-smoke-")]
    assert len(exps) == 1, [e.name for e in exps]
    runs = client.search_runs([exps[0].experiment_id])
    return (client, [r for r in runs if r.data.tags.get(S.KIND) == S.KIND_TRIAL],
            [r for r in runs if r.data.tags.get(S.KIND) == S.KIND_PARENT])


def test_two_trial_sweep_lands_in_mlflow(sweep):
    workdir, proc, uri = sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, trials, parents = trial_runs(uri)
    assert sorted(r.info.run_name for r in trials) == ["synth-commands/attention-mel/split",
                                                      "synth-commands/helix-mel/split"]
    assert sorted(r.info.run_name for r in parents) == ["synth-commands/attention-mel", "synth-commands/helix-mel"]
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "finished"
        assert r.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
        p = r.data.params
        assert p["frontend"] == "mel" and p["dataset"] == "synth-commands" and int(p["n_params"]) > 0
        seconds = load_config([]).dataset_defs["synth-commands"].clip_seconds
        assert p["pattern"] in ("MMMAMM", "AAAAAA") and float(p["lr"]) > 0 and int(p["d_ffn"]) > 0
        assert int(p["tokens_per_clip"]) == num_tokens("mel", int(seconds * 16000))
        for key in ("train_loss", "test_acc", "best_test_acc", "lr", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2], key
        best = max(m.value for m in client.get_metric_history(r.info.run_id, "test_acc"))
        assert r.data.metrics["best_test_acc"] == pytest.approx(best)
        assert {"confusion_matrix.csv", "config.yaml"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    exp_dirs = list((workdir / "experiments").iterdir())
    assert len(exp_dirs) == 1
    results = (exp_dirs[0] / "results.md").read_text()
    assert "helix-mel" in results and "attention-mel" in results
    assert "| synth-commands | helix-mel |" in proc.stdout


def test_rerunning_the_same_command_continues_without_new_runs(sweep):
    workdir, _, uri = sweep
    _, before, _ = trial_runs(uri)
    again = run_sweep(workdir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "restoring experiment" in again.stderr + again.stdout
    client, after, _ = trial_runs(uri)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)
    for r in after:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "test_acc")] == [1, 2]


def test_changed_settings_refuse_to_continue(sweep):
    workdir, _, _ = sweep
    proc = run_sweep(workdir, "train.lr=0.01")
    assert proc.returncode == 2
    assert "was started with other settings" in proc.stderr and "lr" in proc.stderr


def report_of(uri: str, out: Path) -> Path:
    """`python -m helix_sweep.report` on the sweep's runs; the page it wrote."""
    proc = subprocess.run([sys.executable, "-m", "helix_sweep.report", f"tracking_uri={uri}", f"out={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [index] = list(out.glob("*/index.html"))
    return index


def test_report_of_the_real_sweep(sweep, tmp_path):
    """The report regenerated from this real sweep's runs shows every trial's best test accuracy."""
    from helix_sweep.report.tables import pct

    workdir, _, uri = sweep
    html = report_of(uri, tmp_path / "dashboards").read_text()
    _, trials, _ = trial_runs(uri)
    for r in trials:
        assert f">{pct(r.data.metrics['best_test_acc'])}<" in html, r.info.run_name


@pytest.mark.slow  # needs Debian's chromium, which CI does not install (as tests/test_report_browser.py)
def test_report_and_mlflow_ui_of_the_real_sweep(sweep, browser, tmp_path):
    """The report and the MLflow runs table of this real sweep, seen in headless chromium."""
    from helix_sweep.report.tables import pct

    workdir, _, uri = sweep
    index = report_of(uri, tmp_path / "dashboards")
    client, trials, _ = trial_runs(uri)
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    page.set_default_timeout(90_000)
    eid = trials[0].info.experiment_id
    page.goto(f"{uri}/#/experiments/{eid}/runs?workflowType=machine_learning")
    for parent in ("synth-commands/helix-mel", "synth-commands/attention-mel"):
        page.get_by_text(parent, exact=True).wait_for(state="visible")
    page.screenshot(path=str(tmp_path / "mlflow_real_sweep.png"))
    page.goto(index.as_uri())
    for r in trials:
        cells = page.locator("td", has_text=pct(r.data.metrics["best_test_acc"]))
        assert cells.count() >= 1, r.info.run_name
    page.close()
