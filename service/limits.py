"""Input limits and hostile input: what a request body and its headers may be, and the 4xx for
everything else. Pure functions; the ASGI middleware (:mod:`service.middleware`) and the routes
(:mod:`service.app`) call them.

* Body size: at most ``MTRANK_MAX_BODY_BYTES``; a larger ``Content-Length`` is refused before the
  body is read, a body without one (chunked) is counted as it streams and refused as soon as it
  passes the limit (413 either way).
* Content type: ``application/json`` or ``application/*+json`` (415 otherwise). The body is UTF-8
  (RFC 8259), whatever a ``charset`` parameter says.
* JSON: parsed by orjson, which is strict: NaN/Infinity, invalid UTF-8, lone surrogates, a byte
  order mark, nesting deeper than 1024 and numbers beyond a double are syntax errors (422
  ``json_invalid`` naming the line, column and byte offset; the text there is not shown).
* Schema: :mod:`service.schemas` (items, id length, top_k, request id); errors are 422 naming the
  field (:func:`field_errors`: a dotted path, the first one in ``error.field``), at most
  :data:`MAX_ERRORS` of them, and never echo the input back (an input can be a megabyte, or nested
  a thousand levels deep).
* Off the event loop: ``/rank`` parses a body of ``OFF_LOOP_BYTES`` or more in the threadpool, and
  lists the errors of a body with thousands of them there too (:func:`parse_body_off_loop`).
* Request ids: ``X-Request-Id`` is used when it is 1 to 128 visible ASCII characters; otherwise it
  is ignored (the body's ``request_id`` or a generated one is used).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from email.message import Message
from typing import Any, TypeVar

import anyio.to_thread
import orjson
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.schemas import REQUEST_ID_MAX

M = TypeVar("M", bound=BaseModel)

MAX_ERRORS = 20
#: bodies of this many bytes or more are parsed and validated in the threadpool (see parse_body_off_loop)
OFF_LOOP_BYTES = 64 * 1024
_RID = re.compile(rb"[!-~]{1,%d}" % REQUEST_ID_MAX)
_ID_FIELDS = ("user_id", "items")


def request_id_from_header(value: bytes | None) -> str | None:
    """The ``X-Request-Id`` value when it is usable (1-128 visible ASCII characters), else None."""
    if value is not None and _RID.fullmatch(value):
        return value.decode("ascii")
    return None


def content_length(value: bytes | None) -> int | None:
    """The declared length, or None (absent). A malformed value never reaches the app (the HTTP
    parser refuses it), but is treated as absent here to be safe: the streamed bytes are counted."""
    if value is None or not value.isdigit():
        return None
    return int(value)


def check_json_content_type(ctype: str | None) -> None:
    """415 unless ``ctype`` is application/json or application/*+json."""
    if ctype is None:
        raise HTTPException(415, "Content-Type must be application/json")
    msg = Message()
    msg["content-type"] = ctype
    sub = msg.get_content_subtype()
    if msg.get_content_maintype() != "application" or not (sub == "json" or sub.endswith("+json")):
        raise HTTPException(415, "Content-Type must be application/json or application/*+json")


def parse_json(raw: bytes) -> Any:
    """The body as Python objects, or RequestValidationError (422) naming the position (never the text)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        pos = int(getattr(e, "pos", 0) or 0)
        reason = getattr(e, "msg", None) or str(e)
        err = {"type": "json_invalid", "loc": ["body", pos],
               "msg": f"JSON decode error: {reason} (line {getattr(e, 'lineno', 1)}, "
                      f"column {getattr(e, 'colno', pos + 1)}, byte {pos})"}
        raise RequestValidationError([err]) from None


def field_path(loc: Sequence[Any], type_: str = "") -> str:
    """A ``loc`` as a dotted path: ``["body", "items", 3]`` -> ``items.3``; other locations keep their
    name (``header.x-mtrank-variant``); the body as a whole, or a JSON syntax error in it, ``body``."""
    parts = [str(x) for x in loc]
    if parts[:1] == ["body"]:
        parts = parts[1:]
        if not parts or type_ == "json_invalid":
            return "body"
    return ".".join(parts) or "body"


def error_count(errors: Sequence[Mapping[str, Any]]) -> int:
    """How many errors ``errors`` stand for (a ``too_many_errors`` entry counts those it replaced)."""
    return sum(int(e.get("ctx", {}).get("more", 1)) if e.get("type") == "too_many_errors" else 1 for e in errors)


def field_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Validation errors as answered (:class:`service.schemas.FieldError`): ``field``, ``loc``,
    ``type``, ``message``; never the input; at most MAX_ERRORS (plus one entry saying how many more)."""
    out = []
    for e in errors[:MAX_ERRORS]:
        loc = [x if isinstance(x, (str, int)) else str(x) for x in e.get("loc", ())]
        type_ = str(e.get("type", "value_error"))
        msg = str(e.get("msg", ""))
        if type_ == "string_type" and len(loc) > 1 and loc[0] == "body" and loc[1] in _ID_FIELDS:
            msg = "ids must be strings or integers (of at most 64 bits)"
        out.append({"field": field_path(loc, type_), "loc": loc, "type": type_, "message": msg})
    more = error_count(errors[MAX_ERRORS:])
    if more:
        out.append({"field": "body", "loc": ["body"], "type": "too_many_errors",
                    "message": f"{more} more errors not shown"})
    return out


def body_errors(e: ValidationError) -> list[dict]:
    """A schema's errors with ``body`` locs: the first MAX_ERRORS, then one entry counting the rest."""
    errors = e.errors(include_url=False, include_input=False)
    shown: list[dict] = [{**x, "loc": ("body", *x["loc"])} for x in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:  # counted, not copied (a body can hold thousands)
        shown.append({"type": "too_many_errors", "loc": ("body",), "ctx": {"more": len(errors) - MAX_ERRORS}})
    return shown


class ManyErrors(RequestValidationError):
    """More than MAX_ERRORS schema errors. Listing them costs milliseconds (pydantic builds every one
    of thousands), so it happens on demand: :meth:`errors`, or :meth:`listed` in the threadpool."""

    def __init__(self, cause: ValidationError):
        super().__init__([])
        self.cause = cause

    def errors(self) -> Sequence[Any]:
        return body_errors(self.cause)

    def listed(self) -> RequestValidationError:
        return RequestValidationError(body_errors(self.cause))


def validate(model: type[M], obj: Any) -> M:
    """``obj`` (parsed JSON) as ``model``, or RequestValidationError with ``body`` locs (:class:`ManyErrors`
    beyond MAX_ERRORS errors)."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        if e.error_count() > MAX_ERRORS:
            raise ManyErrors(e) from None
        raise RequestValidationError(body_errors(e)) from None


def parse_body(raw: bytes, ctype: str | None, model: type[M]) -> M:
    """Content type, JSON and schema of one request body (415 / 422)."""
    check_json_content_type(ctype)
    return validate(model, parse_json(raw))


async def parse_body_off_loop(raw: bytes, ctype: str | None, model: type[M]) -> M:
    """:func:`parse_body` as ``POST /rank`` runs it, keeping the costly cases off the event loop
    (bench/loop_block.py measures them): a body of :data:`OFF_LOOP_BYTES` or more is parsed and
    validated in the threadpool; a smaller one inline (the hop to a thread costs about as much as
    parsing it); and a body of any size with more than MAX_ERRORS errors has them listed in the
    threadpool (an 8 KB body of 2,000 bad ids takes pydantic milliseconds to list)."""
    try:
        if len(raw) >= OFF_LOOP_BYTES:
            return await anyio.to_thread.run_sync(parse_body, raw, ctype, model)
        return parse_body(raw, ctype, model)
    except ManyErrors as e:
        raise await anyio.to_thread.run_sync(e.listed) from None
