"""``mtrank events consume``: read the events stream in a consumer group and apply each event to the
behaviour sequences of every held bundle (:mod:`service.events.sequences`).

* **Group.** ``MTRANK_EVENTS_GROUP`` on ``<prefix>:events``, created (from the start of the stream)
  when missing. Every process is one consumer of it (``--name``, default ``<host>-<pid>``); Redis
  hands each entry to one of them, so several processes share the load.
* **At least once.** An entry stays pending until the script that applies it acknowledges it
  (``XACK`` inside the same atomic step). A consumer that dies leaves its entries pending: every
  ``MTRANK_EVENTS_CLAIM_IDLE_MS / 2`` each consumer claims (``XAUTOCLAIM``) entries pending longer than
  ``MTRANK_EVENTS_CLAIM_IDLE_MS`` and applies them; a restart under the same name first re-reads its own
  pending entries. A redelivered event is not applied twice (its dedup key, same script).
* **Order.** One consumer applies entries in stream order. With several, two batches may be applied
  in either order, so a user's sequence can hold two events of the same moment swapped; each event
  is still applied exactly once.
* **Targets** are found again every ``MTRANK_STORE_POLL_S`` (as the service's watcher polls): a new
  bundle version, or features loaded for it, is followed without a restart.
* **Redis down**: the loop logs, waits a second and goes on; nothing is acknowledged that was not
  applied. A stream or group that disappeared (a Redis restarted without persistence) is created again.

The source is the only Redis-Streams-specific part: :meth:`Consumer.step` reads a batch and hands
it to :meth:`~service.events.sequences.Applier.apply`. docs/events.md says how the same apply step
would consume a bigger bus (Kafka).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis

from service.events.record import stream_key
from service.events.sequences import Applier, Counts, Target, TargetFinder
from service.redis_client import FeatureStore, make_store
from service.routing import RoutingConfigError
from service.settings import Settings

log = logging.getLogger("service.events")

#: seconds between two progress lines in the log
REPORT_EVERY_S = 30.0


class ConsumerError(RuntimeError):
    """The consumer cannot run with these settings (the message says why)."""


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Consumer:
    def __init__(self, settings: Settings, name: str | None = None, block_ms: int = 1000):
        if settings.cluster:
            raise ConsumerError("mtrank events consume needs a single Redis: one event updates keys of several "
                                "namespaces in one script, which a Redis Cluster refuses across slots")
        s = self.settings = settings
        self.name = name or default_name()
        self.block_ms = block_ms
        # the blocking read must not hit the socket timeout of the control path
        self.store: FeatureStore = make_store(s.model_copy(update={
            "redis_timeout_ms": max(s.redis_timeout_ms, block_ms + 5000)}))
        self.client = self.store.client
        self.stream = stream_key(s.redis_prefix)
        self.group = s.events_group
        self.applier = Applier(self.client, s.redis_prefix, self.group, s.events_dedup_ttl_s)
        self.finder = TargetFinder(s, self.store)
        self.targets: list[Target] = []
        self.totals = Counts()
        self._refresh_at = 0.0
        self._claim_at = 0.0

    # -- setup -----------------------------------------------------------------------------------

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %r on %s", self.group, self.stream)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def refresh(self, force: bool = False) -> None:
        """Find the targets again when due (every MTRANK_STORE_POLL_S; 0 = only at start)."""
        now = time.monotonic()
        poll = self.settings.store_poll_s
        if not force and (poll <= 0 or now < self._refresh_at):
            return
        self._refresh_at = now + poll
        try:
            targets = self.finder.targets()
        except (RoutingConfigError, OSError, ValueError) as e:  # a bad config or bundle file; Redis errors propagate
            if force:
                raise ConsumerError(f"cannot tell which bundles the service holds: {e}") from None
            log.error("finding the held bundles failed, keeping the previous ones: %s", e)
            return
        if [(t.namespace, t.bundles) for t in targets] != [(t.namespace, t.bundles) for t in self.targets] or force:
            if targets:
                log.info("updating sequences in %s", "; ".join(
                    f"{t.namespace} ({', '.join(t.bundles)}: " + ", ".join(
                        f"{ev} -> {'/'.join(s.name for s in slots)}" for ev, slots in t.slots.items()) + ")"
                    for t in targets))
            else:
                log.warning("no held bundle with loaded features has a sequence fed by events: entries are "
                            "acknowledged without an update")
        self.targets = targets

    # -- the loop --------------------------------------------------------------------------------

    def _apply(self, entries) -> int:
        if entries:
            self.totals.add(self.applier.apply(entries, self.targets))
        return len(entries)

    def own_pending(self) -> int:
        """Re-read this consumer's own pending entries (a restart under the same name) and apply them."""
        n = 0
        while True:
            reply = self.client.xreadgroup(self.group, self.name, {self.stream: "0"}, count=self.settings.events_batch)
            entries = reply[0][1] if reply else []
            if not entries:
                return n
            n += self._apply(entries)

    def claim(self) -> int:
        """Claim and apply the entries pending longer than MTRANK_EVENTS_CLAIM_IDLE_MS (dead consumers)."""
        n, start = 0, "0-0"
        while True:
            reply = self.client.xautoclaim(self.stream, self.group, self.name, self.settings.events_claim_idle_ms,
                                           start_id=start, count=self.settings.events_batch)
            cursor, entries = reply[0], reply[1]
            if entries:
                log.info("claimed %d entries pending longer than %d ms", len(entries),
                         self.settings.events_claim_idle_ms)
                n += self._apply(entries)
            if cursor in (b"0-0", "0-0"):
                return n
            start = cursor

    def step(self) -> int:
        """One turn: find the targets (when due), claim (when due), read and apply one batch.
        Returns the number of entries handled."""
        self.refresh()
        n = 0
        now = time.monotonic()
        if now >= self._claim_at:
            self._claim_at = now + self.settings.events_claim_idle_ms / 2000.0
            n += self.claim()
        reply = self.client.xreadgroup(self.group, self.name, {self.stream: ">"}, count=self.settings.events_batch,
                                       block=self.block_ms)
        for _, entries in reply or ():
            n += self._apply(entries)
        return n

    def run(self, stop: threading.Event) -> Counts:
        """Until ``stop`` is set: the loop of the module doc. Returns the totals."""
        started = False
        report_at = time.monotonic() + REPORT_EVERY_S
        while not stop.is_set():
            try:
                if not started:
                    self.ensure_group()
                    self.refresh(force=True)
                    self.own_pending()
                    started = True
                    log.info("consumer %r of group %r on %s started", self.name, self.group, self.stream)
                self.step()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("redis unavailable (%s: %s); retrying in 1 s", type(e).__name__, e)
                stop.wait(1.0)
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                log.warning("the stream or its group is gone (deleted, or a Redis without persistence restarted): "
                            "creating it again")
                started = False
            if time.monotonic() >= report_at:
                report_at = time.monotonic() + REPORT_EVERY_S
                log.info("events so far: %s", vars(self.totals))
        log.info("consumer %r stopped; events: %s", self.name, vars(self.totals))
        self.store.close()
        return self.totals
