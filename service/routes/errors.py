"""Exceptions -> error answers: the one mapping (:data:`CODES`: exception -> error code; the code's
HTTP status is :data:`service.schemas.ERROR_STATUS`) and the handlers. Every answer has the one
shape (:func:`service.schemas.error_answer`): ``{"error": {"code", "message", "field"?,
"details"?}, "request_id"}``, with ``Retry-After`` on 429 and 503.

Invalid requests, bad context entries and unknown forced variants are 422 naming the field; no
serving state and an unreadable feature store (fail mode) are 503; refused operator calls 404 / 409
/ 422; Starlette's own HTTP errors (404 no route, 405, the admin 401/403, 415) get their code from
:data:`HTTP_CODES`. Anything else is logged by the middleware with the request id and answered 500
(:mod:`service.middleware`, with the same builder)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from service import limits
from service.events.stream import EventsUnavailable
from service.features import ContextError
from service.routes.rank import FORCE_HEADER
from service.schemas import ERROR_STATUS, ErrorCode, error_answer, new_request_id
from service.serving import InUse, LoadRefused, NotInStore, NotReady, OperatorError, UnknownVariant

log = logging.getLogger("service.app")

CODES: dict[type[Exception], ErrorCode] = {
    RequestValidationError: ErrorCode.invalid_request, UnknownVariant: ErrorCode.unknown_variant,
    ContextError: ErrorCode.invalid_context, NotReady: ErrorCode.not_ready,
    redis.RedisError: ErrorCode.feature_store_unavailable, NotInStore: ErrorCode.not_in_store,
    InUse: ErrorCode.in_use, LoadRefused: ErrorCode.load_refused, EventsUnavailable: ErrorCode.events_unavailable,
}
#: Starlette/FastAPI HTTPExceptions (routing, admin auth, content type) by status
HTTP_CODES: dict[int, ErrorCode] = {400: ErrorCode.bad_request, 401: ErrorCode.unauthorized,
                                    403: ErrorCode.forbidden, 404: ErrorCode.not_found,
                                    405: ErrorCode.method_not_allowed, 413: ErrorCode.body_too_large,
                                    415: ErrorCode.unsupported_media_type}


def code_of(exc: Exception) -> ErrorCode:
    return next((code for cls, code in CODES.items() if isinstance(exc, cls)), ErrorCode.internal_error)


def status_of(exc: Exception) -> int:
    return ERROR_STATUS[code_of(exc)]


def request_id(request: Request) -> str:
    info = getattr(request.state, "info", None)
    return info.request_id if info is not None else new_request_id()


def answer(request: Request, code: ErrorCode, message: str, *, field: str | None = None,
           details: list[dict] | dict | None = None, status: int | None = None,
           headers: Mapping[str, str] | None = None, extra: dict[str, Any] | None = None) -> Response:
    """The error answer of a route (the middleware sends the same bytes for its own answers)."""
    status, body, hdrs = error_answer(code, message, request_id(request), field=field, details=details,
                                      status=status, extra=extra)
    ours = {k.lower() for k in hdrs}  # e.g. Retry-After: the answer's own wins over the exception's
    return Response(content=body, status_code=status,
                    headers={**hdrs, **{k: v for k, v in (headers or {}).items() if k.lower() not in ours}})


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    info = getattr(request.state, "info", None)
    if info is not None and info.error is None:
        info.error = "RequestValidationError"
    return _field_errors(request, code_of(exc), list(exc.errors()))


def _field_errors(request: Request, code: ErrorCode, errors: list[Any]) -> Response:
    """A 422 naming the first bad field in ``error.field`` and every one in ``error.details``."""
    details = limits.field_errors(errors)
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    total = limits.error_count(errors)
    more = f" (and {total - 1} more)" if total > 1 else ""
    return answer(request, code, f"{first['field']}: {first['message']}{more}", field=first["field"],
                  details=details)


async def _unknown_variant(request: Request, exc: UnknownVariant) -> Response:
    st = request.app.state.mtrank.serving
    known = f"; known: {sorted(v.name for v in st.variants)}" if st is not None else ""
    return _field_errors(request, code_of(exc), [{
        "loc": ["header", FORCE_HEADER.lower()], "type": "unknown_variant",
        "msg": f"names no variant of the ranking layer{known}"}])  # the header's value is not echoed


async def _context_error(request: Request, exc: ContextError) -> Response:
    return _field_errors(request, code_of(exc), [{"loc": ["body", "context", exc.key[:200]], "type": "context_error",
                                                  "msg": exc.reason[:1000]}])


async def _not_ready(request: Request, exc: NotReady) -> Response:
    return answer(request, code_of(exc), exc.reason)


async def _events_unavailable(request: Request, exc: EventsUnavailable) -> Response:
    log.error("events stream error (request %s): %s", request_id(request), exc)
    return answer(request, code_of(exc), str(exc))


async def _redis_error(request: Request, exc: redis.RedisError) -> Response:
    log.error("feature store error (request %s): %s: %s", request_id(request), type(exc).__name__, exc)
    return answer(request, code_of(exc), "feature store unavailable")


async def _operator_error(request: Request, exc: OperatorError) -> Response:
    code = code_of(exc)
    log.warning("admin %s refused (%d): %s", request.url.path, ERROR_STATUS[code], exc)
    return answer(request, code, str(exc))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = HTTP_CODES.get(exc.status_code, ErrorCode.bad_request if exc.status_code < 500 else ErrorCode.internal_error)
    return answer(request, code, str(exc.detail), status=exc.status_code, headers=exc.headers)


def install(app: FastAPI) -> None:
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(UnknownVariant)(_unknown_variant)
    app.exception_handler(ContextError)(_context_error)
    app.exception_handler(NotReady)(_not_ready)
    app.exception_handler(EventsUnavailable)(_events_unavailable)
    app.exception_handler(redis.RedisError)(_redis_error)
    app.exception_handler(OperatorError)(_operator_error)
    app.exception_handler(HTTPException)(_http_error)
