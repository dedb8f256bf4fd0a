"""Fault injection for the tests (train.inject): one object per trial, one call per fault kind.

train.inject keys: nan_at_step, nan_from_step (a non-finite loss), oom_at_step (a CUDA out-of-memory
error; with oom_marker, a path prefix, only the first time at each step, marked by <prefix>.<step>),
kill_at_step (a step or a list) + kill_marker (a path prefix: SIGKILL the worker once per
step, marked by <prefix>.<step>), sleep_per_step and sleep_before_finish (seconds, after the final
report); trial: only trials whose key contains it; per_trial: {key part: {fault: step}}; rank: only
that DDP rank of a multi-worker trial (a slow rank, a NaN or a kill on one rank).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

import torch


class Faults:
    def __init__(self, inject: Optional[dict] = None, key: str = "", rank: int = 0):
        inject = inject or {}
        shared = {} if inject.get("trial") and inject["trial"] not in key else inject
        own: dict = {}
        for part, faults in (inject.get("per_trial") or {}).items():
            if part in key:  # the first matching part decides a fault; a trial's own beat the shared
                for what, step in faults.items():
                    own.setdefault(what, step)
        self.faults = {**shared, **own}
        if self.faults.get("rank") is not None and int(self.faults["rank"]) != rank:
            self.faults = {}  # aimed at another rank

    def _get(self, what: str) -> Any:
        return self.faults.get(what)

    def _at(self, what: str, step: int) -> bool:
        at = self._get(what)
        return step in at if isinstance(at, (list, tuple)) else at == step

    def before_step(self, step: int) -> None:
        """kill_at_step (once per step, remembered by its marker file) and sleep_per_step."""
        if self._at("kill_at_step", step):
            marker = self._get("kill_marker")
            _kill_once(f"{marker}.{step}" if marker else "")
        if self._get("sleep_per_step"):
            time.sleep(float(self._get("sleep_per_step")))

    def before_micro_step(self, step: int) -> None:
        """oom_at_step: raise CUDA's out-of-memory error (once per step with oom_marker)."""
        if self._at("oom_at_step", step) and _first_time(self._get("oom_marker"), step):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected for a test)")

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """nan_at_step / nan_from_step: the loss made non-finite."""
        nan_from = self._get("nan_from_step")
        if self._at("nan_at_step", step) or (nan_from is not None and step >= nan_from):
            return loss * float("nan")
        return loss

    def before_finish(self) -> None:
        """sleep_before_finish: widen the gap a scheduler's stop can fall into."""
        if self._get("sleep_before_finish"):
            time.sleep(float(self._get("sleep_before_finish")))


def _first_time(marker: Optional[str], step: int) -> bool:
    """True without a marker; with one, only the first time at this step (its file records it)."""
    if not marker:
        return True
    path = f"{marker}.{step}"
    if os.path.exists(path):
        return False
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return True


def _kill_once(marker: str) -> None:
    """SIGKILL this worker the first time only (the marker file, one per kill step, records it)."""
    if marker and os.path.exists(marker):
        return
    if marker:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
