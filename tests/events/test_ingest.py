"""POST /events: validation and limits (4xx naming the field), the stream entries it appends, the
stream's length and age bounds, and 503 + Retry-After when Redis is down (a real server)."""

from __future__ import annotations

import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.events import stream
from service.events.record import EventRecord, decode, stream_key
from tests.support.bundles import seed_features
from tests.support.http import error_of
from tests.support.redis_server import RedisProc


def ev(i: int = 0, **kw) -> dict:
    e = {"event_id": f"e{i}", "user_id": "u1", "item_id": "i3", "type": "click", "ts": 1764633600.5}
    e.update(kw)
    return e


def named(r: httpx.Response) -> tuple[str | None, str]:
    """(the field, the message) of a 4xx answer, checked to be in the one error shape."""
    err = error_of(r)
    return err.get("field"), err["message"]


@pytest.fixture
def client(ev_settings):
    with TestClient(create_app(ev_settings(events_max_batch=5, max_id_length=16)),
                    raise_server_exceptions=False) as c:
        yield c


def test_a_batch_is_appended_in_order_and_answered_202_with_counts(client, redis_url, key_prefix):
    batch = [ev(0), ev(1, type="watch", value=31.5, request_id="r-1"), ev(2, type="impression", user_id=42)]
    r = client.post("/events", json={"events": batch})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 3, "types": {"click": 1, "watch": 1, "impression": 1}}
    entries = redis.Redis.from_url(redis_url).xrange(stream_key(key_prefix))
    got = [decode(fields[b"e"]) for _, fields in entries]
    assert got == [EventRecord(**{**e, "user_id": str(e["user_id"])}) for e in batch]


@pytest.mark.parametrize("event, loc, words", [
    (ev(type="watch"), ["body", "events", 0, "value"], "needs value"),
    (ev(value=3.0), ["body", "events", 0, "value"], "watch events only"),
    (ev(type="watch", value=-1), ["body", "events", 0, "value"], "greater than or equal to 0"),
    (ev(type="like"), ["body", "events", 0, "type"], "impression"),
    (ev(user_id="u" * 17), ["body", "events", 0, "user_id"], "at most 16"),
    (ev(item_id=""), ["body", "events", 0, "item_id"], "at least 1"),
    (ev(event_id=1.5), ["body", "events", 0, "event_id"], ""),
    (ev(ts=-1), ["body", "events", 0, "ts"], "greater than or equal to 0"),
    (ev(ts="now"), ["body", "events", 0, "ts"], ""),
    (ev(request_id="has space"), ["body", "events", 0, "request_id"], ""),
    (ev(extra=1), ["body", "events", 0, "extra"], ""),
    ({k: v for k, v in ev().items() if k != "ts"}, ["body", "events", 0, "ts"], "required"),
])
def test_an_invalid_event_is_422_naming_its_field(client, redis_url, key_prefix, event, loc, words):
    r = client.post("/events", json={"events": [ev(9), event]})
    assert r.status_code == 422, r.text
    loc[2] = 1
    where, msg = named(r)
    assert where == ".".join(str(part) for part in loc[1:]), r.text
    assert words in msg
    assert redis.Redis.from_url(redis_url).exists(stream_key(key_prefix)) == 0, "nothing of the batch is appended"


def test_batch_limits_and_bodies(client):
    r = client.post("/events", json={"events": [ev(i) for i in range(6)]})
    assert r.status_code == 422 and named(r)[0] == "events", r.text
    assert "at most 5" in named(r)[1] and "events" in str(r.json())
    r = client.post("/events", json={"events": []})
    assert r.status_code == 422 and named(r)[0] == "events", r.text
    r = client.post("/events", content=b'{"events": [{"ts": NaN}]}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in named(r)[1]
    assert client.post("/events", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/events", json=[ev()]).status_code == 422
    assert client.get("/events").status_code == 405


def test_the_stream_is_bounded_by_length_and_age(tmp_path):
    # one entry per macro node: the approximate (~) trims are then exact
    proc = RedisProc(tmp_path / "r", args=("--stream-node-max-entries", "1")).start()
    try:
        c = proc.client()
        key = stream_key("p")
        stream.append(c, "p", [EventRecord(**ev(i)) for i in range(20)], maxlen=5, max_age_s=3600)
        assert c.xlen(key) == 5
        assert [decode(f[b"e"]).event_id for _, f in c.xrange(key)] == [f"e{i}" for i in range(15, 20)]
        time.sleep(0.05)
        ids = stream.append(c, "p", [EventRecord(**ev(99))], maxlen=100, max_age_s=0.03)
        assert [i for i, _ in c.xrange(key)] == ids, "older than the age bound: trimmed"
    finally:
        proc.stop()


def test_redis_down_is_503_with_retry_after_and_nothing_is_lost(tmp_path, key_prefix, ev_schema, ev_store,
                                                                   server_factory, ev_env):
    proc = RedisProc(tmp_path / "r").start()
    seed_features(proc.url, key_prefix, ev_schema)
    srv = server_factory(ev_env(MTRANK_REDIS_URL=proc.url, MTRANK_REDIS_TIMEOUT_MS=300))
    body = {"events": [ev(1), ev(2)]}
    try:
        assert httpx.post(f"{srv.base}/events", json=body, timeout=10).status_code == 202
        proc.kill()
        r = httpx.post(f"{srv.base}/events", json=body, timeout=10)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert "send the batch again" in r.text
        proc.start()  # no persistence: the stream restarts empty; the client's retry is what counts
        r = httpx.post(f"{srv.base}/events", json=body, timeout=10)
        assert r.status_code == 202, r.text
        assert proc.client().xlen(stream_key(key_prefix)) == 2
    finally:
        proc.stop()
