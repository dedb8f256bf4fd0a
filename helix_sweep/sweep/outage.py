"""Writes to a tracking server that may be away: an outage waits, a refusal is skipped.

`is_outage` tells the two apart. An outage is anything the server may answer differently later:
no connection (refused, reset, name not resolving), a timeout, an HTTP 5xx, 408 or 429. A refusal
is permanent: the server answered 4xx (MLflow rejected a value, INVALID_PARAMETER_VALUE; the run
is gone, RESOURCE_DOES_NOT_EXIST; no permission), a disk is full (the artifact store's or our
temp files'), or the write itself failed before any request (a bug or bad data on our side).

`OutageBuffer` delivers writes in order. At an outage it stops and keeps that write and everything
after it for the next flush (order matters: a run is opened before it is logged to); a permanent
error is logged, counted and the write dropped, so one bad value never blocks the writes behind it.
A 5xx answer is an outage unless the server answers otherwise: given a `probe` (a read that goes
through the server's store), a write answered with 5xx POISON_AFTER times in a row while the probe
succeeds each time is one the server fails on (a store error on that write alone) and is dropped as
refused; otherwise it would hold every later write of the trial, and the trial's pending file, forever.
While the server is away, `poll` (what new writes trigger) tries again only after a back-off
(retry_s, doubling up to MAX_RETRY_S), so a host that times out rather than refusing does not stall
training at every write; `flush` and `drain` always try.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import time
from typing import Callable, Generic, Iterator, Optional, TypeVar

log = logging.getLogger(__name__)

# OS reasons that waiting does not fix (a full disk stays full until someone frees it)
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                    errno.ENAMETOOLONG}
PERMANENT_TEXT = ("No space left on device", "Disk quota exceeded", "Read-only file system", "File too large")
RETRY_STATUSES = {408, 429}  # HTTP 4xx that mean "later", not "no"
MAX_RETRY_S = 300.0
POISON_AFTER = 3  # 5xx answers in a row to one write, the server answering the probe each time


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status a server answered with, if the exception carries one."""
    response = getattr(exc, "response", None)  # requests.HTTPError (artifact uploads)
    if response is not None and getattr(response, "status_code", None):
        return int(response.status_code)
    get = getattr(exc, "get_http_status_code", None)  # MlflowException, RestException
    if callable(get):
        try:
            return int(get())
        except (TypeError, ValueError):
            return None
    return None


def _answered_5xx(exc: BaseException) -> Optional[int]:
    """The 5xx status the server answered with (not a refused connection or a timeout, which MLflow's
    client also reports as status 500), or None."""
    from mlflow.exceptions import RestException

    for e in _chain(exc):
        status = _http_status(e) if isinstance(e, RestException) or getattr(e, "response", None) is not None else None
        if status is not None and status >= 500:
            return status
    found = re.search(r"too many (5\d\d) error responses", str(exc))  # urllib3's retries spent on answers
    return int(found.group(1)) if found else None


def is_outage(exc: BaseException) -> bool:
    """True when the tracking server may take this write later; False when it never will."""
    import requests

    if any(text in str(e) for e in _chain(exc) for text in PERMANENT_TEXT):
        return False
    for e in _chain(exc):
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError, socket.timeout,
                          socket.gaierror)):
            return True
        if isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS:
            return False
    from mlflow.exceptions import MlflowException

    # MLflow's wrapper of a request that got no answer (no connection, a timeout, retries spent)
    no_answer = ("failed with exception", "failed with timeout exception")
    text = str(exc)
    if isinstance(exc, MlflowException) and text.startswith("API request to") and any(s in text for s in no_answer):
        return True
    status = _http_status(exc)
    if status is None:
        return False  # not a request at all: our own call failed, which retrying does not change
    return status >= 500 or status in RETRY_STATUSES


T = TypeVar("T")


class OutageBuffer(Generic[T]):
    """In-order delivery of writes through `deliver(write)`; see the module docstring."""

    def __init__(self, deliver: Callable[[T], None], describe: Callable[[T], str] = str, retry_s: float = 15.0,
                 probe: Optional[Callable[[], object]] = None):
        self.deliver, self.describe, self.retry_s, self.probe = deliver, describe, retry_s, probe
        self.pending: list[T] = []
        self.errors = 0  # permanent errors skipped so far
        self.down_since: Optional[float] = None
        self.last_try = 0.0
        self.outages = 0  # flushes in a row stopped by an outage
        self.server_errors = 0  # 5xx answers in a row to the first pending write, with the probe answering

    def add(self, write: T) -> None:
        self.pending.append(write)
        self.poll()

    def poll(self) -> bool:
        """Flush unless the server was away at the last try and its back-off has not passed."""
        if self.down_since is not None:
            wait = min(self.retry_s * 2 ** max(self.outages - 1, 0), MAX_RETRY_S)
            if time.monotonic() - self.last_try < wait:
                return False
        return self.flush()

    def flush(self) -> bool:
        """Deliver what is pending, in order; False when an outage stopped it (the rest stays)."""
        self.last_try = time.monotonic()
        while self.pending:
            write = self.pending[0]
            try:
                self.deliver(write)
            except Exception as exc:
                if is_outage(exc) and not self._fails_on(write, exc):
                    self.outages += 1
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        log.warning("MLflow unreachable (%s while logging %s: %s); buffering, training goes on",
                                    type(exc).__name__, self.describe(write), _first_line(exc))
                    return False
                self.errors += 1
                log.error("MLflow refused %s (%s: %s); skipped, later writes go on (%d such errors)",
                          self.describe(write), type(exc).__name__, _first_line(exc), self.errors)
            self.pending.pop(0)
            self.server_errors = 0
        self.outages = 0
        if self.down_since is not None:
            log.info("MLflow reachable again after %.0f s; buffered writes delivered",
                     time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def _fails_on(self, write: T, exc: BaseException) -> bool:
        """Whether the server, answering 5xx to `write`, answers the probe: POISON_AFTER times in a row
        means it fails on this write, not that it is away (see the module docstring)."""
        status = _answered_5xx(exc)
        if self.probe is None or status is None:
            return False
        try:
            self.probe()
        except Exception as probe_exc:  # away, or its store is: an outage, counted afresh once it is back
            log.debug("probe after a %d to %s failed: %s", status, self.describe(write), _first_line(probe_exc))
            self.server_errors = 0
            return False
        self.server_errors += 1
        if self.server_errors < POISON_AFTER:
            return False
        log.error("MLflow answered %s with HTTP %d %d times in a row while answering other requests: the "
                  "server fails on this write", self.describe(write), status, self.server_errors)
        return True

    def drain(self, wait_s: float, poll_s: float = 2.0) -> bool:
        """Flush until everything is delivered or `wait_s` has passed; False when writes remain."""
        deadline = time.monotonic() + wait_s
        while not self.flush():
            if time.monotonic() + poll_s > deadline:
                return False
            time.sleep(poll_s)
        return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else repr(exc))[:500]
