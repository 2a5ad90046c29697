"""Appending events to the stream (``<prefix>:events``, :func:`service.events.record.stream_key`).

One pipelined round trip per batch: an ``XADD ... MAXLEN ~ <maxlen>`` per event (the length
bound) and one ``XTRIM ... MINID ~ <now - max_age>`` (the age bound; entry ids are the server's
millisecond clock, and one XADD cannot carry both bounds). ``~`` lets Redis trim whole macro-nodes
only, which keeps trimming cheap; the stream can hold a little more than either bound says.

Either bound also drops entries no consumer has read yet: keep them well above the consumers' lag
(``XINFO GROUPS`` shows it). A failure raises ``redis.RedisError``: the caller answers 503 and the
client sends the batch again (the consumer applies an ``event_id`` once, so a batch that was in
fact appended before the error costs nothing twice).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from service.events.record import FIELD, EventRecord, encode, stream_key


class EventsUnavailable(Exception):
    """The stream's Redis failed: nothing of the batch was taken (the client sends it again)."""


def min_id(max_age_s: float, now_s: float | None = None) -> str:
    """The oldest entry id the age bound keeps (``<ms>-0``)."""
    now_s = time.time() if now_s is None else now_s
    return f"{max(0, int((now_s - max_age_s) * 1000))}-0"


def append(client, prefix: str, events: Sequence[EventRecord], maxlen: int, max_age_s: float) -> list[bytes]:
    """Append ``events`` in order; the entry ids. ``client``: a redis-py client (single or cluster)."""
    key = stream_key(prefix)
    pipe = client.pipeline(transaction=False)
    for e in events:
        pipe.xadd(key, {FIELD: encode(e)}, maxlen=maxlen, approximate=True)
    pipe.xtrim(key, minid=min_id(max_age_s), approximate=True)
    return pipe.execute()[:-1]
