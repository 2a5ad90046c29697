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
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

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


class ErrorResponse(BaseModel):
    """A request that was not ranked (413, 415, 503, 500)."""

    detail: str
    request_id: str | None = None


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="where: body/header, then the field path (or the byte offset of "
                                             "a JSON syntax error)")
    msg: str
    type: str
    ctx: dict[str, Any] | None = None


class ValidationErrorResponse(BaseModel):
    """422: what is wrong, by field; the input itself is never echoed."""

    detail: list[ValidationIssue]


class Readiness(BaseModel):
    """``GET /readyz``: ``ready`` = this replica can answer /rank usefully (HTTP 200); ``degraded``
    = it answers with default features because the feature store is unavailable (degrade mode);
    ``reasons`` say why it is not ready or degraded."""

    ready: bool
    degraded: bool = False
    reasons: list[str] | None = None
