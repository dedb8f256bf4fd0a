"""The one MLflow run of a trial, across any number of restarts, and logging that survives outages.

Every write to the run, opening it included, is a `Write` (plain data) delivered through an
`outage.OutageBuffer`: with the tracking server away the trial trains on, and what is buffered is
delivered in order, with its original timestamps, once the server answers. Opening finds the run by
the id kept in the checkpoint, else by its `trial_key` tag, else creates it under the (dataset,
variant) parent; it then reads which epochs the run holds, so an epoch is logged once however often
the trial restarts (metrics use step = epoch). A write MLflow refuses (a rejected value, a full
artifact disk) is skipped and counted in the run's `tracking_errors` tag.

When the server is still away as the trial ends and the worker has waited its `finish_wait_s`, the
undelivered writes (the end status among them) go to a small JSON file beside the trial's
checkpoints (PENDING_FILE) and the worker lets its GPU go. Whoever comes next delivers them with
`deliver_pending`: the driver's closing pass, a later `run` of the experiment, or
`python -m helix_sweep.report`. A relaunched worker of the trial takes the file over instead.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

# Fail fast inside workers: MLflow's own retries back off for minutes, the buffer does the waiting.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

from filelock import FileLock, Timeout  # noqa: E402
from mlflow.entities import Metric, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from helix_sweep.sweep import artifacts, runs  # noqa: E402
from helix_sweep.sweep import schema as S  # noqa: E402
from helix_sweep.sweep.outage import OutageBuffer, is_outage  # noqa: E402

log = logging.getLogger(__name__)

PENDING_FILE = "tracking_pending.json"  # in the trial's storage directory, beside its checkpoints


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


@dataclass
class Write:
    """One write to the trial's run, as JSON-able data so that it can wait in a file.

    kind and data:
      open     {params, resumed, hardware, reopen, create}: find (or create) the run; `reopen` marks it
               running again (a worker that trains), `create` allows creating it
      epoch    {epoch, metrics, ts}: one epoch's metrics (step = epoch), skipped if the run has it
      confusion{confusion, label_names}: the best epoch's confusion matrix artifacts
      config   {yaml}: the resolved config artifact
      model    {best_dir}: the best epoch's weights, read from its checkpoint copy at delivery
      figures  {metrics, tags, ts}: end-of-trial metrics (step 0), or tags
      (config, model and figures with `unless_ended`: STATUS are skipped when the run already ended
      with that status)
      end      {status, tags, only_if_running}: the status tag and the run's end state, then `tags`
               (stop_reason); nothing when the run already ended with that status (or, with
               only_if_running, is not tagged running)
    """

    kind: str
    data: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"epoch {self.data['epoch']}" if self.kind == "epoch" else self.kind


class TrialRun:
    def __init__(self, tracking_uri: str, experiment: str, trial_key: str, dataset: str, variant: str,
                 fold: str | int, run_dir: str | Path = "", run_id: str = ""):
        self.client = MlflowClient(tracking_uri)
        self.uri, self.experiment, self.trial_key = tracking_uri, experiment, trial_key
        self.dataset, self.variant, self.fold = dataset, variant, str(fold)
        self.run_dir = Path(run_dir) if run_dir else None
        self.run_id = run_id  # known once opened (or from the checkpoint)
        self.experiment_id = ""
        self.buffer: OutageBuffer[Write] = OutageBuffer(self._deliver, Write.describe, probe=self._probe)
        self.logged: set[int] = set()  # epochs the run holds (read when opened)
        self.queued: set[int] = set()  # epochs queued by this process
        self.resumes: Optional[int] = None  # the resumes tag this start sets (fixed once computed)
        self.errors_logged = 0  # the run's tracking_errors tag as we last saw or set it
        self.errors_before = 0  # its value when opened (errors of earlier starts)

    # ---------------------------------------------------------------- what a worker queues
    def open(self, params: dict, resumed: bool = False, reopen: bool = True, create: bool = True) -> str:
        """Queue opening the run (delivered now if the server answers); returns its id or ""."""
        self.add(Write("open", {"params": {k: S.param_value(v) for k, v in params.items()}, "resumed": resumed,
                                "hardware": hardware() if reopen else "", "reopen": reopen, "create": create}))
        return self.run_id

    def log_epochs(self, history: list[dict]) -> None:
        """Queue one batch of metrics per epoch (step = epoch) not already in the run: an epoch
        retrained after a restart keeps its first logged figures, so the curve has no duplicates."""
        for entry in history:
            epoch = int(entry["epoch"])
            if epoch in self.queued:
                continue
            self.queued.add(epoch)
            metrics = {k: float(entry[k]) for k in S.EPOCH_METRICS if k in entry}
            ts = int(entry.get("_ts", time.time() * 1000))
            self.add(Write("epoch", {"epoch": epoch, "metrics": metrics, "ts": ts}))

    def log_artifacts(self, confusion, label_names: list[str]) -> None:
        import numpy as np

        self.add(Write("confusion", {"confusion": np.asarray(confusion).tolist(), "label_names": list(label_names)}))

    def set_tags(self, tags: dict) -> None:
        self.add(Write("figures", {"metrics": {}, "tags": {k: S.param_value(v) for k, v in tags.items()}, "ts": 0}))

    def close(self, status: str, extra_tags: dict, final_metrics: dict, wait_s: float, config_yaml: str = "",
              best_dir: str | Path = "") -> bool:
        """End the run with `status` (with the config and, given `best_dir`, the best weights as
        artifacts), waiting up to `wait_s` for the server; what it could not deliver goes to the
        pending file (see the module docstring). True when all was delivered. A run that already
        ended with `status` (a relaunch after the end) gets none of it again."""
        if config_yaml:
            self.add(Write("config", {"yaml": config_yaml, "unless_ended": status}))
        if best_dir:
            self.add(Write("model", {"best_dir": str(best_dir), "unless_ended": status}))
        self.add(Write("figures", {"metrics": {k: float(v) for k, v in final_metrics.items()}, "tags": {},
                                   "ts": int(time.time() * 1000), "unless_ended": status}))
        self.add(Write("end", {"status": status, "tags": {k: S.param_value(v) for k, v in extra_tags.items()},
                               "only_if_running": False}))
        if self.buffer.drain(wait_s):
            self._sync_error_count()  # writes refused in the drain count too
            return True
        try:
            where = self.save_pending()
        except OSError as exc:  # the storage failed too (the reason this trial may be ending)
            log.error("MLflow unreachable and %d writes of %s (its end status %s among them) cannot be kept: %s",
                      len(self.buffer.pending), self.trial_key, status, exc)
            return False
        log.error("MLflow still unreachable after %.0f s: %d writes of %s (its end status %s among them) wait "
                  "in %s; the driver's closing pass, the next run of this experiment or python -m "
                  "helix_sweep.report delivers them", wait_s, len(self.buffer.pending), self.trial_key, status, where)
        return False

    def add(self, write: Write) -> None:
        self.buffer.add(write)
        if not self.buffer.down_since:
            self._sync_error_count()

    def flush(self, now: bool = True) -> bool:
        """Deliver what waits (with now=False only once the back-off after an outage has passed)."""
        ok = self.buffer.flush() if now else self.buffer.poll()
        if ok:
            self._sync_error_count()
        return ok

    # ---------------------------------------------------------------- delivery
    def _probe(self) -> None:
        """A read through the server's store (raises when the server or its store does not answer)."""
        self.client.search_experiments(max_results=1)

    def _deliver(self, w: Write) -> None:
        d = w.data
        if w.kind == "open":
            return self._open(d)
        if not self.run_id:  # the run could not be found and was not to be created: nothing to write to
            log.debug("%s: no run to deliver %s to", self.trial_key, w.describe())
            return
        if d.get("unless_ended") and self._ended_with(d["unless_ended"]):
            return
        if w.kind == "epoch":
            if d["epoch"] not in self.logged:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, d["ts"], d["epoch"])
                                                            for k, v in d["metrics"].items()])
                self.logged.add(d["epoch"])
        elif w.kind == "confusion":
            import numpy as np

            artifacts.log_confusion_artifacts(self.client, self.run_id, np.asarray(d["confusion"]), d["label_names"])
        elif w.kind == "config":
            artifacts.log_config_artifact(self.client, self.run_id, d["yaml"])
        elif w.kind == "model":
            import torch

            state = torch.load(Path(d["best_dir"]) / "state.pt", map_location="cpu", weights_only=True)
            artifacts.log_model_artifact(self.client, self.run_id, state["model"])
        elif w.kind == "figures":
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, d["ts"], 0) for k, v in d["metrics"].items()],
                                  tags=[RunTag(k, v) for k, v in d["tags"].items()])
        elif w.kind == "end":
            self._end(d["status"], d.get("tags", {}), d["only_if_running"])
        else:
            raise ValueError(f"unknown tracking write {w.kind!r}")

    def _open(self, d: dict) -> None:
        self.experiment_id = runs.get_or_create_experiment(self.client, self.experiment)
        run = None
        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
            except Exception as exc:
                if is_outage(exc):
                    raise
                log.warning("%s: run %s (from the checkpoint) not found (%s); looking it up by its trial_key tag",
                            self.trial_key, self.run_id, exc)
        if run is None:
            run = runs.find_trial_run(self.client, self.experiment_id, self.trial_key)
        if run is None and not d["create"]:
            self.run_id = ""
            return
        if run is None:
            tags = {S.RESUMES: "0", S.STATUS: S.RUNNING, **({S.HARDWARE: d["hardware"]} if d["hardware"] else {})}
            run = runs.create_trial_run(self.client, self.experiment_id, self.trial_key, self.dataset, self.variant,
                                        self.fold, tags=tags, params=d["params"])
            self.resumes = 0
        self.run_id = run.info.run_id
        self.errors_before = self.errors_logged = int(run.data.tags.get(S.TRACKING_ERRORS, "0") or 0)
        if d["reopen"]:
            if self.resumes is None:  # computed once: a retried open must not count the restart twice
                self.resumes = int(run.data.tags.get(S.RESUMES, "0")) + (1 if d["resumed"] else 0)
            if run.info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            tags = {S.RESUMES: str(self.resumes), S.STATUS: S.RUNNING, S.HARDWARE: d["hardware"]}
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.logged = {m.step for m in self.client.get_metric_history(self.run_id, S.TEST_ACC)}

    def _ended_with(self, status: str) -> bool:
        run = self.client.get_run(self.run_id)
        return run.data.tags.get(S.STATUS) == status and run.info.status != "RUNNING"

    def _end(self, status: str, tags: dict, only_if_running: bool) -> None:
        run = self.client.get_run(self.run_id)
        tagged = run.data.tags.get(S.STATUS)
        if only_if_running and tagged != S.RUNNING:
            return
        if tagged == status and run.info.status != "RUNNING":
            return  # already ended so (a relaunch after the end, a record delivered twice)
        self.client.log_batch(self.run_id, tags=[RunTag(S.STATUS, status)])
        self.client.set_terminated(self.run_id, S.run_state(status))
        if tags:  # after the status: a refused tag must not keep the run open
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        try:  # aggregates are recomputed by the next fold that ends, or by the report
            runs.update_parent_aggregates(self.client, run.info.experiment_id, self.dataset, self.variant)
        except Exception as exc:
            log.warning("parent aggregates of %s/%s not updated: %s", self.dataset, self.variant, exc)

    def _sync_error_count(self) -> None:
        """The run's tracking_errors tag follows the permanent errors skipped (this start's and before)."""
        count = self.errors_before + self.buffer.errors
        if not self.run_id or count == self.errors_logged:
            return
        try:
            self.client.set_tag(self.run_id, S.TRACKING_ERRORS, str(count))
            self.errors_logged = count
        except Exception as exc:  # the next flush tries again
            log.warning("%s: tracking_errors tag not set (%s)", self.trial_key, exc)

    # ---------------------------------------------------------------- the pending file
    def record(self) -> dict:
        unsynced = self.errors_before + self.buffer.errors - self.errors_logged  # not yet in the run's tag
        return {"uri": self.uri, "experiment": self.experiment, "trial_key": self.trial_key,
                "dataset": self.dataset, "variant": self.variant, "fold": self.fold, "run_id": self.run_id,
                "tracking_errors": unsynced, "writes": [asdict(w) for w in self.buffer.pending]}

    def save_pending(self) -> Optional[Path]:
        """Append the undelivered writes to the trial's pending file; returns its path."""
        if self.run_dir is None:
            log.error("%s: no storage directory to keep %d undelivered MLflow writes in", self.trial_key,
                      len(self.buffer.pending))
            return None
        path = self.run_dir / PENDING_FILE
        with FileLock(str(path) + ".lock"):
            old = _read(path)
            rec = self.record()
            if old:
                rec["writes"] = old["writes"] + rec["writes"]
                rec["run_id"] = rec["run_id"] or old.get("run_id", "")
                rec["tracking_errors"] += int(old.get("tracking_errors", 0))
            _write(path, rec)
        return path

    def take_over_pending(self) -> None:
        """A relaunched worker of the trial queues what an earlier one left undelivered (its own open
        and end replace the old ones) and removes the file."""
        if self.run_dir is None or not (self.run_dir / PENDING_FILE).exists():
            return
        path = self.run_dir / PENDING_FILE
        with FileLock(str(path) + ".lock"):
            rec = _read(path)
            path.unlink(missing_ok=True)
        if not rec:
            return
        self.run_id = self.run_id or rec.get("run_id", "")
        kept = [Write(**w) for w in rec["writes"] if w["kind"] not in ("open", "figures", "end")]
        log.info("%s: taking over %d undelivered MLflow writes from %s", self.trial_key, len(kept), path)
        self.buffer.errors += int(rec.get("tracking_errors", 0))
        self.buffer.pending.extend(kept)


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        log.error("unreadable pending MLflow writes %s (%s); left in place", path, exc)
        raise


def _write(path: Path, rec: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # temp + rename: never half a file
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, path)


def pending_files(root: Path) -> list[Path]:
    """Pending files under `root` (a trials folder, an experiment, or the experiments folder)."""
    return sorted(Path(root).rglob(PENDING_FILE)) if Path(root).is_dir() else []


def deliver_pending(uri: str, root: Path, experiment: Optional[str] = None, same_host: bool = False
                    ) -> tuple[int, int]:
    """Deliver the pending files under `root` (only those of `experiment`, if given) to `uri`.

    same_host: only files a trial wrote while logging to `uri`'s host (the report, which may be
    pointed at another server holding an experiment of the same name; a local server back on
    another port is the same host). The driver delivers its own experiment's files wherever the
    trials logged before: they log where it says now. A file whose writes all arrive (or were
    refused) is removed; one cut off by an outage keeps what is left for the next try.
    Returns (files delivered, files left)."""
    host = urllib.parse.urlparse(uri).hostname
    done = left = 0
    for path in pending_files(root):
        try:
            with FileLock(str(path) + ".lock", timeout=0):  # another process delivers it right now
                rec = _read(path)
                if not rec or (experiment is not None and rec.get("experiment") != experiment) or \
                        (same_host and urllib.parse.urlparse(rec.get("uri", "")).hostname != host):
                    continue
                run = TrialRun(uri, rec["experiment"], rec["trial_key"], rec["dataset"], rec["variant"], rec["fold"],
                               run_dir=path.parent, run_id=rec.get("run_id", ""))
                run.buffer.errors = int(rec.get("tracking_errors", 0))
                writes = [Write(**w) for w in rec["writes"]]
                if writes and writes[0].kind != "open":  # find the run (its id may be stale or unknown)
                    writes.insert(0, Write("open", {"params": {}, "resumed": False, "hardware": "", "reopen": False,
                                                    "create": False}))
                run.buffer.pending.extend(writes)
                if run.flush():
                    path.unlink()
                    done += 1
                    log.info("delivered the pending MLflow writes of %s (%s)", rec["trial_key"], path)
                else:
                    _write(path, run.record())
                    left += 1
        except Timeout:
            continue
        except ValueError:  # unreadable: named in the log, left for a person
            left += 1
    return done, left


def end_trial_run(uri: str, experiment: str, trial_key: str, dataset: str, variant: str, fold: str,
                  run_dir: str | Path, status: str, reason: str = "") -> None:
    """The driver ends a trial's run that is still tagged running with `status` (a failed or stopped
    trial whose worker could not); with the server away the end waits in the trial's pending file."""
    run = TrialRun(uri, experiment, trial_key, dataset, variant, fold, run_dir=run_dir)
    run.open({}, reopen=False, create=False)
    tags = {S.STOP_REASON: S.param_value(reason)} if reason else {}
    run.add(Write("end", {"status": status, "tags": tags, "only_if_running": True}))
    if not run.flush():
        log.warning("MLflow unreachable: %s stays tagged running until the next run or report delivers its end "
                    "(%s)", trial_key, run.save_pending())
