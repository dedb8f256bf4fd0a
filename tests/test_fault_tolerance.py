"""Fault tolerance through a real local Ray (or a real multi-node ray.cluster_utils.Cluster) and a real
MLflow server on loopback. No mocks.

- A worker SIGKILLed at a random step mid-epoch, then again after an epoch boundary, restarts from its
  latest checkpoint each time and ends bit-identical to an uninterrupted run (deterministic
  algorithms, CPU), in the same single MLflow run.
- NaN losses end a trial as `diverged`, an OOM inside the step as `oom`; the sweep's other trials finish.
- A killed driver: finished trials are not rerun, the one in flight continues from its checkpoint.
- The tracking server stopped mid-trial and started again: every epoch logged exactly once.
- The checkpoint storage turned read-only mid-trial: the trial fails with a clear error, the previous
  checkpoint stays intact, and the same command resumes from it once the storage is writable.
- A lost node: the trial finishes on another node from its checkpoint.
"""

import contextlib
import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from helix_sweep.run import plan_trials
from helix_sweep.sweep.tracking import ensure_tracking_server, server_status, stop_tracking_server
from helix_sweep.sweep.worker import RAY_SNAPSHOT
from helix_sweep.training.checkpoint import BEST_DIR, checkpoints_on_disk, load_newest, load_state
from helix_sweep.training.loop import run_training
from mounts import read_only, tmpfs
from sweep_process import client_for, kill_group, run, start, trial_runs, wait_for

BASE = ["datasets=[synth-commands]", "train.epochs=2", "train.deterministic=true", "train.batch_size=100"]
TIMING = ("epoch_seconds", "samples_per_s", "peak_mem_mb", "_ts")


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    stop_tracking_server(tmp_path)


def by_key(workdir: Path) -> dict:
    return {r.data.tags["trial_key"]: r for r in trial_runs(workdir)}


def epochs_logged(workdir: Path, run) -> list:
    return [m.step for m in client_for(workdir).get_metric_history(run.info.run_id, "test_acc")]


class MemoryReporter:
    """An in-process reporter: the uninterrupted reference run, no Ray, no MLflow."""

    rank, world_size = 0, 1

    def __init__(self):
        self.last = None

    def load(self):
        return None

    def start(self, progress, info):
        return "reference"

    def commit(self, state, metrics, progress):
        self.last = state

    def finish(self, progress, info):
        pass


@pytest.mark.parametrize("runner", ["auto", "train"])
def test_worker_sigkill_mid_epoch_resumes_bit_identical(workdir, runner):
    # runner auto: the trial trains in Tune's trial actor (one CPU worker on a local Ray), so the kill
    # is the actor's and Tune relaunches the trial; train: a Ray Train run, whose controller restarts
    # its worker
    key = "synth-commands/helix-mel/split"
    marker = workdir / "killed"
    # 6 steps an epoch, a checkpoint after every step; SIGKILL the worker at the first step after the
    # epoch-1 boundary (global step 6), then at a random step inside epoch 2
    mid = random.Random().randrange(7, 12)
    print(f"killing at global steps 6 and {mid}")
    args = [*BASE, "variants=[helix-mel]", f"resources.trial_runner={runner}"]
    proc = run(workdir, *args, "train.checkpoint_minutes=0.0",
               "train.inject={kill_at_step: [6, " + str(mid) + "], kill_marker: '" + str(marker) + "'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "killed.6").exists() and (workdir / f"killed.{mid}").exists(), "the worker was not killed twice"
    output = proc.stdout + proc.stderr
    trained_by = {"auto": "(train_trial pid=", "train": "(RayTrainWorker pid="}
    assert trained_by[runner] in output and trained_by[{"auto": "train", "train": "auto"}[runner]] not in output
    # lost work is bounded by checkpoint_minutes: with a checkpoint after every step, nothing is redone
    assert "resuming at epoch 1 step 0" in output
    assert f"resuming at epoch 1 step {mid - 6}" in output
    [final] = list((workdir / "experiments").glob(f"*/trials/{key.replace('/', '__')}/*-final"))
    resumed = load_state(final)
    # a checkpoint after every step, across a restart: the newest two and the best epoch's copy remain
    kept = checkpoints_on_disk(final.parent)
    assert kept[0] == final and load_state(kept[1])["progress"]["global_step"] == \
        resumed["progress"]["global_step"] - 1
    if runner == "train":
        # plus at most one older that Ray's record still names (a kill between our write and Ray
        # registering it leaves Ray's record one behind; the worker never deletes what Ray lists)
        listed = {r["checkpoint_dir_name"] for r in
                  json.loads((final.parent / RAY_SNAPSHOT).read_text())["checkpoint_results"]}
        assert len(kept) <= 3 and all(k.name in listed for k in kept[2:]), (kept, listed)
    else:  # in the actor every checkpoint is ours: exactly the newest two, and no half-written folder
        assert len(kept) == 2 and not (final.parent / RAY_SNAPSHOT).exists(), kept
        assert not list(final.parent.glob(".*.tmp")), list(final.parent.iterdir())
    best = load_state(final.parent / BEST_DIR)["progress"]
    assert best["epoch"] == best["best_epoch"] == resumed["progress"]["best_epoch"] and best["step_in_epoch"] == 0

    _, [spec] = plan_trials([f"workdir={workdir}", *args])
    reference = MemoryReporter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (cpus_per_worker=1)
    try:
        run_training(spec, reference)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    ref = reference.last
    assert ref["progress"]["epoch"] == resumed["progress"]["epoch"] == 2
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    strip = lambda h: [{k: v for k, v in e.items() if k not in TIMING} for e in h]
    assert strip(ref["progress"]["history"]) == strip(resumed["progress"]["history"])

    runs = by_key(workdir)
    assert list(runs) == [key]
    # one resume per restart from a checkpoint: the two kills, plus any restart a loaded machine adds
    # (once, with another pytest beside it, the Train run counted 3), each logged as it loads
    restarts = output.count(f"{key}: resuming at epoch")
    assert runs[key].data.tags["status"] == "finished" and int(runs[key].data.tags["resumes"]) == restarts >= 2
    assert epochs_logged(workdir, runs[key]) == [1, 2]


@pytest.mark.slow  # outside CI (suite time); CI covers it in process: tests/test_ddp.py, test_tracking_outage.py's terminal oom/diverged
def test_nan_diverges_oom_stops_and_the_rest_finishes(workdir):
    proc = run(workdir, *BASE, "variants=[helix-mel,attention-mel,mamba-mel]", "train.max_nonfinite_steps=3",
               "train.inject={per_trial: {helix-mel: {nan_from_step: 2}, attention-mel: {oom_at_step: 3}}}")
    runs = by_key(workdir)
    status = {k.split("/")[1]: r.data.tags["status"] for k, r in runs.items()}
    assert status == {"helix-mel": "diverged", "attention-mel": "oom", "mamba-mel": "finished"}, proc.stderr[-3000:]
    diverged = runs["synth-commands/helix-mel/split"]
    assert "3 non-finite losses in a row" in diverged.data.tags["stop_reason"]
    oom = runs["synth-commands/attention-mel/split"]
    assert f"out of memory at {oom.data.params['tokens_per_clip']} tokens/clip" in oom.data.tags["stop_reason"]
    assert "micro-batch 100" in oom.data.tags["stop_reason"]
    assert epochs_logged(workdir, runs["synth-commands/mamba-mel/split"]) == [1, 2]


def test_driver_kill_resumes_unfinished_and_keeps_finished(workdir):
    # fold3's epochs are slow (9 s): a killed driver's worker goes on for some seconds (seen: it
    # finished a 2 s epoch 2 after the kill, so the relaunch found the trial finished, not mid-way)
    args = ["datasets=[synth-textures]", "variants=[helix-mel]", "folds=[1,2,3]", "train.epochs=2",
            "train.batch_size=64", "max_concurrent_trials=1",
            "train.inject={sleep_per_step: 0.3, per_trial: {fold3: {sleep_per_step: 1.5}}}"]
    driver = start(workdir, *args)
    try:
        def two_done_one_midway():
            runs = trial_runs(workdir)
            done = [r for r in runs if r.data.tags.get("status") == "finished"]
            midway = [r for r in runs if r.data.tags.get("status") == "running" and epochs_logged(workdir, r)]
            return len(done) >= 2 and midway and (done, midway[0])
        done, midway = wait_for(two_done_one_midway, 600, "2 finished trials and 1 mid-way", poll=0.5)
    finally:
        kill_group(driver)
    before = {r.data.tags["trial_key"]: (r.info.run_id, r.info.end_time, epochs_logged(workdir, r)) for r in done}
    midway_epochs = epochs_logged(workdir, midway)
    proc = run(workdir, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = by_key(workdir)
    assert len(runs) == 3 and all(r.data.tags["status"] == "finished" for r in runs.values())
    for key, (run_id, end_time, epochs) in before.items():  # untouched: same run, same end, same curve
        assert (runs[key].info.run_id, runs[key].info.end_time, epochs_logged(workdir, runs[key])) == \
            (run_id, end_time, epochs)
        assert runs[key].data.tags["resumes"] == "0"
    resumed = runs[midway.data.tags["trial_key"]]
    assert resumed.info.run_id == midway.info.run_id and int(resumed.data.tags["resumes"]) >= 1
    assert epochs_logged(workdir, resumed) == [1, 2] and midway_epochs  # continued, no duplicates
    assert "resuming at epoch" in (workdir / "driver.log").read_text() + proc.stdout + proc.stderr


@pytest.mark.slow  # outside CI (suite time); CI: tests/test_tracking_outage.py's outage at a trial's start and end
def test_tracking_server_outage_mid_trial(workdir):
    args = [*BASE, "variants=[helix-mel]", "train.epochs=4", "train.inject={sleep_per_step: 0.3}"]
    driver = start(workdir, *args)
    try:
        wait_for(lambda: any(epochs_logged(workdir, r) for r in trial_runs(workdir)), 300, "epoch 1 logged")
        port = server_status(workdir)["port"]
        stop_tracking_server(workdir)
        time.sleep(8)  # at least one epoch ends while the server is down
        ensure_tracking_server(workdir, port=int(port))
        assert driver.wait(timeout=600) == 0, (workdir / "driver.log").read_text()[-3000:]
    finally:
        kill_group(driver)
    [r] = trial_runs(workdir)
    assert r.data.tags["status"] == "finished"
    assert epochs_logged(workdir, r) == [1, 2, 3, 4]
    assert "MLflow unreachable" in (workdir / "driver.log").read_text()


@contextmanager
def filled(directory: Path):
    """Fill directory's file system to the last block with a ballast file; remove it on exit."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:  # ENOSPC: on to smaller writes
                pass
    finally:
        os.close(fd)
    try:
        yield
    finally:
        ballast.unlink()


# Both faults mean the same thing to a 40-hour run (no next checkpoint can be written) and take the same
# path; both run outside CI (-m slow: ~160 s each at load), where tmpfs mounts are allowed. Each on
# both runners: the trial in Tune's actor writes its checkpoints itself, a Train run's Ray copies them.
@pytest.mark.slow
@pytest.mark.parametrize("runner", ["auto", "train"])
@pytest.mark.parametrize("fault", ["read-only", "full-disk"])
def test_unwritable_checkpoint_storage_fails_clearly_and_resumes_intact(workdir, fault, runner):
    key = "synth-commands/helix-mel/split"
    args = [*BASE, "variants=[helix-mel]", "max_failures=1", "train.inject={sleep_per_step: 0.4}",
            f"resources.trial_runner={runner}"]
    with contextlib.ExitStack() as stack:
        if fault == "full-disk":  # the trials' storage is a small file system of its own from the start
            [exp] = {t.experiment for t in plan_trials(args)[1]}
            stack.enter_context(tmpfs(workdir / "experiments" / exp / "trials", size_mb=48))
        _unwritable_storage_run(workdir, key, args, fault, runner)


def _unwritable_storage_run(workdir, key, args, fault, runner):
    driver = start(workdir, *args)

    def registered():  # epoch 1's checkpoint is done: the next write is the worker's (or the actor's)
        if runner == "auto":  # renamed into place by the actor (no Ray Train record)
            return [p.parent.parent for p in workdir.glob("experiments/*/trials/*/epoch0001-*/state.pt")]
        return [p.parent for p in workdir.glob(f"experiments/*/trials/*/{RAY_SNAPSHOT}")  # in Ray's record
                if "epoch0001" in p.read_text()]
    try:
        [run_dir] = wait_for(registered, 300, "the first epoch's checkpoint", poll=0.3)
        with (read_only(run_dir.parent) if fault == "read-only" else filled(run_dir.parent)):
            assert driver.wait(timeout=600) == 1, "a trial that cannot checkpoint must fail the sweep"
            log_text = (workdir / "driver.log").read_text()
            [r] = trial_runs(workdir)
            intact = load_newest(checkpoints_on_disk(run_dir))  # a full disk may leave the newest cut short
    finally:
        kill_group(driver)
    # the reason names the storage and the checkpoint left to resume from, in the log and in MLflow
    reason = r.data.tags["stop_reason"]
    assert r.data.tags["status"] == "failed" and r.info.status == "FAILED"
    why = {"read-only": ("Read-only file system", "Permission denied"), "full-disk": ("No space left on device",)}
    assert f"checkpoint storage {run_dir} is not writable" in reason and any(w in reason for w in why[fault]), reason
    assert f"the previous checkpoint {intact[0]} is intact" in reason
    assert f"errored: {key}: helix_sweep.training.checkpoint.CheckpointStorageError: {key}: checkpoint storage " \
        f"{run_dir} is not writable" in log_text  # the driver's closing summary
    state = load_state(intact[0])  # loads: not half-written
    assert state["progress"]["epoch"] >= 1 and state["progress"]["status"] == "running"

    proc = run(workdir, *args)  # storage writable again: the same command resumes the trial
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [r] = trial_runs(workdir)
    assert r.data.tags["trial_key"] == key and r.data.tags["status"] == "finished"
    assert int(r.data.tags["resumes"]) >= 1 and epochs_logged(workdir, r) == [1, 2]
    assert f"resuming at epoch {state['progress']['epoch']}" in proc.stdout + proc.stderr
    # pruned to the newest two (keep_checkpoints) plus the best epoch's copy
    assert len(checkpoints_on_disk(run_dir)) == 2 and (run_dir / BEST_DIR / "state.pt").is_file()


@pytest.mark.slow  # outside CI (suite time); multi-node; CI covers worker kills (sigkill) and driver kills
def test_node_loss_trial_finishes_elsewhere(workdir):
    import psutil
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        args = [*BASE, "variants=[helix-mel]", "train.epochs=3", "train.inject={sleep_per_step: 0.2}",
                f"ray_address={cluster.address}"]
        driver = start(workdir, *args)
        wait_for(lambda: any(epochs_logged(workdir, r) for r in trial_runs(workdir)), 300, "epoch 1 logged")
        # polled: once (at load, 2026-12-02) no worker process was listed at the first look
        worker = wait_for(lambda: next((p for p in psutil.process_iter(["cmdline"])
                                        if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])), None),
                          60, "the trial's Ray Train worker process", poll=0.5)
        raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
        node = next(raylets[p.pid] for p in worker.parents() if p.pid in raylets)
        cluster.remove_node(node, allow_graceful=False)
        assert driver.wait(timeout=600) == 0, (workdir / "driver.log").read_text()[-3000:]
    finally:
        cluster.shutdown()
    [r] = trial_runs(workdir)
    assert r.data.tags["status"] == "finished" and int(r.data.tags["resumes"]) >= 1
    assert epochs_logged(workdir, r) == [1, 2, 3]
