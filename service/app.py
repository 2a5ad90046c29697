"""FastAPI application factory: ``uvicorn --factory service.app:create_app``.

Routes are thin; the work is in :mod:`service.serving` (the serving state: routing, bundles,
rankers, hot swap), :mod:`service.ranking` (features, model, fusion) and :mod:`service.admin`.

* ``POST /rank``   rank candidate items for a user (503 while no model is loaded)
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
start with an error naming the line. Errors: invalid requests -> 422 naming the field (FastAPI's
``detail`` list with ``loc``), a body that is not JSON -> 415/422 with a message, a body over
MTRANK_MAX_BODY_BYTES -> 413, a context entry the schema does not accept -> 422 naming the key, an
unknown forced variant -> 422 naming the header, Redis unavailable -> 503 in fail mode, overload ->
429 with Retry-After; anything unexpected is logged with the request id and answered 500.

At start (the factory), a redis-py older than the floor this package declares is refused with an
error naming both versions (:func:`service.deps.check_redis_py`).
"""

# no `from __future__ import annotations`: FastAPI must see the real types of the route signatures
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio.to_thread
import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from service import access_log, deps, limits, metrics
from service.admin import ModelId, check_bearer
from service.features import ContextError
from service.middleware import EdgeMiddleware, RequestInfo
from service.predlog import PredictionLog
from service.redis_client import FeatureStore, make_store
from service.routing import RoutingConfigError
from service.schemas import (DUPLICATES_DOC, ErrorResponse, RankRequest, RankResponse, Readiness,
                             ValidationErrorResponse, rank_request_model)
from service.serving import AdminError, NotReady, ServingManager, ServingState, UnknownVariant, Watcher
from service.settings import Settings
from service.store import Bundle, ProviderError, limit_concurrent_runs

log = logging.getLogger("service.app")
FORCE_HEADER = "X-Mtrank-Variant"
RANK_DESCRIPTION = f"""Score the candidate items for one user and return them sorted by the fused score.

Limits: at most MTRANK_MAX_ITEMS items, ids of at most MTRANK_MAX_ID_LENGTH characters, top_k at
most MTRANK_MAX_ITEMS, a body of at most MTRANK_MAX_BODY_BYTES (413), context keys of the model's
feature schema only (422). {DUPLICATES_DOC} The request id (X-Request-Id header, else the body's
request_id, else generated) is echoed in the X-Request-Id response header. Beyond the worker's
queue-time target (MTRANK_SHED_QUEUE_MS) or queue bound the answer is 429 with Retry-After."""


@dataclass
class AppState:
    settings: Settings
    redis_client: FeatureStore | None = None
    manager: ServingManager | None = None
    watcher: Watcher | None = None
    predlog: PredictionLog | None = None
    load_error: str | None = None

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
        if self.load_error:
            return self.load_error
        return (self.manager.not_ready if self.manager is not None else None) or "starting"

    def breaker_state(self) -> str | None:
        c = self.redis_client
        return getattr(c, "state", None) if c is not None else None

    def readiness(self) -> tuple[list[str], list[str]]:
        """(reasons not to be ready, reasons to be degraded). Redis is PINGed unless a breaker is
        open (then it is known to be unavailable)."""
        s = self.settings
        reasons: list[str] = []
        redis_down: list[str] = []
        if self.serving is None:
            reasons.append(f"model not loaded: {self.not_ready}")
        c = self.redis_client
        if c is None:
            reasons.append("redis: no client")
        else:
            fault = getattr(c, "fault", None)
            if fault:  # every /rank fails with it: not something degraded mode can answer
                reasons.append(f"redis client error on the request path (every /rank fails): {fault}")
            if not getattr(c, "healthy", True):
                redis_down.append(f"redis {s.redis_url_redacted}: circuit breaker {self.breaker_state()}")
            else:
                try:
                    c.ping()
                except redis.RedisError as e:
                    redis_down.append(f"redis {s.redis_url_redacted}: {type(e).__name__}: {e}")
                except Exception as e:  # an incompatible client: say so instead of a 500
                    reasons.append(f"redis client error: {type(e).__name__}: {e}")
        if s.redis_failure_mode == "fail":
            return reasons + redis_down, []
        return reasons, redis_down


def _start(state: AppState) -> None:
    """Redis client, first serving state (raises on an invalid routing config), watcher, prediction log."""
    s = state.settings
    # CPU: one model run at a time per worker (each uses the worker's whole thread budget), so
    # concurrent requests queue for the cores instead of time-slicing them. Bundles whose session
    # actually runs on the CPU take this gate (Bundle.gated), whatever was configured; a GPU
    # session queues on its device
    limit_concurrent_runs(1)
    log.info("feature store %s (prefix %r, timeout %d ms)", s.redis_url_redacted, s.redis_prefix, s.redis_timeout_ms)
    client_error = None
    try:
        state.redis_client = make_store(s)
    except Exception as e:  # an unusable URL: say so in /readyz rather than refuse to start
        client_error = f"{type(e).__name__}: {e}"
        state.load_error = f"redis client: {client_error}"
        log.error("%s (url %s)", state.load_error, s.redis_url_redacted)
    state.manager = ServingManager(s, state.redis_client, client_error=client_error)
    try:
        state.manager.start()  # an invalid MTRANK_ROUTING_CONFIG raises here: the service does not start
    except (RoutingConfigError, ProviderError):  # ProviderError: MTRANK_PROVIDERS_STRICT refused a fallback
        raise
    except Exception as e:
        if s.routing_config:
            raise
        state.load_error = f"{type(e).__name__}: {e}"  # as before: not ready, /readyz says why
        log.exception("model not loaded")
    st = state.serving
    if st is not None:
        for v in st.variants:
            b = v.bundle
            log.info("serving %s v%d (%s) on %s (requested %s) as variant %r, buckets %d-%d of %d; fusion %s %s",
                     b.name, b.version, b.manifest.architecture, b.provider, ",".join(b.requested_providers),
                     v.name, v.first, v.last, st.config.buckets, v.ranker.fusion_name, v.ranker.weights)
    if s.store_poll_s > 0:
        state.watcher = Watcher(state.manager, s.store_poll_s).start()
    if s.admin_token is None:
        log.info("admin API disabled (MTRANK_ADMIN_TOKEN is not set)")
    if s.predlog_rate > 0:
        state.predlog = PredictionLog(s).start()
        log.info("prediction log: %.3g of the ranked requests to stream %r (MAXLEN ~%d)", s.predlog_rate,
                 s.predlog_stream, s.predlog_maxlen)
    log.info("limits: %d ranks executing per worker, %d waiting at most %.0f ms (then 429), %d items, ids of %d "
             "characters, bodies of %d bytes; %d onnxruntime threads, %d workers", s.inflight_limit, s.queue_limit,
             s.shed_queue_ms, s.max_items, s.max_id_length, s.max_body_bytes, s.ort_threads, s.workers)


def _stop(state: AppState) -> None:
    if state.watcher is not None:
        state.watcher.stop()
    if state.predlog is not None:
        state.predlog.close()
    if state.redis_client is not None:
        state.redis_client.close()
    metrics.worker_exit()


def create_app(settings: Settings | None = None) -> FastAPI:
    deps.check_redis_py()  # an incompatible redis-py: a clear start-up error, not a 500 per request
    settings = settings or Settings()
    access_log.configure(settings.log_level, settings.log_format)
    access_log.register_settings_secrets(settings)
    state = AppState(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the threadpool must hold every admitted rank: the in-flight bound, not anyio's 40, limits them
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.inflight_limit + 8)
        _start(state)
        try:
            yield
        finally:
            _stop(state)

    app = FastAPI(title="mtrank", summary="Online multi-task ranking", lifespan=lifespan)
    app.state.mtrank = state
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes,
                       inflight_limit=settings.inflight_limit, queue_limit=settings.queue_limit,
                       queue_timeout_s=settings.shed_queue_ms / 1000.0, cache_on=settings.item_cache_size > 0)
    RankRequestModel = rank_request_model(settings.max_items, settings.max_id_length)
    request_schema = RankRequestModel.model_json_schema()
    assert "$defs" not in request_schema  # inlined below: no references to resolve

    async def rank_body(request: Request) -> RankRequest:
        """The body, parsed here (strict JSON, the configured limits) rather than by FastAPI."""
        info: RequestInfo = request.state.info
        try:
            body = limits.parse_body(await request.body(), request.headers.get("content-type"), RankRequestModel)
        except (HTTPException, RequestValidationError) as e:
            info.error = type(e).__name__ if isinstance(e, RequestValidationError) else "UnsupportedMediaType"
            raise
        info.adopt_body_id(body)
        info.n_items = len(body.items)
        return body

    errors = {"model": ErrorResponse}

    @app.post("/rank", response_model=RankResponse, description=RANK_DESCRIPTION,
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": request_schema}}}},
              responses={413: {**errors, "description": "body larger than MTRANK_MAX_BODY_BYTES"},
                         415: {**errors, "description": "body is not JSON"},
                         422: {"model": ValidationErrorResponse,
                               "description": "invalid request (detail names the field)"},
                         429: {**errors, "description": "overloaded: no slot within MTRANK_SHED_QUEUE_MS "
                                                        "(with Retry-After)"},
                         500: {**errors, "description": "unexpected error (logged with the request id)"},
                         503: {**errors, "description": "model not loaded, or feature store unavailable in "
                                                        "fail mode"}})
    def rank(request: Request, body: RankRequest = Depends(rank_body),
             x_mtrank_variant: str | None = Header(default=None, alias=FORCE_HEADER,
                                                   description="force a variant (QA; only when the config "
                                                               "allows it)")) -> Response:
        info: RequestInfo = request.state.info
        request.state.request_id = body.request_id
        st = state.serving  # the one read of the serving state: this request's whole world
        try:
            if st is None:
                raise NotReady(f"model not loaded: {state.not_ready}")
            route = st.route(body.user_id, x_mtrank_variant)
            info.routed(route)
            result = route.variant.ranker.rank_result(body, route.bucket)
        except Exception as e:
            info.error = type(e).__name__
            raise
        finally:
            metrics.set_breaker(state.breaker_state())
        info.result = result
        metrics.set_degraded(result.degraded is not None)  # also set by /readyz: the latest finding wins
        if state.predlog is not None:
            state.predlog.offer(body.user_id, info.variant, route.bucket, result.n_items, result.body,
                                result.degraded)
        return Response(content=result.body, media_type="application/json")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness,
             description="200 when this replica can answer /rank usefully; ``degraded: true`` (still 200) "
                         "while the feature store is unavailable in degrade mode; 503 otherwise",
             responses={503: {"model": Readiness, "description": "not ready: the reasons say why"}})
    def readyz() -> JSONResponse:
        reasons, degraded = state.readiness()
        metrics.set_breaker(state.breaker_state())
        metrics.set_degraded(bool(degraded) and not reasons)
        if reasons:
            return JSONResponse({"ready": False, "degraded": bool(degraded), "reasons": reasons + degraded},
                                status_code=503)
        if degraded:
            return JSONResponse({"ready": True, "degraded": True, "reasons": degraded})
        return JSONResponse({"ready": True, "degraded": False})

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.set_breaker(state.breaker_state())
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @app.get("/models", responses={503: {"model": ErrorResponse, "description": "no model loaded"}})
    def models() -> JSONResponse:
        st = state.serving
        if st is None:
            return JSONResponse({"detail": f"model not loaded: {state.not_ready}"}, status_code=503)
        v = st.primary
        b, m = v.bundle, v.bundle.manifest
        return JSONResponse({
            "name": m.name,
            "version": m.version,
            "architecture": m.architecture,
            "tasks": [t.model_dump() for t in m.tasks],
            "provider": b.provider,
            "session_providers": b.session_providers,
            "requested_providers": b.requested_providers,
            "inputs": [i.name for i in m.inputs],
            "outputs": list(m.outputs),
            "metrics": m.metrics,
            "created_at": m.created_at.isoformat(),
            "sha256": m.sha256,
            "fusion": {"name": v.ranker.fusion_name, "weights": v.ranker.weights},
            "variants": [{"name": x.name, "buckets": [x.first, x.last], "model": x.ranker.model_ref,
                          "fusion": {"name": x.ranker.fusion_name, "weights": x.ranker.weights}}
                         for x in st.variants],
        })

    if settings.admin_token is not None:  # without a token the admin routes do not exist (404)
        token = settings.admin_token

        def require_admin(authorization: str | None = Header(default=None)) -> ServingManager:
            check_bearer(authorization, token)
            if state.manager is None:
                raise NotReady("starting")
            return state.manager

        @app.post("/admin/reload", tags=["admin"])
        def admin_reload(manager: ServingManager = Depends(require_admin)) -> JSONResponse:
            report = manager.reload("admin")
            return JSONResponse(report.as_dict(), status_code=200 if report.ok else 422)

        @app.get("/admin/models", tags=["admin"])
        def admin_models(manager: ServingManager = Depends(require_admin)) -> JSONResponse:
            return JSONResponse(manager.describe())

        @app.post("/admin/models/load", tags=["admin"])
        def admin_load(body: ModelId, manager: ServingManager = Depends(require_admin)) -> JSONResponse:
            return JSONResponse(manager.load_model(body.name, body.version))

        @app.post("/admin/models/unload", tags=["admin"])
        def admin_unload(body: ModelId, manager: ServingManager = Depends(require_admin)) -> JSONResponse:
            return JSONResponse(manager.unload_model(body.name, body.version))

    @app.exception_handler(AdminError)
    async def _admin_error(request: Request, exc: AdminError) -> JSONResponse:
        log.warning("admin %s refused (%d): %s", request.url.path, exc.status, exc.message)
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        info = getattr(request.state, "info", None)
        if info is not None and info.error is None:
            info.error = "RequestValidationError"
        return JSONResponse({"detail": limits.public_errors(list(exc.errors()))}, status_code=422)

    @app.exception_handler(UnknownVariant)
    async def _unknown_variant(request: Request, exc: UnknownVariant) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["header", FORCE_HEADER.lower()], "msg": str(exc),
                                         "type": "unknown_variant"}]}, status_code=422)

    @app.exception_handler(ContextError)
    async def _context_error(request: Request, exc: ContextError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["body", "context", exc.key[:200]], "msg": exc.reason[:1000],
                                         "type": "context_error"}]}, status_code=422)

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=503)

    @app.exception_handler(redis.RedisError)
    async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        info = getattr(request.state, "info", None)
        rid = info.request_id if info is not None else None
        log.error("feature store error (request %s): %s: %s", rid, type(exc).__name__, exc)
        return JSONResponse({"detail": "feature store unavailable", "request_id": rid}, status_code=503)

    return app
