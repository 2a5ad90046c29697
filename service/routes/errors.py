"""Exceptions -> HTTP answers: the one mapping (:data:`STATUS`) and the handlers that write the
bodies. Invalid requests, bad context entries and unknown forced variants are 422 naming the field
(FastAPI's ``detail`` list with ``loc``); no serving state and an unreadable feature store (fail
mode) are 503; refused operator calls 404 / 409 / 422. Anything else is logged by the middleware
with the request id and answered 500."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import limits
from service.features import ContextError
from service.routes.rank import FORCE_HEADER
from service.serving import InUse, LoadRefused, NotInStore, NotReady, OperatorError, UnknownVariant

log = logging.getLogger("service.app")

STATUS: dict[type[Exception], int] = {
    RequestValidationError: 422, UnknownVariant: 422, ContextError: 422,
    NotReady: 503, redis.RedisError: 503,
    NotInStore: 404, InUse: 409, LoadRefused: 422,
}


def status_of(exc: Exception) -> int:
    return next(status for cls, status in STATUS.items() if isinstance(exc, cls))


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    info = getattr(request.state, "info", None)
    if info is not None and info.error is None:
        info.error = "RequestValidationError"
    return JSONResponse({"detail": limits.public_errors(list(exc.errors()))}, status_code=status_of(exc))


async def _unknown_variant(request: Request, exc: UnknownVariant) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["header", FORCE_HEADER.lower()], "msg": str(exc),
                                     "type": "unknown_variant"}]}, status_code=status_of(exc))


async def _context_error(request: Request, exc: ContextError) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body", "context", exc.key[:200]], "msg": exc.reason[:1000],
                                     "type": "context_error"}]}, status_code=status_of(exc))


async def _not_ready(request: Request, exc: NotReady) -> JSONResponse:
    return JSONResponse({"detail": exc.reason}, status_code=status_of(exc))


async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
    info = getattr(request.state, "info", None)
    rid = info.request_id if info is not None else None
    log.error("feature store error (request %s): %s: %s", rid, type(exc).__name__, exc)
    return JSONResponse({"detail": "feature store unavailable", "request_id": rid}, status_code=status_of(exc))


async def _operator_error(request: Request, exc: OperatorError) -> JSONResponse:
    status = status_of(exc)
    log.warning("admin %s refused (%d): %s", request.url.path, status, exc)
    return JSONResponse({"detail": str(exc)}, status_code=status)


def install(app: FastAPI) -> None:
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(UnknownVariant)(_unknown_variant)
    app.exception_handler(ContextError)(_context_error)
    app.exception_handler(NotReady)(_not_ready)
    app.exception_handler(redis.RedisError)(_redis_error)
    app.exception_handler(OperatorError)(_operator_error)
