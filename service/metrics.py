"""Prometheus metrics of the service (prometheus-client), served on ``GET /metrics``.

One process: the default registry. Several uvicorn workers: ``mtrank serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start; every worker then
writes its values to memory-mapped files there and a scrape (answered by any one worker) merges
them with :class:`prometheus_client.multiprocess.MultiProcessCollector`. A worker that exits
marks itself dead (:func:`worker_exit`) so that its live gauges drop out; one that was killed
(no exit code ran) is marked dead by the next scrape (:func:`exposition` prunes the live-gauge
files of processes that no longer run).

Bounded label sets: no label takes a value per model *version* (a version published every hour
would add series for ever). Which versions serve is :data:`MODEL_INFO`, computed at scrape time
from the serving state (``mtrank_model_info{variant, model, version, precision} 1``, one series
per variant: an unloaded version is gone from the next scrape). Join it to the request counter
on (instance, variant, model) to count requests by version.

Gauges describe the worker's present: the breaker and degraded gauges are refreshed by a thread
per worker (:class:`GaugeRefresher`, every :data:`GAUGE_REFRESH_S`), not only when a request or a
probe happens to land on that worker.

The hot path only touches label children bound once and cached (per variant/model/status, per
stage), never ``.labels()`` with a fresh lookup per request.

Names (see README "Operations"):

=====================================  =========  ==========================  ==============================
name                                   type       labels                      meaning
=====================================  =========  ==========================  ==============================
mtrank_rank_requests_total             counter    variant, model, status      /rank answers
mtrank_rank_duration_seconds           histogram  status                      /rank wall time in the process
mtrank_rank_stage_seconds              histogram  stage                       per stage of ranked requests
mtrank_rank_candidates                 histogram                              items per ranked request
mtrank_missing_features_total          counter    entity (user, item)         scored with defaults
mtrank_corrupt_features_total          counter    entity (item)               undecodable values
mtrank_rank_degraded_total             counter    reason                      degraded answers
mtrank_rank_shed_total                 counter                                429 + Retry-After (overload)
mtrank_rank_inflight                   gauge                                  /rank in flight (sum)
mtrank_item_cache_hits_total           counter                                items from the in-process cache
mtrank_item_cache_misses_total         counter                                items not from it
mtrank_model_loads_total               counter    model, result               bundle load attempts
mtrank_redis_breaker_state             gauge                                  0 closed, 1 half-open, 2 open
mtrank_degraded                        gauge                                  1 ready but degraded (Redis)
mtrank_predlog_written_total           counter                                prediction-log records written
mtrank_predlog_dropped_total           counter    reason                      records dropped
mtrank_rank_forced_total               counter    variant                     ranked with X-Mtrank-Variant
mtrank_features_lost                   gauge                                  held bundles whose features vanished
mtrank_model_info                      gauge      variant, model, version,    1 per variant: the bundle
                                                  precision                   serving it (at scrape time)
=====================================  =========  ==========================  ==============================
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.breaker import BREAKER_STATES
from service.ranking import STAGES as RANK_STAGES

log = logging.getLogger("service.metrics")
STAGES = (*RANK_STAGES, "total")  # the ranking stages, plus the whole request
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
CONTENT_TYPE = CONTENT_TYPE_LATEST

RANK_REQUESTS = Counter("mtrank_rank_requests", "POST /rank answers by variant, model and HTTP status "
                                                "(variant/model empty when the request was not routed; the "
                                                "version serving a variant: mtrank_model_info)",
                        ["variant", "model", "status"])
RANK_DURATION = Histogram("mtrank_rank_duration_seconds", "POST /rank wall time inside the process, from the "
                                                          "first byte of the request to the response, by status",
                          ["status"], buckets=LATENCY_BUCKETS)
RANK_STAGE = Histogram("mtrank_rank_stage_seconds", "time per stage of a ranked request: fetch (Redis), "
                                                    "assemble, inference, fusion, serialise, total",
                       ["stage"], buckets=LATENCY_BUCKETS)
RANK_CANDIDATES = Histogram("mtrank_rank_candidates", "candidate items per ranked request", buckets=CANDIDATE_BUCKETS)
MISSING = Counter("mtrank_missing_features", "entities scored with default features (absent or corrupt)",
                  ["entity"])
CORRUPT = Counter("mtrank_corrupt_features", "feature values that did not decode (scored with defaults)", ["entity"])
DEGRADED = Counter("mtrank_rank_degraded", "responses answered degraded (feature store late or down)", ["reason"])
SHED = Counter("mtrank_rank_shed", "POST /rank refused with 429 + Retry-After: no execution slot within "
                                   "MTRANK_SHED_QUEUE_MS, or the wait queue was full")
INFLIGHT = Gauge("mtrank_rank_inflight", "POST /rank requests in flight (summed over the live workers)",
                 multiprocess_mode="livesum")
CACHE_HITS = Counter("mtrank_item_cache_hits", "items whose features came from the in-process item cache")
CACHE_MISSES = Counter("mtrank_item_cache_misses", "items whose features did not come from the item cache")
MODEL_LOADS = Counter("mtrank_model_loads", "model bundle load attempts by result (loaded, refused)",
                      ["model", "result"])
BREAKER = Gauge("mtrank_redis_breaker_state", "feature-store circuit breaker: 0 closed, 1 half-open, 2 open "
                                              "(the worst of the live workers)", multiprocess_mode="livemax")
DEGRADED_NOW = Gauge("mtrank_degraded", "1 while the replica is ready but degraded: the feature store is "
                                        "unavailable and /rank answers with default features (degrade mode); "
                                        "the worst of the live workers", multiprocess_mode="livemax")
PREDLOG_WRITTEN = Counter("mtrank_predlog_written", "prediction-log records appended to the Redis Stream")
PREDLOG_DROPPED = Counter("mtrank_predlog_dropped", "prediction-log records dropped: queue_full (the writer is "
                                                    "behind) or redis (the stream's Redis failed)", ["reason"])
FORCED = Counter("mtrank_rank_forced", "ranked requests whose variant was forced by X-Mtrank-Variant (QA; also "
                                      "counted in mtrank_rank_requests_total, left out of A/B readouts)", ["variant"])
FEATURES_LOST = Gauge("mtrank_features_lost", "held bundles whose feature namespace vanished from Redis (their "
                                              "variants answer 503 until `mtrank features load`); the worst of "
                                              "the live workers", multiprocess_mode="livemax")

_STAGE = {s: RANK_STAGE.labels(s) for s in STAGES}
_MISSING_USER = MISSING.labels("user")
_MISSING_ITEM = MISSING.labels("item")
_CORRUPT_ITEM = CORRUPT.labels("item")
_requests: dict[tuple[str | None, str | None, int], Counter] = {}
_durations: dict[int, Histogram] = {}
_degraded: dict[str, Counter] = {}
_dropped: dict[str, Counter] = {}
_breaker_last: list[float | None] = [None]
_degraded_last: list[float | None] = [None]


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def count_request(variant: str | None, model: str | None, status: int) -> None:
    key = (variant, model, status)
    child = _requests.get(key)
    if child is None:
        child = _requests.setdefault(key, RANK_REQUESTS.labels(variant or "", model or "", str(status)))
    child.inc()


def observe_duration(status: int, seconds: float) -> None:
    child = _durations.get(status)
    if child is None:
        child = _durations.setdefault(status, RANK_DURATION.labels(str(status)))
    child.observe(seconds)


def observe_ranked(timings: dict[str, float], n_items: int, user_missing: bool, items_missing: int,
                   items_corrupt: int, degraded: str | None, items_from_cache: int | None,
                   cache_on: bool) -> None:
    """Everything about one ranked (200) request."""
    for stage, seconds in timings.items():
        child = _STAGE.get(stage)
        if child is not None:
            child.observe(seconds)
    RANK_CANDIDATES.observe(n_items)
    if user_missing:
        _MISSING_USER.inc()
    if items_missing:
        _MISSING_ITEM.inc(items_missing)
    if items_corrupt:
        _CORRUPT_ITEM.inc(items_corrupt)
    if degraded:
        counter = _degraded.get(degraded)
        if counter is None:
            counter = _degraded.setdefault(degraded, DEGRADED.labels(degraded))
        counter.inc()
    if cache_on and items_from_cache is not None:
        if items_from_cache:
            CACHE_HITS.inc(items_from_cache)
        if n_items - items_from_cache:
            CACHE_MISSES.inc(n_items - items_from_cache)


def shed() -> None:
    SHED.inc()


def inflight(delta: int) -> None:
    INFLIGHT.inc(delta)


def set_breaker(state: str | None) -> None:
    """The feature store breaker's state (``closed``, ``half_open``, ``open``); unknown -> closed."""
    value = float(BREAKER_STATES.index(state) if state in BREAKER_STATES else 0)
    if _breaker_last[0] != value:
        _breaker_last[0] = value
        BREAKER.set(value)


def set_degraded(degraded: bool) -> None:
    """Whether this worker is ready but degraded: set by ``GET /readyz`` and by every ranked request
    (the latest finding wins)."""
    value = 1.0 if degraded else 0.0
    if _degraded_last[0] != value:
        _degraded_last[0] = value
        DEGRADED_NOW.set(value)


def set_features_lost(n: int) -> None:
    """How many held bundles' features vanished from Redis (set by the store watcher)."""
    FEATURES_LOST.set(n)


def record_model_load(model: str, result: str) -> None:
    """One bundle load attempt: ``result`` is ``loaded`` or ``refused`` (called by service.serving)."""
    MODEL_LOADS.labels(model, result).inc()


def predlog_written(n: int = 1) -> None:
    PREDLOG_WRITTEN.inc(n)


def predlog_dropped(reason: str, n: int = 1) -> None:
    child = _dropped.get(reason)
    if child is None:
        child = _dropped.setdefault(reason, PREDLOG_DROPPED.labels(reason))
    child.inc(n)


def count_forced(variant: str) -> None:
    FORCED.labels(variant).inc()  # QA traffic: rare, no cached child


def exposition() -> bytes:
    """The text exposition of every metric (merged over the workers in multi-process mode, after
    dropping the live gauges of workers that died without :func:`worker_exit`)."""
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        prune_dead_workers(path)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(MODEL_INFO)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def worker_exit() -> None:
    """At a worker's exit in multi-process mode: drop its live gauges from the merged view."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


def prune_dead_workers(path: str) -> list[int]:
    """Mark dead (drop the live-gauge files of) every process that wrote live gauges under ``path``
    and no longer runs - a worker killed by a signal or the OOM killer runs no exit code. Returns
    their pids."""
    from prometheus_client import multiprocess

    dead = []
    for f in Path(path).glob("gauge_live*_*.db"):
        pid = f.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            multiprocess.mark_process_dead(int(pid), path)
            dead.append(int(pid))
    return dead


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a dead worker its supervisor has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# -- what serves: an info metric computed at scrape time ---------------------------------------------

ModelRow = tuple[str, str, int, str]  # variant, model, version, precision


class ModelInfo(Collector):
    """``mtrank_model_info{variant, model, version, precision} 1``: the bundle serving each variant of
    the worker's serving state at scrape time (:attr:`source`, set by the runtime). Holds no series
    of its own, so an unloaded version is gone from the next scrape, however many came before."""

    NAME = "mtrank_model_info"
    LABELS = ("variant", "model", "version", "precision")

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[ModelRow]] | None = None

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.NAME, "1 per variant of the serving state: the model, version and precision "
                                            "serving it (answered by the scraped worker)", labels=self.LABELS)

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> list[GaugeMetricFamily]:
        fam = self._family()
        source = self.source
        try:
            rows = list(source()) if source is not None else []
        except Exception:  # a scrape must never fail on it
            rows = []
        for variant, model, version, precision in rows:
            fam.add_metric([variant, model, str(version), precision], 1.0)
        return [fam]


MODEL_INFO = ModelInfo()
REGISTRY.register(MODEL_INFO)


def serving_models(source: Callable[[], Iterable[ModelRow]] | None) -> None:
    """Where :data:`MODEL_INFO` reads the serving state from (None: nothing serves)."""
    MODEL_INFO.source = source


# -- gauges of the worker's present, refreshed in the background -------------------------------------

#: seconds between two refreshes of the breaker and degraded gauges of a worker
GAUGE_REFRESH_S = 1.0


class GaugeRefresher:
    """A daemon thread per worker that sets the breaker and degraded gauges every ``interval_s``
    from ``probe() -> (breaker state, degraded)``, so that they say what the worker knows now even
    when no request reaches it. Requests and ``/readyz`` still set them too (the latest wins)."""

    def __init__(self, probe: Callable[[], tuple[str | None, bool]], interval_s: float = GAUGE_REFRESH_S):
        self.probe = probe
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtrank-gauges", daemon=True)

    def start(self) -> GaugeRefresher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                state, degraded = self.probe()
            except Exception:  # never let the thread die: the next round tries again
                if not self._stop.is_set():  # (at shutdown the store may close under a probe)
                    log.exception("refreshing the gauges failed")
                continue
            if not self._stop.is_set():
                set_breaker(state)
                set_degraded(degraded)

    def stop(self) -> None:
        """Stop without waiting for a probe in progress (it may wait for a stalled Redis; the
        thread is a daemon and sets nothing once stopped)."""
        self._stop.set()
