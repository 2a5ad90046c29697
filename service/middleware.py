"""The HTTP edge of the service: one pure ASGI middleware in front of every route.

For every HTTP request it

* picks the request id (``X-Request-Id`` when usable, else generated; ``/rank`` may replace a
  generated one by its body's ``request_id``) and echoes it in the ``X-Request-Id`` response header
  of every answer, errors included;
* enforces ``MTRANK_MAX_BODY_BYTES`` (413 on ``Content-Length`` before reading, or as soon as a
  streamed/chunked body passes the limit) and hands the buffered body to the app;
* sheds load on ``POST /rank`` by queue time: at most ``inflight_limit`` ranks execute at once per
  worker (counted here, in the event loop, before the threadpool); more wait in a FIFO queue
  (an asyncio future each: no thread, no parsing). A request that waited ``queue_timeout_s``
  (``MTRANK_SHED_QUEUE_MS``) without a slot, or that finds ``queue_limit`` others waiting, is
  answered **429** with ``Retry-After`` before any of its work is done. Why: a 429 is not a
  failure to a proxy (nginx never counts it against ``max_fails``), and rejecting after a wait
  instead of at once keeps closed-loop clients from turning the CPU into a reject loop - moderate
  overload is absorbed by the queue, useful answers per second stay at capacity, and the latency
  of an accepted request is bounded by the queue-time target plus its own run;
* answers anything unexpected with a 500 carrying the request id (and logs it with the traceback);
* its own answers (413, 429, 500) have the one error shape of every non-2xx answer
  (:func:`service.schemas.error_answer`: ``{"error": {"code", "message"}, "request_id"}``,
  ``Retry-After`` on 429);
* writes the ``/rank`` bookkeeping when the answer is done: metrics (:mod:`service.metrics`) and
  the access line (:mod:`service.access_log`), from the :class:`RequestInfo` the route filled in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service import access_log, metrics
from service.limits import content_length, request_id_from_header
from service.schemas import ErrorCode, error_answer, new_request_id

log = logging.getLogger("service.http")
RANK_PATH = "/rank"
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


@dataclass(slots=True)
class RequestInfo:
    """What one request learnt on its way (``request.state.info``); read by the middleware at the end."""

    request_id: str
    rid_from_header: bool
    variant: str | None = None
    bucket: int | None = None
    forced: bool = False
    model: dict | None = None
    n_items: int | None = None
    result: Any = None  # the RankResult of a ranked request
    error: str | None = None

    def adopt_body_id(self, body) -> None:
        """Request id precedence: X-Request-Id header, else the body's request_id, else generated."""
        if self.rid_from_header:
            body.request_id = self.request_id
        elif "request_id" in body.model_fields_set:
            self.request_id = body.request_id
        else:
            body.request_id = self.request_id

    def routed(self, route) -> None:
        ranker = route.variant.ranker
        self.variant = route.variant.name
        self.bucket = route.bucket
        self.forced = route.forced
        self.model = ranker.model_ref


def _error_messages(code: ErrorCode, message: str, request_id: str,
                    extra: Sequence[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    """The ASGI messages of an error answer (:func:`service.schemas.error_answer`, the one builder)."""
    status, data, hdrs = error_answer(code, message, request_id)
    headers = [*((k.encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()),
               (b"content-length", str(len(data)).encode()), *extra]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": data, "more_body": False})


class EdgeMiddleware:
    """See the module doc. ``inflight_limit``: /rank executing at once per worker; ``queue_limit``:
    /rank waiting for a slot; ``queue_timeout_s``: the longest wait before 429 (its Retry-After is
    :data:`service.schemas.RETRY_AFTER_S`); ``cache_on``: count item-cache hits/misses."""

    def __init__(self, app, *, max_body_bytes: int, inflight_limit: int, queue_limit: int = 0,
                 queue_timeout_s: float = 1.0, cache_on: bool = False):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.inflight_limit = inflight_limit
        self.queue_limit = queue_limit
        self.queue_timeout_s = queue_timeout_s
        self.cache_on = cache_on
        self.inflight = 0  # executing; touched only in the event loop: no lock
        self._waiters: deque[asyncio.Future] = deque()  # FIFO of requests waiting for a slot

    async def _admit(self, t0: float) -> str | None:
        """Take a slot (None), or say why not: ``queue_full`` (at once) or ``queue_time`` (after
        waiting ``queue_timeout_s`` since the request arrived at ``t0``)."""
        if self.inflight < self.inflight_limit and not self._waiters:
            self.inflight += 1
            return None
        if len(self._waiters) >= self.queue_limit:
            return "queue_full"
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, self.queue_timeout_s - (time.perf_counter() - t0))
        except TimeoutError:
            self._discard(fut)
            return "queue_time"
        except BaseException:  # cancelled (the client went away, or shutdown)
            if fut.done() and not fut.cancelled():
                self._release()  # a slot was handed over just now: pass it on
            else:
                self._discard(fut)
            raise
        return None  # the releasing request handed its slot over (self.inflight unchanged)

    def _discard(self, fut: asyncio.Future) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def _release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid_header = clen = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid_header = value
            elif name == b"content-length":
                clen = value
        rid = request_id_from_header(rid_header)
        info = RequestInfo(request_id=rid or new_request_id(), rid_from_header=rid is not None)
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["info"] = info
        is_rank = scope["path"] == RANK_PATH and scope["method"] == "POST"
        started: list[int] = []

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                started.append(message["status"])
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-request-id", info.request_id.encode("latin-1"))]}
            await send(message)

        try:
            if scope["method"] in _BODY_METHODS:
                receive = await self._buffer_body(scope, receive, send_with_id, clen, info)
                if receive is None:  # answered 413, or the client went away
                    return
            if not is_rank:
                await self.app(scope, receive, send_with_id)
                return
            refused = await self._admit(t0)
            if refused is not None:
                metrics.shed()
                info.error = "Overloaded"
                why = (f"{len(self._waiters)} requests already wait for a slot" if refused == "queue_full" else
                       f"no slot within {self.queue_timeout_s * 1000:.0f} ms (MTRANK_SHED_QUEUE_MS)")
                for m in _error_messages(ErrorCode.overloaded, f"overloaded: {why}; {self.inflight} ranks executing "
                                                               "in this worker; retry later", info.request_id):
                    await send_with_id(m)
                return
            metrics.inflight(1)
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self._release()
                metrics.inflight(-1)
        except Exception:
            log.exception("unexpected error on %s (request %s)", scope["path"], info.request_id)
            info.error = info.error or "InternalError"
            if started:
                raise  # the head is out: nothing better to do than to drop the connection
            for m in _error_messages(ErrorCode.internal_error, "internal error", info.request_id):
                await send_with_id(m)
        finally:
            if is_rank:
                self._finish(info, started[0] if started else 499, time.perf_counter() - t0)

    async def _buffer_body(self, scope, receive, send, clen: bytes | None, info: RequestInfo):
        """The whole body, within the limit, replayed to the app; None when answered (413) or gone."""
        limit = self.max_body_bytes
        declared = content_length(clen)
        too_large = declared is not None and declared > limit
        chunks: list[bytes] = []
        size = 0
        while not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            if body:
                size += len(body)
                if size > limit:
                    too_large = True
                    break
                chunks.append(body)
            if not message.get("more_body", False):
                break
        if too_large:
            info.error = "BodyTooLarge"
            for m in _error_messages(ErrorCode.body_too_large, f"request body larger than {limit} bytes "
                                     "(MTRANK_MAX_BODY_BYTES)", info.request_id, [(b"connection", b"close")]):
                await send(m)
            return None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay

    def _finish(self, info: RequestInfo, status: int, seconds: float) -> None:
        """Metrics and the access line of one /rank answer; never raises."""
        try:
            model = info.model
            metrics.count_request(info.variant, model["name"] if model else None, status)
            metrics.observe_duration(status, seconds)
            res = info.result
            if res is not None and status == 200:
                degraded = getattr(res, "degraded", None)
                metrics.observe_ranked(res.timings, res.n_items, res.user_missing, res.items_missing,
                                       res.items_corrupt, degraded, getattr(res, "items_from_cache", None),
                                       self.cache_on)
                access_log.rank_line(request_id=info.request_id, status=status, variant=info.variant,
                                     bucket=info.bucket, forced=info.forced, model=model, n_items=res.n_items,
                                     n_returned=res.n_returned, missing_user=res.user_missing,
                                     missing_items=res.items_missing, timings=res.timings, degraded=degraded,
                                     duration_s=seconds)
            else:
                access_log.rank_line(request_id=info.request_id, status=status, variant=info.variant,
                                     bucket=info.bucket, forced=info.forced, model=model, n_items=info.n_items,
                                     duration_s=seconds, error=info.error or f"HTTP {status}")
        except Exception:  # bookkeeping must never break an answer
            log.exception("recording /rank %s failed", info.request_id)
