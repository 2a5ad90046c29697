"""The in-process item cache: TTL and size bounds (with a fake clock), tags refusing stale puts,
the cost of 500 lookups, and in the fetcher: one MGET with only the uncached items, hits
counted, and invalidation by a real ``mtrank features load`` (the loader rewrites the meta key)."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from service.features import FeatureFetcher, item_key, namespace
from service.item_cache import ItemCache
from service.redis_client import make_store
from service.store import load_bundle
from tests.support.world import load_world, store_settings


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_ttl_bounds_every_entry_lifetime():
    clock = Clock()
    c = ItemCache(size=1000, ttl_s=10.0, clock=clock)
    c.retag("g1")
    for step in range(40):  # insert one item every 0.5 s, check every item's age at every step
        clock.t += 0.5
        c.put([(f"i{step}", b"v")], "g1")
        born = {f"i{k}": 1000.0 + 0.5 * (k + 1) for k in range(step + 1)}
        got = c.get_many(list(born))
        for (i, t0), v in zip(born.items(), got, strict=True):
            age = clock.t - t0
            if age > 10.0:
                assert v is None, (i, age)  # never older than the ttl
            elif age < 5.0:
                assert v == b"v", (i, age)  # kept at least ttl/2 without size pressure


def test_long_idle_drops_everything():
    clock = Clock()
    c = ItemCache(size=100, ttl_s=2.0, clock=clock)
    c.retag("g")
    c.put([("a", b"1")], "g")
    clock.t += 0.9
    c.put([("b", b"2")], "g")
    clock.t += 2.05  # "b" is 2.05 s old
    assert c.get_many(["a", "b"]) == [None, None]


def test_size_bound_and_bulk_eviction_keeps_the_recent():
    c = ItemCache(size=1000, ttl_s=600)
    c.retag("g")
    for k in range(0, 10_000, 100):
        c.put([(f"i{j}", b"v") for j in range(k, k + 100)], "g")
        assert len(c) <= 1000
    got = c.get_many([f"i{j}" for j in range(9_500, 10_000)])
    assert all(v == b"v" for v in got)  # the latest 500 survive
    assert c.get_many(["i0"]) == [None]


def test_tags_empty_the_cache_and_refuse_stale_puts():
    c = ItemCache(size=100, ttl_s=60)
    assert c.retag(b"meta-1") is False  # the first tag: nothing to clear
    c.put([("a", b"1")], b"meta-1")
    assert c.get_many(["a"]) == [b"1"]
    assert c.retag(b"meta-1") is False
    assert c.retag(b"meta-2") is True and c.get_many(["a"]) == [None]
    c.put([("a", b"old")], b"meta-1")  # read before the reload: refused
    assert c.get_many(["a"]) == [None]
    c.put([("a", b"new")], b"meta-2")
    assert c.get_many(["a"]) == [b"new"]
    assert c.retag(None) is True and len(c) == 0  # meta key gone (e.g. flushed): clear too
    s = c.stats()
    assert s["clears"] == 2 and s["hits"] == 2 and s["misses"] == 2


def test_off_when_size_or_ttl_is_zero():
    assert not ItemCache(0, 60).enabled and not ItemCache(10, 0).enabled and ItemCache(10, 1).enabled


def test_500_lookups_cost_well_under_a_millisecond():
    c = ItemCache(size=50_000, ttl_s=600)
    c.retag("g")
    ids = [str(100_000 + i) for i in range(20_000)]
    c.put([(i, b"x" * 64) for i in ids[:12_000]], "g")
    c.put([(i, b"x" * 64) for i in ids[12_000:]], "g")  # some now in the old generation
    req = ids[::40]  # 500 ids, hits in both generations
    miss = [f"m{i}" for i in range(250)] + ids[:250:1]
    for _ in range(20):
        c.get_many(req)
    times = []
    for _ in range(300):
        t = time.perf_counter()
        c.get_many(req)
        c.get_many(miss)
        times.append((time.perf_counter() - t) / 2)
    med = statistics.median(times)
    print(f"500 lookups: median {med * 1e6:.0f} us, p90 {sorted(times)[270] * 1e6:.0f} us")
    assert med < 0.0005


def test_concurrent_use_is_consistent():
    c = ItemCache(size=2000, ttl_s=0.05)
    errors = []

    def worker(n):
        try:
            for k in range(300):
                ids = [f"{n}-{j}" for j in range(k % 50, k % 50 + 40)]
                vals = c.get_many(ids)
                assert all(v is None or v == i.encode() for v, i in zip(vals, ids, strict=True))
                c.put([(i, i.encode()) for i in ids], c.tag)
                if k % 97 == 0:
                    c.retag(k)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(c) <= 2000


# -- in the fetcher ----------------------------------------------------------------------------------

def mget_keys_sent(client):
    """Total keys of all MGETs so far (keyspace reads) and the MGET count."""
    info = client.info("commandstats").get("cmdstat_mget", {})
    return info.get("calls", 0)


@pytest.fixture
def fetcher_rig(own_redis, world):
    r = own_redis()
    load_world(world, r.client(), "ic")
    st = make_store(store_settings(r.url, "ic", world, redis_deadline_ms=500))
    b = load_bundle(world.store, "demo", providers="cpu", intra_op_threads=1)
    f = FeatureFetcher(st, b.manifest.feature_schema, st.settings, b.vocabs, inputs=b.manifest.inputs)
    yield r, st, f
    st.close()


def test_fetcher_reads_only_uncached_items_in_one_mget(fetcher_rig, world):
    r, _, f = fetcher_rig
    c = r.client()
    items = world.items[:100]
    a = f.fetch(world.users[0], items)
    assert a.items_from_cache == 0 and a.items_missing == 0
    n0 = mget_keys_sent(c)
    b = f.fetch(world.users[0], items + world.items[100:110] + ["unknown"])
    assert mget_keys_sent(c) - n0 == 1  # still one MGET
    assert b.items_from_cache == 100 and b.items_missing == 1
    for k in ("item_sparse", "item_dense"):
        assert (b.inputs[k][:100] == a.inputs[k]).all()
    stats = f.cache_stats()
    assert stats["hits"] == 100 and stats["misses"] == 100 + 11 and stats["size"] == 110
    # the unknown item was not cached (absent), nor would a corrupt one be
    assert f.cache.get_many(["unknown"]) == [None]


def test_corrupt_values_are_not_cached(fetcher_rig, world):
    r, _, f = fetcher_rig
    ns = namespace("ic", f.schema)
    r.client().set(item_key(ns, world.items[5]), b"garbage")
    f.fetch(world.users[0], world.items[:10])
    again = f.fetch(world.users[0], world.items[:10])
    assert again.items_from_cache == 9 and again.items_corrupt == 1


def test_a_features_load_invalidates_the_cache(fetcher_rig, world):
    r, _, f = fetcher_rig
    c = r.client()
    ns = namespace("ic", f.schema)
    x = world.items[3]
    original = c.get(item_key(ns, x))
    donor = c.get(item_key(ns, world.items[4]))
    assert original != donor
    c.set(item_key(ns, x), donor)  # an out-of-band change...
    first = f.fetch(world.users[0], [x, world.items[7]])
    c.set(item_key(ns, x), original)  # ...and another one, without a load: the cache still serves the first
    cached = f.fetch(world.users[0], [x, world.items[7]])
    assert cached.items_from_cache == 2
    assert (cached.inputs["item_sparse"][0] == first.inputs["item_sparse"][0]).all()
    c.set(item_key(ns, x), donor)
    load_world(world, c, "ic")  # the real loader: rewrites x to the original bytes and the meta key
    after = f.fetch(world.users[0], [x, world.items[7]])
    assert after.items_from_cache == 0 and f.cache_stats()["clears"] == 1
    reference = f.item_codec.decode([original])
    assert (after.inputs["item_sparse"][0] == reference.sparse[0]).all()
    assert (after.inputs["item_sparse"][0] != first.inputs["item_sparse"][0]).any()
    assert f.fetch(world.users[0], [x]).items_from_cache == 1  # filled again under the new tag


def test_cache_off_sends_exactly_user_and_items(own_redis, world):
    r = own_redis()
    load_world(world, r.client(), "off")
    st = make_store(store_settings(r.url, "off", world, item_cache_size=0, redis_deadline_ms=500))
    try:
        b = load_bundle(world.store, "demo", providers="cpu", intra_op_threads=1)
        f = FeatureFetcher(st, b.manifest.feature_schema, st.settings, b.vocabs, inputs=b.manifest.inputs)
        assert f.cache is None
        c = r.client()
        c.config_resetstat()
        f.fetch(world.users[0], world.items[:50])
        f.fetch(world.users[0], world.items[:50])
        stats = c.info("stats")
        assert mget_keys_sent(c) == 2 and stats["keyspace_hits"] == 2 * 51
        assert f.cache_stats() == {"hits": 0, "misses": 0, "size": 0, "clears": 0}
    finally:
        st.close()
