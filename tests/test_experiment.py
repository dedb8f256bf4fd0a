"""Run identity: resume= must name an experiment that exists; one live driver per experiment."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helix_sweep.config import ConfigError
from helix_sweep.sweep.experiment import LOCK_FILE, STALE_S, ExperimentLock, experiment_dir

HOLD = """
import sys, time
from pathlib import Path
from helix_sweep.sweep.experiment import ExperimentLock
with ExperimentLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_resume_must_name_an_existing_experiment(tmp_path):
    (tmp_path / "experiments" / "helix-full").mkdir(parents=True)
    (tmp_path / "experiments" / "helix-smoke").mkdir()
    assert experiment_dir(tmp_path, "helix-smoke", None) == tmp_path / "experiments" / "helix-smoke"
    assert experiment_dir(tmp_path, "helix-smoke", "helix-full") == tmp_path / "experiments" / "helix-full"
    with pytest.raises(ConfigError) as err:
        experiment_dir(tmp_path, "helix-smoke", "helix-fulll")
    assert "resume=helix-fulll" in str(err.value) and "helix-full, helix-smoke" in str(err.value)
    with pytest.raises(ConfigError, match="no such experiment folder"):
        experiment_dir(tmp_path, "helix-smoke", str(tmp_path / "elsewhere" / "x"))


def test_a_second_driver_is_refused_while_the_first_lives_and_admitted_once_it_is_killed(tmp_path):
    exp = tmp_path / "experiments" / "helix-smoke"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as err:
            ExperimentLock(exp).acquire()
        assert f"pid {holder.pid}" in str(err.value) and "live driver" in str(err.value)
        assert json.loads((exp / LOCK_FILE).read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with ExperimentLock(exp) as lock:  # the killed driver's lock is taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (exp / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    lock_file = exp / LOCK_FILE
    lock_file.write_text(json.dumps({"host": "head-that-died", "pid": 1, "start_time": "1", "since": "then"}))
    with pytest.raises(ConfigError, match="host head-that-died"):
        ExperimentLock(exp).acquire()
    old = time.time() - STALE_S - 5
    os.utime(lock_file, (old, old))
    lock = ExperimentLock(exp)
    lock.acquire()
    try:
        assert json.loads(lock_file.read_text())["host"] != "head-that-died"
    finally:
        lock.release()


def run_cli(workdir, *args):
    return subprocess.run([sys.executable, "-m", "helix_sweep.run", f"workdir={workdir}", *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(workdir)})


def written(workdir):
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.name != LOCK_FILE)


def test_cli_refuses_a_mistyped_resume_and_a_live_experiment_writing_nothing(tmp_path):
    (tmp_path / "experiments" / "helix-smoke").mkdir(parents=True)
    before = written(tmp_path)
    proc = run_cli(tmp_path, "resume=helix-smok")
    assert proc.returncode == 2 and "resume=helix-smok" in proc.stderr and "helix-smoke" in proc.stderr, proc.stderr
    proc = run_cli(tmp_path, "experiment=../escape")
    assert proc.returncode == 2 and "plain name" in proc.stderr, proc.stderr
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "experiments" / "held")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli(tmp_path, "experiment=held", "datasets=[synth-commands]", "variants=[mamba-mel]")
        assert proc.returncode == 2 and "live driver" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # no settings, no MLflow store, no data: the refused drivers wrote nothing
    assert written(tmp_path) == sorted(before + ["experiments/held"])


def test_kernel_cache_is_stale_until_written_after_the_source(tmp_path):
    import os

    from helix_sweep.run import CPU_KERNELS, kernels_cached

    (tmp_path / "__pycache__").mkdir()
    source = tmp_path / f"{CPU_KERNELS}.py"
    source.write_text("# kernels\n")
    assert not kernels_cached(tmp_path)  # a fresh clone: nothing compiled
    (tmp_path / "__pycache__" / f"{CPU_KERNELS}.fused_forward-97.py311.nbi").write_bytes(b"")
    assert kernels_cached(tmp_path)
    later = source.stat().st_mtime + 10
    os.utime(source, (later, later))  # its source changed since
    assert not kernels_cached(tmp_path)


def test_kernels_compile_in_the_background_only_for_a_local_sweep_with_mamba_trials(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from helix_sweep import run

    monkeypatch.setattr(run, "kernels_cached", lambda: False)
    started = []
    monkeypatch.setattr(run.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or "compiling")
    local, cluster = SimpleNamespace(ray_address=None), SimpleNamespace(ray_address="10.0.0.1:6379")
    mamba, attention = SimpleNamespace(pattern="MMMAMM", status="run"), SimpleNamespace(pattern="AAAAAA", status="run")
    assert run.compile_cpu_kernels(cluster, [mamba]) is None  # the workers' machines compile their own
    assert run.compile_cpu_kernels(local, [attention]) is None  # nothing will run the kernels
    assert run.compile_cpu_kernels(local, [attention, mamba]) == "compiling"
    assert started and "helix_sweep.models.mixer_numba" in started[0][-1]
    monkeypatch.setattr(run, "kernels_cached", lambda: True)
    assert run.compile_cpu_kernels(local, [mamba]) is None  # compiled already


def record_of(*overrides: str) -> str:
    from helix_sweep.config import to_yaml
    from helix_sweep.run import plan_trials
    from helix_sweep.sweep.experiment import settings_record

    cfg, trials = plan_trials(list(overrides))
    return settings_record(to_yaml(cfg), [t.key for t in trials])


def test_an_experiment_continues_only_with_its_settings_but_survives_a_release_adding_one(tmp_path, caplog):
    from helix_sweep.sweep.experiment import check_same_config

    exp = tmp_path / "exp"
    saved = exp / "helix_config.yaml"
    started = record_of()
    check_same_config(exp, started)
    assert saved.read_text() == started
    check_same_config(exp, started)  # the same command continues
    check_same_config(exp, record_of("tracking_uri=http://elsewhere:5000", "max_concurrent_trials=1"))  # where, not what

    with pytest.raises(ConfigError) as err:  # a changed value: refused, naming the key and both values
        check_same_config(exp, record_of("train.lr=0.01"))
    assert "train.lr: 0.005 -> 0.01" in str(err.value) and saved.read_text() == started
    with pytest.raises(ConfigError) as err:  # another grid: refused, naming the trials
        check_same_config(exp, record_of("variants=[mamba-raw]"))
    assert "trials: 6 in the experiment, 1 on the command line" in str(err.value)

    with pytest.raises(ConfigError, match=r"train_explicit.lr: \(not set\) -> 0.005"):  # explicit now: wins over
        check_same_config(exp, record_of("train.lr=0.005"))  # a dataset's own lr, so not the same settings

    # an experiment started before a release added train.max_nonfinite_steps (its record lacks the key)
    # and with fields this release no longer has
    older = started.replace("  max_nonfinite_steps: 25\n", "").replace("train:\n", "train:\n  retired_key: 3\n", 1)
    older = older.replace("  synth-concat:\n", "  synth-concat:\n    retired_field: x\n", 1)
    assert older.count("retired") == 2 and "max_nonfinite_steps" not in older
    saved.write_text(older)
    with pytest.raises(ConfigError, match=r"train.max_nonfinite_steps: \(not set\) -> 5"):  # not the default:
        check_same_config(exp, record_of("train.max_nonfinite_steps=5"))  # the experiment ran without it
    with caplog.at_level("WARNING"):
        check_same_config(exp, started)
    assert "train.max_nonfinite_steps=25" in caplog.text
    assert "train.retired_key" in caplog.text and "dataset_defs.synth-concat.retired_field" in caplog.text
    assert saved.read_text() == started  # the record now has it: a later change of it is caught
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps: 25 -> 5"):
        check_same_config(exp, record_of("train.max_nonfinite_steps=5"))
