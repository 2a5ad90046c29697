"""Issue 7, prediction logs: sampled ranked requests land in a Redis Stream off the hot path and
``mtrank logs export`` writes them to Parquet; an unwritable or hung stream never slows or fails
/rank (records are dropped and counted instead)."""

import subprocess
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from service.predlog import PredictionLog, encode, pseudonym
from service.settings import Settings
from tests.support.http import metric, scrape
from tests.support.ports import free_port
from tests.support.server import MTRANK
from tests.support.wait import wait_for

KEY = "predlog-test-key-0123456789abcdef"




def export(redis_url: str, stream: str, out, *args: str) -> str:
    r = subprocess.run([MTRANK, "logs", "export", "--out", str(out), "--stream", stream, "--redis-url", redis_url,
                        *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
def test_records_reach_the_stream_and_export_to_parquet(env_for, serve_factory, redis_url, key_prefix, tmp_path):
    stream = f"{key_prefix}:predictions"
    srv = serve_factory(env_for(MTRANK_PREDLOG_RATE=1, MTRANK_PREDLOG_STREAM=stream, MTRANK_PREDLOG_MAXLEN=1000,
                                MTRANK_PSEUDONYM_KEY=KEY))
    rdb = redis.Redis.from_url(redis_url)
    sent = []
    with httpx.Client(base_url=srv.base, timeout=10) as c:
        for k in range(12):
            body = {"user_id": f"u{k % 3}", "items": [f"i{(k + j) % 10}" for j in range(5)] + ["nope"],
                    "top_k": 4, "request_id": f"pl-{k}"}
            r = c.post("/rank", json=body)
            assert r.status_code == 200
            sent.append((body, r.json()))
            if k == 5:
                wait_for(lambda: rdb.xlen(stream) == 6, what="the first six records")
                middle = rdb.xrange(stream)[-1][0].decode()
    wait_for(lambda: rdb.xlen(stream) == 12, what="twelve records")
    out = tmp_path / "pred.parquet"
    assert "wrote 12 rows" in export(redis_url, stream, out)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 12
    for row, (body, resp) in zip(rows, sent, strict=True):
        assert row["request_id"] == body["request_id"]
        assert row["user_pseudonym"] == pseudonym(KEY.encode(), body["user_id"])
        assert row["variant"] == "default" and row["model"] == "demo" and row["version"] == 1
        assert row["precision"] == "fp32" and row["forced"] is False and row["has_features"] is False
        assert row["n_candidates"] == 6 and row["bucket"] == resp["bucket"] and row["degraded"] is None
        assert row["items"] == body["items"]  # every candidate, request order
        ranked = [it["item_id"] for it in resp["items"]]
        assert [row["items"][i] for i in row["top"]] == ranked  # the returned ones, rank order
        assert [row["score"][i] for i in row["top"]] == [it["score"] for it in resp["items"]]
        scores = dict(row["scores"])
        assert set(scores) == {"ctr", "cvr", "watch_time"}
        for task, values in scores.items():  # float32 model outputs: the log writes their shortest exact form
            assert len(values) == 6
            assert np.array([values[i] for i in row["top"]], dtype=np.float32).tolist() == \
                np.array([it["scores"][task] for it in resp["items"]], dtype=np.float32).tolist()
        assert abs(row["ts"].timestamp() * 1000 - int(row["stream_id"].split("-")[0])) < 5000
    # --since (inclusive) a stream id, read in pages of 2 (exclusive resumption between pages)
    later = tmp_path / "later.parquet"
    assert "wrote 7 rows" in export(redis_url, stream, later, "--since", middle, "--page", "2")
    assert [r["request_id"] for r in pq.read_table(later).to_pylist()] == [f"pl-{k}" for k in range(5, 12)]
    # --until in unix ms before everything: an empty file with the same columns
    empty = tmp_path / "empty.parquet"
    assert "wrote 0 rows" in export(redis_url, stream, empty, "--until", "1000")
    assert pq.read_table(empty).schema == pq.read_table(out).schema
    m = scrape(srv.base)
    assert metric(m, "mtrank_predlog_written_total") == 12 and metric(m, "mtrank_predlog_dropped_total") == 0


def test_sampling_rate(env_for, serve_factory, redis_url, key_prefix):
    stream = f"{key_prefix}:sampled"
    srv = serve_factory(env_for(MTRANK_PREDLOG_RATE=0.25, MTRANK_PREDLOG_STREAM=stream, MTRANK_PSEUDONYM_KEY=KEY))
    with httpx.Client(base_url=srv.base, timeout=10) as c:
        for _ in range(300):
            assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).status_code == 200
    rdb = redis.Redis.from_url(redis_url)
    wait_for(lambda: metric(scrape(srv.base), "mtrank_predlog_written_total") == rdb.xlen(stream), what="writer")
    time.sleep(0.5)
    n = rdb.xlen(stream)
    assert 40 <= n <= 110, n  # binomial(300, 0.25): mean 75, sd 7.5


def test_unwritable_or_hung_stream_never_slows_rank(env_for, serve_factory, redis_url, key_prefix):
    stream = f"{key_prefix}:broken"
    rdb = redis.Redis.from_url(redis_url)
    rdb.set(stream, "not a stream")  # every XADD fails with WRONGTYPE
    srv = serve_factory(env_for(MTRANK_PREDLOG_RATE=1, MTRANK_PREDLOG_STREAM=stream, MTRANK_REDIS_TIMEOUT_MS=3000,
                                MTRANK_PSEUDONYM_KEY=KEY))
    body = {"user_id": "u0", "items": [f"i{k % 10}" for k in range(200)]}

    def timed(c, n):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.post("/rank", json=body).status_code == 200
            out.append(time.perf_counter() - t0)
        return out

    with httpx.Client(base_url=srv.base, timeout=10) as c:
        broken = timed(c, 100)
        wait_for(lambda: metric(scrape(srv.base), "mtrank_predlog_dropped_total", reason="redis") > 0,
                 what="drops counted")
        assert rdb.type(stream) == b"string"
        # a hung stream: Redis refuses writes for 2 s (CLIENT PAUSE WRITE); feature reads go on, every
        # XADD waits; /rank must not
        rdb.delete(stream)
        rdb.execute_command("CLIENT", "PAUSE", 2000, "WRITE")
        hung = timed(c, 60)
    assert max(hung) < 0.5, f"slowest /rank {max(hung) * 1e3:.0f} ms while XADD hung for 2 s"
    m = scrape(srv.base)
    assert metric(m, "mtrank_rank_requests_total", status=200) == 160
    print(f"/rank p50 {sorted(broken)[50] * 1e3:.1f} ms with a WRONGTYPE stream, max {max(hung) * 1e3:.0f} ms "
          f"with a paused one")


def ranked(user_id: str = "u", items=("a",)):
    """A RankRequest, a Route and a RankResult as /rank hands them to the prediction log."""
    import numpy as np

    from service.ranking import RankResult
    from service.schemas import RankRequest

    request = RankRequest(user_id=user_id, items=list(items), top_k=1, request_id="r1", context={"hour": 3})
    n = len(items)
    fused = np.linspace(0.1, 0.9, n)
    result = RankResult(body=b'{"request_id":"r1","items":[]}', request_id="r1", n_items=n, n_returned=1,
                        user_missing=False, items_missing=0, items_corrupt=0, degraded="timeout",
                        scored=({"ctr": fused / 2, "cvr": fused / 4}, fused, ([b"U" * 8], [b"I" * 4] * n)))
    bundle = SimpleNamespace(name="m", version=2, precision="int8")
    route = SimpleNamespace(variant=SimpleNamespace(name="v", ranker=SimpleNamespace(bundle=bundle)), bucket=7,
                            forced=True)
    return request, route, result


def test_offer_never_blocks_when_redis_is_down():
    s = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_ms=200, predlog_rate=1.0,
                 predlog_stream="s", pseudonym_key=KEY)
    plog = PredictionLog(s, queue_records=100).start()
    request, route, result = ranked()
    worst = 0.0
    before = metric(scrape_local(), "mtrank_predlog_dropped_total")
    for _ in range(20_000):
        t0 = time.perf_counter()
        plog.offer(request, route, result)
        worst = max(worst, time.perf_counter() - t0)
    t0 = time.monotonic()
    plog.close(timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    assert worst < 0.05, f"one offer took {worst * 1e3:.1f} ms"
    dropped = metric(scrape_local(), "mtrank_predlog_dropped_total") - before
    assert dropped >= 20_000 - 100  # queue_full and redis: everything, minus at most what was in the queue


def test_no_key_no_log():
    with pytest.raises(ValueError, match="MTRANK_PSEUDONYM_KEY"):
        PredictionLog(Settings(predlog_rate=0.5, pseudonym_key=None))
    with pytest.raises(ValueError, match="pseudonym_key"):
        Settings(pseudonym_key="short")


def test_queue_and_stream_are_bounded_by_bytes(redis_url, key_prefix):
    stream = f"{key_prefix}:bytes"
    s = Settings(redis_url=redis_url, predlog_rate=1.0, predlog_stream=stream, pseudonym_key=KEY,
                 predlog_max_bytes=1 << 16, predlog_queue_bytes=1 << 16, predlog_features_rate=1)
    request, route, result = ranked(items=[f"item-{i}" for i in range(100)])
    # the queue: a writer that is not running holds at most queue_bytes of records
    idle = PredictionLog(s)
    taken = sum(idle.offer(request, route, result) for _ in range(1000))
    assert 0 < taken < 1000 and idle._held <= 1 << 16
    # the stream: MAXLEN ~ max_bytes / mean record size
    plog = PredictionLog(s).start()
    for _ in range(40):
        for _ in range(50):
            plog.offer(request, route, result)
        time.sleep(0.02)
    plog.close(timeout=10)
    rdb = redis.Redis.from_url(redis_url)
    mean = sum(len(f[b"r"]) for _, f in rdb.xrange(stream)) / rdb.xlen(stream)
    assert plog.stream_maxlen() == int((1 << 16) / mean)
    # MAXLEN ~ trims whole stream nodes (stream-node-max-entries, 100 by default): at most one node more
    assert rdb.xlen(stream) <= plog.stream_maxlen() + 100 < 2000


def scrape_local() -> dict:
    from prometheus_client import REGISTRY
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in REGISTRY.collect() for s in fam.samples}


def test_record_holds_every_candidate_and_no_raw_user_id():
    import orjson

    request, route, result = ranked("alice@example.org", items=["a", "b", "c"])
    rec = orjson.loads(encode(1700000000.5, request, route.variant.name, route.bucket, route.forced,
                              route.variant.ranker.bundle, result, True, key=KEY.encode()))
    assert rec == {"v": 2, "ts": 1700000000500, "rid": "r1", "user": pseudonym(KEY.encode(), "alice@example.org"),
                   "variant": "v", "bucket": 7, "forced": True, "model": "m", "version": 2, "precision": "int8",
                   "n": 3, "degraded": "timeout", "items": ["a", "b", "c"], "score": [0.1, 0.5, 0.9],
                   "scores": {"ctr": [0.05, 0.25, 0.45], "cvr": [0.025, 0.125, 0.225]}, "top": [2],
                   "context": {"hour": 3}, "features": {"user": "VVVVVVVVVVU=", "items": ["SUlJSQ=="] * 3}}
    assert len(rec["user"]) == 32 and "alice" not in str(rec)
    # another key, another pseudonym
    assert pseudonym(b"another-key-0123456789", "alice@example.org") != rec["user"]
