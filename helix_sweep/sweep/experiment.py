"""Which experiment a run continues, with which settings, and one live driver per experiment.

An experiment is a folder <workdir>/experiments/<name> (Ray Tune state, trial checkpoints, the
settings it was started with). `resume=` must name one that exists: a typo would otherwise start a
new experiment beside the old one. `ExperimentLock` keeps a second driver (a job submitted twice)
off an experiment whose driver is alive; the lock of a killed driver is taken over: on the same host
when its pid is gone, on any host when its heartbeat has not moved for STALE_S.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import yaml

from helix_sweep.config import ConfigError, SweepConfig, load_config, to_dict

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


TRIALS_MARK = "\n# trials\n"  # the settings record: the config's YAML, then this line, then one trial key a line
IGNORED = ("resume", "dry_run", "ray_address", "tracking_uri", "tracking_wait_s", "max_concurrent_trials")


def settings_record(cfg_yaml: str, trial_keys: list[str]) -> str:
    return cfg_yaml + TRIALS_MARK + "\n".join(trial_keys)


def check_same_config(exp_dir: Path, record: str) -> None:
    """An experiment continues only with the settings it was started with (`settings_record`).

    Compared key by key, top-level keys of IGNORED aside (where it runs, not what). A release between
    two restarts of a long sweep may add settings or retire some: a key the record lacks that the
    command gives its release default (this grid with no overrides), and a field the config schema
    no longer has, are accepted with a warning naming them, and the record is updated, so that a
    later change of such a key is caught. Anything else that differs (a value, an entry of a map such
    as train_explicit or dataset_defs, the trial list) refuses, naming each difference."""
    saved = exp_dir / "helix_config.yaml"
    if not saved.exists():
        exp_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(record)
        return
    old_cfg, old_trials = _parse_record(saved.read_text(), saved)
    new_cfg, new_trials = _parse_record(record, "the command line")
    changed, added, dropped = [], [], []
    _compare(old_cfg, new_cfg, (), changed, added, dropped)
    defaults = _release_defaults(new_cfg.get("grid"))
    missing = object()
    for path, value in added:
        if _lookup(defaults, path, missing) == value:
            continue
        changed.append(f"{'.'.join(path)}: (not set) -> {value!r}")
    for path, value in dropped:
        if not _schema_field(path[:-1]):
            changed.append(f"{'.'.join(path)}: {value!r} -> (not set)")
    if old_trials != new_trials:
        gone, new = sorted(set(old_trials) - set(new_trials)), sorted(set(new_trials) - set(old_trials))
        changed.append(f"trials: {len(old_trials)} in the experiment, {len(new_trials)} on the command line"
                       + (f"; not in the command's grid: {', '.join(gone[:10])}" if gone else "")
                       + (f"; new: {', '.join(new[:10])}" if new else ""))
    if changed:
        lines = "\n".join(f"  {c}" for c in changed[:40]) + (f"\n  ... {len(changed) - 40} more" if len(changed) > 40 else "")
        raise ConfigError(f"experiment {exp_dir} was started with other settings; continue it with the same "
                          f"command, or pick a new experiment=NAME. Differences (experiment -> command line):\n{lines}")
    if added or dropped:
        log.warning("experiment %s predates this release's settings; continuing with %s (%s now records them)%s",
                    exp_dir, ", ".join(f"{'.'.join(p)}={v!r}" for p, v in added) or "no new ones", saved.name,
                    f"; no longer settings: {', '.join('.'.join(p) for p, _ in dropped)}" if dropped else "")
        saved.write_text(record)


def _parse_record(text: str, where) -> tuple[dict, list[str]]:
    cfg_yaml, _, trials = text.partition(TRIALS_MARK)
    try:
        cfg = yaml.safe_load(cfg_yaml) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: the experiment's settings do not parse: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: the experiment's settings are not a mapping")
    return {k: v for k, v in cfg.items() if k not in IGNORED}, [t for t in trials.splitlines() if t.strip()]


def _compare(old, new, path: tuple, changed: list, added: list, dropped: list) -> None:
    """Differences of two parsed configs: changed values (as lines), keys only in new (added) and keys
    only in old (dropped), each as (path, value); mappings are compared key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old.keys() | new.keys(), key=str):
            if k not in new:
                dropped.append(((*path, str(k)), old[k]))
            elif k not in old:
                added.append(((*path, str(k)), new[k]))
            else:
                _compare(old[k], new[k], (*path, str(k)), changed, added, dropped)
    elif old != new:
        changed.append(f"{'.'.join(path)}: {old!r} -> {new!r}")


def _release_defaults(grid) -> dict:
    """This release's settings for the grid with no overrides: what a key it added takes by default."""
    try:
        return to_dict(load_config([f"grid={grid}"] if grid else []))
    except ConfigError:  # the grid itself is gone: no key counts as a release default
        return {}


def _lookup(tree: dict, path: tuple, missing):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return missing
        tree = tree[k]
    return tree


def _schema_field(path: tuple) -> bool:
    """Whether `path` names a config dataclass in this release's schema (SweepConfig's fields, the
    dataclasses they hold, the values of its Dict[str, dataclass] maps), rather than a map's entry."""
    node: Any = SweepConfig
    for k in path:
        if is_dataclass(node):
            node = typing.get_type_hints(node).get(k)
        elif typing.get_origin(node) in (dict, typing.Dict):
            node = typing.get_args(node)[1]
        else:
            return False
        node = next((a for a in typing.get_args(node) if a is not type(None)), node) \
            if typing.get_origin(node) is typing.Union else node
    return is_dataclass(node)
