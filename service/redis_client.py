"""The feature store connection: one object the service reads features through.

:class:`FeatureStore` wraps a redis-py client (a single Redis, or a Redis Cluster) and owns what
the request path needs around it. Everything that reads or writes features goes through
:func:`make_store` / :func:`client_for_url` so a URL or ``MTRANK_REDIS_CLUSTER`` switch is
honoured everywhere.

Choices, and why:

* **Two paths.** ``store.client`` is an ordinary redis-py client (``redis.Redis`` or
  ``redis.cluster.RedisCluster``) with ``MTRANK_REDIS_TIMEOUT_MS`` timeouts and one immediate
  retry, for the control path (meta checks, ``/readyz``, tools). :meth:`FeatureStore.mget`, the
  request path, reads through a :class:`~service.redis_conn.WarmPool` per node, without retries.
* **The whole read inside the budget.** A read never connects: DNS, connect, TLS, AUTH/HELLO and
  SELECT happen in each node's pool thread (``service.redis_conn``), which keeps
  ``MTRANK_REDIS_POOL_SIZE`` connections warm and replaces closed ones. A read waits for a warm
  connection at most its budget, sends with the rest of it as the socket timeout and reads every
  reply with ``read_response(timeout=<what is left>)``. On a timeout the socket is closed and the
  connection discarded (a late reply can never be read by the next request); the pool thread
  opens its replacement. No threads are spent per request. (A byte-trickling server could stretch
  one read by one more timeout; Redis does not trickle.)
* **Circuit breaker per node**, small and local (:class:`~service.breaker.Breaker`; the packaged
  breakers are not thread-safe or want asyncio). ``MTRANK_BREAKER_FAILURES`` consecutive failures open it;
  while open, reads of that node fail at once with ``circuit_open`` (no network) and the node's
  pool stops connecting. Probing is off the request path: opening starts a tiny daemon thread
  that PINGs the node on a fresh connection every ``MTRANK_BREAKER_PROBE_S``. A PONG makes it
  half-open: that connection joins the pool, reads are re-admitted on warm connections only (at
  most the pool's size at once, none connects), and the first success closes it (a read's, or the
  next probe's), a failure opens it again. So service resumes ~probe_s after Redis answers, with
  no request paying for the probe and no reconnect storm; the thread then exits.
* **Cluster**: keys are grouped per node from a slot table copied out of the cluster client's
  ``nodes_manager``, one MGET per hash slot (Redis refuses cross-slot MGETs even on one node),
  all of a node's MGETs packed (hiredis) into one write on one connection and their replies read
  back in turn; every node is written to first and then read, so the nodes work concurrently and
  a read costs about the slowest node. Item keys carry one of ``ITEM_GROUPS`` hash tags per
  namespace (:func:`service.contract.item_key`), so a request's items are at most ``ITEM_GROUPS``
  MGETs (plus one each for the user and meta keys) however many it names, and a key's slot is
  found per key *head* (the key up to its first ``}``): keys are grouped by head, and each head's
  slot is looked up once in a cache instead of a CRC per key. A node that fails costs
  only its keys: the others' values come back on :attr:`StoreUnavailable.partial`. MOVED/ASK or a
  failed node schedule a background topology refresh. What the cluster read costs next to a
  single Redis's one MGET (also packed by hiredis directly): ``bench/cluster_read.py``.

Failures surface as :class:`StoreUnavailable` (a ``redis.RedisError``) with a short ``reason``:
``timeout``, ``down`` or ``circuit_open``. Anything else raised on the request path (a bug, or a
redis-py without an API used here: a ``TypeError``) is not a Redis outage that degraded mode could
answer: it propagates (a 500), is logged once per distinct message, and is kept in
:attr:`FeatureStore.fault` until a read succeeds, so ``/readyz`` takes the replica out of rotation
instead of every request failing silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError
from redis.retry import Retry

from service.breaker import BREAKER_STATES, Breaker
from service.redis_conn import PoolBusy, WarmPool, connection_kwargs, set_timeout
from service.settings import Settings, url_secret

log = logging.getLogger(__name__)

#: seconds between two topology refreshes of a cluster at most
_REFRESH_EVERY_S = 1.0


class StoreUnavailable(redis.RedisError):
    """The feature store did not answer in time or at all; ``reason`` is a short code.

    ``partial``: on a cluster where only some nodes failed, the reply with ``None`` for the keys
    of the failed nodes (else ``None``)."""

    def __init__(self, reason: str, detail: str = "", partial: list | None = None):
        super().__init__(f"feature store unavailable ({reason}){': ' + detail if detail else ''}")
        self.reason = reason
        self.partial = partial




class _Node:
    """One Redis server of the request path: its warm pool and breaker."""

    __slots__ = ("breaker", "name", "pool")

    def __init__(self, name: str, pool: WarmPool, breaker: Breaker):
        self.name = name
        self.pool = pool
        self.breaker = breaker


class FeatureStore:
    """Feature reads with a deadline, a circuit breaker per node and, on a cluster, reads grouped
    per node. ``get``/``ping``/``close`` and :attr:`client` are the control path."""

    def __init__(self, client, settings: Settings):
        self.client = client
        self.settings = settings
        self.deadline_s = settings.redis_deadline_ms / 1000.0
        self.connect_timeout_s = settings.redis_timeout_s  # the pools' threads: connect, TLS, AUTH, PING
        self.probe_timeout_s = max(self.deadline_s, min(settings.redis_timeout_s, 0.1))
        self.is_cluster = isinstance(client, RedisCluster)
        self._password = url_secret(settings.redis_url)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._refresh_at = 0.0
        self._refreshing = False
        self.fault: str | None = None  # an unexpected exception of the request path (see the module doc)
        if self.is_cluster:
            self._slot_table: list[str] = []
            self._load_topology()
        else:
            self._single = self._node(redis_name(client.connection_pool), client.connection_pool)
        # the first fill of every node's pool, in parallel: the first reads find warm connections
        until = time.monotonic() + 2 * self.connect_timeout_s + 0.5
        for node in list(self._nodes.values()):
            node.pool.wait_ready(max(until - time.monotonic(), 0.0))

    # -- nodes and topology ----------------------------------------------------------------------
    def _node(self, name: str, source_pool: redis.ConnectionPool) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            pool = WarmPool(name, source_pool.connection_class, connection_kwargs(source_pool, self.connect_timeout_s),
                            self.settings.redis_pool_size, self.connect_timeout_s,
                            paused=lambda: breaker.state == "open", scrub=self._scrub)
            breaker = Breaker(name, self.settings.breaker_failures, self.settings.breaker_probe_s,
                              probe=lambda: pool.probe(self.probe_timeout_s), stop=self._stop, on_open=pool.drop_idle)
            node = self._nodes[name] = _Node(name, pool.start(), breaker)
        return node

    def _load_topology(self) -> None:
        """Copy the cluster client's slot -> primary mapping into a plain list (no lock per key)."""
        nm = self.client.nodes_manager
        table = [""] * 16384
        with self._lock:
            for slot, nodes in list(nm.slots_cache.items()):
                if nodes:
                    primary = nodes[0]
                    conn = primary.redis_connection or self.client.get_redis_connection(primary)
                    self._node(primary.name, conn.connection_pool)
                    table[slot] = primary.name
            self._slot_table = table
            for name in set(self._nodes) - set(table):  # gone (e.g. replaced by a promoted replica)
                node = self._nodes.pop(name)
                node.breaker.retired = True
                node.pool.close()

    def _schedule_refresh(self) -> None:
        """Re-read the cluster topology in the background, at most once per second."""
        now = time.monotonic()
        with self._lock:
            if self._refreshing or now < self._refresh_at or self._stop.is_set():
                return
            self._refreshing, self._refresh_at = True, now + _REFRESH_EVERY_S

        def run():
            try:
                self.client.nodes_manager.initialize()
                self._load_topology()
            except Exception as e:  # keep the old table; the next failure schedules another try
                log.warning("feature store: cluster topology refresh failed: %s",
                            self._scrub(f"{type(e).__name__}: {e}"))
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="mtrank-cluster-refresh", daemon=True).start()

    # -- request path ---------------------------------------------------------------------------
    def mget(self, keys: Sequence[str], deadline_s: float | None = None) -> list[bytes | None]:
        """Values of ``keys`` in order (``None`` = absent) within ``deadline_s`` seconds (default
        ``MTRANK_REDIS_DEADLINE_MS``); raises :class:`StoreUnavailable` otherwise."""
        try:
            out = self._mget(keys, deadline_s)
        except redis.RedisError:
            raise
        except Exception as e:
            fault = self._scrub(f"{type(e).__name__}: {e}")
            if fault != self.fault:
                log.error("feature store: unexpected error on the request path (not ready until a read "
                          "succeeds): %s", fault, exc_info=True)
            self.fault = fault
            raise
        if self.fault is not None:
            log.warning("feature store: reads succeed again (was: %s)", self.fault)
            self.fault = None
        return out

    def _mget(self, keys: Sequence[str], deadline_s: float | None) -> list[bytes | None]:
        until = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        if self.is_cluster:
            return self._mget_cluster(keys, until)
        node = self._single
        if not node.breaker.allow():
            raise StoreUnavailable("circuit_open", node.breaker.last_error or "")
        # packed by hiredis directly: redis-py's packer checks every argument in Python first
        conn = self._send(node, hiredis.pack_command(("MGET", *keys)), until)  # type: ignore[arg-type]
        reply = self._recv(node, conn, 1, until)[0]
        if isinstance(reply, Exception):  # an error reply (NOAUTH, OOM, ...): the server cannot serve us
            raise self._failed(node, reply)
        return reply

    def _send(self, node: _Node, commands: list[tuple] | bytes, until: float):
        """A warm connection of ``node`` with ``commands`` written on it (pipelined; ``bytes``: packed
        already) by ``until``."""
        try:
            conn = node.pool.acquire(until)
        except PoolBusy as e:  # the pool is too small for the load: not a failure of the node
            raise StoreUnavailable("timeout", self._scrub(f"{node.name}: {e}")) from None
        except redis.RedisError as e:
            raise self._failed(node, e) from None
        try:
            set_timeout(conn, until - time.monotonic())
            if isinstance(commands, bytes):
                conn.send_packed_command([commands])
            elif len(commands) == 1:
                conn.send_command(*commands[0])
            else:
                conn.send_packed_command(conn.pack_commands(commands))
        except BaseException as e:
            node.pool.discard(conn)
            if isinstance(e, redis.RedisError):
                raise self._failed(node, e) from None
            raise
        return conn

    def _recv(self, node: _Node, conn, n: int, until: float) -> list:
        """The ``n`` replies on ``conn``; a ``ResponseError`` reply is returned in place (the
        connection stays in step), a timeout or a socket error raises (the socket is closed)."""
        out: list = []
        try:
            for _ in range(n):
                # at least 1 ms: replies already in the socket buffer are read even past the budget
                left = max(until - time.monotonic(), 0.001)
                try:
                    out.append(conn.read_response(timeout=left))
                except (redis.ConnectionError, redis.TimeoutError):
                    raise
                except redis.ResponseError as e:
                    out.append(e)
        except BaseException as e:  # the connection may hold a late reply: never reused
            node.pool.discard(conn)
            if isinstance(e, redis.RedisError):
                raise self._failed(node, e) from None
            raise
        node.pool.release(conn)
        node.breaker.success()
        return out

    def _failed(self, node: _Node, e: Exception) -> StoreUnavailable:
        reason = "timeout" if isinstance(e, redis.TimeoutError) else "down"
        detail = self._scrub(f"{node.name}: {type(e).__name__}: {e}")
        node.breaker.failure(detail)
        if self.is_cluster:
            self._schedule_refresh()
        return StoreUnavailable(reason, detail)

    def _mget_cluster(self, keys: Sequence[str], until: float) -> list[bytes | None]:
        """One pipeline per node (a write of all its MGETs, then a read of all their replies), one
        MGET per hash slot; every node is written to before any is read, so they work concurrently.
        With the item keys' hash tags (:data:`service.contract.ITEM_GROUPS`) that is a bounded
        number of MGETs per node, however many items a request names."""
        table, pack = self._slot_table, hiredis.pack_command  # hiredis packs in C; redis-py's packer loops per key
        plan: dict[str, list[list[int]]] = {}  # node -> positions of each of its MGETs (one per slot)
        for slot, positions in _positions_by_slot(keys).items():
            plan.setdefault(table[slot], []).append(positions)
        out: list = [None] * len(keys)
        errors: list[StoreUnavailable] = []
        sent = []
        for name, groups in plan.items():
            node = self._nodes.get(name)
            if node is None:
                errors.append(StoreUnavailable("down", f"no node serves slot {key_slot(keys[groups[0][0]].encode())}"))
                self._schedule_refresh()
                continue
            if not node.breaker.allow():
                errors.append(StoreUnavailable("circuit_open", node.breaker.last_error or ""))
                continue
            # (hiredis' stub types the argument as a 1-tuple; it takes any tuple of str/bytes)
            packed = b"".join([pack(("MGET", *map(keys.__getitem__, g))) for g in groups])  # type: ignore[arg-type]
            try:
                conn = self._send(node, packed, until)
            except StoreUnavailable as e:
                errors.append(e)
                continue
            sent.append((node, conn, groups))
        for node, conn, groups in sent:  # every node is working by now: read them in turn
            try:
                replies = self._recv(node, conn, len(groups), until)
            except StoreUnavailable as e:
                errors.append(e)
                continue
            for g, reply in zip(groups, replies, strict=True):
                if isinstance(reply, Exception):
                    if isinstance(reply, (MovedError, AskError)):
                        self._schedule_refresh()
                    errors.append(StoreUnavailable("down", self._scrub(f"{node.name}: {reply}")))
                    continue
                for p, v in zip(g, reply, strict=True):
                    out[p] = v
        if errors:
            first = errors[0]
            raise StoreUnavailable(first.reason, str(first), partial=out)
        return out

    # -- state -----------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Every breaker is closed."""
        return all(n.breaker.state == "closed" for n in list(self._nodes.values()))

    @property
    def state(self) -> str:
        """``closed``, ``half_open`` or ``open``: the worst of the nodes' breakers."""
        states = [n.breaker.state for n in list(self._nodes.values())] or ["closed"]
        return max(states, key=BREAKER_STATES.index)

    @property
    def last_error(self) -> str | None:
        """The latest failure seen by any breaker (no password in it)."""
        errs = [(n.breaker.opened_at or 0.0, n.breaker.last_error) for n in list(self._nodes.values())
                if n.breaker.last_error]
        return max(errs)[1] if errs else None

    def connections(self) -> dict[str, dict]:
        """Per node: idle and open warm connections, connections ever opened, the last open error."""
        out = {}
        for n in list(self._nodes.values()):
            idle, total = n.pool.counts
            out[n.name] = {"idle": idle, "open": total, "opened": n.pool.opened, "error": n.pool.error}
        return out

    def breakers(self) -> dict[str, dict]:
        """Per node: state, consecutive failures, last error (for metrics and admin views)."""
        return {n.name: {"state": n.breaker.state, "failures": n.breaker.failures, "last_error": n.breaker.last_error}
                for n in list(self._nodes.values())}

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    # -- pass-through for the control path (meta checks, readiness) --------------------------------
    def get(self, key: str):
        return self.client.get(key)

    def ping(self) -> bool:
        return self.client.ping()

    def close(self) -> None:
        self._stop.set()
        for n in list(self._nodes.values()):
            n.pool.close()
        self.client.close()


#: hash slot of a key *head* (the key up to and with its first ``}``) when the head alone decides it, i.e. holds
#: a non-empty hash tag: each namespace's item keys share ITEM_GROUPS heads (service.contract), so a
#: request's thousands of item keys cost a dict lookup each instead of a CRC each
_HEAD_SLOTS: dict[str, int] = {}
_HEAD_SLOTS_MAX = 1 << 16


def _positions_by_slot(keys: Sequence[str]) -> dict[int, list[int]]:
    """The positions of ``keys`` grouped by hash slot (Redis Cluster's rules: the first ``{...}``
    with something inside, else the whole key).

    Keys are grouped by head first (one ``partition``, one dict lookup and one append per key: the
    only per-key work in Python), then each distinct head is looked up once: a request's item keys
    share at most ``ITEM_GROUPS`` heads."""
    by_head: defaultdict[str, list[int]] = defaultdict(list)
    for pos, key in enumerate(keys):
        head, brace, _ = key.partition("}")
        by_head[head + brace].append(pos)  # a key without "}" is its own head (and never ends in "}")
    cache = _HEAD_SLOTS
    by_slot: dict[int, list[int]] = {}
    for head, positions in by_head.items():
        slot = cache.get(head)
        if slot is None:
            if head[-1:] != "}" or "{" not in head[:-2]:  # no non-empty tag in the head: hash each key whole
                for pos in positions:
                    by_slot.setdefault(key_slot(keys[pos].encode()), []).append(pos)
                continue
            slot = key_slot(keys[positions[0]].encode())  # the tag inside the head alone decides the slot
            if len(cache) >= _HEAD_SLOTS_MAX:
                cache.clear()
            cache[head] = slot
        at = by_slot.get(slot)
        if at is None:
            by_slot[slot] = positions
        else:  # another head (or an untagged key) in the same slot
            at.extend(positions)
    return by_slot


def redis_name(pool: redis.ConnectionPool) -> str:
    kw = pool.connection_kwargs
    return f"{kw['host']}:{kw.get('port', 6379)}" if "host" in kw else str(kw.get("path", "redis"))


def _plain_url(url: str) -> str:
    """``redis+cluster://`` -> ``redis://``, ``rediss+cluster://`` -> ``rediss://`` (TLS kept)."""
    scheme, sep, rest = url.partition("://")
    return scheme.lower().removesuffix("+cluster") + sep + rest


def make_client(settings: Settings):
    """A redis-py client for ``settings.redis_url``: a ``RedisCluster`` when ``settings.cluster``
    (this contacts the cluster to learn its slots), else a ``redis.Redis``. Timeouts from the
    settings; one immediate retry (a pooled connection may have died with a restarted server)."""
    url = _plain_url(settings.redis_url)
    t = settings.redis_timeout_s
    if settings.cluster:
        return RedisCluster.from_url(url, socket_timeout=t, socket_connect_timeout=t, require_full_coverage=False,
                                     retry=Retry(NoBackoff(), 1))
    return redis.Redis.from_url(url, socket_timeout=t, socket_connect_timeout=t, retry=Retry(NoBackoff(), 1))


def client_for_url(url: str, timeout_s: float = 5.0, cluster: bool | None = None):
    """A redis-py client for tools (loader, demo): a cluster client for a ``+cluster`` URL or
    ``cluster=True``, else a plain one."""
    return make_client(Settings(redis_url=url, redis_timeout_ms=round(timeout_s * 1000),
                                redis_cluster=bool(cluster)))


def make_store(settings: Settings) -> FeatureStore:
    return FeatureStore(make_client(settings), settings)
