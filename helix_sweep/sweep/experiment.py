"""Which experiment a run continues, with which settings, and one live driver per experiment.

An experiment is a folder <workdir>/experiments/<name> (Ray Tune state, trial checkpoints, the
settings it was started with). `resume=` must name one that exists: a typo would otherwise start a
new experiment beside the old one. `ExperimentLock` keeps a second driver (a job submitted twice)
off an experiment whose driver is alive; the lock of a killed driver is taken over: on the same host
when its pid is gone, on any host when its heartbeat has not moved for STALE_S.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from helix_sweep.config import ConfigError

log = logging.getLogger(__name__)

EXPERIMENTS = "experiments"
LOCK_FILE = "driver.lock"
HEARTBEAT_S = 20.0  # how often a live driver touches its lock
STALE_S = 120.0  # a lock not touched for this long belongs to a dead driver (another host, or a frozen one)


def known_experiments(workdir: Path) -> list[str]:
    root = workdir / EXPERIMENTS
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def experiment_dir(workdir: Path, name: str, resume: str | None) -> Path:
    """The experiment folder this run uses: <workdir>/experiments/<name>, or the one `resume` names
    (an experiment name, or a path to an experiment folder), which must exist."""
    if not resume:
        return workdir / EXPERIMENTS / name
    path = Path(resume).expanduser()
    if "/" in resume or path.is_dir():
        if not path.is_dir():
            raise ConfigError(f"resume={resume}: no such experiment folder")
        return path.resolve()
    found = workdir / EXPERIMENTS / resume
    if not found.is_dir():
        have = known_experiments(workdir)
        raise ConfigError(f"resume={resume}: no experiment of that name under {workdir / EXPERIMENTS}; "
                          + (f"experiments there: {', '.join(have)}" if have else "there are none yet"))
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for
    the driver that held the lock; None when the process does not exist."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)  # not Linux: existence only
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def _holder_alive(holder: dict, age_s: float) -> bool:
    if age_s > STALE_S:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # another host's driver: only its heartbeat can say it is gone
    started = _start_time(int(holder.get("pid", -1)))
    return started is not None and started in ("", holder.get("start_time"))


class ExperimentLock:
    """`with ExperimentLock(exp_dir):` holds the experiment for this process, or raises ConfigError
    naming the live driver (host, pid, since when) that holds it."""

    def __init__(self, exp_dir: Path):
        self.path = Path(exp_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another starting driver is re-judged
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._read()
                if holder is not None and _holder_alive(holder, age):
                    raise ConfigError(
                        f"experiment {self.path.parent} is in use by a live driver (host {holder.get('host')}, "
                        f"pid {holder.get('pid')}, since {holder.get('since')}); wait for it or stop it, or pick "
                        f"another experiment=NAME. (Its lock {self.path} is taken over once that driver is "
                        f"gone, or after {STALE_S:.0f} s without its heartbeat.)")
                log.warning("taking over the lock of a driver that is gone: %s", holder)
                self._replace()
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.me, f)
            if self._read()[0] == self.me:
                self._beat = threading.Thread(target=self._heartbeat, name="experiment-lock", daemon=True)
                self._beat.start()
                return
        raise ConfigError(f"experiment {self.path.parent}: could not take its lock {self.path}")

    def release(self) -> None:
        self._stop.set()
        if self._read()[0] == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "ExperimentLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> tuple[dict | None, float]:
        try:
            return json.loads(self.path.read_text()), time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):  # gone, or half written by a driver starting right now
            return None, 0.0

    def _replace(self) -> None:
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.me))
        os.replace(tmp, self.path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as exc:  # the storage hiccupped: the next beat tries again
                log.debug("lock heartbeat: %s", exc)


def check_same_config(exp_dir: Path, cfg_yaml: str) -> None:
    """An experiment continues only with the settings it was started with."""
    saved = exp_dir / "helix_config.yaml"
    if not saved.exists():
        exp_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(cfg_yaml)
        return
    ignore = ("resume:", "dry_run:", "ray_address:", "tracking_uri:", "tracking_wait_s:", "max_concurrent_trials:")
    old = [ln for ln in saved.read_text().splitlines() if not ln.strip().startswith(ignore)]
    new = [ln for ln in cfg_yaml.splitlines() if not ln.strip().startswith(ignore)]
    if old != new:
        diff = "\n".join(list(difflib.unified_diff(old, new, "experiment", "command line", lineterm="", n=0))[:40])
        raise ConfigError(f"experiment {exp_dir} was started with other settings; continue it with the same "
                          f"command, or pick a new experiment=NAME. Differences:\n{diff}")
