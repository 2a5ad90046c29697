"""Reading the two streams for the readout: the prediction log's records and the outcome events."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pydantic import ValidationError

from service.events import record as event_record
from service.predlog import decode, field_of, read_stream

log = logging.getLogger(__name__)


def predictions(client, stream: str, since: str | None = None, until: str | None = None) -> Iterator[dict]:
    """The prediction-log records (version 2: with candidates; older records are skipped)."""
    old = 0
    for entries in read_stream(client, stream, since, until):
        for _, fields in entries:
            raw = field_of(fields)
            if raw is None:
                continue
            rec = decode(raw)
            if rec.get("v", 1) < 2:
                old += 1
                continue
            yield rec
    if old:
        log.warning("%d prediction-log records of an older format (no candidates) skipped", old)


def events(client, prefix: str, since: str | None = None, until: str | None = None) -> Iterator:
    """The outcome events of ``<prefix>:events`` (:mod:`service.events.record`); undecodable ones are
    skipped and counted in a warning."""
    bad = 0
    for entries in read_stream(client, event_record.stream_key(prefix), since, until):
        for _, fields in entries:
            raw = fields.get(event_record.FIELD) or fields.get(event_record.FIELD.decode())
            try:
                yield event_record.decode(raw or b"")
            except (ValidationError, TypeError, ValueError):
                bad += 1
    if bad:
        log.warning("%d undecodable events skipped", bad)
