"""The body of ``POST /events`` and its limits (:func:`events_request_model`).

A batch ``{"events": [...]}`` of 1 to ``MTRANK_EVENTS_MAX_BATCH`` events. Each event: ``event_id``,
``user_id`` and ``item_id`` (ids as ``/rank`` takes them: strings of 1 to ``MTRANK_MAX_ID_LENGTH``
characters, or JSON integers), ``type`` (impression, click, conversion, watch), ``ts`` (the event's
Unix time in seconds, finite, >= 0), ``value`` (watch seconds: required for ``watch``, finite,
>= 0; refused on the other types) and an optional ``request_id`` (the ``/rank`` that showed the
item). Unknown keys are refused. Every error names its field (``loc``: body, events, index, field).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from service.events.record import EventRecord, EventType
from service.schemas import RequestId, id_type


class EventIn(BaseModel):
    """One event as a client sends it (the limits are set by :func:`events_request_model`)."""

    model_config = ConfigDict(extra="forbid")

    event_id: str
    user_id: str
    item_id: str
    type: EventType
    ts: float = Field(ge=0, allow_inf_nan=False, description="when it happened, Unix seconds")
    value: float | None = Field(default=None, ge=0, allow_inf_nan=False, validate_default=True,
                                description="watch seconds: required for type watch, refused on the others")
    request_id: RequestId | None = Field(default=None, description="the /rank request that showed the item")

    @field_validator("value")
    @classmethod
    def _value_for_watch(cls, v: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("type")  # absent when the type itself was invalid: that error is enough
        if kind == "watch" and v is None:
            raise ValueError("a watch event needs value (the watch time in seconds)")
        if kind is not None and kind != "watch" and v is not None:
            raise ValueError(f"value is for watch events only (this one is {kind})")
        return v

    def record(self) -> EventRecord:
        return EventRecord(**self.model_dump())


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn]


class EventsAccepted(BaseModel):
    """202: the batch is in the stream."""

    accepted: int = Field(description="events appended")
    types: dict[str, int] = Field(description="of them, by type")


@lru_cache(maxsize=16)
def events_request_model(max_batch: int, max_id_length: int) -> type[EventsRequest]:
    """:class:`EventsRequest` with the configured limits (shown in the OpenAPI schema)."""
    ident: Any = id_type(max_id_length)
    event = create_model(
        "EventIn",
        __base__=EventIn,
        event_id=(ident, Field(description=f"unique per event (1 to {max_id_length} characters): an event "
                                           "sent again is applied once")),
        user_id=(ident, Field(description=f"1 to {max_id_length} characters")),
        item_id=(ident, Field(description=f"1 to {max_id_length} characters")),
    )
    return create_model(
        "EventsRequest",
        __base__=EventsRequest,
        events=(list[event], Field(min_length=1, max_length=max_batch,  # type: ignore[valid-type]
                                   description=f"1 to {max_batch} events")),
    )
