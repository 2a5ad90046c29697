"""Prediction logs: a sample of the ranked requests, appended to a Redis Stream off the hot path,
and their export to Parquet (``mtrank logs export``). What is logged is what the A/B readout
(:mod:`service.readout`) and the training data as served (``--with-outcomes``) join outcomes to.

On the request path :meth:`PredictionLog.offer` costs a random draw and, for a sampled request, a
non-blocking put of references (the request, the scores the model computed, the feature bytes the
fetcher read; all immutable once ranked) into a queue bounded by records and by bytes
(``MTRANK_PREDLOG_QUEUE_BYTES``). A background thread with its own Redis client (on
``MTRANK_PREDLOG_REDIS_URL`` when set) encodes one compact record per request (orjson) and appends
them with pipelined ``XADD <stream> MAXLEN ~ N``, N the smaller of ``MTRANK_PREDLOG_MAXLEN`` and
``MTRANK_PREDLOG_MAX_BYTES`` over the mean record size this worker wrote. When the queue is full
or Redis fails, records are dropped and counted (``mtrank_predlog_dropped_total{reason}``):
losing the stream never slows or fails ``/rank``.

Pseudonyms: the raw user id never leaves the process. A record holds ``user``, the first 16 bytes
(hex) of HMAC-SHA256(``MTRANK_PSEUDONYM_KEY``, user id); the readout computes the same of an
event's user id with the same key. Without a key the log refuses to start (the service does not
start): a per-process random key would make the pseudonyms of two workers, or of one worker before
and after a restart, unjoinable, and the readout wrong without a word.

One stream entry per request, field ``r`` holding the JSON record (``v`` 2)::

    {"v": 2, "ts": <ms>, "rid": ..., "user": <pseudonym>, "variant": ..., "bucket": ..., "forced": false,
     "model": ..., "version": ..., "precision": "fp32", "n": <candidates>, "degraded": null,
     "items": [every candidate, request order], "score": [fused, per candidate],
     "scores": {task: [per candidate]}, "top": [candidate positions returned, rank order],
     "context": {...}, "features": {"user": <base64>, "items": [<base64> | null, ...]}}

``features`` (only in a ``MTRANK_PREDLOG_FEATURES_RATE`` share of the records) holds the packed
values (:mod:`service.codec`) exactly as the fetcher read them, ``null`` where Redis had none.
``forced`` marks a request whose variant came from the ``X-Mtrank-Variant`` header: it is logged,
and the readout leaves it out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import redis

from service import fusion, metrics

if TYPE_CHECKING:
    from service.ranking import RankResult
    from service.schemas import RankRequest
    from service.serving.state import Route

log = logging.getLogger("service.predlog")
FIELD = b"r"
RECORD_VERSION = 2
QUEUE_RECORDS = 4096
BATCH = 256
#: bytes of a pseudonym (hex: twice as many characters)
PSEUDONYM_BYTES = 16


def pseudonym(key: bytes, user_id: str) -> str:
    """The keyed pseudonym of a user id: HMAC-SHA256, first 16 bytes as hex."""
    return hmac.new(key, user_id.encode(), hashlib.sha256).digest()[:PSEUDONYM_BYTES].hex()


def pseudonym_key(settings) -> bytes:
    """``MTRANK_PSEUDONYM_KEY`` as bytes; ValueError naming the setting when it is not set."""
    if settings.pseudonym_key is None:
        raise ValueError("MTRANK_PSEUDONYM_KEY is not set: the prediction log stores a keyed hash of the user id "
                         "and the A/B readout needs the same key (set a secret of at least 16 characters, the "
                         "same for every worker and for `mtrank ab report`)")
    return settings.pseudonym_key.get_secret_value().encode()


class PredictionLog:
    """The sampler, the bounded queue and the writer thread of one worker process."""

    def __init__(self, settings, client_factory=None, queue_records: int = QUEUE_RECORDS,
                 queue_bytes: int | None = None):
        self.rate = float(settings.predlog_rate)
        self.features_rate = float(settings.predlog_features_rate)
        self.stream = settings.predlog_stream
        self.maxlen = int(settings.predlog_maxlen)
        self.max_bytes = int(settings.predlog_max_bytes)
        self.timeout_s = max(0.05, settings.redis_timeout_s)
        self._key = pseudonym_key(settings) if self.rate > 0 else b""
        if client_factory is None:
            from service.redis_client import client_for_url, make_client

            url = settings.predlog_redis_url

            def client_factory():
                return make_client(settings) if url is None else client_for_url(url, self.timeout_s)
        self._client_factory = client_factory
        self._queue: queue.Queue = queue.Queue(maxsize=queue_records)
        self._queue_bytes = int(settings.predlog_queue_bytes if queue_bytes is None else queue_bytes)
        self._held = 0  # estimated bytes of the records in the queue
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._written = 0  # records and bytes this worker appended: the mean record size
        self._written_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def start(self) -> PredictionLog:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mtrank-predlog", daemon=True)
            self._thread.start()
        return self

    # -- request path ---------------------------------------------------------------------------

    def offer(self, request: RankRequest, route: Route, result: RankResult) -> bool:
        """Queue one ranked request (if sampled); never blocks, never raises for a full queue."""
        if self.rate < 1.0 and random.random() >= self.rate:
            return False
        with_features = self.features_rate > 0 and (self.features_rate >= 1.0 or random.random() < self.features_rate)
        size = _estimate(result, with_features)
        rec = (time.time(), request, route.variant.name, route.bucket, route.forced, route.variant.ranker.bundle,
               result, with_features, size)
        with self._lock:
            if self._held + size > self._queue_bytes:
                full = True
            else:
                try:
                    self._queue.put_nowait(rec)
                    self._held += size
                    full = False
                except queue.Full:
                    full = True
        if full:
            metrics.predlog_dropped("queue_full")
            return False
        return True

    # -- the writer thread ----------------------------------------------------------------------

    def _take(self, first_wait: float) -> list:
        batch = []
        try:
            batch.append(self._queue.get(timeout=first_wait))
            while len(batch) < BATCH:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if batch:
            with self._lock:
                self._held -= sum(b[-1] for b in batch)
        return batch

    def _run(self) -> None:
        retry_at = 0.0
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take(0.2)
            if not batch:
                continue
            if time.monotonic() < retry_at:  # Redis failed a moment ago: do not hammer it
                metrics.predlog_dropped("redis", len(batch))
                continue
            try:
                self._write(batch)
                metrics.predlog_written(len(batch))
            except (redis.RedisError, OSError) as e:
                metrics.predlog_dropped("redis", len(batch))
                log.warning("prediction log: %d records dropped, stream %r unavailable: %s: %s", len(batch),
                            self.stream, type(e).__name__, e)
                self._reset_client()
                retry_at = time.monotonic() + 1.0
            except Exception:
                metrics.predlog_dropped("error", len(batch))
                log.exception("prediction log: %d records dropped", len(batch))

    def stream_maxlen(self) -> int:
        """The MAXLEN of the next XADD: the record bound, or the byte bound over the mean record size."""
        if not self._written:
            return self.maxlen
        mean = self._written_bytes / self._written
        return max(1, min(self.maxlen, int(self.max_bytes / mean)))

    def _write(self, batch: list) -> None:
        client = self._client
        if client is None:
            client = self._client = self._client_factory()
        records = [encode(*rec[:-1], key=self._key) for rec in batch]
        self._written += len(records)
        self._written_bytes += sum(len(r) for r in records)
        maxlen = self.stream_maxlen()
        pipe = client.pipeline(transaction=False)
        for raw in records:
            pipe.xadd(self.stream, {FIELD: raw}, maxlen=maxlen, approximate=True)
        pipe.execute()

    def _reset_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def close(self, timeout: float = 2.0) -> None:
        """Stop the writer: what is queued is written for at most ``timeout`` seconds, then dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        left = self._queue.qsize()
        if left:
            metrics.predlog_dropped("shutdown", left)
        self._reset_client()


def _estimate(result: RankResult, with_features: bool) -> int:
    """Bytes a queued record holds, roughly (O(1): no walk over the candidates)."""
    size = 200 + len(result.body) * max(1, result.n_items) // max(1, result.n_returned)
    raw = result.scored[2] if result.scored is not None else None
    if with_features and raw is not None:
        user, items = raw
        size += len(user[0] or b"") + len(items) * len((items[0] if items else None) or b"")
    return size


def _b64(v: bytes | None) -> str | None:
    return None if v is None else base64.b64encode(v).decode()


def encode(ts: float, request: RankRequest, variant: str, bucket: int | None, forced: bool, bundle: Any,
           result: RankResult, with_features: bool = False, *, key: bytes) -> bytes:
    """One compact record (in the writer thread): the user id is replaced by its pseudonym here."""
    scores, fused, raw = result.scored if result.scored is not None else ({}, None, None)
    rec: dict[str, Any] = {
        "v": RECORD_VERSION, "ts": int(ts * 1000), "rid": result.request_id, "user": pseudonym(key, request.user_id),
        "variant": variant, "bucket": bucket, "forced": forced, "model": bundle.name, "version": bundle.version,
        "precision": bundle.precision, "n": result.n_items, "degraded": result.degraded,
        "items": request.items,
        # numpy arrays as orjson writes them: float32 scores in their shortest exact form, NaN as null
        "score": np.ascontiguousarray(fused) if fused is not None else [],
        "scores": {t: np.ascontiguousarray(v) for t, v in scores.items()},
        "top": fusion.order(fused, request.top_k) if fused is not None else [],
        "context": request.context or {},
    }
    if with_features and raw is not None:
        user, items = raw
        rec["features"] = {"user": _b64(user[0]), "items": [_b64(v) for v in items]}
    return orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(raw: bytes) -> dict:
    """One record back (the ``r`` field of an entry)."""
    return orjson.loads(raw)


def field_of(fields: dict) -> bytes | None:
    """The record of a stream entry's fields (keys as bytes or str)."""
    return fields.get(FIELD) or fields.get(FIELD.decode())


# -- export ------------------------------------------------------------------------------------------

def stream_bound(value: str | None, default: str) -> str:
    """An XRANGE bound from ``--since``/``--until``: a stream id (``1712345678901-0``), unix ms, or
    an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return default
    v = value.strip()
    head, dash, tail = v.partition("-")
    if head.isdigit() and (not dash or tail.isdigit()):
        return v
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a stream id, unix milliseconds or ISO 8601 time: {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return str(int(t.timestamp() * 1000))


def read_stream(client, stream: str, since: str | None = None, until: str | None = None,
                page: int = 1000) -> Iterator[list[tuple[bytes, dict]]]:
    """Pages of ``(entry id, fields)`` from XRANGE, oldest first."""
    start = stream_bound(since, "-")
    end = stream_bound(until, "+")
    while True:
        entries = client.xrange(stream, min=start, max=end, count=page)
        if not entries:
            return
        yield entries
        if len(entries) < page:
            return
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)


def parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("stream_id", pa.string()), ("ts", pa.timestamp("ms", tz="UTC")), ("request_id", pa.string()),
        ("user_pseudonym", pa.string()), ("variant", pa.string()), ("bucket", pa.int32()), ("forced", pa.bool_()),
        ("model", pa.string()), ("version", pa.int32()), ("precision", pa.string()),
        ("n_candidates", pa.int32()), ("degraded", pa.string()), ("context", pa.string()),
        ("items", pa.list_(pa.string())), ("top", pa.list_(pa.int32())), ("score", pa.list_(pa.float64())),
        ("scores", pa.map_(pa.string(), pa.list_(pa.float64()))), ("has_features", pa.bool_()),
    ])


def _table(entries: list[tuple[bytes, dict]], schema):
    import pyarrow as pa

    cols: dict[str, list] = {name: [] for name in schema.names}
    for entry_id, fields in entries:
        raw = field_of(fields)
        if raw is None:
            continue
        r = decode(raw)
        cols["stream_id"].append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
        cols["ts"].append(r.get("ts"))
        cols["request_id"].append(r.get("rid"))
        cols["user_pseudonym"].append(r.get("user"))
        cols["variant"].append(r.get("variant"))
        cols["bucket"].append(r.get("bucket"))
        cols["forced"].append(bool(r.get("forced")))
        cols["model"].append(r.get("model"))
        cols["version"].append(r.get("version"))
        cols["precision"].append(r.get("precision"))
        cols["n_candidates"].append(r.get("n"))
        cols["degraded"].append(r.get("degraded"))
        cols["context"].append(orjson.dumps(r.get("context") or {}).decode())
        cols["items"].append(r.get("items") or [])
        cols["top"].append(r.get("top") or [])
        cols["score"].append(r.get("score") or [])
        cols["scores"].append(list((r.get("scores") or {}).items()))
        cols["has_features"].append("features" in r)
    return pa.table({name: pa.array(cols[name], type=schema.field(name).type) for name in schema.names},
                    schema=schema)


def export(client, stream: str, out: str | Path, since: str | None = None, until: str | None = None,
           page: int = 1000) -> int:
    """Write the stream's records (one row per request; list columns for the candidates, the returned
    positions and the scores, a map task -> scores; the context as JSON) to a Parquet file, page by
    page; returns the number of rows."""
    import pyarrow.parquet as pq

    schema = parquet_schema()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for entries in read_stream(client, stream, since, until, page):
            table = _table(entries, schema)
            if table.num_rows:
                writer.write_table(table)
                rows += table.num_rows
        if rows == 0:
            writer.write_table(schema.empty_table())
    tmp.replace(out)
    return rows
