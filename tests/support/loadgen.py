"""A small asyncio HTTP/1.1 load generator for loopback benchmarks: keep-alive connections, one
request in flight per connection, every request with a timeout, nothing but the standard library
(a few thousand requests per second cost the test process little)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Outcome:
    status: int | str  # HTTP status, or the exception's name (timeout, reset, ...)
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def _read(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def _client(port: int, request: bytes, out: list[Outcome], stop_at: float, budget: list[int],
                  timeout: float, backoff_shed: float, keep_body: bool) -> None:
    reader = writer = None
    while time.monotonic() < stop_at and budget[0] > 0:
        budget[0] -= 1
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            writer.write(request)
            status, headers, body = await asyncio.wait_for(_read(reader), timeout)
        except Exception as e:  # noqa: BLE001 - every failure is an outcome the test asserts on
            out.append(Outcome(type(e).__name__, time.perf_counter() - t0))
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        out.append(Outcome(status, time.perf_counter() - t0, headers, body if keep_body or status != 200 else b""))
        if headers.get("connection", "").lower() == "close":
            writer.close()
            reader = writer = None
        if status in (429, 503) and backoff_shed:
            await asyncio.sleep(backoff_shed)
    if writer is not None:
        writer.close()


def drive(port: int, request: bytes, concurrency: int, seconds: float, max_requests: int, timeout: float = 10.0,
          backoff_shed: float = 0.0, keep_body: bool = False) -> list[Outcome]:
    """``concurrency`` connections send ``request`` back to back for ``seconds`` or ``max_requests``
    in all; a client that gets 429 or 503 waits ``backoff_shed`` seconds before its next request."""

    async def main():
        out: list[Outcome] = []
        stop_at = time.monotonic() + seconds
        budget = [max_requests]
        await asyncio.gather(*(_client(port, request, out, stop_at, budget, timeout, backoff_shed, keep_body)
                               for _ in range(concurrency)))
        return out

    return asyncio.run(main())


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
