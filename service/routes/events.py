"""``POST /events``: validate a batch of outcome events (:mod:`service.events.schemas`) and append
it to the events stream (:mod:`service.events.stream`); 202 with the counts."""

# no `from __future__ import annotations`: FastAPI must see the real types of the route signatures
from collections import Counter
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service import limits
from service.events import stream
from service.events.schemas import EventsAccepted, EventsRequest, events_request_model
from service.routes.rank import RESPONSES as RANK_RESPONSES
from service.runtime import Runtime

EVENTS_DESCRIPTION = """Append a batch of outcome events (impression, click, conversion, watch) to the
events stream; `mtrank events consume` applies them (fresh behaviour sequences). At most
MTRANK_EVENTS_MAX_BATCH events, ids of at most MTRANK_MAX_ID_LENGTH characters, `value` (watch
seconds) required for watch events. 202 = appended. 503 + Retry-After = the stream is unavailable and
nothing was accepted: send the batch again (an event_id is applied once, so resending is safe)."""
# the error answers are /rank's (one owner of their shapes); only the 503 says something else here
RESPONSES: dict[int | str, dict[str, Any]] = {
    **{k: v for k, v in RANK_RESPONSES.items() if k in (413, 415, 422, 500)},
    503: {**RANK_RESPONSES[503], "description": "events stream (Redis) unavailable: retry after Retry-After seconds"}}


def router(rt: Runtime) -> APIRouter:
    s = rt.settings
    Model = events_request_model(s.events_max_batch, s.max_id_length)
    request_schema = _inline(Model.model_json_schema())
    r = APIRouter()

    async def events_body(request: Request) -> EventsRequest:
        """The body, parsed here (strict JSON, the configured limits) rather than by FastAPI."""
        return limits.parse_body(await request.body(), request.headers.get("content-type"), Model)

    @r.post("/events", status_code=202, response_model=EventsAccepted, description=EVENTS_DESCRIPTION,
            responses=RESPONSES, openapi_extra={"requestBody": {
                "required": True, "content": {"application/json": {"schema": request_schema}}}})
    def events(body: Annotated[EventsRequest, Depends(events_body)]) -> JSONResponse:
        records = [e.record() for e in body.events]
        store = rt.redis_client
        if store is None:
            raise _unavailable("no Redis client")
        try:
            stream.append(store.client, s.redis_prefix, records, s.events_maxlen, s.events_max_age_s)
        except redis.RedisError as e:
            raise _unavailable(type(e).__name__) from None
        return JSONResponse({"accepted": len(records), "types": dict(Counter(e.type for e in records))},
                            status_code=202)

    return r


def _inline(schema: dict) -> dict:
    """``schema`` with its ``$defs`` references replaced by the definitions (one level: EventIn)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _unavailable(why: str) -> stream.EventsUnavailable:
    return stream.EventsUnavailable(f"events stream unavailable ({why}); nothing was accepted, send the batch again")
