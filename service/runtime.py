"""The one object the app starts and stops: feature store client, serving manager, store watcher
and prediction log, and the one answer to "is this replica ready?".

``create_app`` builds a :class:`Runtime`, the lifespan calls :meth:`Runtime.start` and
:meth:`Runtime.stop`, and the routes read it (``app.state.mtrank``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from service import access_log, metrics
from service.predlog import PredictionLog
from service.redis_client import FeatureStore, make_store
from service.serving import ServingManager, ServingState, Watcher
from service.settings import Settings, redact_url
from service.store import Bundle, limit_concurrent_runs

log = logging.getLogger("service.app")


@dataclass
class Runtime:
    settings: Settings
    redis_client: FeatureStore | None = None
    manager: ServingManager | None = None
    watcher: Watcher | None = None
    predlog: PredictionLog | None = None
    gauges: metrics.GaugeRefresher | None = None
    access_queue: bool = False  # this runtime holds a use of the access-log queue

    @property
    def serving(self) -> ServingState | None:
        return self.manager.state if self.manager is not None else None

    @property
    def bundle(self) -> Bundle | None:
        """The bundle of the first variant (the only one without a routing config)."""
        st = self.serving
        return st.primary.bundle if st is not None else None

    @property
    def not_ready(self) -> str:
        """Why no model serves (the manager says; "starting" before it exists)."""
        return (self.manager.not_ready if self.manager is not None else None) or "starting"

    def breaker_state(self) -> str | None:
        return self.redis_client.state if self.redis_client is not None else None

    def model_rows(self) -> list[metrics.ModelRow]:
        """(variant, model, version, precision) of every variant serving now (``mtrank_model_info``)."""
        st = self.serving
        return [(v.name, v.bundle.name, v.bundle.version, v.bundle.precision) for v in st.variants] if st else []

    def gauge_probe(self) -> tuple[str | None, bool]:
        """(breaker state, ready but degraded) now, for the background refresh of the gauges."""
        reasons, degraded = self.readiness()
        return self.breaker_state(), bool(degraded) and not reasons

    def readiness(self) -> tuple[list[str], list[str]]:
        """(reasons not to be ready, reasons to be degraded). Redis is PINGed unless a breaker is
        open (then it is known to be unavailable). Variants whose features vanished from Redis
        (:mod:`service.serving.namespace_watch`) answer 503: all of them -> not ready; some ->
        ready but degraded (the other variants' users are still ranked)."""
        s = self.settings
        reasons: list[str] = []
        redis_down: list[str] = []
        st = self.serving
        lost = st.unavailable() if st is not None else []  # variants whose features vanished from Redis
        if st is None:
            reasons.append(f"model not loaded: {self.not_ready}")
        elif lost and len(lost) == len(st.variants):
            reasons, lost = lost, []  # no variant can rank: not ready
        c = self.redis_client
        if c is None:
            reasons.append("redis: no client")
        else:
            if c.fault:  # every /rank fails with it: not something degraded mode can answer
                reasons.append(f"redis client error on the request path (every /rank fails): {c.fault}")
            if not c.healthy:
                redis_down.append(f"redis {s.redis_url_redacted}: circuit breaker {c.state}")
            else:
                try:
                    c.ping()
                except redis.RedisError as e:
                    redis_down.append(f"redis {s.redis_url_redacted}: {type(e).__name__}: {e}")
                except Exception as e:  # an incompatible client: say so instead of a 500
                    reasons.append(f"redis client error: {type(e).__name__}: {e}")
        if s.redis_failure_mode == "fail":
            return reasons + redis_down, lost
        return reasons, redis_down + lost  # lost: some variants only, the others still rank

    def start(self) -> None:
        """Redis client, first serving state (raises on an invalid routing config or, with
        MTRANK_PROVIDERS_STRICT, a missing provider), watcher, prediction log. A start that raises
        stops what it had started (the Redis pool's thread above all) before the error goes on."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        # CPU: one model run at a time per worker (each uses the worker's whole thread budget), so
        # concurrent requests queue for the cores instead of time-slicing them. Bundles whose session
        # actually runs on the CPU take this gate (Bundle.gated), whatever was configured; a GPU
        # session queues on its device
        limit_concurrent_runs(1)
        log.info("feature store %s (prefix %r, timeout %d ms)", s.redis_url_redacted, s.redis_prefix,
                 s.redis_timeout_ms)
        store_error = None
        try:
            self.redis_client = make_store(s)
        except Exception as e:  # an unusable URL: say so in /readyz rather than refuse to start
            store_error = f"{type(e).__name__}: {e}"
            log.error("redis client: %s (url %s)", store_error, s.redis_url_redacted)
        self.manager = ServingManager(s, self.redis_client, store_error)
        self.manager.start()  # an invalid MTRANK_ROUTING_CONFIG raises here: the service does not start
        st = self.serving
        if st is not None:
            for v in st.variants:
                b = v.bundle
                log.info("serving %s v%d (%s) on %s (requested %s) as variant %r, buckets %d-%d of %d; fusion %s %s",
                         b.name, b.version, b.manifest.architecture, b.provider, ",".join(b.requested_providers),
                         v.name, v.first, v.last, st.config.buckets, v.ranker.fusion_name, v.ranker.weights)
        if s.store_poll_s > 0:
            self.watcher = Watcher(self.manager, s.store_poll_s).start()
        metrics.serving_models(self.model_rows)
        self.gauges = metrics.GaugeRefresher(self.gauge_probe).start()
        if s.admin_token is None:
            log.info("admin API disabled (MTRANK_ADMIN_TOKEN is not set)")
        if s.predlog_rate > 0:
            self.predlog = PredictionLog(s).start()
            log.info("prediction log: %.3g of the ranked requests (features in %.3g of them) to stream %r on %s "
                     "(MAXLEN ~%d, ~%d bytes)", s.predlog_rate, s.predlog_features_rate, s.predlog_stream,
                     redact_url(s.predlog_redis_url) if s.predlog_redis_url else "the feature store's Redis",
                     s.predlog_maxlen, s.predlog_max_bytes)
        access_log.start_queue()  # last: nothing above raised, so stop() will drain it
        self.access_queue = True
        log.info("limits: %d ranks executing per worker, %d waiting at most %.0f ms (then 429), %d items, ids of "
                 "%d characters, bodies of %d bytes; %d onnxruntime threads, %d workers", s.inflight_limit,
                 s.queue_limit, s.shed_queue_ms, s.max_items, s.max_id_length, s.max_body_bytes, s.ort_threads,
                 s.workers)

    def stop(self) -> None:
        if self.gauges is not None:
            self.gauges.stop()
        if metrics.MODEL_INFO.source == self.model_rows:
            metrics.serving_models(None)
        if self.watcher is not None:
            self.watcher.stop()
        if self.predlog is not None:
            self.predlog.close()
        if self.redis_client is not None:
            self.redis_client.close()
        metrics.worker_exit()
        if self.access_queue:
            access_log.stop_queue()  # the last access lines are written before the worker exits
            self.access_queue = False
