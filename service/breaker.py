"""The circuit breaker of one Redis node (the feature store's request path, :mod:`service.redis_client`).

Consecutive failures open it; a background thread probes the node while it is open; a probe that
answers half-opens it; the first success closes it. Why a hand-written one: the packaged breakers
are not thread-safe or want asyncio, and this one must never connect on the request path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

# the feature store's logger: the breaker's lines belong to the store's story
log = logging.getLogger("service.redis_client")

#: the breaker's states, from best to worst: the index is the gauge value (service.metrics) and the
#: order :attr:`FeatureStore.state` uses when several breakers (cluster nodes) disagree
BREAKER_STATES = ("closed", "half_open", "open")


class Breaker:
    """Consecutive-failure circuit breaker of one Redis node, with a background probe.

    ``failures`` consecutive failures open it: reads fail at once, and a thread calls ``probe``
    (raises when the node does not answer) every ``probe_s``. A probe that answers makes it
    ``half_open``: reads are let through again, on the warm connections of the node's pool (a
    read never connects, so re-admission cannot storm the node). The first success, a read's or
    the next probe's, closes it; a failure while half-open opens it again at once. ``allow()``
    and ``success()`` (the healthy request path) read attributes and take no lock."""

    def __init__(self, name: str, failures: int, probe_s: float, probe: Callable[[], object],
                 stop: threading.Event, on_open: Callable[[], None] | None = None):
        self.name = name
        self.threshold = failures
        self.probe_s = probe_s
        self._probe = probe
        self._stop = stop
        self._on_open = on_open
        self._lock = threading.Lock()
        self._probing = False  # a probe thread runs (one at most)
        self.state = "closed"
        self.failures = 0  # consecutive
        self.last_error: str | None = None
        self.opened_at: float | None = None
        self.retired = False  # the node left the cluster: stop probing it

    def allow(self) -> bool:
        return self.state != "open"

    def success(self) -> None:
        if self.failures or self.state != "closed":
            self._close("a read succeeded")

    def failure(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = error
            if self.state == "half_open":
                self.state = "open"
            elif self.state != "closed" or self.failures < self.threshold:
                return
            else:
                self.state = "open"
                self.opened_at = time.monotonic()
            start, self._probing = not self._probing, True
        log.warning("feature store %s: circuit open after %d consecutive failures (%s)", self.name,
                    self.failures, error)
        if self._on_open is not None:
            self._on_open()
        if start:
            threading.Thread(target=self._probe_loop, name=f"mtrank-breaker-{self.name}", daemon=True).start()

    def _close(self, why: str) -> None:
        with self._lock:
            was, self.state, self.failures = self.state, "closed", 0
        if was != "closed":
            log.warning("feature store %s: circuit closed (%s; %.2fs after it opened)", self.name, why,
                        time.monotonic() - (self.opened_at or 0.0))

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.probe_s):
            with self._lock:
                if self.state == "closed" or self.retired:
                    self._probing = False
                    return
                state = self.state
            try:
                self._probe()
            except Exception as e:  # any failure keeps it open (or opens it again)
                with self._lock:
                    self.state = "open"
                    self.last_error = f"probe: {type(e).__name__}: {e}"
                if state == "half_open" and self._on_open is not None:
                    self._on_open()
                continue
            if state == "half_open":  # no read came to decide: a second probe answer does
                self._close("PING answered twice")
                continue
            with self._lock:
                if self.state == "open":
                    self.state = "half_open"
            log.info("feature store %s: circuit half-open (PING answered after %.2fs): reads re-admitted on "
                     "warm connections", self.name, time.monotonic() - (self.opened_at or 0.0))
