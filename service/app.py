"""FastAPI application factory: ``uvicorn --factory service.app:create_app``.

Routes are thin; the work is in :mod:`service.serving` (the serving state: routing, bundles,
rankers, hot swap), :mod:`service.ranking` (features, model, fusion) and :mod:`service.admin`.

* ``POST /rank``   rank candidate items for a user (503 while no model is loaded)
* ``GET /healthz`` the process is alive
* ``GET /readyz``  200 when a serving state exists and Redis answers PING, else 503 with reasons
* ``GET /models``  the model of the first variant, plus every variant (no secrets)
* ``/admin/...``   the operator's API (only with MTRANK_ADMIN_TOKEN): ``POST /admin/reload``,
  ``GET /admin/models``, ``POST /admin/models/load`` and ``/admin/models/unload``

Each ``/rank`` reads the current serving state once and uses nothing else, so a hot swap never
mixes two worlds in one response. One JSON access-log line per ``/rank`` on ``service.access``.

Without a routing config, a bundle that fails to load does not stop the app: it starts, ``/readyz``
says why it is not ready and ``/rank`` answers 503; an invalid MTRANK_ROUTING_CONFIG stops the
start with an error naming the line. Errors: invalid requests -> 422 naming the field (FastAPI's
``detail`` list with ``loc``), a body that is not JSON -> 415/422 with a message, a context entry
the schema does not accept -> 422 naming the key, an unknown forced variant -> 422 naming the
header, Redis unavailable -> 503; anything unexpected is logged with the request id and answered 500.
"""

# no `from __future__ import annotations`: FastAPI must see the real request model of the closure
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import Message

import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from service import access_log
from service.admin import ModelId, check_bearer
from service.features import ContextError
from service.redis_client import FeatureStore, make_store
from service.schemas import RankResponse, rank_request_model
from service.routing import RoutingConfigError
from service.serving import AdminError, NotReady, ServingManager, ServingState, UnknownVariant, Watcher
from service.settings import Settings
from service.store import Bundle

log = logging.getLogger("service.app")
FORCE_HEADER = "X-Mtrank-Variant"


@dataclass
class AppState:
    settings: Settings
    redis_client: FeatureStore | None = None
    manager: ServingManager | None = None
    watcher: Watcher | None = None
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


def _configure_logging(level: str) -> None:
    logging.getLogger("service").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access_log.configure(level)


def _start(state: AppState) -> None:
    """Redis client, first serving state (raises on an invalid routing config), watcher."""
    s = state.settings
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
    except RoutingConfigError:
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings.log_level)
    state = AppState(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _start(state)
        try:
            yield
        finally:
            if state.watcher is not None:
                state.watcher.stop()
            if state.redis_client is not None:
                state.redis_client.close()

    app = FastAPI(title="mtrank", summary="Online multi-task ranking", lifespan=lifespan)
    app.state.mtrank = state
    RankRequestModel = rank_request_model(settings.max_items)

    def require_json(request: Request) -> None:
        ctype = request.headers.get("content-type")
        if ctype is None:
            raise HTTPException(415, "Content-Type must be application/json")
        msg = Message()
        msg["content-type"] = ctype
        sub = msg.get_content_subtype()
        if msg.get_content_maintype() != "application" or not (sub == "json" or sub.endswith("+json")):
            raise HTTPException(415, f"Content-Type must be application/json, got {ctype!r}")

    @app.post("/rank", response_model=RankResponse, dependencies=[Depends(require_json)],
              responses={415: {"description": "body is not JSON"}, 422: {"description": "invalid request"},
                         503: {"description": "model not loaded or feature store unavailable"}})
    def rank(body: RankRequestModel, request: Request,
             x_mtrank_variant: str | None = Header(default=None, alias=FORCE_HEADER,
                                                   description="force a variant (QA; only when the config "
                                                               "allows it)")) -> Response:
        request.state.request_id = body.request_id
        st = state.serving  # the one read of the serving state: this request's whole world
        route = None
        try:
            if st is None:
                raise NotReady(f"model not loaded: {state.not_ready}")
            route = st.route(body.user_id, x_mtrank_variant)
            result = route.variant.ranker.rank_result(body, route.bucket)
        except Exception as e:
            access_log.rank_line(request_id=body.request_id, status=access_log.status_of(e),
                                 variant=route.variant.name if route else None,
                                 bucket=route.bucket if route else None, forced=bool(route and route.forced),
                                 model=route.variant.ranker.model_ref if route else None,
                                 n_items=len(body.items), error=type(e).__name__)
            raise
        access_log.rank_line(request_id=body.request_id, status=200, variant=route.variant.name, bucket=route.bucket,
                             forced=route.forced, model=route.variant.ranker.model_ref, n_items=result.n_items,
                             n_returned=result.n_returned, missing_user=result.user_missing,
                             missing_items=result.items_missing, timings=result.timings)
        return Response(content=result.body, media_type="application/json")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        reasons = []
        if state.serving is None:
            reasons.append(f"model not loaded: {state.not_ready}")
        if state.redis_client is None:
            reasons.append("redis: no client")
        else:
            try:
                state.redis_client.ping()
            except redis.RedisError as e:
                reasons.append(f"redis {settings.redis_url_redacted}: {type(e).__name__}: {e}")
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/models")
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
    async def _invalid(request: Request, exc: RequestValidationError):
        if request.url.path == "/rank":
            access_log.rank_line(request_id=None, status=422, error="RequestValidationError")
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(UnknownVariant)
    async def _unknown_variant(request: Request, exc: UnknownVariant) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["header", FORCE_HEADER.lower()], "msg": str(exc),
                                         "type": "unknown_variant"}]}, status_code=422)

    @app.exception_handler(ContextError)
    async def _context_error(request: Request, exc: ContextError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["body", "context", exc.key], "msg": exc.reason,
                                         "type": "context_error"}]}, status_code=422)

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=503)

    @app.exception_handler(redis.RedisError)
    async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        log.error("feature store error (request %s): %s: %s", rid, type(exc).__name__, exc)
        return JSONResponse({"detail": "feature store unavailable", "request_id": rid}, status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        log.exception("unexpected error on %s (request %s)", request.url.path, rid)
        return JSONResponse({"detail": "internal error", "request_id": rid}, status_code=500)

    return app
