"""FastAPI application factory: ``uvicorn --factory service.app:create_app``.

Routes are thin (:mod:`service.routes`: rank, health, admin, and the one exception -> status
mapping in :mod:`service.routes.errors`) over one :class:`~service.runtime.Runtime` that the
lifespan starts and stops. The work is in :mod:`service.serving` (the serving state: routing,
bundles, rankers, hot swap), :mod:`service.ranking` (features, model, fusion) and :mod:`service.admin`.

* ``POST /rank``   rank candidate items for a user (503 while no model is loaded)
* ``POST /events`` append a batch of outcome events to the events stream (202; 503 + Retry-After
  when Redis is unavailable); :mod:`service.routes.events`
* ``GET /healthz`` the process is alive
* ``GET /readyz``  "this replica can answer /rank usefully": 200 when a serving state exists and
  the feature store is usable; in degrade mode (MTRANK_REDIS_FAILURE_MODE=degrade, the default) a
  Redis that is down or paused keeps it 200 with ``"degraded": true`` and the reasons (and the
  gauge ``mtrank_degraded`` at 1), since /rank still answers with default features; 503 when no
  model serves, when Redis is unavailable in ``fail`` mode, or when the Redis client itself fails
  (an unexpected exception on the request path, e.g. an incompatible redis-py)
* ``GET /models``  the model of the first variant, plus every variant (no secrets)
* ``GET /metrics`` Prometheus metrics (:mod:`service.metrics`; merged over the workers)
* ``/admin/...``   the operator's API (only with MTRANK_ADMIN_TOKEN): ``POST /admin/reload``,
  ``GET /admin/models``, ``POST /admin/models/load`` and ``/admin/models/unload``

Each ``/rank`` reads the current serving state once and uses nothing else, so a hot swap never
mixes two worlds in one response. In front of every route, :class:`~service.middleware.EdgeMiddleware`
sets the request id (echoed in ``X-Request-Id``), enforces the body size limit (413), sheds load
by queue time (429 + ``Retry-After``) and writes the metrics and the one access-log line
per ``/rank`` (``service.access``). The ``/rank`` body is parsed by :mod:`service.limits` (strict
JSON, the configured limits, errors that name the field and never echo the input). A sampled
share of the ranked requests goes to the prediction log (:mod:`service.predlog`).

Without a routing config, a bundle that fails to load does not stop the app: it starts, ``/readyz``
says why it is not ready and ``/rank`` answers 503; an invalid MTRANK_ROUTING_CONFIG stops the
start with an error naming the line. Errors (every non-2xx answer has one shape,
``{"error": {"code", "message", "field"?, "details"?}, "request_id"}``, see
:mod:`service.routes.errors`; ``Retry-After`` on 429 and 503): invalid requests -> 422 naming the
field, a body that is not JSON -> 415/422 with a message, a body over
MTRANK_MAX_BODY_BYTES -> 413, a context entry the schema does not accept -> 422 naming the key, an
unknown forced variant -> 422 naming the header, Redis unavailable -> 503 in fail mode, overload ->
429 with Retry-After; anything unexpected is logged with the request id and answered 500.

At start (the factory), a redis-py older than the floor this package declares is refused with an
error naming both versions (:func:`service.deps.check_redis_py`).
"""

from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from service import access_log, deps
from service.middleware import EdgeMiddleware
from service.routes import admin, errors, events, health, rank
from service.runtime import Runtime
from service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    deps.check_redis_py()  # an incompatible redis-py: a clear start-up error, not a 500 per request
    settings = settings or Settings()
    access_log.configure(settings.log_level, settings.log_format)
    access_log.register_settings_secrets(settings)
    runtime = Runtime(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the threadpool must hold every admitted rank: the in-flight bound, not anyio's 40, limits them
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.inflight_limit + 8)
        runtime.start()
        try:
            yield
        finally:
            runtime.stop()

    app = FastAPI(title="mtrank", summary="Online multi-task ranking", lifespan=lifespan)
    app.state.mtrank = runtime
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes,
                       inflight_limit=settings.inflight_limit, queue_limit=settings.queue_limit,
                       queue_timeout_s=settings.shed_queue_ms / 1000.0, cache_on=settings.item_cache_size > 0)
    app.include_router(rank.router(runtime))
    app.include_router(health.router(runtime))
    app.include_router(events.router(runtime))
    if settings.admin_token is not None:  # without a token the admin routes do not exist (404)
        app.include_router(admin.router(runtime, settings.admin_token))
    errors.install(app)
    return app
