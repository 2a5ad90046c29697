"""Issue 7 structured logs and issue 6 secrets: every line of ``mtrank serve`` is JSON; the /rank
access line carries the request id, variant, bucket, model, status, items, timings and degraded;
the request id is taken from X-Request-Id (when usable), else the body, else generated, and echoed
on every response; the Redis password and the admin token appear in no log line, response or
header - with Redis up, with a wrong token, and with Redis gone."""

import io
import json
import logging
import re
import threading
import time

import httpx
import pytest

from service.access_log import JsonFormatter, TextFormatter, register_secrets
from tests.support.bundles import seed_features
from tests.support.redis_server import RedisProc

PASSWORD = "hunter2-Pa55w0rd"
TOKEN = "admin-T0ken-s3cr3t"
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test only, with a password."""
    redis_proc = RedisProc(tmp_path, password=PASSWORD).start()
    yield redis_proc.url, redis_proc.proc
    redis_proc.stop()


def test_json_logs_request_ids_and_no_secrets(private_redis, key_prefix, schema, env_for, serve_factory):
    url, redis_proc = private_redis
    seed_features(url, key_prefix, schema)
    env = env_for(MTRANK_REDIS_URL=url, MTRANK_ADMIN_TOKEN=TOKEN, MTRANK_LOG_FORMAT="json", MTRANK_STORE_POLL_S=0.3,
                  MTRANK_MAX_BODY_BYTES=2048, MTRANK_REDIS_TIMEOUT_MS=300)
    srv = serve_factory(env)
    seen: list[str] = []

    def call(method, path, **kw) -> httpx.Response:
        r = httpx.request(method, f"{srv.base}{path}", timeout=10, **kw)
        seen.append(r.text + json.dumps(dict(r.headers)))
        assert r.status_code < 500 or path == "/readyz" or r.status_code == 503, (path, r.status_code, r.text)
        assert r.headers.get("x-request-id"), (path, r.status_code)  # on every response
        return r

    ok = call("POST", "/rank", json={"user_id": "u0", "items": ["i1", "i2", "zz"], "top_k": 2},
              headers={"X-Request-Id": "trace-abc-123"})
    assert ok.headers["x-request-id"] == "trace-abc-123" and ok.json()["request_id"] == "trace-abc-123"
    r = call("POST", "/rank", json={"user_id": "u0", "items": ["i1"], "request_id": "body-rid-1"})
    assert r.headers["x-request-id"] == "body-rid-1" == r.json()["request_id"]
    r = call("POST", "/rank", json={"user_id": "u0", "items": ["i1"], "request_id": "body-rid-2"},
             headers={"X-Request-Id": "hdr-wins"})
    assert r.headers["x-request-id"] == "hdr-wins" == r.json()["request_id"]
    r = call("POST", "/rank", json={"user_id": "u0", "items": ["i1"]})
    assert HEX32.fullmatch(r.headers["x-request-id"]) and r.headers["x-request-id"] == r.json()["request_id"]
    for bad in ("has space", "x" * 129, "\u00e9t\u00e9".encode()):
        r = call("POST", "/rank", json={"user_id": "u0", "items": ["i1"]}, headers={"X-Request-Id": bad})
        assert r.status_code == 200 and HEX32.fullmatch(r.headers["x-request-id"]), bad
    for method, path, kw, status in [
        ("POST", "/rank", {"json": {"user_id": "u0", "items": []}}, 422),
        ("POST", "/rank", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
        ("POST", "/rank", {"json": {"user_id": "u0", "items": ["i1"] * 600}}, 413),
        ("GET", "/nope", {}, 404), ("GET", "/healthz", {}, 200), ("GET", "/readyz", {}, 200),
        ("GET", "/models", {}, 200), ("GET", "/metrics", {}, 200), ("GET", "/openapi.json", {}, 200),
        ("GET", "/admin/models", {}, 401),
        ("GET", "/admin/models", {"headers": {"Authorization": "Bearer wrong"}}, 403),
        ("GET", "/admin/models", {"headers": {"Authorization": f"Bearer {TOKEN}"}}, 200),
        ("POST", "/admin/models/load", {"json": {"name": "demo", "version": 9},
                                         "headers": {"Authorization": f"Bearer {TOKEN}"}}, 404),
    ]:
        rid = f"rid-{len(seen)}"
        r = call(method, path, headers={**kw.pop("headers", {}), "X-Request-Id": rid}, **kw)
        assert r.status_code == status and r.headers["x-request-id"] == rid, (path, r.status_code, r.text[:200])
    # Redis goes away: readiness (still ready in degrade mode) says why, with the URL redacted;
    # errors are logged (watcher, requests)
    redis_proc.terminate()
    redis_proc.wait(10)
    r = call("GET", "/readyz")
    assert r.status_code == 200 and r.json()["degraded"] is True and ":***@127.0.0.1" in r.text
    call("POST", "/rank", json={"user_id": "u0", "items": ["i1"]})
    time.sleep(1.0)  # a few failed watcher polls
    call("GET", "/models")
    assert srv.stop() == 0
    log = srv.log()

    # no secret anywhere
    for text in [log, *seen]:
        assert PASSWORD not in text and TOKEN not in text
    assert ":***@127.0.0.1" in log  # the redacted URL is what gets logged
    # every line is one JSON object
    lines = [json.loads(x) for x in log.splitlines() if x.strip()]
    assert len(lines) > 10
    for rec in lines:
        assert {"timestamp", "level", "logger", "message", "pid"} <= rec.keys(), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", rec["timestamp"])
    assert any(rec["logger"].startswith("uvicorn") for rec in lines)  # uvicorn's own lines too
    access = {rec["request_id"]: rec for rec in lines if rec["logger"] == "service.access"}
    a = access["trace-abc-123"]
    assert a["message"] == "rank" and a["status"] == 200 and a["variant"] == "default"
    assert isinstance(a["bucket"], int) and a["model"] == {"name": "demo", "version": 1}
    assert a["n_items"] == 3 and a["n_returned"] == 2 and a["missing_items"] == 1 and a["degraded"] is False
    assert set(a["ms"]) == {"fetch", "assemble", "inference", "fusion", "serialise", "total"}
    assert a["duration_ms"] >= a["ms"]["total"] > 0
    errors = [rec for rec in lines if rec["logger"] == "service.access" and rec["status"] in (413, 415, 422)]
    assert {rec["status"] for rec in errors} == {413, 415, 422}
    assert all(rec["error"] for rec in errors)


def test_formatters_and_the_secret_guard():
    register_secrets("pw-in-a-message-XYZ")
    logger = logging.getLogger("tests.http.formatters")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    logger.addHandler(h)
    try:
        for fmt in (JsonFormatter(), TextFormatter()):
            h.setFormatter(fmt)
            logger.info("connecting with %s", "pw-in-a-message-XYZ", extra={"fields": {"request_id": "r-1", "n": 3}})
            try:
                raise ValueError("boom pw-in-a-message-XYZ")
            except ValueError:
                logger.exception("failed")
    finally:
        logger.removeHandler(h)
    out = buf.getvalue()
    assert "pw-in-a-message-XYZ" not in out and out.count("***") >= 4
    first, second = [json.loads(x) for x in out.splitlines()[:1]] + [None]
    assert first["message"] == "connecting with ***" and first["request_id"] == "r-1" and first["n"] == 3
    assert first["level"] == "INFO" and first["logger"] == "tests.http.formatters"
    assert "INFO tests.http.formatters: connecting with ***" in out and '{"request_id":"r-1","n":3}' in out
    assert "ValueError: boom ***" in out


def test_unexpected_error_is_500_with_the_request_id(app_client, caplog):
    """A fault inside the model run (injected: the session's run raises) -> 500 that names the request
    id in the body and the header; logged with the traceback; counted in the access line."""
    with app_client() as c:
        def boom(inputs):
            raise RuntimeError("kaboom")

        c.app.state.mtrank.bundle.run = boom
        with caplog.at_level(logging.INFO):
            r = c.post("/rank", json={"user_id": "u0", "items": ["i1"]}, headers={"X-Request-Id": "rid-500"})
            assert c.get("/healthz").status_code == 200
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal_error", "message": "internal error"},
                                                 "request_id": "rid-500"}
    assert r.headers["x-request-id"] == "rid-500" and "kaboom" not in r.text
    err = [x for x in caplog.records if x.levelno == logging.ERROR and "rid-500" in x.getMessage()]
    assert err and err[0].exc_info is not None
    access = [x.fields for x in caplog.records if x.name == "service.access"]
    assert access[-1]["status"] == 500 and access[-1]["error"] == "RuntimeError"


def test_access_lines_never_block_the_loop_keep_order_and_are_flushed(app_client):
    """Issue 14 item 7: the access lines go through a queue. A log stream that blocks (a handler
    stuck like a write to a full pipe) does not hold /rank up: the answers come back while nothing
    is written; released, every line is written in request order, all of them by the shutdown."""
    gate = threading.Event()
    written: list[str] = []

    class Stuck(logging.Handler):
        def emit(self, record):
            if record.name == "service.access":
                gate.wait(60)
                written.append(record.fields["request_id"])

    stuck = Stuck()
    root = logging.getLogger()
    root.addHandler(stuck)
    n = 20
    try:
        with app_client() as c:
            answered: list[int] = []

            def send():
                for i in range(n):
                    answered.append(c.post("/rank", json={"user_id": "u0", "items": ["i1"]},
                                           headers={"X-Request-Id": f"q-{i}"}).status_code)

            t = threading.Thread(target=send, daemon=True)
            t.start()
            t.join(60)
            assert answered == [200] * n and written == []  # answered while the stream was stuck
            gate.set()
        assert written == [f"q-{i}" for i in range(n)]  # all written by the shutdown, in order
    finally:
        gate.set()
        root.removeHandler(stuck)
