"""Request and response models of the ranking API.

Duplicate item ids: every occurrence is scored and returned, at its own position. Occurrences of
one id get identical features and so identical scores; the stable ordering keeps them in request
order, and the response has one entry per requested position (``len(items)`` before ``top_k``).
Callers that do not want duplicates should dedupe before calling.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

Id = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class RankRequest(BaseModel):
    """One ranking request. Integer ids are accepted and turned into strings."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    user_id: Id
    items: list[Id] = Field(min_length=1, description="candidate item ids, in request order")
    context: dict[str, Any] | None = Field(default=None,
                                           description="request context fields of the schema (e.g. hour)")
    top_k: int | None = Field(default=None, ge=1, description="return the best top_k items; default all")
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        default_factory=lambda: uuid.uuid4().hex, description="echoed back; generated (uuid4 hex) when absent")


def rank_request_model(max_items: int) -> type[RankRequest]:
    """:class:`RankRequest` with ``items`` limited to ``max_items`` (shown in the OpenAPI docs)."""
    return create_model(
        "RankRequest",
        __base__=RankRequest,
        items=(list[Id], Field(min_length=1, max_length=max_items, description="candidate item ids, in request order")),
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
