"""Tracking server management and parent-run aggregates, against real MLflow servers on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helix_sweep.sweep import schema as S
from helix_sweep.sweep import tracking
from helix_sweep.sweep.artifacts import log_confusion_artifacts
from helix_sweep.sweep.runs import ensure_parent_runs, get_or_create_parent_run, update_parent_aggregates
from helix_sweep.sweep.tracking import (
    TrackingUnavailable,
    check_tracking_reachable,
    ensure_tracking_server,
    stop_tracking_server,
)
from mlflow_server import mlflow_server  # noqa: F401  (session fixture: a real server)


def _server_json(workdir: Path) -> dict:
    return json.loads((workdir / "mlflow" / "server.json").read_text())


def _alive(pid: int) -> bool:
    return tracking._pid_alive(pid)


def test_start_writes_record_and_serves(mlflow_server):
    info = _server_json(mlflow_server.workdir)
    assert info["uri"] == mlflow_server.uri
    assert mlflow_server.uri == f"http://127.0.0.1:{info['port']}"
    assert info["backend_store_uri"] == f"sqlite:///{mlflow_server.workdir.resolve() / 'mlflow' / 'mlflow.db'}"
    assert _alive(info["pid"])
    check_tracking_reachable(mlflow_server.uri)  # raises if not
    assert (mlflow_server.workdir / "mlflow" / "mlflow.db").exists()
    assert "GET /health" in (mlflow_server.workdir / "mlflow" / "server.log").read_text()


def test_reuse_keeps_same_process(mlflow_server):
    before = _server_json(mlflow_server.workdir)
    assert ensure_tracking_server(mlflow_server.workdir) == mlflow_server.uri
    assert _server_json(mlflow_server.workdir)["pid"] == before["pid"]


def test_cli_status_prints_ui_url(mlflow_server):
    out = subprocess.run([sys.executable, "-m", "helix_sweep.sweep.tracking", "status",
                          "--workdir", str(mlflow_server.workdir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert mlflow_server.uri in out.stdout and "healthy" in out.stdout


def _store_counts(db: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute("SELECT (SELECT COUNT(*) FROM runs), (SELECT COUNT(*) FROM experiments)").fetchone()


def test_stale_record_replaced_concurrently_then_stopped(mlflow_server, tmp_path):
    """A server.json of a dead process is replaced; two drivers starting at once share one server. Its new
    store is a copy of the empty one the session's first server kept (mlflow_server's store holds runs by
    now, the copy none): no schema migrations, nothing of another store's."""
    template = tracking.store_template()
    assert template.parent == Path(os.environ["XDG_CACHE_HOME"]) / "helix_sweep" and template.is_file()
    assert _store_counts(template) == (0, 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "mlflow").mkdir()
    stale = {"pid": dead.pid, "port": 1, "uri": "http://127.0.0.1:1",
             "backend_store_uri": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    (tmp_path / "mlflow" / "server.json").write_text(json.dumps(stale))

    uris: list[str] = []
    errors: list[BaseException] = []

    def start():
        try:
            uris.append(ensure_tracking_server(tmp_path))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not errors, errors
        assert len(uris) == 2 and uris[0] == uris[1] != stale["uri"]
        info = _server_json(tmp_path)
        assert info["pid"] != dead.pid and _alive(info["pid"])
        check_tracking_reachable(uris[0])
        assert "Creating initial MLflow database tables" not in (tmp_path / "mlflow" / "server.log").read_text()
        client = MlflowClient(uris[0])
        assert [e.name for e in client.search_experiments()] == ["Default"]
        client.create_run(client.create_experiment("x"))
        assert _store_counts(template) == (0, 1)  # a copy: the new store's run is not in it
    finally:
        assert stop_tracking_server(tmp_path) is True
    assert not _alive(info["pid"])
    assert not (tmp_path / "mlflow" / "server.json").exists()
    with pytest.raises(TrackingUnavailable, match="connection refused"):
        check_tracking_reachable(uris[0], timeout=2)
    assert stop_tracking_server(tmp_path) is False


def test_only_a_store_holding_nothing_is_kept_as_the_template(tmp_path):
    def store(name: str, runs: int) -> Path:
        db = tmp_path / name
        with contextlib.closing(sqlite3.connect(db)) as c, c:
            c.execute("CREATE TABLE experiments (experiment_id INTEGER)")
            c.execute("CREATE TABLE runs (run_uuid TEXT)")
            c.execute("INSERT INTO experiments VALUES (0)")
            c.executemany("INSERT INTO runs VALUES (?)", [(str(i),) for i in range(runs)])
        return db

    template = tmp_path / "cache" / "template.db"
    tracking._keep_template(store("used.db", runs=1), template)
    assert not template.exists()
    tracking._keep_template(store("new.db", runs=0), template)
    assert _store_counts(template) == (0, 1)
    assert [p.name for p in template.parent.iterdir()] == ["template.db"]  # no temporary left behind


def test_unreachable_refused_names_uri():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingUnavailable) as e:
        check_tracking_reachable(uri, timeout=2)
    assert uri in str(e.value) and "connection refused" in str(e.value)
    assert e.value.uri == uri


def test_unreachable_timeout_names_uri():
    with socket.socket() as s:  # accepts TCP connections (backlog) but never answers HTTP
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(TrackingUnavailable) as e:
            check_tracking_reachable(uri, timeout=0.5)
    assert uri in str(e.value) and "timed out" in str(e.value)


def test_unreachable_http_status_names_uri(mlflow_server):
    uri = mlflow_server.uri + "/not-mlflow"
    with pytest.raises(TrackingUnavailable) as e:
        check_tracking_reachable(uri, timeout=5)
    assert uri in str(e.value) and "HTTP 404" in str(e.value)


def test_file_store_must_be_writable(tmp_path):
    check_tracking_reachable(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    check_tracking_reachable(f"file://{tmp_path}/mlruns")
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    uri = f"file://{blocker}/mlruns"
    with pytest.raises(TrackingUnavailable, match="not a directory") as e:
        check_tracking_reachable(uri)
    assert uri in str(e.value)


def _trial(client, eid, parent, dataset, variant, fold, status, best=None, at_val=None):
    key = f"{dataset}/{variant}/fold{fold}"
    run = client.create_run(eid, run_name=key, tags={
        **S.trial_tags(key, dataset, variant, fold), S.STATUS: status, S.RESUMES: "0", S.PARENT_RUN_ID: parent})
    if best is not None:
        client.log_metric(run.info.run_id, "best_test_acc", best, step=1)
    if at_val is not None:
        client.log_metric(run.info.run_id, "test_acc_at_best_val", at_val, step=1)
    return run.info.run_id


def test_parent_run_idempotent_and_race_safe(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    _, eid = mlflow_server.new_experiment("parent")
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(get_or_create_parent_run(client, eid, "esc50", "helix-raw")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(ids) == 3 and len(set(ids)) == 1
    assert get_or_create_parent_run(client, eid, "esc50", "helix-raw") == ids[0]
    live = client.search_runs([eid], "tags.kind = 'parent'")
    assert [r.info.run_id for r in live] == [ids[0]]
    run = client.get_run(ids[0])
    assert run.info.run_name == "esc50/helix-raw"
    assert run.data.tags["dataset"] == "esc50" and run.data.tags["variant"] == "helix-raw"
    assert get_or_create_parent_run(client, eid, "esc50", "helix-mel") != ids[0]


class _LateCreate(MlflowClient):
    """A client whose create request reaches the server 0.1 s after it stamped the run's start_time
    (a loaded network or server): its parent is the oldest, yet it appears after a later one."""

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        start_time = int(time.time() * 1000)
        time.sleep(0.1)
        return super().create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)


def test_parent_run_created_late_but_stamped_earlier_is_the_one_kept(mlflow_server):
    # Keeping "the oldest visible right after my create" returned two parents here: the prompt
    # creator saw only its own; the late one then saw both and kept its own, the older.
    _, eid = mlflow_server.new_experiment("parent-late")
    ids: dict[str, str] = {}
    late = threading.Thread(target=lambda: ids.setdefault(
        "late", get_or_create_parent_run(_LateCreate(mlflow_server.uri), eid, "esc50", "helix-raw")))
    late.start()
    time.sleep(0.03)
    ids["prompt"] = get_or_create_parent_run(MlflowClient(mlflow_server.uri), eid, "esc50", "helix-raw")
    late.join(timeout=60)
    client = MlflowClient(mlflow_server.uri)
    live = client.search_runs([eid], "tags.kind = 'parent'")
    assert ids["late"] == ids["prompt"] == live[0].info.run_id and len(live) == 1


def test_ensure_parent_runs_creates_each_pair_once_with_its_folds(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    _, eid = mlflow_server.new_experiment("parents")
    existing = get_or_create_parent_run(client, eid, "esc50", "helix-raw")
    planned = {("esc50", "helix-raw"): [1, 2], ("esc50", "mamba-mel"): [1, 2], ("synth-commands", "helix-raw"): ["split"]}
    ids = ensure_parent_runs(client, eid, planned)
    assert ids[("esc50", "helix-raw")] == existing and len(set(ids.values())) == 3
    assert ensure_parent_runs(client, eid, planned) == ids
    for (dataset, variant), folds in planned.items():
        run = client.get_run(ids[dataset, variant])
        assert run.info.run_name == S.parent_run_name(dataset, variant)
        assert run.data.tags[S.FOLDS_PLANNED] == ",".join(map(str, folds))
    assert len(client.search_runs([eid], "tags.kind = 'parent'")) == 3


def test_parent_aggregates_equal_children(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    _, eid = mlflow_server.new_experiment("agg")
    parent = get_or_create_parent_run(client, eid, "synth-textures", "helix-raw")
    best = {1: 0.55, 2: 0.625, 3: 0.4875}
    for fold, acc in best.items():
        _trial(client, eid, parent, "synth-textures", "helix-raw", fold, "finished", acc, acc - 0.05)
    _trial(client, eid, parent, "synth-textures", "helix-raw", 4, "running", 0.9)  # not finished: ignored
    _trial(client, eid, parent, "synth-textures", "helix-raw", 5, "oom")
    _trial(client, eid, parent, "synth-textures", "helix-mel", 1, "finished", 0.1)  # other variant

    figures = update_parent_aggregates(client, eid, "synth-textures", "helix-raw", n_folds_planned=5)
    values = list(best.values())
    assert figures["parent_run_id"] == parent
    assert figures["n_folds_done"] == 3 and figures["folds"] == ["1", "2", "3"]
    assert figures["best_test_acc_mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
    assert figures["best_test_acc_std"] == pytest.approx(statistics.stdev(values), abs=1e-12)  # ddof=1
    assert figures["test_acc_at_best_val_mean"] == pytest.approx(statistics.mean(values) - 0.05, abs=1e-12)
    logged = client.get_run(parent)
    assert logged.data.metrics["best_test_acc_mean"] == pytest.approx(figures["best_test_acc_mean"])
    assert logged.data.metrics["best_test_acc_std"] == pytest.approx(figures["best_test_acc_std"])
    assert logged.data.metrics["n_folds_done"] == 3
    assert logged.info.status == "RUNNING"  # 3 of 5 planned folds

    # Two more folds finish: the aggregate follows and the parent is closed.
    for fold, acc in ((4, 0.6), (5, 0.5)):
        run = client.search_runs([eid], f"tags.trial_key = 'synth-textures/helix-raw/fold{fold}'")[0]
        client.log_metric(run.info.run_id, "best_test_acc", acc, step=2)
        client.set_tag(run.info.run_id, "status", "finished")
        values.append(acc)
    figures = update_parent_aggregates(client, eid, "synth-textures", "helix-raw", n_folds_planned=5)
    assert figures["n_folds_done"] == 5
    assert figures["best_test_acc_std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert figures["test_acc_at_best_val_mean"] is None  # folds 4, 5 have no validation figure
    assert client.get_run(parent).info.status == "FINISHED"
    history = client.get_metric_history(parent, "n_folds_done")
    assert [(m.step, m.value) for m in history] == [(3, 3.0), (5, 5.0)]


def test_single_fold_has_no_std(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    _, eid = mlflow_server.new_experiment("single")
    parent = get_or_create_parent_run(client, eid, "synth-commands", "mamba-mel")
    _trial(client, eid, parent, "synth-commands", "mamba-mel", "split", "finished", 0.8)
    figures = update_parent_aggregates(client, eid, "synth-commands", "mamba-mel")
    assert figures["best_test_acc_mean"] == pytest.approx(0.8) and figures["best_test_acc_std"] is None
    assert "best_test_acc_std" not in client.get_run(parent).data.metrics


def test_confusion_artifacts_round_trip(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    _, eid = mlflow_server.new_experiment("artifacts")
    run_id = client.create_run(eid).info.run_id
    cm = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    names = log_confusion_artifacts(client, run_id, cm, ["dog", "rain", "siren"])
    assert names == ["confusion_matrix.csv", "confusion_matrix.png", "per_class_accuracy.csv"]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == names
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    rows = (local / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0] == "true\\predicted,dog,rain,siren" and rows[2] == "rain,2,2,0"
    per_class = (local / "per_class_accuracy.csv").read_text().splitlines()
    assert per_class[1] == "dog,6,5,0.833333" and per_class[2] == "rain,4,2,0.500000"
    assert per_class[3].startswith("siren,0,0,nan")
    assert (local / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not match 2 label names"):
        log_confusion_artifacts(client, run_id, cm, ["a", "b"])


def test_a_search_parent_closes_once_its_samples_ended_with_the_best(mlflow_server):
    # a search's samples share their base trial's fold: the parent counts that fold once, by its best
    # sample, and closes when the planned samples ended (ASHA-stopped ones too), not at the first
    client = MlflowClient(mlflow_server.uri)
    _, eid = mlflow_server.new_experiment("search-parent")
    parent = get_or_create_parent_run(client, eid, "synth-commands", "helix-mel", ["split"])
    client.set_tag(parent, S.SAMPLES_PLANNED, "3")

    from helix_sweep.run import plan_trials
    from helix_sweep.sweep.driver import results_table

    _, [base] = plan_trials(["grid=tune"])
    assert base.key == "synth-commands/helix-mel/split"
    assert results_table(client, eid, [base])[0]["status"] == "pending"

    def sample(n, status, best=None):
        key = f"{base.key}/s{n:08d}"
        run = client.create_run(eid, run_name=key, tags={
            **S.trial_tags(key, "synth-commands", "helix-mel", "split"), S.STATUS: status, S.PARENT_RUN_ID: parent})
        if best is not None:
            client.log_metric(run.info.run_id, "best_test_acc", best, step=1)
        return update_parent_aggregates(client, eid, "synth-commands", "helix-mel")

    figures = sample(1, S.FINISHED, 0.5)
    assert figures["n_folds_done"] == 1 and figures["best_test_acc_mean"] == pytest.approx(0.5)
    assert client.get_run(parent).info.status == "RUNNING"  # two samples to come
    sample(2, S.STOPPED, 0.3)
    assert client.get_run(parent).info.status == "RUNNING"
    figures = sample(3, S.FINISHED, 0.7)
    assert figures["n_folds_done"] == 1 and figures["folds"] == ["split"]
    assert figures["best_test_acc_mean"] == pytest.approx(0.7) and figures["best_test_acc_std"] is None
    assert client.get_run(parent).info.status == "FINISHED"
    # the driver's closing table: the search's best sample for its one trial
    [row] = results_table(client, eid, [base])
    assert (row["trials"], row["finished"], row["status"]) == (1, 1, "finished/stopped")
    assert row["best_test_acc_mean"] == pytest.approx(70.0)


def test_mlflow_telemetry_is_off_in_helix_sweep_processes():
    # Outside CI MLflow's telemetry thread deletes an env var mid-run (KeyError in a concurrent
    # log call, helix_sweep/__init__.py). The child drops the CI markers MLflow itself checks
    # (pytest sets one), so this is what a user's sweep gets; a Ray worker imports helix_sweep the same way.
    ci_markers = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if k not in ci_markers}
    probe = ("import helix_sweep.sweep.trial_run, mlflow.telemetry.utils as u, os; "
             "print(u.is_telemetry_disabled(), os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "true"], out.stderr[-2000:]
