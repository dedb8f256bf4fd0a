"""Tracking that degrades instead of failing (issue 13), against real MLflow servers on loopback and,
for whole sweeps, a real local Ray. No mocks.

In process (seconds):
- a write MLflow refuses is skipped and counted in the run's tracking_errors tag; later writes arrive;
- outages and refusals are told apart on the exceptions MLflow really raises;
- a write the server fails on (5xx to it alone, while the server answers its store's reads) is dropped
  and counted after a few tries instead of holding every later write forever;
- a trial run opened, logged and closed while its server is away leaves one pending file, which
  deliver_pending turns into one run with every epoch and its end status, once;
- oom and diverged are in the trial's final checkpoint: a relaunch from it trains nothing.
Whole sweeps (`python -m helix_sweep.run` as a subprocess):
- MLflow down before the trial starts and back after two epochs: one run, every epoch once, finished;
- MLflow down at the trial's end for longer than the worker waits: the run ends with its status at
  the next `report` (and, marked slow, the next `run`);
- (slow: two sweeps) a restored sweep whose server came back on another port logs to the new one,
  and its oom trial, relaunched after its end, reports its status again without training.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from helix_sweep.run import plan_trials
from helix_sweep.sweep import schema as S
from helix_sweep.sweep.outage import is_outage
from helix_sweep.sweep.tracking import ensure_tracking_server, server_status, stop_tracking_server
from helix_sweep.sweep.trial_run import PENDING_FILE, TrialRun, deliver_pending, pending_files
from helix_sweep.training import require_prepared
from helix_sweep.training.loop import run_training
from mlflow_server import mlflow_server  # noqa: F401  (session fixture: a real server)
from sweep_process import client_for, env_for, kill_group, run, start, trial_runs, wait_for

KEY = ("synth-commands/helix-mel/split", "synth-commands", "helix-mel", "split")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    """The sweep arguments every test here starts from: one trial of synth-commands (6 steps an
    epoch), its data shared by the module's sweeps (the first generates it, ~20 s on a loaded machine)."""
    return ["datasets=[synth-commands]", "variants=[helix-mel]", "train.epochs=2", "train.batch_size=100",
            f"data_root={tmp_path_factory.mktemp('data')}"]


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    stop_tracking_server(tmp_path)


def dead_uri() -> str:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def history(uri: str, run_id: str, key: str = S.TEST_ACC) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


EPOCHS = [{"epoch": e, "test_acc": 0.1 * e, "train_loss": 1.0 / e, "_ts": 1_700_000_000_000 + e} for e in (1, 2)]


def test_refused_write_is_skipped_and_counted(mlflow_server, tmp_path):
    name, _ = mlflow_server.new_experiment("refused")
    run = TrialRun(mlflow_server.uri, name, *KEY, run_dir=tmp_path)
    run_id = run.open({"lr": 0.01})
    assert run_id
    run.set_tags({"k" * 300: "a tag key MLflow refuses (over 250 characters)"})
    run.log_artifacts([[1, 0], [0, 1]], ["only one label name"])  # fails before any request: ours, permanent
    run.log_epochs(EPOCHS)
    assert run.close(S.FINISHED, {}, {S.EPOCHS_DONE: 2}, wait_s=0)
    got = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert got.data.tags[S.TRACKING_ERRORS] == "2"
    assert got.data.tags[S.STATUS] == S.FINISHED and got.info.status == "FINISHED"
    assert history(mlflow_server.uri, run_id) == [1, 2] and got.data.params["lr"] == "0.01"
    assert not (tmp_path / PENDING_FILE).exists()
    assert run.record()["tracking_errors"] == 0  # a pending file would not count them again

    # a restart of the trial keeps counting from the run's tag
    again = TrialRun(mlflow_server.uri, name, *KEY, run_dir=tmp_path, run_id=run_id)
    again.open({"lr": 0.01}, resumed=True)
    again.set_tags({"k" * 300: "refused again"})
    again.log_epochs(EPOCHS + [{"epoch": 3, "test_acc": 0.3, "_ts": 1_700_000_000_003}])
    got = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert got.data.tags[S.TRACKING_ERRORS] == "3" and got.data.tags[S.RESUMES] == "1"
    assert history(mlflow_server.uri, run_id) == [1, 2, 3]  # epochs 1, 2 not logged twice


def test_outage_and_refusal_told_apart(mlflow_server):
    refused = MlflowClient(dead_uri())
    with pytest.raises(MlflowException) as down:
        refused.get_experiment_by_name("x")
    assert is_outage(down.value)
    client = MlflowClient(mlflow_server.uri)
    _, eid = mlflow_server.new_experiment("classify")
    run_id = client.create_run(eid).info.run_id
    with pytest.raises(MlflowException) as rejected:
        client.set_tag(run_id, "k" * 300, "v")
    assert not is_outage(rejected.value)  # INVALID_PARAMETER_VALUE (400)
    with pytest.raises(MlflowException) as gone:
        client.get_run("0" * 32)
    assert not is_outage(gone.value)  # RESOURCE_DOES_NOT_EXIST (404)
    assert not is_outage(OSError(28, "No space left on device"))
    assert not is_outage(ValueError("a bug of ours"))
    assert is_outage(TimeoutError("timed out"))


def test_a_write_the_server_fails_on_is_dropped_after_a_few_tries(mlflow_server, tmp_path):
    # a store error on one write alone: the server's SQLite fails inserting this tag (a trigger that
    # runs invalid JSON through json()), and MLflow answers 503 to it while answering everything else
    import sqlite3

    name, _ = mlflow_server.new_experiment("fails-on")
    db = sqlite3.connect(mlflow_server.workdir / "mlflow" / "mlflow.db")
    db.execute("CREATE TRIGGER fails_on_tag BEFORE INSERT ON tags WHEN NEW.key = 'fails_on' "
               "BEGIN SELECT json('{not json'); END")
    db.commit()
    try:
        run = TrialRun(mlflow_server.uri, name, *KEY, run_dir=tmp_path)
        run_id = run.open({"lr": 0.01})
        run.set_tags({"fails_on": "the store fails on this write"})
        run.log_epochs(EPOCHS)
        assert run.buffer.pending  # held at first: one 5xx could be a server on its way down
        assert run.close(S.FINISHED, {}, {S.EPOCHS_DONE: 2}, wait_s=30)
    finally:
        db.execute("DROP TRIGGER fails_on_tag")
        db.commit()
        db.close()
    got = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert "fails_on" not in got.data.tags and got.data.tags[S.TRACKING_ERRORS] == "1"
    assert got.data.tags[S.STATUS] == S.FINISHED and history(mlflow_server.uri, run_id) == [1, 2]
    assert not (tmp_path / PENDING_FILE).exists()


def test_a_5xx_while_the_store_does_not_answer_is_an_outage():
    from mlflow.exceptions import RestException

    from helix_sweep.sweep.outage import POISON_AFTER, OutageBuffer

    def deliver(write):
        if write == "fails":
            raise RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "store unavailable"})
        delivered.append(write)

    def probe():
        if not store_answers:
            raise MlflowException("API request to /api/2.0/mlflow/experiments/search failed with timeout exception")

    delivered, store_answers = [], False
    buffer = OutageBuffer(deliver, probe=probe)
    buffer.pending = ["fails", "next"]
    for _ in range(2 * POISON_AFTER):
        assert not buffer.flush()  # the server answers nothing else either: wait for it
    assert delivered == [] and buffer.errors == 0
    store_answers = True
    for _ in range(POISON_AFTER - 1):
        assert not buffer.flush()
    assert buffer.flush() and delivered == ["next"] and buffer.errors == 1


def test_trial_run_through_an_outage_is_delivered_later(mlflow_server, tmp_path):
    name, eid = mlflow_server.new_experiment("later")
    run = TrialRun(dead_uri(), name, *KEY, run_dir=tmp_path)
    assert run.open({"lr": 0.01}) == ""  # nothing raised: the open waits in the buffer
    tried = run.buffer.last_try
    run.log_epochs(EPOCHS)
    run.log_epochs(EPOCHS[-1:])  # queued once
    assert run.buffer.last_try == tried  # within the back-off new writes wait without trying the server
    started = time.monotonic()
    assert not run.close(S.DIVERGED, {S.STOP_REASON: "3 non-finite losses"}, {S.EPOCHS_DONE: 2}, wait_s=1,
                         config_yaml="a: 1\n")
    assert time.monotonic() - started < 15
    saved = json.loads((tmp_path / PENDING_FILE).read_text())
    assert [w["kind"] for w in saved["writes"]] == ["open", "epoch", "epoch", "config", "figures", "end"]

    assert deliver_pending(mlflow_server.uri, tmp_path, experiment="another") == (0, 0)  # not this one's
    elsewhere = mlflow_server.uri.replace("127.0.0.1", "localhost")  # the report pointed at another host
    assert deliver_pending(elsewhere, tmp_path, experiment=name, same_host=True) == (0, 0)
    assert deliver_pending(mlflow_server.uri, tmp_path, experiment=name, same_host=True) == (1, 0)  # other port
    assert pending_files(tmp_path) == []
    [got] = MlflowClient(mlflow_server.uri).search_runs([eid], S.tag_filter({S.TRIAL_KEY: KEY[0]}))
    assert got.data.tags[S.STATUS] == S.DIVERGED and got.info.status == "FAILED"
    assert got.data.tags[S.STOP_REASON] == "3 non-finite losses" and got.data.params["lr"] == "0.01"
    assert history(mlflow_server.uri, got.info.run_id) == [1, 2]
    assert history(mlflow_server.uri, got.info.run_id, S.EPOCHS_DONE) == [0]


class Recorder:
    """The Reporter protocol in memory (no Ray, no MLflow): what a trial commits and how it ends."""

    rank, world_size = 0, 1

    def __init__(self, state=None):
        self.state, self.commits, self.finished = state, [], None

    def load(self):
        return self.state

    def start(self, progress, trial):
        return "run-id"

    def commit(self, state, epoch, progress):
        self.commits.append(state)

    def finish(self, progress, trial):
        self.finished = progress


@pytest.mark.parametrize("fault,status", [("nan_from_step: 7", "diverged"), ("oom_at_step: 8", "oom")])
def test_oom_and_diverged_are_terminal_in_the_checkpoint(tmp_path, base, fault, status):
    """The final checkpoint records the status and reason; a relaunch from it trains nothing."""
    _, [spec] = plan_trials([f"workdir={tmp_path}", *base, "train.max_nonfinite_steps=3",
                             "train.inject={" + fault + "}"])
    require_prepared(spec.data_root, spec.dataset)
    first = Recorder()
    run_training(spec, first)
    final = first.commits[-1]
    assert final["progress"]["status"] == status and final["progress"]["epoch"] == 1
    assert final["progress"]["stop_reason"] and first.finished.status == status

    again = Recorder(state=final)
    progress = run_training(spec, again)
    assert again.commits == [] and again.finished.status == status  # nothing trained, nothing committed
    assert progress.stop_reason == final["progress"]["stop_reason"] and progress.global_step == \
        final["progress"]["global_step"]


# --------------------------------------------------------------------------------------------
# Whole sweeps
# --------------------------------------------------------------------------------------------

def epochs_logged(workdir: Path, r) -> list[int]:
    return sorted(m.step for m in client_for(workdir).get_metric_history(r.info.run_id, S.TEST_ACC))


def checkpoints(workdir: Path, epoch: int) -> list[Path]:
    return [p.parent for p in workdir.glob(f"experiments/*/trials/*/epoch{epoch:04d}-step*/state.pt")]


def driver_log(workdir: Path) -> str:
    return (workdir / "driver.log").read_text()


@pytest.mark.slow  # ~80 s sweep; CI keeps the in-process outage, refused-write and pending-file tests
def test_server_down_at_trial_start_back_after_two_epochs(workdir, base):
    args = [*base, "train.epochs=3", "train.inject={sleep_per_step: 0.2}", "tracking_wait_s=300"]
    driver = start(workdir, *args)
    try:
        # Ray is starting: the driver is done with MLflow until the trials end; the trial is not up yet
        wait_for(lambda: "cluster:" in driver_log(workdir), 300, "Ray started", poll=0.1)
        port = int(server_status(workdir)["port"])
        stop_tracking_server(workdir)
        wait_for(lambda: checkpoints(workdir, 2), 300, "two epochs trained", poll=0.3)
        ensure_tracking_server(workdir, port=port)
        assert driver.wait(timeout=600) == 0, driver_log(workdir)[-3000:]
    finally:
        kill_group(driver)
    [r] = trial_runs(workdir)
    assert r.data.tags["status"] == "finished" and r.info.status == "FINISHED"
    assert r.data.tags["resumes"] == "0" and S.TRACKING_ERRORS not in r.data.tags
    assert epochs_logged(workdir, r) == [1, 2, 3]
    log_text = driver_log(workdir)
    assert "MLflow unreachable" in log_text and "resuming at epoch" not in log_text  # trained on, no restart


# both outside CI (suite time): CI keeps the outage at a trial's start as a sweep, and the in-process end delivery
@pytest.mark.parametrize("next_command", [pytest.param("report", marks=pytest.mark.slow),
                                          pytest.param("run", marks=pytest.mark.slow)])
def test_server_down_at_trial_end_delivered_by_next_command(workdir, base, next_command):
    """helix-mel finishes while MLflow is away; mamba-mel errors (its worker SIGKILLed, no retries)
    and the driver's closing pass, with MLflow away too, cannot end its run as failed: both ends
    wait in pending files until the next command."""
    # epoch 2 takes 3 s or more: time to stop the server once epoch 1 is logged
    args = [*base, "variants=[helix-mel,mamba-mel]", "max_failures=0", "tracking_wait_s=2",
            "train.inject={sleep_per_step: 0.5, kill_marker: '" + str(workdir / "killed") + "', "
            "per_trial: {mamba-mel: {kill_at_step: 2}}}"]
    driver = start(workdir, *args)
    try:
        def epoch_1_logged_both_open():
            runs = {r.data.tags["variant"]: r for r in trial_runs(workdir)}
            return len(runs) == 2 and epochs_logged(workdir, runs["helix-mel"])
        wait_for(epoch_1_logged_both_open, 300, "epoch 1 logged", poll=0.3)
        stop_tracking_server(workdir)
        assert driver.wait(timeout=600) == 3, driver_log(workdir)[-3000:]  # no results table without MLflow
    finally:
        kill_group(driver)
    log_text = driver_log(workdir)
    assert (workdir / "killed.2").exists(), "mamba-mel's worker was not killed"
    assert "MLflow still unreachable after 2 s" in log_text and "python -m helix_sweep.report" in log_text
    assert "errored: synth-commands/mamba-mel/split: " in log_text  # the closing summary, MLflow or not
    pending = sorted(p.parent.name for p in workdir.glob(f"experiments/*/trials/*/{PENDING_FILE}"))
    assert pending == ["synth-commands__helix-mel__split", "synth-commands__mamba-mel__split"]

    ensure_tracking_server(workdir)  # back (on another port: nothing pending names the address)
    assert {r.data.tags["status"] for r in trial_runs(workdir)} == {"running"}  # not yet delivered
    if next_command == "report":
        done = subprocess.run([sys.executable, "-m", "helix_sweep.report", f"workdir={workdir}",
                               f"out={workdir / 'dashboards'}"], capture_output=True, text=True, timeout=600,
                              env=env_for(workdir))
    else:
        done = run(workdir, *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {r.data.tags["variant"]: r for r in trial_runs(workdir)}
    r = runs["helix-mel"]
    assert r.data.tags["status"] == "finished" and r.info.status == "FINISHED"
    assert epochs_logged(workdir, r) == [1, 2] and r.data.metrics[S.EPOCHS_DONE] == 2
    failed = runs["mamba-mel"]
    if next_command == "report":
        assert failed.data.tags["status"] == "failed" and failed.info.status == "FAILED"
        assert failed.data.tags["stop_reason"], failed.data.tags
    else:  # delivered as the run started, then retried (resume_errored) and finished
        assert failed.data.tags["status"] == "finished" and epochs_logged(workdir, failed) == [1, 2]
        assert "delivered the pending MLflow writes of synth-commands/mamba-mel/split" in done.stdout + done.stderr
    assert not list(workdir.rglob(PENDING_FILE))


@pytest.mark.slow  # two sweeps (a kill and a restore): ~140 s on an idle 2-core machine
def test_restored_sweep_logs_to_the_new_port_and_a_relaunched_oom_trial_does_not_train(workdir, base):
    """attention-mel runs out of memory in epoch 2 and sleeps before its end; mamba-mel trains
    slowly. The driver dies with both running in Tune's state, and the tracking server comes back
    on another port. The same command relaunches both: mamba-mel resumes and logs to the new port;
    attention-mel reports oom again from its final checkpoint without training."""
    args = [*base, "variants=[attention-mel,mamba-mel]", "tracking_wait_s=5",
            "train.inject={per_trial: {attention-mel: {oom_at_step: 8, sleep_before_finish: 300}, "
            "mamba-mel: {sleep_per_step: 1.5}}}"]
    driver = start(workdir, *args)
    try:
        def ended_and_midway():
            runs = {r.data.tags["variant"]: r for r in trial_runs(workdir)}
            oom = runs.get("attention-mel")
            return oom and oom.info.status != "RUNNING" and oom.data.tags["status"] == "oom" and \
                "mamba-mel" in runs and epochs_logged(workdir, runs["mamba-mel"]) == [1] and runs
        before = wait_for(ended_and_midway, 600, "an oom trial ended and another mid-way", poll=0.5)
    finally:
        kill_group(driver)
    oom_dir = next(workdir.glob("experiments/*/trials/synth-commands__attention-mel__split"))
    ckpts = sorted(p.name for p in oom_dir.glob("epoch*"))
    assert ckpts[-1] == "epoch0001-step00000008-final", ckpts
    old = server_status(workdir)
    stop_tracking_server(workdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        new_port = s.getsockname()[1]
    assert new_port != int(old["port"])
    assert ensure_tracking_server(workdir, port=new_port) == f"http://127.0.0.1:{new_port}"

    done = run(workdir, *args)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "restoring experiment" in out and "resuming at epoch 1" in out and "relaunched after it ended (oom)" in out
    assert "MLflow unreachable" not in out and not list(workdir.rglob(PENDING_FILE))  # straight to the new port
    after = {r.data.tags["variant"]: r for r in trial_runs(workdir)}
    resumed = after["mamba-mel"]
    assert resumed.info.run_id == before["mamba-mel"].info.run_id and int(resumed.data.tags["resumes"]) >= 1
    assert resumed.data.tags["status"] == "finished" and epochs_logged(workdir, resumed) == [1, 2]
    a, b = after["attention-mel"], before["attention-mel"]  # untouched: same run, end, status, reason, curve
    assert (a.info.run_id, a.info.end_time, a.data.tags["status"], a.data.tags["resumes"]) == \
        (b.info.run_id, b.info.end_time, b.data.tags["status"], b.data.tags["resumes"])
    assert a.data.tags["stop_reason"] == b.data.tags["stop_reason"] != "" and epochs_logged(workdir, a) == [1]
    assert sorted(p.name for p in oom_dir.glob("epoch*")) == ckpts  # nothing trained
    assert "| synth-commands | attention-mel | — | 0/1 | oom |" in done.stdout
