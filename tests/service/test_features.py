import logging
import re
import zlib

import numpy as np
import pytest
import redis

from service.codec import HEADER, EntityCodec
from service.contract import ITEM_GROUPS, model_inputs
from service.features import (
    ContextError,
    FeatureFetcher,
    item_key,
    meta_key,
    namespace,
    user_key,
)
from service.redis_client import make_store
from service.settings import Settings


class CountingRedis:
    """Proxy that records every command the fetcher sends."""

    def __init__(self, client):
        self.client = client
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if callable(attr):
            def wrapped(*a, **kw):
                self.calls.append(name)
                return attr(*a, **kw)
            return wrapped
        return attr


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def settings(redis_url, key_prefix):
    return Settings(redis_url=redis_url, redis_prefix=key_prefix, redis_deadline_ms=2000)


@pytest.fixture
def store(settings):
    st = make_store(settings)
    yield st
    st.close()


@pytest.fixture
def vocabs():
    return {"hour": [str(h) for h in range(24)], "item_id": [f"i{i}" for i in range(20)]}


def test_key_layout(schema):
    ns = namespace("p", schema)
    assert ns == f"p:{schema.fingerprint()[:12]}"
    assert user_key(ns, "42") == f"{ns}:u:42"
    k = zlib.crc32(b"a:b") % ITEM_GROUPS  # key layout 2: one of the hash-tag groups (test_key_layout.py)
    assert re.fullmatch(rf"{ns}:i:\{{{zlib.crc32(ns.encode()):08x}\.{k}\.\d+\}}:a:b", item_key(ns, "a:b"))
    assert meta_key(ns) == f"{ns}:meta"


def test_one_mget_decodes_user_and_items(store, settings, schema, features, vocabs):
    proxy = CountingRedis(store)
    fetcher = FeatureFetcher(proxy, schema, settings, vocabs)
    ids = ["i3", "i0", "i9", "i3"]
    f = fetcher.fetch("u1", ids, {"hour": "13", "distance_km": 1.5})
    assert proxy.calls == ["mget"]
    assert f.n_items == 4 and f.user_missing is False and f.items_missing == 0
    specs = {mi.name: mi for mi in model_inputs(schema)}
    assert set(f.inputs) == set(specs)
    for name, arr in f.inputs.items():
        mi = specs[name]
        assert arr.dtype == np.dtype(mi.dtype)
        assert arr.shape == ((4 if mi.entity == "item" else 1), mi.width)
    u = features.users["u1"]
    np.testing.assert_array_equal(f.inputs["user_sparse"][0], u[0])
    np.testing.assert_array_equal(f.inputs["user_dense"][0], u[1])
    np.testing.assert_array_equal(f.inputs["user_seq"][0], u[2])
    np.testing.assert_array_equal(f.inputs["item_sparse"], np.array([features.items[i][0] for i in ids]))
    np.testing.assert_array_equal(f.inputs["item_dense"], np.array([features.items[i][1] for i in ids]))
    assert f.inputs["context_sparse"].tolist() == [[14]]
    assert f.inputs["context_dense"].tolist() == [[1.5]]
    assert set(f.timings) == {"fetch", "assemble"}


def test_missing_entities_get_defaults_and_are_counted(store, settings, schema, features, vocabs):
    fetcher = FeatureFetcher(store, schema, settings, vocabs)
    f = fetcher.fetch("nobody", ["i1", "zzz", "i2", "yyy"], {})
    assert f.user_missing is True and f.items_missing == 2 and f.items_corrupt == 0
    assert f.inputs["user_sparse"].tolist() == [[0, 0]]
    assert f.inputs["user_dense"].tolist() == [[30.0]]  # mean of age
    assert f.inputs["user_seq"].tolist() == [[0] * 5]
    assert f.inputs["item_sparse"][1].tolist() == [0, 0]
    np.testing.assert_allclose(f.inputs["item_dense"][[1, 3]], [[10.0, 0.5], [10.0, 0.5]])
    np.testing.assert_array_equal(f.inputs["item_sparse"][0], features.items["i1"][0])
    assert f.inputs["context_sparse"].tolist() == [[0]] and f.inputs["context_dense"].tolist() == [[3.0]]


def test_corrupt_values_degrade_to_defaults_and_are_summed_up_without_ids(client, store, settings, schema, key_prefix,
                                                                          features, vocabs, caplog):
    ns = namespace(key_prefix, schema)
    size = EntityCodec.for_schema(schema, "item").size
    good = client.get(item_key(ns, "i4"))
    client.set(item_key(ns, "i5"), good[:-3])  # wrong length
    client.set(item_key(ns, "i6"), b"XX\x01\x00" + good[4:])  # bad header, right length
    assert len(b"XX\x01\x00" + good[4:]) == size and HEADER != b"XX\x01\x00"
    client.set(user_key(ns, "u2"), b"garbage")
    fetcher = FeatureFetcher(store, schema, settings, vocabs)
    with caplog.at_level(logging.DEBUG, logger="service.features"):
        f = fetcher.fetch("u2", ["i4", "i5", "i6", "nope"], {})
        for _ in range(5):  # more requests with corrupt values: no more WARNINGs within the interval
            fetcher.fetch("u2", ["i5"], {})
    assert f.user_missing and f.user_corrupt
    assert f.items_missing == 3 and f.items_corrupt == 2
    assert f.inputs["item_sparse"][1:].tolist() == [[0, 0]] * 3
    np.testing.assert_allclose(f.inputs["item_dense"][1:3], [[10.0, 0.5]] * 2)
    np.testing.assert_array_equal(f.inputs["item_sparse"][0], features.items["i4"][0])
    recs = [r for r in caplog.records if r.name == "service.features"]
    warnings = [r.getMessage() for r in recs if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 user and 2 item values" in warnings[0], warnings
    assert not any(x in warnings[0] for x in ("u2", "i5", "i6"))  # never an id at WARNING
    debug = [r.getMessage() for r in recs if r.levelno == logging.DEBUG and "corrupt" in r.getMessage()]
    assert len(debug) == 6 and "i5" in debug[0] and "i6" in debug[0] and "u2" in debug[0] and "nope" not in debug[0]


def test_context_lookup(store, settings, schema, vocabs):
    fetcher = FeatureFetcher(store, schema, settings, vocabs)
    assert fetcher.context_arrays({"hour": 7})[0].tolist() == [[8]]
    assert fetcher.context_arrays({"hour": "0"})[0].tolist() == [[1]]
    assert fetcher.context_arrays({"hour": "25"})[0].tolist() == [[0]]  # unknown value -> OOV
    assert fetcher.context_arrays({"hour": None})[0].tolist() == [[0]]
    sp, de = fetcher.context_arrays({"distance_km": 4})
    assert de.dtype == np.float32 and de.tolist() == [[4.0]] and sp.dtype == np.int64


@pytest.mark.parametrize("ctx,key", [
    ({"weather": "rain"}, "weather"),
    ({"hour": [1]}, "hour"),
    ({"hour": True}, "hour"),
    ({"hour": 1.5}, "hour"),
    ({"distance_km": "far"}, "distance_km"),
    ({"distance_km": float("nan")}, "distance_km"),
    ({"distance_km": 10 ** 400}, "distance_km"),
])
def test_context_errors_name_the_key(store, settings, schema, vocabs, ctx, key):
    fetcher = FeatureFetcher(CountingRedis(store), schema, settings, vocabs)
    with pytest.raises(ContextError) as e:
        fetcher.fetch("u0", ["i0"], ctx)
    assert isinstance(e.value, ValueError) and e.value.key == key and repr(key) in str(e.value)
    assert fetcher.redis.calls == []  # rejected before any Redis round trip


def test_inputs_must_match_schema(store, settings, schema, vocabs):
    bad = list(reversed(model_inputs(schema)))
    with pytest.raises(ValueError, match="do not match"):
        FeatureFetcher(store, schema, settings, vocabs, inputs=bad)
    with pytest.raises(ValueError, match="hour"):
        FeatureFetcher(store, schema, settings, {})


def test_store_backed_fetch_is_one_mget_with_the_meta_key(redis_url, schema, key_prefix, features, vocabs):
    settings = Settings(redis_url=redis_url, redis_prefix=key_prefix, redis_deadline_ms=2000)
    store = make_store(settings)
    try:
        fetcher = FeatureFetcher(store, schema, settings, vocabs)
        c = store.client
        calls = c.info("commandstats")["cmdstat_mget"]["calls"]
        first = fetcher.fetch("u1", ["i3", "i0", "nope"])
        again = fetcher.fetch("u1", ["i3", "i0", "nope"])
        assert c.info("commandstats")["cmdstat_mget"]["calls"] - calls == 2
        assert fetcher.cache.tag == c.get(meta_key(namespace(key_prefix, schema))) is not None
        assert first.degraded is None and first.items_from_cache == 0 and first.items_missing == 1
        assert again.items_from_cache == 2 and again.items_missing == 1
        np.testing.assert_array_equal(again.inputs["item_sparse"], first.inputs["item_sparse"])
        assert fetcher.cache_stats()["hits"] == 2
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["degrade", "fail"])
def test_unreachable_store_degrades_or_raises(schema, key_prefix, vocabs, mode):
    import socket

    from service.redis_client import StoreUnavailable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix=key_prefix, redis_failure_mode=mode)
    store = make_store(settings)
    try:
        fetcher = FeatureFetcher(store, schema, settings, vocabs)
        if mode == "fail":
            with pytest.raises(StoreUnavailable) as e:
                fetcher.fetch("u1", ["i1"])
            assert e.value.reason == "down" and isinstance(e.value, redis.RedisError)
            return
        f = fetcher.fetch("u1", ["i1", "i2"], {"hour": "3"})
        assert f.degraded == "down" and f.user_missing and f.items_missing == 2
        assert f.inputs["user_sparse"].tolist() == [[0, 0]] and f.inputs["context_sparse"].tolist() == [[4]]
    finally:
        store.close()
