"""Property: whatever bytes sit in Redis under a user or item key, a rank never fails. A value
that is not a packed value of the schema (wrong size or header) is served as the schema defaults,
counted as missing and corrupt, and logged with its id; a well-formed value with garbage inside
is sanitised (ids outside the vocabulary -> 0, non-finite dense -> default)."""

from __future__ import annotations

import logging
import math

import numpy as np
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.codec import HEADER
from service.features import item_key, namespace, user_key
from tests.support.world import RankerRig, World, store_settings

N_ITEMS = 6
ITEM_IDS = [f"hyp-i{j}" for j in range(N_ITEMS)]
USER_ID = "hyp-user"


@pytest.fixture(scope="module")
def prop_rig(redis_server, world: World):
    # cache off: every example must read what it just wrote; a generous deadline: no timeouts here
    r = RankerRig(store_settings(redis_server, "hyp-prop", world, item_cache_size=0, redis_deadline_ms=2000))
    yield r
    r.close()
    c = redis.Redis.from_url(redis_server)
    for k in c.scan_iter(match="hyp-prop:*"):
        c.delete(k)


def values(size: int):
    return st.one_of(
        st.none(),
        st.binary(max_size=2 * size),  # anything
        st.binary(min_size=size, max_size=size),  # the right size, a random header
        st.binary(min_size=size - 4, max_size=size - 4).map(lambda b: HEADER + b),  # well-formed, garbage inside
    )


def well_formed(v: bytes | None, size: int) -> bool:
    return v is not None and len(v) == size and v[:4] == HEADER


@pytest.fixture(scope="module")
def sizes(prop_rig):
    f = prop_rig.ranker.fetcher
    return f.user_codec.size, f.item_codec.size


def test_arbitrary_bytes_never_fail_a_rank(prop_rig, sizes, redis_server, caplog):
    size_u, size_i = sizes
    fetcher = prop_rig.ranker.fetcher
    ns = namespace("hyp-prop", fetcher.schema)
    client = redis.Redis.from_url(redis_server)
    defaults = fetcher.fetch("no-such-user", ["no-such-item"])
    seen: set[str] = set()  # kinds of values the examples covered

    @settings(max_examples=100, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(user=values(size_u), items=st.lists(values(size_i), min_size=N_ITEMS, max_size=N_ITEMS))
    def check(user, items):
        pipe = client.pipeline(transaction=False)
        values = [(user_key(ns, USER_ID), user)] + [(item_key(ns, i), v) for i, v in zip(ITEM_IDS, items, strict=True)]
        for key, v in values:
            pipe.delete(key) if v is None else pipe.set(key, v)
        pipe.execute()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="service.features"):
            res = prop_rig.rank(USER_ID, ITEM_IDS)
            feats = fetcher.fetch(USER_ID, ITEM_IDS)
        u_ok = well_formed(user, size_u)
        i_ok = [well_formed(v, size_i) for v in items]
        corrupt_items = [i for i, v, ok in zip(ITEM_IDS, items, i_ok, strict=True) if v is not None and not ok]
        for v, ok in [(user, u_ok)] + list(zip(items, i_ok, strict=True)):
            seen.add("absent" if v is None else "well-formed" if ok else "corrupt")
        assert res.degraded is None
        assert res.user_missing == (not u_ok) and res.items_missing == i_ok.count(False)
        assert res.items_corrupt == len(corrupt_items)
        body = orjson.loads(res.body)
        assert len(body["items"]) == N_ITEMS and body["degraded"] is False
        for x in body["items"]:
            assert x["score"] is None or math.isfinite(x["score"])
        # not well-formed -> exactly the defaults
        if not u_ok:
            for name in ("user_sparse", "user_dense", "user_seq"):
                np.testing.assert_array_equal(feats.inputs[name], defaults.inputs[name])
        for j, ok in enumerate(i_ok):
            if not ok:
                for name in ("item_sparse", "item_dense"):
                    np.testing.assert_array_equal(feats.inputs[name][j], defaults.inputs[name][0])
        # well-formed garbage -> sanitised
        for name, arr in feats.inputs.items():
            if arr.dtype == np.float32:
                assert np.isfinite(arr).all(), name
            else:
                assert (arr >= 0).all(), name
        logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
        warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        feature_logs = [r for r in caplog.records if r.name == "service.features"]
        if corrupt_items or (user is not None and not u_ok):
            assert all(i in logged for i in corrupt_items)  # ids at DEBUG only
            assert f"corrupt_user={user is not None and not u_ok}" in logged
            assert USER_ID not in warned and not any(i in warned for i in corrupt_items)
        else:
            assert not [r for r in feature_logs if "corrupt" in r.getMessage()]

    check()
    client.close()
    assert seen == {"absent", "well-formed", "corrupt"}
