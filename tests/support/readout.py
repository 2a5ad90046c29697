"""Helpers of the readout tests: the pseudonym key their servers use, events written to the
stream in the stream's own format, the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import uuid

import redis

from service.events.record import FIELD, EventRecord, encode, stream_key
from tests.support.server import MTRANK

KEY = "readout-test-pseudonym-key-0123456789"


def write_events(redis_url: str, prefix: str, events: list[EventRecord]) -> None:
    """XADD each event to ``<prefix>:events`` exactly as the endpoint does (service.events.record)."""
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for ev in events:
        pipe.xadd(stream_key(prefix), {FIELD: encode(ev)})
    pipe.execute()
    client.close()


def event(user: str, item: str, type_: str, ts: float, rid: str | None = None, value: float | None = None,
          event_id: str | None = None) -> EventRecord:
    return EventRecord(event_id=event_id or uuid.uuid4().hex, user_id=user, item_id=item, type=type_, ts=ts,
                       value=value, request_id=rid)


def mtrank(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``mtrank ARGS`` with no MTRANK_* variable of this process, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    full.update(env or {})
    return subprocess.run([MTRANK, *args], capture_output=True, text=True, timeout=timeout, env=full)
