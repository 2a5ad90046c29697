"""The columnar ``/rank`` response, negotiated by the client with ``Accept``.

A client that sends ``Accept: application/vnd.mtrank.columnar+json`` gets the ranked items as
parallel arrays (``item_ids``, ``score``, ``scores: {task: [...]}``) instead of one object per
item; the arrays are written straight from numpy by orjson, with no Python object per item. Every
other ``Accept`` (absent, ``application/json``, ``*/*``, unknown or unparsable) gets the default
object-per-item response, unchanged. The rule (:func:`wants_columnar`): the columnar type is
listed with ``q > 0`` and no plain JSON range (``application/json``, ``application/*``, ``*/*``)
has a higher ``q``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.schemas import Missing, ModelRef

MEDIA_TYPE = "application/vnd.mtrank.columnar+json"
_JSON_RANGES = frozenset(("application/json", "application/*", "*/*"))


def wants_columnar(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for the columnar response (see the module doc)."""
    if not accept or MEDIA_TYPE not in accept.lower():
        return False  # the common case, decided without parsing
    q_col = q_json = 0.0
    for part in accept.lower().split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media == MEDIA_TYPE:
            q_col = max(q_col, q)
        elif media in _JSON_RANGES:
            q_json = max(q_json, q)
    return q_col > 0 and q_col >= q_json


class ColumnarRankResponse(BaseModel):
    """The ``/rank`` answer for ``Accept: application/vnd.mtrank.columnar+json``: the same fields
    and values as the default response, with ``items`` replaced by parallel arrays (position i of
    every array is the i-th ranked item)."""

    request_id: str
    variant: str = Field(description="experiment variant (of the ranking layer) that served the request")
    bucket: int = Field(description="the user's bucket in the ranking layer, 0 <= bucket < buckets")
    model: ModelRef = Field(description="the bundle that served the request")
    item_ids: list[str] = Field(description="sorted by score desc, ties by request order, at most top_k")
    score: list[float | None] = Field(description="fused score of item_ids[i] (null if the model produced NaN)")
    scores: dict[str, list[float | None]] = Field(description="per task, the model output of item_ids[i]")
    missing: Missing
    degraded: bool = Field(default=False, description="the feature store did not answer in time: schema "
                                                      "defaults (and cached items) were used")
    degraded_reason: str | None = Field(default=None, description="why the response is degraded "
                                                                   "(timeout, down, circuit_open)")


def openapi_200() -> dict[str, Any]:
    """The OpenAPI entry of the 200 answer's columnar content (beside the default JSON one); the
    schemas it refers to (``ModelRef``, ``Missing``) are those of the default response."""
    schema = ColumnarRankResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    assert set(schema.pop("$defs", {})) <= {"ModelRef", "Missing"}, "a new nested model must be registered"
    return {"description": f"the ranked items: one object per item (application/json, the default), or "
                           f"parallel arrays with `Accept: {MEDIA_TYPE}`",
            "content": {MEDIA_TYPE: {"schema": schema}}}
