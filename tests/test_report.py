"""The report against a real MLflow server: a fake partial sweep logged with the trial schema, then
the tables must equal the runs' numbers, the parents' aggregates the children's mean/std, and the
dashboard files must exist."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from helix_sweep.report.__main__ import main as report_main
from helix_sweep.report.loading import load_sweep
from helix_sweep.report.page import write_report
from helix_sweep.report.paper import PAPER_RESULTS
from helix_sweep.report.tables import paper_text, pct, study_tables
from helix_sweep.sweep.runs import get_or_create_parent_run, update_parent_aggregates
from mlflow_server import log_fake_sweep, log_trial, mlflow_server  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def fake(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    return log_fake_sweep(client, "helix-fake-report")


@pytest.fixture(scope="module")
def sweep(mlflow_server, fake):
    return load_sweep(MlflowClient(mlflow_server.uri), fake.name)


@pytest.fixture(scope="module")
def tables(sweep):
    return {t.name: t for t in study_tables(sweep)}


@pytest.fixture(scope="module")
def written(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("dashboards")
    return write_report(sweep, out)


def _pm(values: list[float]) -> str:
    return f"{pct(statistics.mean(values))} ± {pct(statistics.stdev(values))}"


def test_runs_hold_the_trial_schema(mlflow_server, fake):
    client = MlflowClient(mlflow_server.uri)
    trials = client.search_runs([fake.experiment_id], "tags.kind = 'trial'", max_results=1000)
    assert sorted(r.data.tags["trial_key"] for r in trials) == sorted(
        f"{d}/{v}/" + (f"fold{f}" if f.isdigit() else f) for d, v, f in fake.runs)
    run = client.get_run(fake.runs[("synth-commands", "helix-mel", "split")])
    assert run.info.run_name == "synth-commands/helix-mel/split"
    assert run.data.tags["status"] == "finished" and run.data.tags["fold"] == "split"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "synth-commands/helix-mel" and parent.data.tags["kind"] == "parent"
    assert run.data.params["tokens_per_clip"] == "8" and run.data.params["frontend"] == "mel"
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert [m.step for m in history] == [1, 2, 3]  # one value per epoch, step = epoch
    assert run.data.metrics["epochs_done"] == 3


def test_fold_table_equals_runs(fake, tables):
    t = tables["folds_synth-textures"]
    assert t.header[:7] == ["variant", "fold 1", "fold 2", "fold 3", "fold 4", "fold 5", "mean ± std"]
    for variant in fake.variants:
        for fold in fake.folds["synth-textures"]:
            key = ("synth-textures", variant, fold)
            expected = pct(fake.best[key]) if key in fake.best else {
                "running": "running (ep 2)", "diverged": "diverged", None: "pending"}[fake.status.get(key)]
            assert t.column(f"fold {fold}")[variant] == expected, key
    mean = t.column("mean ± std")
    done = {v: [fake.best[("synth-textures", v, f)] for f in "12345" if ("synth-textures", v, f) in fake.best]
            for v in fake.variants}
    assert mean["mamba-raw"] == _pm(done["mamba-raw"])  # all 5 folds
    assert mean["helix-mel"] == _pm(done["helix-mel"]) + " (3/5 folds)"  # one running, one pending
    assert mean["attention-raw"] == _pm(done["attention-raw"]) + " (4/5 folds)"  # one diverged
    assert "paper" not in t.header  # synthetic: no paper numbers
    record = next(r for r in t.records if r["variant"] == "helix-raw")
    assert record["mean"] == pytest.approx(statistics.mean(done["helix-raw"]), abs=1e-12)
    assert record["std"] == pytest.approx(statistics.stdev(done["helix-raw"]), abs=1e-12)


def test_parent_aggregates_equal_children_and_table(mlflow_server, fake, tables):
    client = MlflowClient(mlflow_server.uri)
    for record in tables["folds_synth-textures"].records:
        parent = client.search_runs([fake.experiment_id], "tags.kind = 'parent' and tags.dataset = 'synth-textures' "
                                                          f"and tags.variant = '{record['variant']}'")[0]
        assert parent.data.metrics["best_test_acc_mean"] == pytest.approx(record["mean"], abs=1e-9)
        assert parent.data.metrics["best_test_acc_std"] == pytest.approx(record["std"], abs=1e-9)
        assert parent.data.metrics["n_folds_done"] == record["n_done"]
    status = {(r.data.tags["dataset"], r.data.tags["variant"]): r.info.status
              for r in client.search_runs([fake.experiment_id], "tags.kind = 'parent'", max_results=100)}
    assert status[("synth-textures", "mamba-raw")] == "FINISHED"
    assert status[("synth-textures", "helix-mel")] == "RUNNING"  # fold 4 running, fold 5 pending
    assert status[("synth-textures", "attention-raw")] == "FAILED"  # all ended, fold 2 diverged
    assert status[("synth-speaker", "attention-raw")] == "FAILED"  # oom
    assert status[("esc50", "mamba-raw")] == "RUNNING"  # 2 of 5 folds


def test_paper_numbers_beside_ours(fake, tables):
    t = tables["folds_esc50"]
    paper = t.column("paper")
    assert paper["mamba-raw"] == "55.10 ± 3.33" and paper["helix-mel"] == "51.85 ± 2.41"
    assert paper["attention-raw"] == "44.60 ± 3.16"
    ours = [fake.best[("esc50", "helix-raw", f)] for f in "12"]
    assert t.column("mean ± std")["helix-raw"] == _pm(ours) + " (2/5 folds)"
    assert t.column("Δ vs paper")["helix-raw"] == f"{100 * statistics.mean(ours) - 50.20:+.2f}"
    assert t.column("fold 3")["helix-raw"] == "pending"
    assert t.column("mean ± std")["attention-raw"] == "pending" and t.column("Δ vs paper")["attention-raw"] == ""
    assert PAPER_RESULTS["speechcommands"]["helix-raw"].acc == 92.94
    assert paper_text("speechcommands", "mamba-mel") == "92.36 (86 ep)"
    assert paper_text("speechcommands-concat", "helix-raw") == "91.31 (24 ep)"
    assert paper_text("voxpopuli", "attention-raw") == "OOM"


def test_single_split_table_with_validation(fake, tables):
    t = tables["single_synth-commands"]
    for v in fake.variants:
        key = ("synth-commands", v, "split")
        assert t.column("best test")[v] == pct(fake.best[key])
        assert t.column("test @ best val")[v] == pct(fake.at_best_val[key])
        assert t.column("epochs reached")[v] == "3" and t.column("status")[v] == "done"
    assert any(fake.at_best_val[k] != fake.best[k] for k in fake.at_best_val)  # the check can fail


def test_long_memory_and_speaker_tables(fake, tables):
    concat = tables["long_memory_synth-concat"]
    assert concat.column("tokens/clip") == {"mamba-raw": "1000", "helix-raw": "1000", "helix-mel": "80",
                                            "attention-raw": "1000"}
    assert concat.column("pool K")["helix-raw"] == "100"
    assert concat.column("best test")["attention-raw"] == "planned OOM"
    assert concat.column("best test")["mamba-raw"] == pct(fake.best[("synth-concat", "mamba-raw", "split")])
    speaker = tables["speaker_synth-speaker"]
    assert speaker.column("best test")["attention-raw"] == "OOM" and speaker.column("status")["attention-raw"] == "OOM"
    assert speaker.column("best test")["helix-raw"] == pct(fake.best[("synth-speaker", "helix-raw", "split")])


def test_feasibility_table(tables):
    t = tables["feasibility"]
    rows = {r[0]: dict(zip(t.header, r)) for r in t.rows}
    assert list(rows) == ["synth-commands", "esc50", "synth-textures", "synth-concat", "synth-speaker"]  # by length
    assert rows["synth-speaker"]["attention-raw"].startswith("OOM")
    assert rows["synth-speaker"]["tokens (raw / mel)"] == "3,000 / 184"
    assert rows["synth-concat"]["attention-raw"] == "planned OOM"
    assert rows["synth-textures"]["attention-raw"].startswith("done 4/5, diverged 1/5")
    assert "(2.5× Mamba)" in rows["synth-commands"]["attention-raw"]  # 5.0 s vs 2.0 s per epoch
    assert rows["synth-commands"]["mamba-raw"].startswith("ok · 2.0 s/ep")
    assert rows["esc50"]["attention-raw"] == "pending"
    assert rows["esc50"]["paper"] == "500 tokens: all three backbones train"


def test_dashboard_files(written, sweep):
    root = written.parent
    assert written.name == "index.html" and root.name == sweep.experiment
    page = written.read_text()
    for t in study_tables(sweep):
        assert (root / "tables" / f"{t.name}.md").read_text() == t.to_markdown()
        assert (root / "tables" / f"{t.name}.html").exists()
        assert f">{t.title}<" in page.replace("&#x27;", "'")
    figures = sorted((root / "figures").glob("*.png"))
    assert {p.name for p in figures} >= {"accuracy_esc50.png", "accuracy_synth-textures.png", "gap_raw_minus_mel.png",
                                         "accuracy_vs_length.png", "curves_synth-textures.png", "curves_synth-commands.png"}
    for p in figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert page.count("data:image/png;base64,") == len(figures)  # self-contained
    assert "running (ep 2)" in page and "planned OOM" in page and "pending" in page
    trials_csv = (root / "trials.csv").read_text().splitlines()
    assert len(trials_csv) == 1 + len(sweep.trials)
    md = (root / "tables.md").read_text()
    assert "| mamba-raw |" in md and "55.10 ± 3.33" in md


def test_finished_sweep_has_no_pending(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    name, eid = mlflow_server.new_experiment("helix-finished")
    best = {}
    for v in ("mamba-raw", "helix-mel"):
        parent = get_or_create_parent_run(client, eid, "esc50", v, folds=["1", "2"])
        for f, accs in (("1", [0.3, 0.5]), ("2", [0.4, 0.45])):
            log_trial(client, eid, parent, "esc50", v, f, "finished", accs)
            best[(v, f)] = max(accs)
        update_parent_aggregates(client, eid, "esc50", v)
    sweep = load_sweep(client, name)
    t = {t.name: t for t in study_tables(sweep)}["folds_esc50"]
    assert t.column("mean ± std") == {v: _pm([best[(v, "1")], best[(v, "2")]]) for v in ("mamba-raw", "helix-mel")}
    index = write_report(sweep, tmp_path)
    page = index.read_text()
    assert 'class="pending"' not in page and ">pending<" not in page and "folds)" not in page
    assert client.get_run(get_or_create_parent_run(client, eid, "esc50", "helix-mel")).info.status == "FINISHED"


def test_cli_writes_dashboard(mlflow_server, fake, tmp_path):
    out = subprocess.run([sys.executable, "-m", "helix_sweep.report", f"experiment={fake.name}",
                          f"tracking_uri={mlflow_server.uri}", f"out={tmp_path}"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / fake.name / "index.html").exists()
    assert f"MLflow UI: {mlflow_server.uri}/#/experiments/{fake.experiment_id}/runs" in out.stdout


def test_cli_errors_name_the_problem(mlflow_server):
    with pytest.raises(SystemExit, match="expected key=value with key one of experiment"):
        report_main(["experimnt=x"])
    with pytest.raises(SystemExit, match="experiment='nope' not found.*helix-fake-report"):
        report_main(["experiment=nope", f"tracking_uri={mlflow_server.uri}"])
