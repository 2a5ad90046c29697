"""Issue 15 item 5, pseudonymisation: with the prediction log on (every request, features too, on
its own Redis), the raw user ids appear nowhere in either Redis - no key, no value, no stream
entry - nor in the server's log; the log holds the keyed pseudonym the readout can recompute, and
forced-variant traffic is flagged in the log, the access line and the metrics. Without a key the
service refuses to start."""

from __future__ import annotations

import httpx
import orjson
import pytest
import redis

from service.predlog import pseudonym
from tests.support.http import metric, scrape
from tests.support.readout import KEY
from tests.support.redis_server import RedisProc
from tests.support.server import Server
from tests.support.wait import wait_for

RAW = ["alice.liddell+7731@example.org", "bob-the-builder-55170", "u1"]  # u1: a user with features in Redis
CONFIG = ("salt: pseud\nallow_force: true\nvariants:\n  - {name: A, percent: 50, model: {name: demo}}\n"
          "  - {name: B, percent: 50, model: {name: demo}}\n")


def everything(client: redis.Redis) -> bytes:
    """Every key and every value of a Redis, whatever its type, as one blob."""
    out = []
    for key in client.scan_iter(count=1000):
        out.append(key)
        kind = client.type(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"stream":
            for entry_id, fields in client.xrange(key):
                out += [entry_id, *fields.keys(), *fields.values()]
        elif kind == b"hash":
            for k, v in client.hgetall(key).items():
                out += [k, v]
        elif kind == b"list":
            out += client.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"zset":
            out += client.zrange(key, 0, -1)
    return b"\n".join(out)


def test_raw_user_ids_appear_nowhere(readout_env, serve, redis_url, key_prefix, tmp_path):
    own = RedisProc(tmp_path / "predlog-redis").start()
    try:
        cfg = tmp_path / "routing.yaml"
        cfg.write_text(CONFIG)
        srv = serve(readout_env(MTRANK_PREDLOG_REDIS_URL=own.url, MTRANK_PREDLOG_FEATURES_RATE=1,
                                MTRANK_ROUTING_CONFIG=str(cfg), MTRANK_LOG_LEVEL="debug"))
        with httpx.Client(base_url=srv.base, timeout=30) as c:
            for k in range(30):
                headers = {"X-Mtrank-Variant": "B"} if k % 10 == 0 else {}
                r = c.post("/rank", json={"user_id": RAW[k % 3], "items": ["i1", "i2", "i3"], "context": {"hour": 7}},
                           headers=headers)
                assert r.status_code == 200
        log_client = own.client()
        wait_for(lambda: log_client.xlen(f"{key_prefix}:predictions") == 30, what="30 records in the predlog Redis")
        main = redis.Redis.from_url(redis_url)
        assert main.exists(f"{key_prefix}:predictions") == 0  # its own Redis
        blobs = {"predlog redis": everything(log_client), "main redis": everything(main)}
        m = scrape(srv.base)
    finally:
        own.stop()
    srv.stop()
    blobs["server log"] = srv.log_path.read_bytes()
    for raw in RAW[:2]:
        for where, blob in blobs.items():
            assert raw.encode() not in blob, f"raw user id {raw!r} found in the {where}"
    # "u1" is also a feature-store key of the main Redis (by design: the features are keyed by id);
    # it must not be in the prediction log or the server log
    assert b'"u1"' not in blobs["predlog redis"] and b'"u1"' not in blobs["server log"]
    assert KEY.encode() not in blobs["server log"]
    records = [orjson.loads(v) for v in blobs["predlog redis"].split(b"\n") if v.startswith(b'{"v":2')]
    assert len(records) == 30
    assert {r["user"] for r in records} == {pseudonym(KEY.encode(), u) for u in RAW}
    assert sum(r["forced"] for r in records) == 3 and all(r["variant"] == "B" for r in records if r["forced"])
    assert all(len(r["features"]["items"]) == 3 for r in records)
    lines = [orjson.loads(line) for line in blobs["server log"].splitlines() if line.startswith(b"{")]
    access = [x for x in lines if x.get("message") == "rank"]
    assert sum(x.get("forced") is True for x in access) == 3
    assert metric(m, "mtrank_rank_forced_total", variant="B") == 3


def test_the_service_refuses_to_log_without_a_key(readout_env, tmp_path):
    env = readout_env()
    env.pop("MTRANK_PSEUDONYM_KEY")
    srv = Server(env, tmp_path / "nokey.log", (), cli=True)
    with pytest.raises(RuntimeError, match="MTRANK_PSEUDONYM_KEY"):
        srv.start(timeout=60)
    srv.stop()
