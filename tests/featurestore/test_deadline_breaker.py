"""FeatureStore against a real, test-owned redis-server that is paused, slept, killed and restarted:
each read costs at most the deadline, a timed-out connection is never reused, the breaker opens
after N failures, fails fast while open, probes at most once per period and closes within a
second of Redis answering; errors never show the password; the Ranker degrades (or, in fail
mode, raises)."""

from __future__ import annotations

import logging
import threading
import time

import orjson
import pytest
import redis

from service.features import namespace, user_key
from service.redis_client import StoreUnavailable, make_store
from service.settings import Settings
from tests.support.wait import wait_until
from tests.support.world import (
    RELAXED_DEADLINE_MS,
    assert_latencies,
    load_world,
    store_settings,
)

DEADLINE_S = 0.015


def reasons_of(store, keys, n, pause=0.0):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        try:
            store.mget(keys)
            out.append(("ok", time.perf_counter() - t))
        except StoreUnavailable as e:
            out.append((e.reason, time.perf_counter() - t))
        time.sleep(pause)
    return out


def mget_calls(client) -> int:
    return client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)




def test_mget_is_one_command_in_request_order(own_redis):
    r = own_redis()
    c = r.client()
    c.mset({f"k{i}": f"v{i}".encode() for i in range(600)})
    st = make_store(Settings(redis_url=r.url, redis_deadline_ms=RELAXED_DEADLINE_MS))
    try:
        keys = [f"k{i}" for i in range(599, -1, -3)] + ["absent", "k7"]
        before = mget_calls(c)
        assert st.mget(keys) == c.mget(keys)
        assert mget_calls(c) - before == 2  # ours + the reference
        assert st.state == "closed" and st.healthy and st.last_error is None
    finally:
        st.close()


@pytest.mark.parametrize("stall", ["client_pause", "debug_sleep"])
def test_stalled_redis_costs_the_deadline_then_fails_fast_then_recovers(own_redis, stall):
    r = own_redis(args=("--enable-debug-command", "yes"))
    c = r.client()
    c.mset({f"k{i}": b"x" * 40 for i in range(500)})
    keys = [f"k{i}" for i in range(500)]
    st = make_store(Settings(redis_url=r.url, redis_deadline_ms=DEADLINE_S * 1000, breaker_failures=3,
                             breaker_probe_s=0.2))
    try:
        assert st.mget(keys)[0] == b"x" * 40
        if stall == "client_pause":
            c.execute_command("CLIENT", "PAUSE", "2000")
            stall_s = 2.0
        else:
            r.debug_sleep(1)
            stall_s = 1.0
        t_stall = time.monotonic()
        got = reasons_of(st, keys, 12, pause=0.01)
        assert [g[0] for g in got[:3]] == ["timeout"] * 3, got
        assert {g[0] for g in got[3:]} == {"circuit_open"}, got
        assert_latencies([t for _, t in got], DEADLINE_S)
        fast = sorted(t for _, t in got[3:])  # open: no network at all
        assert fast[len(fast) // 2] < 0.001 and fast[-1] < DEADLINE_S / 2, fast
        assert st.state in ("open", "half_open") and not st.healthy
        assert "Timeout" in st.last_error
        # back: Redis answers again at t_stall + stall_s; the service must follow within a second
        assert wait_until(lambda: r.ping(), stall_s + 2)
        t_back = time.monotonic()
        assert wait_until(lambda: reasons_of(st, keys, 1)[0][0] == "ok", 1.0), st.breakers()
        assert time.monotonic() - t_back <= 1.0
        assert st.state == "closed" and st.healthy
        assert time.monotonic() - t_stall < stall_s + 1.5
    finally:
        st.close()


def test_timed_out_connection_is_never_reused_with_a_late_reply(own_redis):
    r = own_redis()
    c = r.client()
    c.mset({"a": b"A", "b": b"B"})
    st = make_store(Settings(redis_url=r.url, redis_deadline_ms=20, breaker_failures=1000))
    try:
        assert st.mget(["a"]) == [b"A"]  # one pooled connection, warm
        c.execute_command("CLIENT", "PAUSE", "300")
        with pytest.raises(StoreUnavailable) as e:
            st.mget(["a"])  # its reply [b"A"] arrives after the pause
        assert e.value.reason == "timeout" and isinstance(e.value, redis.RedisError)
        time.sleep(0.4)
        for _ in range(5):
            assert st.mget(["b"]) == [b"B"]
    finally:
        st.close()


def test_killed_redis_opens_the_breaker_and_a_restart_closes_it_within_a_second(own_redis, caplog):
    r = own_redis()
    r.client().set("k", b"v")
    r.snapshot()
    st = make_store(Settings(redis_url=r.url, breaker_failures=3, breaker_probe_s=0.2, redis_deadline_ms=100))
    try:
        assert st.mget(["k"]) == [b"v"]
        r.kill()
        with caplog.at_level(logging.WARNING, logger="service.redis_client"):
            got = reasons_of(st, ["k"], 6)
            assert [g[0] for g in got] == ["down"] * 3 + ["circuit_open"] * 3, got
            assert_latencies([t for _, t in got], 0.1)
            time.sleep(0.5)  # a few probe periods: still one probe thread, still open
            assert len([t for t in threading.enumerate() if t.name.startswith("mtrank-breaker-")]) == 1
            assert st.state in ("open", "half_open") and "refused" in st.last_error.lower()
            r.start()
            t_back = time.monotonic()
            assert wait_until(lambda: reasons_of(st, ["k"], 1)[0][0] == "ok", 1.0)
            assert time.monotonic() - t_back <= 1.0
            assert st.mget(["k"]) == [b"v"]  # from the snapshot
        opened = [x for x in caplog.records if "circuit open" in x.getMessage()]
        closed = [x for x in caplog.records if "circuit closed" in x.getMessage()]
        assert len(opened) == 1 and len(closed) == 1
        assert wait_until(lambda: not any(t.name.startswith("mtrank-breaker-") for t in threading.enumerate()), 1)
    finally:
        st.close()


def test_concurrent_readers_share_one_breaker_and_one_probe(own_redis):
    r = own_redis()
    r.client().mset({f"k{i}": b"v" for i in range(50)})
    r.snapshot()
    st = make_store(Settings(redis_url=r.url, breaker_failures=3, breaker_probe_s=0.1))
    keys = [f"k{i}" for i in range(50)]
    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    lock = threading.Lock()

    def reader():
        while not stop.is_set():
            t = time.perf_counter()
            try:
                st.mget(keys)
                out = "ok"
            except StoreUnavailable as e:
                out = e.reason
            except Exception as e:  # anything else is a bug
                out = f"BUG {type(e).__name__}: {e}"
            with lock:
                seen.append((time.perf_counter() - t, out))
            time.sleep(0.002)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.2)
        r.kill()
        time.sleep(0.5)
        probes = [t for t in threading.enumerate() if t.name.startswith("mtrank-breaker-")]
        assert len(probes) == 1 and st.state in ("open", "half_open")
        r.start()
        t_back = time.monotonic()
        assert wait_until(lambda: st.state == "closed", 1.0)
        recovered = time.monotonic() - t_back
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        st.close()
    outcomes = {o for _, o in seen}
    assert not [o for o in outcomes if o.startswith("BUG")], outcomes
    assert outcomes <= {"ok", "down", "circuit_open", "timeout"} and {"ok", "circuit_open"} <= outcomes
    assert_latencies([t for t, _ in seen], DEADLINE_S)
    assert recovered <= 1.0 and "ok" in [o for _, o in seen[-12:]]


def test_password_never_in_errors(own_redis, caplog):
    pw = "s3cr3t-Pa55"
    r = own_redis(args=("--requirepass", pw))
    url = f"redis://:{pw}@127.0.0.1:{r.port}/0"
    st = make_store(Settings(redis_url=url, breaker_failures=2, redis_deadline_ms=RELAXED_DEADLINE_MS))
    try:
        st.client.set("k", b"v")
        assert st.mget(["k"]) == [b"v"]
        r.kill()
        with caplog.at_level(logging.DEBUG):
            errs = []
            for _ in range(4):
                with pytest.raises(StoreUnavailable) as e:
                    st.mget(["k"])
                errs.append(str(e.value))
        assert st.last_error and pw not in st.last_error
        assert not any(pw in x for x in errs)
        assert not any(pw in rec.getMessage() for rec in caplog.records)
        assert pw not in str(st.breakers())
    finally:
        st.close()


def test_ranker_degrades_or_fails_by_mode(own_redis, world, rig):
    r = own_redis()
    load_world(world, r.client(), "deg")
    healthy_rig = rig(store_settings(r.url, "deg", world))
    fail_rig = rig(store_settings(r.url, "deg", world, redis_failure_mode="fail"))
    user, items = world.users[0], world.items[:40]
    ok = healthy_rig.rank(user, items)
    assert ok.degraded is None and not ok.user_missing and ok.items_missing == 0
    assert b'"degraded":false,"degraded_reason":null' in ok.body
    assert fail_rig.rank(user, items).degraded is None
    r.kill()
    res = healthy_rig.rank(user, items + ["never-seen"])
    assert res.degraded == "down" and b'"degraded":true,"degraded_reason":"down"' in res.body
    assert res.user_missing and res.items_from_cache == 40 and res.items_missing == 1
    assert res.n_returned == 41
    with pytest.raises(StoreUnavailable) as e:
        fail_rig.rank(user, items)
    assert e.value.reason == "down" and isinstance(e.value, redis.RedisError)


def test_degraded_ranking_uses_cached_items_and_defaults(own_redis, world, rig):
    """With Redis gone, the scores of cached items are the healthy ones (given the default user);
    items never cached get the defaults."""
    r = own_redis()
    load_world(world, r.client(), "cache")
    s = store_settings(r.url, "cache", world)
    rg = rig(s)
    items = world.items[:30]
    rg.rank(world.users[1], items)  # fills the cache
    c = r.client()
    ns = namespace("cache", rg.ranker.bundle.manifest.feature_schema)
    # the same request for a user without features, healthy: the reference
    c.delete(user_key(ns, "nobody"))
    want = rg.rank("nobody", items + ["not-an-item"])  # an unknown item: the default item features
    r.kill()
    got = rg.rank("nobody", items + [world.items[101]])  # known, but never read: defaults too
    assert got.degraded == "down" and got.items_from_cache == 30 and got.items_missing == 1
    assert want.degraded is None and want.items_missing == 1
    w = {x["item_id"]: x["scores"] for x in orjson.loads(want.body)["items"]}
    g = {x["item_id"]: x["scores"] for x in orjson.loads(got.body)["items"]}
    for i in items:
        assert g[i] == pytest.approx(w[i], rel=1e-6)
    assert g[world.items[101]] == pytest.approx(w["not-an-item"], rel=1e-6)


def test_ranker_loop_through_kill_and_restart(own_redis, world, rig):
    """Ranker.rank_result in a steady two-thread loop while Redis is killed and restarted on the
    same port: no exception, every rank within the deadline plus slack, degraded while down,
    normal (same scores, from the snapshot) within a second of Redis answering."""
    r = own_redis()
    load_world(world, r.client(), "loop")
    r.snapshot()
    rg = rig(store_settings(r.url, "loop", world, redis_deadline_ms=DEADLINE_S * 1000))
    items = world.items[:100]
    want = orjson.loads(rg.rank(world.users[4], items).body)["items"]
    recs, errors, stop, lock = [], [], threading.Event(), threading.Lock()

    def loop():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                res = rg.rank(world.users[4], items)
            except Exception as e:  # must never happen
                errors.append(repr(e))
                continue
            with lock:
                # bytes only: keeping thousands of parsed bodies would make the GC pause the loop
                recs.append((t0, time.monotonic(), res.degraded, res.body))
            time.sleep(0.002)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        t_kill = time.monotonic()
        r.kill()
        time.sleep(0.8)
        t_restart = time.monotonic()
        r.start()
        t_back = time.monotonic()
        time.sleep(1.4)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert not errors, errors[:3]
    assert_latencies([x[1] - x[0] for x in recs], DEADLINE_S)
    down = [x for x in recs if x[0] > t_kill + 0.01 and x[1] < t_restart]
    assert len(down) > 20 and all(x[2] is not None for x in down)
    first_ok = min(x[1] for x in recs if x[0] >= t_back and x[2] is None)
    assert first_ok - t_back <= 1.0
    tail = [x for x in recs if x[0] > t_back + 1.0]
    late = [x for x in tail if x[2] is not None]  # a healthy Redis missing 15 ms on this loaded box
    assert tail and len(late) <= 0.05 * len(tail), [x[2] for x in late]
    assert all(orjson.loads(x[3])["items"] == want for x in tail if x[2] is None)
