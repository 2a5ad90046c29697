"""FastAPI application factory: ``uvicorn --factory service.app:create_app``.

Routes are thin; the work is in :mod:`service.ranking` (and below it features, store, fusion).

* ``POST /rank``   rank candidate items for a user (503 while no model is loaded)
* ``GET /healthz`` the process is alive
* ``GET /readyz``  200 when the model is loaded and Redis answers PING, else 503 with reasons
* ``GET /models``  the loaded model (no secrets)

A bundle that fails to load does not stop the app: it starts, ``/readyz`` says why it is not
ready and ``/rank`` answers 503. Errors: invalid requests -> 422 naming the field (FastAPI's
``detail`` list with ``loc``), a body that is not JSON -> 415/422 with a message, a context
entry the schema does not accept -> 422 naming the key, Redis unavailable -> 503; anything
unexpected is logged with the request id and answered 500.
"""

# no `from __future__ import annotations`: FastAPI must see the real request model of the closure
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import Message

import redis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from service.features import ContextError
from service.ranking import Ranker
from service.schemas import RankResponse, rank_request_model
from service.settings import Settings
from service.store import Bundle, load_bundle

log = logging.getLogger("service.app")


@dataclass
class AppState:
    settings: Settings
    redis_client: redis.Redis | None = None
    bundle: Bundle | None = None
    ranker: Ranker | None = None
    load_error: str | None = None


class NotReady(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _configure_logging(level: str) -> None:
    logging.getLogger("service").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(state: AppState) -> None:
    s = state.settings
    log.info("feature store %s (prefix %r, timeout %d ms)", s.redis_url_redacted, s.redis_prefix, s.redis_timeout_ms)
    try:
        state.redis_client = redis.Redis.from_url(s.redis_url, socket_timeout=s.redis_timeout_s,
                                                  socket_connect_timeout=s.redis_timeout_s)
    except Exception as e:  # an unusable URL: say so in /readyz rather than refuse to start
        state.load_error = f"redis client: {type(e).__name__}: {e}"
        log.error("%s (url %s)", state.load_error, s.redis_url_redacted)
        return
    try:
        state.bundle = load_bundle(s.model_store, s.model_name, s.model_version, providers=s.provider_list,
                                   strict=s.providers_strict, intra_op_threads=s.ort_intra_op_threads)
        state.ranker = Ranker(s, state.bundle, state.redis_client)
    except Exception as e:  # keep serving /healthz and /readyz; /readyz reports why
        state.ranker = None
        state.load_error = f"{type(e).__name__}: {e}"
        log.error("model not loaded: %s", state.load_error)
        return
    b = state.bundle
    log.info("serving %s v%d (%s) on %s (requested %s); fusion %s %s", b.name, b.version,
             b.manifest.architecture, b.provider, ",".join(b.requested_providers), s.fusion, s.fusion_weights)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings.log_level)
    state = AppState(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _load(state)
        yield
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

    def get_ranker() -> Ranker:
        if state.ranker is None:
            raise NotReady(f"model not loaded: {state.load_error or 'starting'}")
        return state.ranker

    @app.post("/rank", response_model=RankResponse, dependencies=[Depends(require_json)],
              responses={415: {"description": "body is not JSON"}, 422: {"description": "invalid request"},
                         503: {"description": "model not loaded or feature store unavailable"}})
    def rank(body: RankRequestModel, request: Request, ranker: Ranker = Depends(get_ranker)) -> Response:
        request.state.request_id = body.request_id
        result = ranker.rank_result(body)
        return Response(content=result.body, media_type="application/json")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        reasons = []
        if state.ranker is None:
            reasons.append(f"model not loaded: {state.load_error or 'starting'}")
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
        b = state.bundle
        if b is None or state.ranker is None:
            return JSONResponse({"detail": f"model not loaded: {state.load_error or 'starting'}"}, status_code=503)
        m = b.manifest
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
            "fusion": {"name": settings.fusion, "weights": settings.fusion_weights},
        })

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

