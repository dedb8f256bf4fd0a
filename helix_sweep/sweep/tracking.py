"""MLflow tracking: the local tracking server, reachability checks, parent runs and trial artifacts.

The sweep logs to an MLflow tracking server. When the user configures none, `ensure_tracking_server`
starts one on loopback with a SQLite backend under the work directory (or reuses the one already
running there), detached from the driver so that its UI stays up after the sweep ends:

    <workdir>/mlflow/mlflow.db       backend store (experiments, runs, params, metrics, tags)
    <workdir>/mlflow/artifacts/      artifact store, written through the server (see below)
    <workdir>/mlflow/server.json     {"pid", "port", "host", "uri", ...} of the running server
    <workdir>/mlflow/server.log      the server's stdout and stderr
    <workdir>/mlflow/server.lock     serialises start/stop between concurrent drivers

Artifacts are proxied (`--serve-artifacts --artifacts-destination`): experiments get
`mlflow-artifacts:/` roots, so a Ray worker on any node uploads through the server's HTTP API and
needs no shared file system (with `--default-artifact-root <dir>` each client would write to that
local path itself, which only works on the machine that holds it).

Schema written here (the trial workers follow the same one, see `report.py` for the reader):
parent run per (dataset, variant) named `<dataset>/<variant>` with tags kind=parent, dataset,
variant; trial runs nested under it (tag `mlflow.parentRunId`) with tags kind=trial, dataset, variant,
fold, trial_key, status, and per-epoch metrics (step = epoch) such as `best_test_acc`.

Command line:  python -m helix_sweep.sweep.tracking start|stop|status [--workdir DIR] [--port P]
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from filelock import FileLock

if TYPE_CHECKING:  # mlflow is imported lazily: the server management needs only the stdlib
    import numpy as np
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Where a work directory keeps its tracking state.
MLFLOW_SUBDIR = "mlflow"
SERVER_FILE = "server.json"
STARTUP_TIMEOUT_S = 120.0  # ~7.5 s idle with the lean flags; a loaded 2-core machine needs slack
FINISHED = "finished"  # trial status tag value of a run whose numbers count in the aggregates
TERMINAL_STATUSES = frozenset({"finished", "oom", "diverged", "failed", "planned_oom"})  # trial will not run again

# Servers started by this process, so that we can reap them (a dead child stays a zombie, which
# `os.kill(pid, 0)` still reports as alive).
_children: dict[int, subprocess.Popen] = {}


class TrackingUnavailable(RuntimeError):
    """The tracking URI cannot be used; the message names the URI and the reason."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"MLflow tracking at {uri!r} is unavailable: {reason}")
        self.uri = uri
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Local tracking server
# --------------------------------------------------------------------------------------------


def tracking_dir(workdir: Path) -> Path:
    return Path(workdir).expanduser().resolve() / MLFLOW_SUBDIR


def ensure_tracking_server(
    workdir: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
) -> str:
    """Start the work directory's MLflow server, or reuse it when it is running and healthy.

    Returns the tracking URI (`http://host:port`). The server runs in its own session so it
    outlives the calling process; stop it with `stop_tracking_server(workdir)`.
    Raises TrackingUnavailable when the server does not answer /health within `timeout` seconds
    (the message points at server.log).
    """
    tdir = tracking_dir(workdir)
    tdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(tdir / "server.lock")):
        info = _read_server_info(tdir)
        if info is not None:
            if _server_alive(info) and _healthy(info["uri"], timeout=5.0):
                if port is not None and int(info["port"]) != int(port):
                    log.warning("Reusing MLflow server on port %s (port %s was asked for): %s",
                                info["port"], port, tdir / SERVER_FILE)
                log.info("Reusing MLflow tracking server pid %s at %s", info["pid"], info["uri"])
                return info["uri"]
            alive = _server_alive(info)
            log.info("Replacing stale MLflow server record %s (pid %s %s)", tdir / SERVER_FILE,
                     info["pid"], "alive but not answering /health" if alive else "gone")
            if alive:
                _terminate_group(info["pid"])
            (tdir / SERVER_FILE).unlink(missing_ok=True)
        return _start_server(tdir, host, port if port is not None else _free_port(host), timeout)


def _start_server(tdir: Path, host: str, port: int, timeout: float) -> str:
    db = tdir / "mlflow.db"
    artifacts = tdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", host, "--port", str(port),
        "--workers", "1",  # one worker: ~0.5 GiB instead of ~2.9 GiB (FIELD-NOTES)
    ]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    logfile = open(tdir / "server.log", "ab")
    try:
        logfile.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        logfile.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                                env=env, cwd=tdir, start_new_session=True)
    finally:
        logfile.close()
    _children[proc.pid] = proc
    uri = f"http://{_client_host(host)}:{port}"
    info = {"pid": proc.pid, "pgid": proc.pid, "host": host, "port": port, "uri": uri,
            "backend_store_uri": f"sqlite:///{db}", "artifacts_destination": str(artifacts),
            "started_at": time.time()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingUnavailable(uri, f"mlflow server exited with code {proc.returncode} "
                                           f"during start-up; see {tdir / 'server.log'}")
        if _healthy(uri, timeout=2.0):
            _write_server_info(tdir, info)
            log.info("Started MLflow tracking server pid %d at %s (store %s)", proc.pid, uri, db)
            return uri
        time.sleep(0.5)
    _terminate_group(proc.pid)
    raise TrackingUnavailable(uri, f"no answer on /health within {timeout:.0f} s; "
                                   f"see {tdir / 'server.log'}")


def stop_tracking_server(workdir: Path, timeout: float = 15.0) -> bool:
    """Stop the server that `ensure_tracking_server` started for `workdir` (its whole process group).

    Returns True when a live server was stopped, False when none was running.
    """
    tdir = tracking_dir(workdir)
    if not tdir.exists():
        return False
    with FileLock(str(tdir / "server.lock")):
        info = _read_server_info(tdir)
        if info is None:
            return False
        alive = _server_alive(info)
        if alive:
            _terminate_group(info["pid"], timeout=timeout)
        (tdir / SERVER_FILE).unlink(missing_ok=True)
        return alive


def server_status(workdir: Path) -> dict[str, Any] | None:
    """The recorded server of `workdir` with `alive` and `healthy` flags, or None when none recorded."""
    info = _read_server_info(tracking_dir(workdir))
    if info is None:
        return None
    info["alive"] = _server_alive(info)
    info["healthy"] = info["alive"] and _healthy(info["uri"], timeout=5.0)
    return info


def _read_server_info(tdir: Path) -> dict[str, Any] | None:
    path = tdir / SERVER_FILE
    try:
        info = json.loads(path.read_text())
        int(info["pid"]), int(info["port"]), str(info["uri"])
        return info
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("Ignoring unreadable %s: %s", path, e)
        return None


def _write_server_info(tdir: Path, info: dict[str, Any]) -> None:
    # temp + rename so that a reader never sees half a file
    tmp = tdir / f".{SERVER_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, tdir / SERVER_FILE)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host != "0.0.0.0" else "", 0))
        return s.getsockname()[1]


def _client_host(host: str) -> str:
    """The address clients use for a server bound to `host` (a wildcard bind is reached by name)."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return host


def _pid_alive(pid: int) -> bool:
    pid = int(pid)
    if pid in _children:
        return _children[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (dead, not yet reaped by its parent) is not a server
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _server_alive(info: dict[str, Any]) -> bool:
    """The recorded pid is alive AND is still our server (a reused pid must never be signalled)."""
    pid = int(info["pid"])
    if not _pid_alive(pid):
        return False
    if pid in _children:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "mlflow" in cmdline and str(info.get("backend_store_uri", "mlflow.db")) in cmdline


def _terminate_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by `pid` (the server and its uvicorn workers), then SIGKILL."""
    pid = int(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        except PermissionError as e:
            raise RuntimeError(f"cannot stop MLflow server process group {pid}: {e}") from e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if not _group_alive(pid):
            break
    proc = _children.pop(pid, None)
    if proc is not None:
        proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    if _pid_alive(pgid):
        return True
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Members may be zombies of a parent we are not (reaped by init soon); check them.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


# --------------------------------------------------------------------------------------------
# Reachability
# --------------------------------------------------------------------------------------------


def _healthy(uri: str, timeout: float) -> bool:
    try:
        _get_health(uri, timeout)
        return True
    except TrackingUnavailable:
        return False


def _get_health(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    req = urllib.request.Request(url)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read(64)
    except urllib.error.HTTPError as e:
        raise TrackingUnavailable(uri, f"HTTP {e.code} {e.reason} from {url}") from e
    except urllib.error.URLError as e:
        raise TrackingUnavailable(uri, _describe_os_error(e.reason, timeout)) from e
    except (TimeoutError, socket.timeout) as e:
        raise TrackingUnavailable(uri, f"timed out after {timeout:g} s") from e
    except OSError as e:  # connection reset mid-response and the like
        raise TrackingUnavailable(uri, _describe_os_error(e, timeout)) from e


def _describe_os_error(reason: object, timeout: float) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (no server listening)"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return f"host name does not resolve ({reason})"
    return str(reason)


def check_tracking_reachable(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingUnavailable (naming `uri` and why) unless MLflow can log to `uri`.

    http(s): the server's /health answers 200 within `timeout`. file: / sqlite: / plain paths: the
    store's directory is writable (or can be created). Database URIs (postgresql://, mysql://...):
    the database port accepts a TCP connection. Other schemes (databricks, ...) are not checked.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        _get_health(uri, timeout)
    elif scheme == "sqlite":
        # sqlite:///relative.db or sqlite:////abs/path.db; ":memory:" needs nothing
        path = uri.split("sqlite:///", 1)[1] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            _check_writable(uri, Path(path).parent)
    elif scheme in ("", "file"):
        _check_writable(uri, Path(urllib.parse.unquote(parsed.path) if scheme else uri))
    elif parsed.hostname and scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        port = parsed.port or {"mysql": 3306, "mssql": 1433}.get(scheme.split("+")[0], 5432)
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        except OSError as e:
            raise TrackingUnavailable(uri, f"database {parsed.hostname}:{port}: "
                                           f"{_describe_os_error(e, timeout)}") from e
    else:
        log.info("Not checking reachability of tracking URI scheme %r (%s)", scheme, uri)


def _check_writable(uri: str, directory: Path) -> None:
    """The directory is writable, or its nearest existing ancestor is (MLflow creates the rest)."""
    d = directory.expanduser().absolute()
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        raise TrackingUnavailable(uri, f"{d} exists and is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise TrackingUnavailable(uri, f"directory {d} is not writable ({errno.errorcode[errno.EACCES]})")


# --------------------------------------------------------------------------------------------
# Parent runs and fold aggregates
# --------------------------------------------------------------------------------------------


def _q(value: str) -> str:
    """Quote a value for an MLflow filter string."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


# MLflow 3's UI opens an experiment on its GenAI trace overview unless the experiment says it holds
# model-training runs; with this tag it opens the runs table.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def get_or_create_experiment(client: MlflowClient, name: str, tags: dict[str, str] | None = None) -> str:
    """The id of experiment `name`, created when missing (tolerates a concurrent create).

    Tags it as a model-training experiment so the UI lists its runs, plus any `tags` given
    (e.g. the grid name); a deleted experiment of that name is restored.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            experiment_id = client.create_experiment(name)
        except MlflowException:  # created by another process meanwhile (RESOURCE_ALREADY_EXISTS)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            log.info("Restoring deleted MLflow experiment %r (%s)", name, experiment_id)
            client.restore_experiment(experiment_id)
    current = exp.tags if exp is not None else {}
    for key, value in {EXPERIMENT_KIND_TAG[0]: EXPERIMENT_KIND_TAG[1], **(tags or {})}.items():
        if current.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def parent_run_name(dataset: str, variant: str) -> str:
    return f"{dataset}/{variant}"


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _find_parents(client: MlflowClient, experiment_id: str, dataset: str, variant: str) -> list:
    runs = _search_all(client, experiment_id, f"tags.kind = 'parent' and tags.dataset = {_q(dataset)} "
                                              f"and tags.variant = {_q(variant)}")
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def get_or_create_parent_run(client: MlflowClient, experiment_id: str, dataset: str, variant: str,
                             folds: Sequence[str | int] | None = None) -> str:
    """The run id of the (dataset, variant) parent run, created on first use (idempotent).

    `folds` (optional) records the planned folds in the tag `folds_planned` ("1,2,3,4,5" or "split"):
    the report then shows unstarted folds as pending, and `update_parent_aggregates` closes the
    parent once they are all finished. The driver should create every parent before its trials start.
    Two processes creating the parent at once both create one, then both keep the oldest and the
    other creator deletes its own, so one parent survives.
    """
    found = _find_parents(client, experiment_id, dataset, variant)
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(experiment_id, run_name=parent_run_name(dataset, variant),
                                tags={"kind": "parent", "dataset": dataset, "variant": variant})
        found = _find_parents(client, experiment_id, dataset, variant)
        run_id = found[0].info.run_id if found else run.info.run_id
        if run_id != run.info.run_id:
            log.info("Parent run for %s/%s created concurrently; keeping %s", dataset, variant, run_id)
            client.delete_run(run.info.run_id)
    if folds is not None:
        planned = ",".join(str(f) for f in folds)
        if not found or found[0].data.tags.get("folds_planned") != planned:
            client.set_tag(run_id, "folds_planned", planned)
    return run_id


def child_runs(client: MlflowClient, experiment_id: str, dataset: str, variant: str) -> list:
    """Trial runs of (dataset, variant), one per trial_key (the latest started if duplicated)."""
    return latest_per_trial(_search_all(client, experiment_id, f"tags.kind = 'trial' and tags.dataset = "
                                                              f"{_q(dataset)} and tags.variant = {_q(variant)}"))


def trial_runs(client: MlflowClient, experiment_id: str) -> list:
    """Every trial run of an experiment, one per trial_key (the latest started if duplicated)."""
    return latest_per_trial(_search_all(client, experiment_id, "tags.kind = 'trial'"))


def end_open_runs(client: MlflowClient, experiment_id: str, trial_key: str, status: str,
                  tags: dict[str, str] | None = None) -> int:
    """End a trial's runs still tagged running with `status` (a stop or failure seen outside its
    worker: ASHA's stop, a storage failure before the worker started). Returns how many."""
    from mlflow.entities import RunTag

    ended = 0
    for run in _search_all(client, experiment_id, f"tags.trial_key = {_q(trial_key)}"):
        if run.data.tags.get("status") != "running":
            continue
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in {"status": status, **(tags or {})}.items()])
        client.set_terminated(run.info.run_id, "KILLED" if status == "stopped" else "FAILED")
        ended += 1
    return ended


def parent_runs(client: MlflowClient, experiment_id: str) -> list:
    return _search_all(client, experiment_id, "tags.kind = 'parent'")


def latest_per_trial(runs: Sequence) -> list:
    """Keep one run per `trial_key` tag: a trial must have exactly one run, so warn on duplicates."""
    by_key: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        key = r.data.tags.get("trial_key", r.info.run_id)
        if key in by_key:
            log.warning("Two MLflow runs for trial %s (%s, %s); using the later one",
                        key, by_key[key].info.run_id, r.info.run_id)
        by_key[key] = r
    return list(by_key.values())


def fold_sort_key(fold: str | int) -> tuple[int, int | str]:
    """Numeric folds in numeric order ("2" before "10"), then named splits ("split")."""
    text = str(fold)
    return (0, int(text)) if text.isdigit() else (1, text)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1, the usual '±' over folds); std is None for n < 2."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def update_parent_aggregates(client: MlflowClient, experiment_id: str, dataset: str, variant: str,
                             n_folds_planned: int | None = None) -> dict[str, Any]:
    """Recompute and log the parent run's fold aggregates over the finished trial runs.

    Call it whenever a trial of (dataset, variant) ends, whatever its status. Logs on the parent
    (step = number of finished folds, so its history shows the aggregate as folds came in; nothing is
    logged when the figures did not change): best_test_acc_mean, best_test_acc_std (sample std,
    ddof=1, only when n >= 2), n_folds_done, and test_acc_at_best_val_mean/_std when every finished
    trial has a validation figure. The parent run is closed once every planned fold (the parent's
    `folds_planned` tag) has ended: FINISHED when all finished, FAILED when some ended otherwise
    (oom, diverged, failed, planned_oom). `n_folds_planned` instead closes it as FINISHED once that
    many folds finished.
    Returns {"parent_run_id", "n_folds_done", "best_test_acc_mean", "best_test_acc_std",
    "test_acc_at_best_val_mean", "test_acc_at_best_val_std", "folds"}; absent figures are None.
    """
    from mlflow.entities import Metric

    parent_id = get_or_create_parent_run(client, experiment_id, dataset, variant)
    trials = child_runs(client, experiment_id, dataset, variant)
    done = [r for r in trials if r.data.tags.get("status") == FINISHED and "best_test_acc" in r.data.metrics]
    done.sort(key=lambda r: fold_sort_key(r.data.tags.get("fold", "")))
    best = [r.data.metrics["best_test_acc"] for r in done]
    at_val = [r.data.metrics["test_acc_at_best_val"] for r in done if "test_acc_at_best_val" in r.data.metrics]
    mean, std = mean_std(best)
    vmean, vstd = mean_std(at_val) if len(at_val) == len(done) else (None, None)
    figures = {"parent_run_id": parent_id, "n_folds_done": len(done),
               "best_test_acc_mean": mean, "best_test_acc_std": std,
               "test_acc_at_best_val_mean": vmean, "test_acc_at_best_val_std": vstd,
               "folds": [r.data.tags.get("fold") for r in done]}

    parent = client.get_run(parent_id)
    now, step = int(time.time() * 1000), len(done)
    metrics = [Metric("n_folds_done", float(len(done)), now, step)]
    metrics += [Metric(k, float(v), now, step) for k, v in figures.items()
                if k.endswith(("_mean", "_std")) and v is not None]
    if any(parent.data.metrics.get(m.key) != m.value for m in metrics):
        client.log_batch(parent_id, metrics=metrics)
    folds_done = ",".join(str(f) for f in figures["folds"])
    if parent.data.tags.get("folds_done") != folds_done:
        client.set_tag(parent_id, "folds_done", folds_done)

    planned = parent.data.tags.get("folds_planned")
    ended = {r.data.tags.get("fold"): r.data.tags.get("status") for r in trials
             if r.data.tags.get("status") in TERMINAL_STATUSES}
    state = None
    if n_folds_planned is not None:
        state = "FINISHED" if len(done) >= n_folds_planned else None
    elif planned and all(f in ended for f in planned.split(",")):
        state = "FINISHED" if len(done) == len(planned.split(",")) else "FAILED"
    if state and parent.info.status != state:
        client.set_terminated(parent_id, state)
    return figures


# --------------------------------------------------------------------------------------------
# Trial artifacts (called by the rank-0 worker)
# --------------------------------------------------------------------------------------------


def confusion_tables(confusion: np.ndarray, label_names: Sequence[str]) -> tuple[str, str]:
    """CSV texts of a confusion matrix (rows = true class, columns = predicted) and per-class accuracy."""
    import numpy as np

    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(label_names):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {len(label_names)} label names")
    names = [str(n).replace(",", ";") for n in label_names]
    lines = ["true\\predicted," + ",".join(names)]
    lines += [names[i] + "," + ",".join(str(int(v)) for v in row) for i, row in enumerate(cm)]
    support = cm.sum(axis=1)
    per_class = ["class,support,correct,accuracy"]
    for i, name in enumerate(names):
        acc = cm[i, i] / support[i] if support[i] else float("nan")
        per_class.append(f"{name},{int(support[i])},{int(cm[i, i])},{acc:.6f}")
    return "\n".join(lines) + "\n", "\n".join(per_class) + "\n"


def plot_confusion(confusion: np.ndarray, label_names: Sequence[str], path: Path, title: str = "") -> None:
    """Write a row-normalised confusion matrix as PNG (class names shown up to 60 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(label_names)
    size = min(4 + 0.25 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 60:
        ax.set_xticks(range(n), [str(x) for x in label_names], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(x) for x in label_names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix ({n} classes, {int(cm.sum())} clips)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_confusion_artifacts(client: MlflowClient, run_id: str, confusion: np.ndarray,
                            label_names: Sequence[str], artifact_path: str | None = None) -> list[str]:
    """Log confusion_matrix.png, confusion_matrix.csv and per_class_accuracy.csv to a run.

    `confusion[i, j]` counts clips of true class i predicted as j. Logging again replaces the files
    (use it with the best epoch's matrix). Returns the artifact file names.
    """
    cm_csv, per_class_csv = confusion_tables(confusion, label_names)
    with tempfile.TemporaryDirectory(prefix="helix-confusion-") as tmp:
        d = Path(tmp)
        (d / "confusion_matrix.csv").write_text(cm_csv)
        (d / "per_class_accuracy.csv").write_text(per_class_csv)
        plot_confusion(confusion, label_names, d / "confusion_matrix.png")
        client.log_artifacts(run_id, str(d), artifact_path)
        return sorted(p.name for p in d.iterdir())


def log_config_artifact(client: MlflowClient, run_id: str, config: Any, name: str = "config.yaml") -> None:
    """Log the trial's resolved config (an OmegaConf object, a dict or YAML text) as a YAML artifact."""
    if isinstance(config, str):
        text = config
    else:
        try:
            from omegaconf import OmegaConf

            text = OmegaConf.to_yaml(config if OmegaConf.is_config(config) else OmegaConf.create(config),
                                     resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)
    client.log_text(run_id, text, name)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def default_workdir() -> Path:
    return Path(os.environ.get("HELIX_WORKDIR", Path.cwd() / "helix_work"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helix_sweep.sweep.tracking",
                                description="Manage the work directory's local MLflow tracking server.")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--workdir", type=Path, default=default_workdir(),
                   help="work directory (default: $HELIX_WORKDIR or ./helix_work)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="port for start (default: a free one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "start":
        try:
            uri = ensure_tracking_server(args.workdir, host=args.host, port=args.port)
        except TrackingUnavailable as e:
            print(e, file=sys.stderr)
            return 1
        print(f"MLflow UI and tracking URI: {uri}")
        print(f"(store {tracking_dir(args.workdir)}; stop with: python -m helix_sweep.sweep.tracking stop "
              f"--workdir {args.workdir})")
        return 0
    if args.action == "stop":
        stopped = stop_tracking_server(args.workdir)
        print("stopped" if stopped else f"no running server recorded under {tracking_dir(args.workdir)}")
        return 0
    info = server_status(args.workdir)
    if info is None:
        print(f"no server recorded under {tracking_dir(args.workdir)}")
        return 1
    state = "healthy" if info["healthy"] else ("running, not answering" if info["alive"] else "dead")
    print(f"MLflow UI and tracking URI: {info['uri']}  (pid {info['pid']}, {state})")
    return 0 if info["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
