"""Warm connections to one Redis node for the request path, so a request never connects.

:class:`WarmPool` keeps ``size`` connections to one node (a single Redis, or one cluster master)
open, authenticated and proven to answer. Only the pool's maintenance thread and the breaker's
probe open connections; a request takes an idle one or waits for one, and either way it never
spends more than what is left of its budget.

Choices, and why:

* **Connecting is off the request path.** Opening a connection is DNS (``getaddrinfo`` has no
  timeout), a connect per address, TLS, AUTH or HELLO, SELECT, and here a PING that proves the
  server answers: each network step bounded by ``MTRANK_REDIS_TIMEOUT_MS``, none by a request's
  budget. So it runs in one thread per node (``mtrank-redis-pool-<node>``; nodes connect in
  parallel, a node whose DNS hangs stalls only its own thread). The thread wakes every
  :data:`MAINTAIN_EVERY_S` (backing off to :data:`MAINTAIN_MAX_S` while opens fail) and whenever a
  request discards a connection, drops idle sockets the
  server closed (a restart, an idle timeout) and opens replacements, one at a time.
* **A request waits at most its budget.** :meth:`WarmPool.acquire` returns an idle connection
  (checked with a zero-timeout poll: one the server closed is dropped, and the next one tried); with
  none idle it waits on a condition until one is released or opened, or until the budget is spent.
  It fails at once when the pool has no connection at all and the last attempt to open one
  failed, or the node's breaker is open: waiting would only spend the budget.
* **Three failures, told apart.** ``redis.ConnectionError`` (no connection, the last open failed)
  and ``redis.TimeoutError`` (no connection yet, one is being opened) are failures of the node;
  :class:`PoolBusy` (every connection in use by other requests) is not: it says the pool is too
  small for the load, which must not open the node's circuit breaker.
* **Pause while the breaker is open.** The breaker's probe owns the node then (the thread does not
  connect); the probe's fresh connection, once it answered, becomes the first warm one, and the
  thread refills the rest only after that, so when Redis comes back the pool reconnects once, at
  most ``size`` connections from one thread, never one per waiting request.

A non-Redis exception while opening (a bug, an incompatible redis-py) is kept and re-raised to
requests as a ``RuntimeError`` while the pool is empty: it is not an outage degraded mode should
hide (see :class:`service.redis_client.FeatureStore`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

#: seconds between two maintenance passes of a pool (drop closed idle sockets, refill); after failed
#: opens the pause doubles up to MAINTAIN_MAX_S (a request that discards a connection wakes it at once)
MAINTAIN_EVERY_S = 0.1
MAINTAIN_MAX_S = 0.8
_PONG = (b"PONG", "PONG", True)


class PoolBusy(redis.TimeoutError):
    """Every connection of the pool was in use by other requests for the whole budget."""


def connection_kwargs(pool: redis.ConnectionPool, timeout_s: float) -> dict:
    """The kwargs of ``pool``'s connections (same server, credentials, TLS, db) with ``timeout_s``
    connect and socket timeouts, no retries and no CLIENT SETINFO round trips at connect."""
    kw = dict(pool.connection_kwargs)
    for k in ("lib_name", "lib_version", "retry_on_timeout", "retry_on_error", "cache", "himport_registry"):
        kw.pop(k, None)
    kw.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
              driver_info=None, health_check_interval=0)
    return kw


def _alive(conn) -> bool:
    """An idle connection is usable: still open, nothing unexpected to read (a zero-timeout poll)."""
    try:
        return conn._sock is not None and not conn.can_read(timeout=0)
    except (redis.RedisError, OSError):
        return False


def set_timeout(conn, seconds: float) -> None:
    """The socket timeout of ``conn``'s next send (redis-py has no public setter for one send)."""
    conn._sock.settimeout(max(seconds, 0.001))


class WarmPool:
    """Up to ``size`` warm connections of one node, kept by a background thread (see the module doc).

    ``paused()`` -> true while the node's breaker is open; ``scrub`` removes the password from a
    message. ``opened`` counts the connections ever opened (by the thread and the probe)."""

    def __init__(self, name: str, connection_class: type, kwargs: dict, size: int, timeout_s: float,
                 paused: Callable[[], bool], scrub: Callable[[str], str]):
        self.name = name
        self.size = size
        self.timeout_s = timeout_s
        self._cls = connection_class
        self._kw = kwargs
        self._paused = paused
        self._scrub = scrub
        self._cond = threading.Condition()
        self._idle: list = []
        self._busy: set = set()  # connections requests hold (close() interrupts their reads)
        self._total = 0  # idle + in use
        self._wake = threading.Event()
        self._closed = False
        self._tried = threading.Event()  # the first fill has finished, well or not
        self.error: str | None = None  # why the last open failed; None once one succeeds
        self._fails = 0  # consecutive failed opens
        self._bug: str | None = None  # the last open raised something that is not a Redis error
        self.opened = 0
        self._thread = threading.Thread(target=self._run, name=f"mtrank-redis-pool-{name}", daemon=True)

    def start(self) -> WarmPool:
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the first fill (at most ``timeout_s``); true when it has finished."""
        return self._tried.wait(timeout_s)

    @property
    def counts(self) -> tuple[int, int]:
        """(idle, total) connections."""
        return len(self._idle), self._total

    # -- the request path ------------------------------------------------------------------------
    def acquire(self, until: float):
        """A connected, idle connection, by ``until`` (``time.monotonic()``) at the latest."""
        with self._cond:
            while True:
                while self._idle:
                    conn = self._idle.pop()
                    if _alive(conn):
                        self._busy.add(conn)
                        return conn
                    conn.disconnect()
                    self._total -= 1
                    self._wake.set()
                if self._closed:
                    raise redis.ConnectionError("connection pool closed")
                if self._total == 0:  # nothing to wait for unless the thread is opening one
                    if self._bug is not None:
                        raise RuntimeError(f"opening a connection failed: {self._bug}")
                    if self.error is not None:
                        self._wake.set()  # retry now rather than after the back-off: the node is wanted
                        raise redis.ConnectionError(f"no warm connection ({self.error})")
                    if self._paused():
                        raise redis.ConnectionError("no warm connection (circuit open)")
                left = until - time.monotonic()
                if left <= 0:
                    if self._total:
                        raise PoolBusy(f"all {self._total} connections busy for the whole budget")
                    raise redis.TimeoutError("no warm connection within the budget (one is being opened)")
                self._cond.wait(left)

    def release(self, conn) -> None:
        """Give back a connection whose replies were all read."""
        with self._cond:
            self._busy.discard(conn)
            if self._closed or conn._sock is None:
                conn.disconnect()
                self._total -= 1
                return
            self._idle.append(conn)
            self._cond.notify()

    def discard(self, conn) -> None:
        """Close a connection that failed or timed out (it may hold a late reply); the thread replaces it."""
        conn.disconnect()
        with self._cond:
            self._busy.discard(conn)
            self._total -= 1
            self._cond.notify_all()  # a waiter may now have nothing left to wait for
        self._wake.set()

    # -- breaker hooks ---------------------------------------------------------------------------
    def drop_idle(self) -> None:
        """Close every idle connection (the breaker opened: they may be dead)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._total -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.disconnect()

    def probe(self, timeout_s: float) -> None:
        """Open a fresh connection and PING it (raises when the node does not answer within
        ``timeout_s``); the connection, proven good, joins the pool."""
        conn = self._open(timeout_s)
        with self._cond:
            if self._closed or self._total >= self.size:
                conn.disconnect()
                return
            self._total += 1
            self._idle.append(conn)
            self._cond.notify()
        self._wake.set()  # the thread refills the rest once the breaker lets it

    def close(self) -> None:
        """Close the idle connections and cut the reads in flight short (a shutdown must not wait for
        a stalled Redis: those requests fail now, the drain has already had its time)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
            self._total -= len(idle)
            self._cond.notify_all()
        self._wake.set()
        for conn in idle:
            conn.disconnect()
        for conn in busy:
            sock = conn._sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv; it then discards
                except OSError:
                    pass

    # -- the maintenance thread ------------------------------------------------------------------
    def _open(self, timeout_s: float):
        """A new connection: DNS, connect, TLS, AUTH/HELLO, SELECT, then a PING it must answer."""
        conn = self._cls(**{**self._kw, "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s})
        try:
            conn.connect()
            conn.send_command("PING")
            if conn.read_response(timeout=timeout_s) not in _PONG:
                raise redis.ConnectionError("unexpected PING reply")
        except BaseException:
            conn.disconnect()
            raise
        with self._cond:
            self.opened += 1
        return conn

    def _run(self) -> None:
        while not self._closed:
            try:
                self._maintain()
            finally:
                self._tried.set()
            self._wake.wait(min(MAINTAIN_EVERY_S * 2 ** self._fails, MAINTAIN_MAX_S))
            self._wake.clear()

    def _maintain(self) -> None:
        if self._paused():
            return
        keep: list = []
        dead: list = []
        with self._cond:  # idle sockets the server closed: a zero-timeout poll each
            for conn in self._idle:
                (keep if _alive(conn) else dead).append(conn)
            self._idle = keep
            self._total -= len(dead)
        for conn in dead:
            conn.disconnect()
        while not self._closed and not self._paused() and self._total < self.size:
            try:
                conn = self._open(self.timeout_s)
            except redis.RedisError as e:
                self._failed(self._scrub(f"{type(e).__name__}: {e}"), bug=False)
                return
            except Exception as e:  # an incompatible client or a bug: say so to the request path
                self._failed(self._scrub(f"{type(e).__name__}: {e}"), bug=True)
                return
            with self._cond:
                if self._closed:
                    conn.disconnect()
                    return
                if self.error is not None:
                    log.warning("feature store %s: connected again (was: %s)", self.name, self.error)
                self.error = self._bug = None
                self._fails = 0
                self._total += 1
                self._idle.append(conn)
                self._cond.notify()

    def _failed(self, error: str, bug: bool) -> None:
        with self._cond:
            if error != self.error:
                log.warning("feature store %s: opening a connection failed: %s", self.name, error)
            self.error = error
            self._fails = min(self._fails + 1, 8)
            self._bug = error if bug else None
            self._cond.notify_all()  # waiting requests: fail now rather than at their deadline
