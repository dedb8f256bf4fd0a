"""The one MLflow run of a trial, across any number of restarts, and logging that survives outages.

The run is found by the id kept in the checkpoint, else by its `trial_key` tag, else created under
the (dataset, variant) parent. Every write goes through a buffer that keeps the original timestamps:
when the tracking server is unreachable the trial trains on, and the buffer is delivered in order
when the server answers again. Metrics use step = epoch; before logging, an epoch already present in
the run is skipped, so a resumed or retried trial shows one continuous curve with no duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

# Fail fast inside workers: MLflow's own retries back off for minutes, the buffer does the waiting.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

from mlflow.entities import Metric, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from helix_sweep.sweep import artifacts, runs  # noqa: E402
from helix_sweep.sweep import schema as S  # noqa: E402

log = logging.getLogger(__name__)


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def package_versions() -> str:
    names = ("torch", "torchaudio", "ray", "mlflow", "optuna", "pyarrow", "numpy", "mamba-ssm")
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return json.dumps(out, sort_keys=True)


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


class OutageBuffer:
    """Writes to MLflow in order; what fails stays queued (with its timestamps) for the next flush."""

    def __init__(self, client: MlflowClient):
        self.client = client
        self.pending: list[tuple[str, Callable[[], None]]] = []
        self.down_since: Optional[float] = None

    def add(self, what: str, call: Callable[[], None]) -> None:
        self.pending.append((what, call))
        self.flush()

    def flush(self) -> bool:
        while self.pending:
            what, call = self.pending[0]
            try:
                call()
            except Exception as exc:  # connection refused, timeout, 5xx: keep it for later
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("MLflow unreachable (%s while logging %s); buffering, training goes on",
                                type(exc).__name__, what)
                return False
            self.pending.pop(0)
        if self.down_since is not None:
            log.info("MLflow reachable again after %.0f s; buffered writes delivered",
                     time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def drain(self, wait_s: float, poll_s: float = 2.0) -> bool:
        deadline = time.monotonic() + wait_s
        while not self.flush():
            if time.monotonic() > deadline:
                log.error("MLflow still unreachable after %.0f s: %d writes not delivered (the checkpoint "
                          "keeps every epoch's metrics; a resume delivers them)", wait_s, len(self.pending))
                return False
            time.sleep(poll_s)
        return True


class TrialRun:
    def __init__(self, tracking_uri: str, experiment: str, trial_key: str):
        self.client = MlflowClient(tracking_uri)
        self.uri, self.experiment, self.trial_key = tracking_uri, experiment, trial_key
        self.buffer = OutageBuffer(self.client)
        self.run_id = ""
        self.experiment_id = ""
        self.logged: set[int] = set()  # epochs this run already holds

    def open(self, run_id: str, tags: dict, params: dict, resumed: bool) -> str:
        """Reopen the trial's run (by id, else by tag) or create it; runs once per worker start."""
        self.experiment_id = runs.get_or_create_experiment(self.client, self.experiment)
        if run_id:
            run = self.client.get_run(run_id)
        else:
            run = runs.find_trial_run(self.client, self.experiment_id, self.trial_key)
        if run is None:
            run = runs.create_trial_run(self.client, self.experiment_id, self.trial_key, tags[S.DATASET],
                                        tags[S.VARIANT], tags[S.FOLD], params=params)
            resumes = 0
        else:
            resumes = int(run.data.tags.get(S.RESUMES, "0")) + (1 if resumed else 0)
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, tags=[RunTag(S.RESUMES, str(resumes)), RunTag(S.STATUS, S.RUNNING),
                                                 RunTag(S.HARDWARE, hardware())])
        return self.run_id

    def is_closed(self, run_id: str, status: str) -> bool:
        """The run already ended with this status (so a relaunch must not touch it)."""
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return False
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        return run.data.tags.get(S.STATUS) == status and run.info.status != "RUNNING"

    def logged_epochs(self) -> set[int]:
        self.logged = {m.step for m in self.client.get_metric_history(self.run_id, S.TEST_ACC)}
        return self.logged

    def log_epochs(self, history: list[dict]) -> None:
        """Queue one batch of metrics per epoch (step = epoch) not already in the run: an epoch
        retrained after a restart keeps its first logged figures, so the curve has no duplicates."""
        for entry in history:
            epoch = int(entry["epoch"])
            if epoch in self.logged:
                continue
            self.logged.add(epoch)
            ts = int(entry.get("_ts", time.time() * 1000))
            metrics = [Metric(k, float(entry[k]), ts, epoch) for k in S.EPOCH_METRICS if k in entry]
            self.buffer.add(f"epoch {epoch}", lambda m=metrics: self.client.log_batch(self.run_id, metrics=m))

    def log_artifacts(self, confusion, label_names: list[str]) -> None:
        import numpy as np

        def call():
            artifacts.log_confusion_artifacts(self.client, self.run_id, np.asarray(confusion), label_names)
        self.buffer.add("confusion matrix", call)

    def log_config(self, config_yaml: str) -> None:
        self.buffer.add("config", lambda: artifacts.log_config_artifact(self.client, self.run_id, config_yaml))

    def log_model(self, state_dict: dict) -> None:
        self.buffer.add("best model", lambda: artifacts.log_model_artifact(self.client, self.run_id, state_dict))

    def close(self, status: str, extra_tags: dict, final_metrics: dict, wait_s: float) -> None:
        tags = [RunTag(S.STATUS, status)] + [RunTag(k, S.param_value(v)) for k, v in extra_tags.items()]
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, 0) for k, v in final_metrics.items()]
        self.buffer.add("final tags", lambda: self.client.log_batch(self.run_id, metrics=metrics, tags=tags))
        self.buffer.add("end run", lambda: self.client.set_terminated(self.run_id, S.run_state(status)))
        self.buffer.drain(wait_s)

