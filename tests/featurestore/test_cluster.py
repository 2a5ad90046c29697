"""A real 3-master Redis Cluster on free loopback ports: the real loader writes to it, the store
reads per node (per slot) and reassembles in request order, the scores equal those from a single
Redis, and with one master killed, ranking degrades (the other nodes' items keep their features)
instead of failing. The kill is the last test of the module."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time

import orjson
import pytest
import redis
from redis.crc import key_slot

from service.codec import EntityCodec
from service.contract import ITEM_GROUPS, VOCAB_FILE, item_keys, user_key
from service.features import item_key, namespace
from service.redis_client import StoreUnavailable, client_for_url, make_client
from service.settings import Settings
from tests.support.redis_server import RedisProc
from tests.support.world import load_world, store_settings
from training.data.dataset import encode_entities, read_raw

PREFIX = "clu"
pytestmark = pytest.mark.slow  # three redis-server nodes joined into a cluster, one killed at the end


class Cluster:
    def __init__(self, procs: list[RedisProc]):
        self.procs = procs
        self.ranges = {p.port: _slot_ranges(p) for p in procs}  # taken while every node is up

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.procs[0].port}/0"

    def node_of(self, key: str) -> RedisProc:
        slot = key_slot(key.encode())
        for p in self.procs:
            if any(lo <= slot <= hi for lo, hi in self.ranges[p.port]):
                return p
        raise LookupError(key)


def _slot_ranges(p: RedisProc) -> list[tuple[int, int]]:
    me = next(n for n in p.client().cluster("nodes").values() if "myself" in n["flags"])
    return [(int(r[0]), int(r[-1])) for r in me["slots"]]


def cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (and below 65536)."""
    for _ in range(200):
        port = random.randint(20_000, 50_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is not on PATH")
    root = tmp_path_factory.mktemp("cluster")
    procs = []
    try:
        for i in range(3):
            args = ("--cluster-enabled", "yes", "--cluster-config-file", str(root / f"nodes-{i}.conf"),
                    "--cluster-node-timeout", "5000")
            p = RedisProc(root / f"n{i}", port=cluster_port(), args=args)
            procs.append(p.start())
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p.port}" for p in procs],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in p.client().execute_command("CLUSTER", "INFO") for p in procs):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield Cluster(procs)
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def loaded(cluster, world):
    client = client_for_url(cluster.url)
    assert isinstance(client, redis.cluster.RedisCluster)
    load_world(world, client, PREFIX)
    client.close()
    return cluster


def test_make_client_picks_the_cluster_client(loaded):
    for url, flag in ((loaded.url, False), (loaded.url.replace("redis+cluster", "redis"), True)):
        c = make_client(Settings(redis_url=url, redis_cluster=flag))
        assert isinstance(c, redis.cluster.RedisCluster) and Settings(redis_url=url, redis_cluster=flag).cluster
        c.close()


def test_loader_spread_the_keys_over_every_master(loaded, world):
    sizes = [p.client().dbsize() for p in loaded.procs]
    assert all(n > 50 for n in sizes) and sum(sizes) >= len(world.items) + len(world.users)


def test_reads_in_request_order_match_the_cluster_client(loaded, world, rig):
    rg = rig(store_settings(loaded.url, PREFIX, world, redis_deadline_ms=500))
    st = rg.store
    assert st.is_cluster and len(st.breakers()) == 3
    ns = namespace(PREFIX, rg.ranker.bundle.manifest.feature_schema)
    keys = [item_key(ns, i) for i in reversed(world.items[:150])] + [item_key(ns, "nope"), item_key(ns, world.items[0])]
    want = st.client.mget_nonatomic(keys)
    assert st.mget(keys) == want and want[-2] is None and all(v is not None for v in want[:150])
    assert {loaded.node_of(k).port for k in keys} == {p.port for p in loaded.procs}


@pytest.mark.parametrize("cache", [0, 50_000])
def test_scores_equal_a_single_redis(loaded, world, rig, own_redis, cache):
    single = own_redis()
    load_world(world, single.client(), PREFIX)
    on_cluster = rig(store_settings(loaded.url, PREFIX, world, redis_deadline_ms=500, item_cache_size=cache))
    on_single = rig(store_settings(single.url, PREFIX, world, redis_deadline_ms=500, item_cache_size=cache))
    items = world.items[:120] + ["unknown-item"]
    for user in world.users[:4] + ["unknown-user"]:
        for _ in range(2):  # the second time from the item cache, when on
            a = on_cluster.rank(user, items, context={"hour": 20})
            b = on_single.rank(user, items, context={"hour": 20})
            assert a.degraded is None and b.degraded is None
            assert (a.user_missing, a.items_missing) == (b.user_missing, b.items_missing)
            ja, jb = orjson.loads(a.body), orjson.loads(b.body)
            assert ja["items"] == jb["items"]
    if cache:
        assert on_cluster.ranker.fetcher.cache_stats()["hits"] > 0


def test_features_written_by_the_loader_read_back_identical(loaded, world, rig):
    """Writer (mtrank features load) and reader (FeatureStore.mget) agree on the key layout: every
    user's and item's value read from the cluster, in a shuffled order, is the bytes the codec
    makes of the data; the items sit in ITEM_GROUPS slots."""
    rg = rig(store_settings(loaded.url, PREFIX, world))
    schema = rg.ranker.bundle.manifest.feature_schema
    vocabs = json.loads((world.bundle_dir / VOCAB_FILE).read_text())
    raw = read_raw(world.data)
    ns = namespace(PREFIX, schema)
    keys, want = [], []
    for entity in ("user", "item"):
        table = encode_entities(raw, schema, vocabs, entity)
        keys += [user_key(ns, i) for i in table.ids] if entity == "user" else item_keys(ns, list(table.ids))
        want += EntityCodec.for_schema(schema, entity).encode(table.sparse, table.dense, table.seq)
    order = random.Random(3).sample(range(len(keys)), len(keys))
    assert rg.store.mget([keys[j] for j in order]) == [want[j] for j in order]
    assert len({key_slot(k.encode()) for k in item_keys(ns, world.items)}) == ITEM_GROUPS


def _mget_calls(p: RedisProc) -> int:
    return int(p.client().info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


def test_a_read_of_2000_items_is_at_most_item_groups_mgets(loaded, world, rig):
    """1 user + 2,000 items: one MGET per slot touched, so ITEM_GROUPS + 1 in all (counted by each
    node's INFO commandstats), against ~2,000 under the untagged layout."""
    rg = rig(store_settings(loaded.url, PREFIX, world))
    ns = "bound:000000000000"
    keys = [user_key(ns, "someone"), *item_keys(ns, [f"item-{i}" for i in range(2000)])]
    values = [f"v{j}".encode() for j in range(len(keys))]
    rg.store.client.mset_nonatomic(dict(zip(keys, values, strict=True)))
    before = [_mget_calls(p) for p in loaded.procs]
    assert rg.store.mget(keys) == values
    calls = [_mget_calls(p) - b for p, b in zip(loaded.procs, before, strict=True)]
    slots = [len({key_slot(k.encode()) for k in keys if loaded.node_of(k) is p}) for p in loaded.procs]
    assert calls == slots and sum(calls) == ITEM_GROUPS + 1
    rg.store.client.delete(*keys)


def test_a_moved_slot_is_followed_after_one_degraded_read(loaded, world, rig):
    """Reshard one slot live (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE): the next read of its keys
    meets MOVED, is answered degraded for those keys only and refreshes the topology in the
    background; within a second reads are whole again, from the new owner."""
    rg = rig(store_settings(loaded.url, PREFIX, world, redis_deadline_ms=500, item_cache_size=0))
    st = rg.store
    ns = namespace(PREFIX, rg.ranker.bundle.manifest.feature_schema)
    keys = [item_key(ns, i) for i in world.items[:60]]
    want = st.mget(keys)
    key = keys[0]
    src = loaded.node_of(key)
    dst = next(p for p in loaded.procs if p is not src)
    slot = key_slot(key.encode())
    ids = {p.port: p.client().execute_command("CLUSTER", "MYID").decode() for p in (src, dst)}
    dst.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src.port])
    src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst.port])
    moving = src.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *moving)
    for p in loaded.procs:
        p.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst.port])
    loaded.ranges = {p.port: _slot_ranges(p) for p in loaded.procs}
    assert loaded.node_of(key) is dst

    with pytest.raises(StoreUnavailable) as e:
        st.mget(keys)
    part = e.value.partial
    assert part[0] is None and [v for k, v in zip(keys, part, strict=True) if key_slot(k.encode()) != slot] == [
        v for k, v in zip(keys, want, strict=True) if key_slot(k.encode()) != slot]
    t0 = time.monotonic()
    while True:
        try:
            assert st.mget(keys) == want
            break
        except StoreUnavailable:
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.02)
    assert st.healthy  # MOVED is not a node failure


def test_one_master_killed_degrades_instead_of_failing(loaded, world, rig):
    rg = rig(store_settings(loaded.url, PREFIX, world, redis_deadline_ms=200, item_cache_size=0,
                            breaker_failures=2))
    items = world.items[:150]
    healthy = rg.rank(world.users[0], items)
    assert healthy.degraded is None and healthy.items_missing == 0
    ns = namespace(PREFIX, rg.ranker.bundle.manifest.feature_schema)
    victim = loaded.node_of(item_key(ns, items[0]))
    on_victim = sum(loaded.node_of(item_key(ns, i)) is victim for i in items)
    victim.kill()
    user_lost = loaded.node_of(f"{ns}:u:{world.users[0]}") is victim
    for _ in range(6):  # before and after its breaker opens
        res = rg.rank(world.users[0], items)
        assert res.degraded in ("down", "circuit_open")
        assert res.items_missing == on_victim  # the other masters' items kept their features
        assert res.user_missing == user_lost
        body = orjson.loads(res.body)
        assert body["degraded"] is True and len(body["items"]) == len(items)
    assert rg.store.state == "open" and not rg.store.healthy
    states = rg.store.breakers()
    assert states[f"127.0.0.1:{victim.port}"]["state"] in ("open", "half_open")
    assert sum(s["state"] == "closed" for s in states.values()) == 2
