"""One outcome event as the events stream stores it: the owner of its fields, types and encoding.

The HTTP endpoint validates a batch (limits, field names in 4xx answers) and appends one stream
entry per event; the consumer (fresh behaviour sequences), the A/B readout and the export of
training data read them back with :func:`decode`. The stream key is ``<prefix>:events``.

An entry holds one field, ``e``: the event as compact JSON, ``None`` fields left out::

    {"event_id": "...", "user_id": "...", "item_id": "...", "type": "click", "ts": 1764633600.25,
     "value": 31.5, "request_id": "..."}

``ts`` is the event's time in Unix seconds as the client reported it; ``value`` is the watch time
in seconds (``watch`` events only); ``request_id`` is the ``/rank`` request that showed the item,
when the client knows it.
"""

from __future__ import annotations

import orjson
from pydantic import BaseModel, ConfigDict

# the event types are the contract's (a sequence feature names the event that feeds it)
from service.contract import EVENT_TYPES, EventType

__all__ = ["EVENT_TYPES", "FIELD", "EventRecord", "EventType", "decode", "encode", "stream_key"]

#: the one field of a stream entry
FIELD = b"e"


class EventRecord(BaseModel):
    """An event that passed validation (the HTTP layer owns the limits)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str
    user_id: str
    item_id: str
    type: EventType
    ts: float
    value: float | None = None
    request_id: str | None = None


def stream_key(prefix: str) -> str:
    """The events stream of a deployment (``MTRANK_REDIS_PREFIX``)."""
    return f"{prefix}:events"


def encode(event: EventRecord) -> bytes:
    return orjson.dumps(event.model_dump(exclude_none=True))


def decode(raw: bytes) -> EventRecord:
    """One entry's ``e`` field back into an event (raises ``pydantic.ValidationError`` if it is not one)."""
    return EventRecord.model_validate_json(raw)
