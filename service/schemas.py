"""Request and response models of the ranking API.

Input limits (MTRANK_* settings; :func:`rank_request_model` builds the request model for them):
``items`` holds 1 to ``max_items`` ids, every id (user and item) is 1 to ``max_id_length``
characters, ``top_k`` is 1 to ``max_items``, ``request_id`` is 1 to 128 visible ASCII characters
(it is echoed in the ``X-Request-Id`` header). Ids are strings; JSON integers are accepted and
read as their decimal string; anything else (floats, booleans, null, objects) is refused.

Duplicate item ids: every occurrence is scored and returned, at its own position. Occurrences of
one id get identical features and so identical scores; the stable ordering keeps them in request
order, and the response has one entry per requested position (``len(items)`` before ``top_k``).
Callers that do not want duplicates should dedupe before calling.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    WrapValidator,
    create_model,
)

#: visible ASCII, no spaces: safe in a response header and in a log line
REQUEST_ID_PATTERN = r"^[!-~]+$"
REQUEST_ID_MAX = 128
DEFAULT_MAX_ITEMS = 2000
DEFAULT_MAX_ID_LENGTH = 128

DUPLICATES_DOC = ("Duplicate ids are allowed: every occurrence is scored and returned at its own position "
                  "(copies get identical scores and keep their request order).")


def _int_to_str(v: Any, handler):
    """One id: a JSON integer is read as its decimal string (not a bool)."""
    return handler(str(v) if type(v) is int else v)


def _ints_to_str(v: Any, handler):
    """A list of ids, validated in one go by pydantic-core; only when that fails and the list holds
    integers are they turned into strings and the list validated again (the errors are then those
    of the converted list)."""
    try:
        return handler(v)
    except ValidationError:
        if type(v) is list and any(type(x) is int for x in v):
            return handler([str(x) if type(x) is int else x for x in v])
        raise


def _id_schema(max_length: int) -> dict:
    hi = min(2**64 - 1, 10**max_length - 1)
    lo = max(-(2**63), -(10 ** (max_length - 1) - 1))
    return {"anyOf": [{"type": "string", "minLength": 1, "maxLength": max_length},
                      {"type": "integer", "minimum": lo, "maximum": hi}]}


def id_type(max_length: int) -> Any:
    """A string id of 1 to ``max_length`` characters, or an integer (of at most 64 bits) that is one.
    Floats (also what a JSON integer above 64 bits becomes), booleans and null are refused."""
    return Annotated[str, StringConstraints(strict=True, min_length=1, max_length=max_length),
                     WrapValidator(_int_to_str), WithJsonSchema(_id_schema(max_length), mode="validation")]


def id_list_type(max_length: int, max_items: int) -> Any:
    element = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=max_length)]
    schema = {"type": "array", "items": _id_schema(max_length), "minItems": 1, "maxItems": max_items}
    return Annotated[list[element], Field(min_length=1, max_length=max_items), WrapValidator(_ints_to_str),
                     WithJsonSchema(schema, mode="validation")]


if TYPE_CHECKING:  # what the validated values are (the types are built at run time, which mypy cannot follow)
    Id = str
    ItemIds = list[str]
else:
    Id = id_type(DEFAULT_MAX_ID_LENGTH)
    ItemIds = id_list_type(DEFAULT_MAX_ID_LENGTH, DEFAULT_MAX_ITEMS)
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=REQUEST_ID_MAX, pattern=REQUEST_ID_PATTERN)]


def new_request_id() -> str:
    """A generated request id (uuid4 hex): the one rule, used by the HTTP edge and the body model."""
    return uuid.uuid4().hex


class RankRequest(BaseModel):
    """One ranking request. Integer ids are accepted and turned into strings."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id
    items: ItemIds = Field(
        description=f"candidate item ids, in request order. {DUPLICATES_DOC}")
    context: dict[str, Any] | None = Field(default=None,
                                           description="request context fields of the model's feature schema "
                                                       "(e.g. hour, device); an unknown key is refused (422)")
    top_k: int | None = Field(default=None, ge=1, le=DEFAULT_MAX_ITEMS,
                              description="return the best top_k items; default all")
    request_id: RequestId = Field(default_factory=new_request_id,
                                  description="echoed back; the X-Request-Id header wins over it; generated "
                                              "(uuid4 hex) when both are absent")


@lru_cache(maxsize=16)
def rank_request_model(max_items: int = DEFAULT_MAX_ITEMS,
                       max_id_length: int = DEFAULT_MAX_ID_LENGTH) -> type[RankRequest]:
    """:class:`RankRequest` with the configured limits (shown in the OpenAPI schema)."""
    ident = id_type(max_id_length)
    return create_model(
        "RankRequest",
        __base__=RankRequest,
        user_id=(ident, Field(description=f"1 to {max_id_length} characters")),
        items=(id_list_type(max_id_length, max_items), Field(
                                  description=f"1 to {max_items} candidate item ids (each 1 to {max_id_length} "
                                              f"characters), in request order. {DUPLICATES_DOC}")),
        top_k=(int | None, Field(default=None, ge=1, le=max_items,
                                 description=f"return the best top_k items (1 to {max_items}); default all")),
    )


class ModelRef(BaseModel):
    name: str
    version: int


class RankedItem(BaseModel):
    item_id: str
    score: float | None = Field(description="fused score (null if the model produced NaN)")
    scores: dict[str, float | None] = Field(description="per-task model outputs")


class Missing(BaseModel):
    user: bool = Field(description="no usable user features (absent or corrupt): defaults used")
    items: int = Field(description="items without usable features (absent or corrupt): defaults used")


class RankResponse(BaseModel):
    request_id: str
    variant: str = Field(description="experiment variant (of the ranking layer) that served the request")
    bucket: int = Field(description="the user's bucket in the ranking layer, 0 <= bucket < buckets")
    model: ModelRef = Field(description="the bundle that served the request")
    items: list[RankedItem] = Field(description="sorted by score desc, ties by request order, at most top_k")
    missing: Missing
    degraded: bool = Field(default=False, description="the feature store did not answer in time: schema "
                                                      "defaults (and cached items) were used")
    degraded_reason: str | None = Field(default=None, description="why the response is degraded "
                                                                   "(timeout, down, circuit_open)")


# -- the error answer: one shape for every non-2xx answer (routes and middleware alike) -------------

class ErrorCode(StrEnum):
    """What went wrong, one word per kind; :data:`ERROR_STATUS` gives its HTTP status."""

    invalid_request = "invalid_request"  # the body or a header fails validation (JSON syntax included)
    invalid_context = "invalid_context"  # a context entry the model's feature schema does not accept
    unknown_variant = "unknown_variant"  # X-Mtrank-Variant names no variant (or forcing is off)
    bad_request = "bad_request"
    unauthorized = "unauthorized"  # admin: no or malformed Authorization header
    forbidden = "forbidden"  # admin: wrong token
    not_found = "not_found"  # no such route (or the admin API is off)
    not_in_store = "not_in_store"  # admin: no such bundle version in the store
    method_not_allowed = "method_not_allowed"
    in_use = "in_use"  # admin: the bundle serves a variant
    body_too_large = "body_too_large"
    unsupported_media_type = "unsupported_media_type"
    load_refused = "load_refused"  # admin: the bundle cannot be served (the message says why)
    reload_failed = "reload_failed"  # admin: the rebuild failed; the old state serves (details: the report)
    overloaded = "overloaded"  # shed: no execution slot in time (Retry-After)
    internal_error = "internal_error"
    not_ready = "not_ready"  # no serving state (Retry-After)
    feature_store_unavailable = "feature_store_unavailable"  # Redis down in fail mode (Retry-After)
    events_unavailable = "events_unavailable"  # POST /events: the stream's Redis failed, nothing taken (Retry-After)


#: the HTTP status of every error code (the one table; exceptions map to codes in service.routes.errors)
ERROR_STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 422, ErrorCode.invalid_context: 422, ErrorCode.unknown_variant: 422,
    ErrorCode.bad_request: 400, ErrorCode.unauthorized: 401, ErrorCode.forbidden: 403,
    ErrorCode.not_found: 404, ErrorCode.not_in_store: 404, ErrorCode.method_not_allowed: 405,
    ErrorCode.in_use: 409, ErrorCode.body_too_large: 413, ErrorCode.unsupported_media_type: 415,
    ErrorCode.load_refused: 422, ErrorCode.reload_failed: 422, ErrorCode.overloaded: 429,
    ErrorCode.internal_error: 500, ErrorCode.not_ready: 503, ErrorCode.feature_store_unavailable: 503,
    ErrorCode.events_unavailable: 503,
}
#: statuses that carry ``Retry-After`` (seconds): worth retrying later, elsewhere or here
RETRY_STATUSES = frozenset((429, 503))
RETRY_AFTER_S = 1


class FieldError(BaseModel):
    field: str = Field(description="dotted path of the field: 'items.3', 'context.hour', 'header.x-mtrank-variant'; "
                                   "'body' for the body as a whole (a JSON syntax error)")
    loc: list[str | int] = Field(description="the same as a list: body/header, then the path (or the byte offset "
                                             "of a JSON syntax error)")
    type: str = Field(description="pydantic's error type, or json_invalid, context_error, too_many_errors")
    message: str


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str = Field(description="for people; never echoes the request's bytes")
    field: str | None = Field(default=None, description="the first bad field (dotted path), when one is to blame")
    details: list[FieldError] | dict[str, Any] | None = Field(
        default=None, description="422: every bad field (at most 20, then a too_many_errors entry); a failed "
                                  "reload: its report")


class ErrorResponse(BaseModel):
    """Every non-2xx answer: ``{"error": {"code", "message", "field"?, "details"?}, "request_id"}``
    (429 and 503 also carry ``Retry-After``)."""

    error: ErrorDetail
    request_id: str


def error_body(code: ErrorCode, message: str, request_id: str, *, field: str | None = None,
               details: list[dict] | dict | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code.value, "message": message}
    if field is not None:
        err["field"] = field
    if details is not None:
        err["details"] = details
    return {"error": err, "request_id": request_id}


def error_answer(code: ErrorCode, message: str, request_id: str, *, field: str | None = None,
                 details: list[dict] | dict | None = None, status: int | None = None,
                 extra: dict[str, Any] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """The one builder of an error answer: (status, JSON body, headers). ``status`` defaults to the
    code's (:data:`ERROR_STATUS`); ``extra`` adds top-level members (``/readyz``'s report)."""
    status = ERROR_STATUS[code] if status is None else status
    body = error_body(code, message, request_id, field=field, details=details)
    if extra:
        body = {**extra, **body}
    headers = {"content-type": "application/json"}
    if status in RETRY_STATUSES:
        headers["retry-after"] = str(RETRY_AFTER_S)
    return status, orjson.dumps(body), headers


_HEADER_DOCS = {"X-Request-Id": {"description": "the request id (also in the body)", "schema": {"type": "string"},
                                 "required": True},
                "Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                "schema": {"type": "integer"}}}


def error_responses(descriptions: dict[int, str], model: type[BaseModel] | None = None) -> dict[int | str, Any]:
    """OpenAPI ``responses`` of a route's error statuses: :class:`ErrorResponse` (or ``model``, a
    subclass), with the ``Retry-After`` header on 429/503."""
    out: dict[int | str, Any] = {}
    for status, text in descriptions.items():
        headers = {"X-Request-Id": _HEADER_DOCS["X-Request-Id"]}
        if status in RETRY_STATUSES:
            headers["Retry-After"] = _HEADER_DOCS["Retry-After"]
        out[status] = {"model": model or ErrorResponse, "description": text, "headers": headers}
    return out


class Readiness(BaseModel):
    """``GET /readyz``: ``ready`` = this replica can answer /rank usefully (HTTP 200); ``degraded``
    = it answers with default features because the feature store is unavailable (degrade mode);
    ``reasons`` say why it is not ready or degraded."""

    ready: bool
    degraded: bool = False
    reasons: list[str] | None = None


class NotReadyResponse(Readiness, ErrorResponse):
    """``GET /readyz`` when not ready (503): the readiness report and the error shape in one body."""
