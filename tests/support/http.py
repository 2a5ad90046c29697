"""A raw-socket HTTP/1.1 exchange (for what httpx will not send: chunked uploads, lying
Content-Length, bytes that are not UTF-8) and Prometheus scrapes."""

from __future__ import annotations

import json
import socket

import httpx


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One response from ``sock``: (status, lower-cased headers, body by Content-Length)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:n]


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line + headers, without the blank line) and ``body``; read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        return read_response(s, timeout)


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """``GET /metrics`` parsed: (sample name, sorted label items) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:500]
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = {k: str(v) for k, v in labels.items()}
    return sum(v for (n, lab), v in samples.items() if n == name and want.items() <= dict(lab).items())


ERROR_KEYS = {"code", "message", "field", "details"}


def error_of(r, status: int | None = None) -> dict:
    """The ``error`` of a non-2xx answer (an httpx/TestClient response, or ``(status, headers, body)``
    from :func:`raw_request`), after checking the one error shape: ``{"error": {"code", "message",
    "field"?, "details"?}, "request_id"}``, the request id also in ``X-Request-Id``, ``Retry-After``
    on 429/503."""
    if isinstance(r, tuple):
        code, headers, body = r
    else:
        code, headers, body = r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content
    assert code >= 400 and (status is None or code == status), (code, body[:300])
    doc = json.loads(body)
    assert isinstance(doc.get("error"), dict) and isinstance(doc.get("request_id"), str), doc
    err = doc["error"]
    assert {"code", "message"} <= err.keys() <= ERROR_KEYS, err
    assert doc["request_id"] == headers.get("x-request-id"), (doc["request_id"], headers.get("x-request-id"))
    if code in (429, 503):
        assert headers.get("retry-after", "").isdigit(), headers
    return err
