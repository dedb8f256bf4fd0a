"""Run `python -m helix_sweep.run` as a real subprocess (own process group) and watch its MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from helix_sweep.sweep import schema as S


def env_for(workdir: Path) -> dict:
    # Ray Train's controller polls its workers every 2 s and a report waits for the poll: with
    # epochs of a second or two that is most of a test trial's time (60 s -> 48 s for two trials)
    return {**os.environ, "HOME": str(workdir), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def run(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helix_sweep.run", f"workdir={workdir}", *args],
                          capture_output=True, text=True, timeout=timeout, env=env_for(workdir))


def start(workdir: Path, *args: str) -> subprocess.Popen:
    log = open(workdir / "driver.log", "w")
    return subprocess.Popen([sys.executable, "-m", "helix_sweep.run", f"workdir={workdir}", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env_for(workdir), start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything in its process group, as a dead shell would."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(json.loads((workdir / "mlflow" / "server.json").read_text())["uri"])


def trial_runs(workdir: Path) -> list:
    try:
        client = client_for(workdir)
        exps = [e for e in client.search_experiments() if e.name.startswith("helix-")]
    except Exception:  # server not up yet
        return []
    if not exps:
        return []
    return [r for r in client.search_runs([exps[0].experiment_id], max_results=1000)
            if r.data.tags.get(S.KIND) == S.KIND_TRIAL]


def wait_for(predicate, timeout: float, what: str, poll: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")
