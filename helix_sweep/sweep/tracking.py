"""The local MLflow tracking server (start, reuse, stop, status) and whether a tracking URI is reachable.

The sweep logs to an MLflow tracking server. When the user configures none, `ensure_tracking_server`
starts one on loopback with a SQLite backend under the work directory (or reuses the one already
running there), detached from the driver so that its UI stays up after the sweep ends:

    <workdir>/mlflow/mlflow.db       backend store (experiments, runs, params, metrics, tags)
    <workdir>/mlflow/artifacts/      artifact store, written through the server (see below)
    <workdir>/mlflow/server.json     {"pid", "port", "host", "uri", ...} of the running server
    <workdir>/mlflow/server.log      the server's stdout and stderr
    <workdir>/mlflow/server.lock     serialises start/stop between concurrent drivers

A new work directory's store starts as a copy of an empty one already migrated by the same MLflow
version (kept in ~/.cache/helix_sweep, or $XDG_CACHE_HOME): the server then skips MLflow's schema
migrations, ~1.7 s of its ~7.5 s start (2-core AMD EPYC Zen 4 with AVX-512, benchmarks/RESULTS.md).

Artifacts are proxied (`--serve-artifacts --artifacts-destination`): experiments get
`mlflow-artifacts:/` roots, so a Ray worker on any node uploads through the server's HTTP API and
needs no shared file system (with `--default-artifact-root <dir>` each client would write to that
local path itself, which only works on the machine that holds it).

One concept, the tracking server as its clients see it (about 400 lines). Only the standard library
and filelock: the report's command line uses it without importing MLflow. What the runs hold:
`schema`; reading and writing them: `runs` and `artifacts`.

Command line:  python -m helix_sweep.sweep.tracking start|stop|status [--workdir DIR] [--port P]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import signal
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from filelock import FileLock

log = logging.getLogger(__name__)

# Where a work directory keeps its tracking state.
MLFLOW_SUBDIR = "mlflow"
SERVER_FILE = "server.json"
STARTUP_TIMEOUT_S = 120.0  # ~7.5 s idle with the lean flags; a loaded 2-core machine needs slack

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


def start_tracking_server(workdir: Path) -> Future:
    """`ensure_tracking_server(workdir)` in a background thread; its Future gives the URI (or raises its
    error). The server takes ~10 s to come up on 2 cores, which the caller spends on other work."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-start")
    try:
        return pool.submit(ensure_tracking_server, workdir)
    finally:
        pool.shutdown(wait=False)  # the thread finishes the start (and its server record) on its own


def store_template() -> Path | None:
    """Where an empty store migrated by the installed MLflow is kept (None without MLflow's metadata or a
    home directory)."""
    try:
        version = importlib.metadata.version("mlflow")
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (importlib.metadata.PackageNotFoundError, RuntimeError):  # RuntimeError: no home directory
        return None
    return cache / "helix_sweep" / f"mlflow-{version}-empty-store.db"


def _keep_template(db: Path, template: Path) -> None:
    """Save a consistent copy of a store the server has just created, if it holds nothing but MLflow's
    Default experiment (no one else has its URI yet: the start holds server.lock)."""
    tmp = template.with_name(f".{template.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # servers start in threads
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(db)) as src, contextlib.closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)
            empty = dst.execute("SELECT (SELECT COUNT(*) FROM runs), (SELECT COUNT(*) FROM experiments)").fetchone()
        if empty == (0, 1):
            os.replace(tmp, template)
    except (OSError, sqlite3.Error) as exc:  # a read-only home: every new store is migrated, as before
        log.debug("no store template at %s: %s", template, exc)
    finally:
        tmp.unlink(missing_ok=True)


def _start_server(tdir: Path, host: str, port: int, timeout: float) -> str:
    db = tdir / "mlflow.db"
    artifacts = tdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    template = None if db.exists() else store_template()
    if template is not None and template.is_file():
        copy = db.with_name(f".{db.name}.tmp")
        shutil.copyfile(template, copy)
        os.replace(copy, db)  # never a half-copied store
        template = None
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
            if template is not None:  # the server migrated a new store: keep it for the next work directory
                _keep_template(db, template)
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
