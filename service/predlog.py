"""Prediction logs: a sample of the ranked requests, appended to a Redis Stream off the hot path,
and their export to Parquet (``mtrank logs export``).

On the request path :meth:`PredictionLog.offer` costs a random draw and, for a sampled request, a
non-blocking put of references (the response bytes are immutable and already built) into a
bounded queue. A background thread with its own Redis client decodes the responses, encodes one
compact record per request (orjson) and appends them with pipelined ``XADD <stream> MAXLEN ~ N``.
When the queue is full (the writer is behind) or Redis fails, records are dropped and counted
(``mtrank_predlog_dropped_total{reason}``): losing the stream never slows or fails ``/rank``.

One stream entry per request, field ``r`` holding the JSON record: ``ts`` (ms), ``rid``,
``user``, ``variant``, ``bucket``, ``model``, ``version``, ``n`` (candidates), ``degraded``,
``items`` (the returned ids, in rank order), ``score`` (fused) and ``scores`` {task: [...]}.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import redis

from service import columnar, metrics

log = logging.getLogger("service.predlog")
FIELD = b"r"
QUEUE_RECORDS = 4096
QUEUE_BYTES = 64 * 1024 * 1024  # the responses held by the queue, at most
BATCH = 256


class PredictionLog:
    """The sampler, the bounded queue and the writer thread of one worker process."""

    def __init__(self, settings, client_factory=None, queue_records: int = QUEUE_RECORDS,
                 queue_bytes: int = QUEUE_BYTES):
        self.rate = float(settings.predlog_rate)
        self.stream = settings.predlog_stream
        self.maxlen = int(settings.predlog_maxlen)
        self.timeout_s = max(0.05, settings.redis_timeout_s)
        if client_factory is None:
            from service.redis_client import make_client

            def client_factory():
                return make_client(settings)
        self._client_factory = client_factory
        self._queue: queue.Queue = queue.Queue(maxsize=queue_records)
        self._queue_bytes = queue_bytes
        self._held = 0  # bytes of the responses in the queue
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def start(self) -> PredictionLog:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mtrank-predlog", daemon=True)
            self._thread.start()
        return self

    # -- request path ---------------------------------------------------------------------------

    def offer(self, user_id: str, variant: str, bucket: int | None, n_items: int, body: bytes,
              degraded: str | None = None) -> bool:
        """Queue one ranked request (if sampled); never blocks, never raises for a full queue."""
        if self.rate < 1.0 and random.random() >= self.rate:
            return False
        size = len(body)
        with self._lock:
            if self._held + size > self._queue_bytes:
                full = True
            else:
                try:
                    self._queue.put_nowait((time.time(), user_id, variant, bucket, n_items, body, degraded))
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
                self._held -= sum(len(b[5]) for b in batch)
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

    def _write(self, batch: list) -> None:
        client = self._client
        if client is None:
            client = self._client = self._client_factory()
        pipe = client.pipeline(transaction=False)
        for rec in batch:
            pipe.xadd(self.stream, {FIELD: encode(*rec)}, maxlen=self.maxlen, approximate=True)
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


def encode(ts: float, user_id: str, variant: str, bucket: int | None, n_items: int, body: bytes,
           degraded: str | None = None) -> bytes:
    """One compact record from a /rank response body (decoded here, in the writer thread)."""
    resp = orjson.loads(body)
    ranked = columnar.as_rows(resp) if "item_ids" in resp else resp.get("items", [])
    tasks = list(ranked[0]["scores"]) if ranked else []
    model = resp.get("model") or {}
    return orjson.dumps({
        "ts": int(ts * 1000), "rid": resp.get("request_id"), "user": user_id, "variant": variant,
        "bucket": bucket, "model": model.get("name"), "version": model.get("version"), "n": n_items,
        "degraded": degraded or resp.get("degraded_reason") or None,
        "items": [it["item_id"] for it in ranked],
        "score": [it["score"] for it in ranked],
        "scores": {t: [it["scores"].get(t) for it in ranked] for t in tasks},
    })


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
        ("user_id", pa.string()), ("variant", pa.string()), ("bucket", pa.int32()), ("model", pa.string()),
        ("version", pa.int32()), ("n_candidates", pa.int32()), ("degraded", pa.string()),
        ("items", pa.list_(pa.string())), ("score", pa.list_(pa.float64())),
        ("scores", pa.map_(pa.string(), pa.list_(pa.float64()))),
    ])


def _table(entries: list[tuple[bytes, dict]], schema):
    import pyarrow as pa

    cols: dict[str, list] = {name: [] for name in schema.names}
    for entry_id, fields in entries:
        raw = fields.get(FIELD) or fields.get(FIELD.decode())
        if raw is None:
            continue
        r = orjson.loads(raw)
        cols["stream_id"].append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
        cols["ts"].append(r.get("ts"))
        cols["request_id"].append(r.get("rid"))
        cols["user_id"].append(r.get("user"))
        cols["variant"].append(r.get("variant"))
        cols["bucket"].append(r.get("bucket"))
        cols["model"].append(r.get("model"))
        cols["version"].append(r.get("version"))
        cols["n_candidates"].append(r.get("n"))
        cols["degraded"].append(r.get("degraded"))
        cols["items"].append(r.get("items") or [])
        cols["score"].append(r.get("score") or [])
        cols["scores"].append(list((r.get("scores") or {}).items()))
    return pa.table({name: pa.array(cols[name], type=schema.field(name).type) for name in schema.names},
                    schema=schema)


def export(client, stream: str, out: str | Path, since: str | None = None, until: str | None = None,
           page: int = 1000) -> int:
    """Write the stream's records (one row per request; list columns for items and scores, a map
    task -> scores) to a Parquet file, page by page; returns the number of rows."""
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
