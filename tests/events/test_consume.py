"""The consumer against a real Redis: the sequence update (most recent first, the bundle's own
vocabulary, a new user from the schema defaults), idempotency by event_id, acknowledgement, and
exactly-once application across two `mtrank events consume` processes, one of them SIGKILLed while
it works, with entries left pending by a consumer that died."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import redis

from service.codec import EntityCodec
from service.contract import namespace, user_key
from service.events import stream
from service.events.consumer import Consumer
from service.events.record import EventRecord, encode, stream_key
from service.events.sequences import Applier, dedup_key
from tests.support.bundles import default_vocabs, seed_features
from tests.support.redis_server import RedisProc

ITEMS = default_vocabs()["item_id"]  # i0..i19 -> index 1..20


def click(i: int, user: str, item: str, kind: str = "click") -> EventRecord:
    return EventRecord(event_id=f"e{i}", user_id=user, item_id=item, type=kind, ts=1.0,
                       value=5.0 if kind == "watch" else None)


def seq_of(r: redis.Redis, prefix: str, schema, user: str) -> list[int] | None:
    raw = r.get(user_key(namespace(prefix, schema), user))
    if raw is None:
        return None
    return EntityCodec.for_schema(schema, "user").decode([raw]).seq[0].tolist()


def wait_for(cond, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.02)


def drain(c: Consumer) -> None:
    while c.step():
        pass


@pytest.fixture
def consumer(ev_settings):
    c = Consumer(ev_settings(events_claim_idle_ms=100_000), name="t", block_ms=10)
    c.ensure_group()
    c.refresh(force=True)
    yield c
    c.store.close()


def test_a_click_is_prepended_with_the_bundles_index_and_applied_once(consumer, redis_url, key_prefix, ev_schema,
                                                                      ev_features):
    r = redis.Redis.from_url(redis_url)
    before = ev_features.users["u1"][2].tolist()
    codec = EntityCodec.for_schema(ev_schema, "user")
    raw_before = r.get(user_key(namespace(key_prefix, ev_schema), "u1"))
    events = [click(1, "u1", "i7"), click(2, "u1", "unknown-item"), click(3, "u1", "i0"),
              click(4, "u1", "i9", "impression"), click(5, "u1", "i9", "watch")]
    stream.append(r, key_prefix, events, 1000, 3600)
    stream.append(r, key_prefix, [click(1, "u1", "i7")], 1000, 3600)  # a client's retry: same event_id
    drain(consumer)
    # most recent first; an unknown item is 0 (out of vocabulary), as training encodes it
    assert seq_of(r, key_prefix, ev_schema, "u1") == [1, 0, 8, *before[:2]]
    after = r.get(user_key(namespace(key_prefix, ev_schema), "u1"))
    assert len(after) == codec.size and after[:-4 * 5] == raw_before[:-4 * 5], "only the sequence changed"
    t = consumer.totals
    assert (t.applied, t.duplicates, t.no_update, t.created, t.invalid) == (3, 1, 2, 0, 0)
    assert r.xpending(stream_key(key_prefix), consumer.group)["pending"] == 0, "everything acknowledged"
    assert r.ttl(dedup_key(key_prefix, "e1")) > 0


def test_a_user_without_features_gets_the_schema_defaults_and_the_new_sequence(consumer, redis_url, key_prefix,
                                                                               ev_schema):
    r = redis.Redis.from_url(redis_url)
    stream.append(r, key_prefix, [click(1, "newcomer", "i4"), click(2, "newcomer", "i5")], 1000, 3600)
    drain(consumer)
    dec = EntityCodec.for_schema(ev_schema, "user").decode([r.get(user_key(namespace(key_prefix, ev_schema),
                                                                           "newcomer"))])
    assert not dec.missing[0] and not dec.corrupt[0]
    assert dec.sparse[0].tolist() == [0, 0] and dec.dense[0].tolist() == [ev_schema.field("age").mean]
    assert dec.seq[0].tolist() == [6, 5, 0, 0, 0]
    assert consumer.totals.created == 1


def test_not_an_event_and_a_corrupt_value_are_acknowledged_without_harm(consumer, redis_url, key_prefix, ev_schema):
    r = redis.Redis.from_url(redis_url)
    key = user_key(namespace(key_prefix, ev_schema), "u2")
    r.set(key, b"garbage")
    r.xadd(stream_key(key_prefix), {b"e": b'{"not": "an event"}'})
    stream.append(r, key_prefix, [click(1, "u2", "i1")], 1000, 3600)
    drain(consumer)
    assert r.get(key) == b"garbage"
    assert (consumer.totals.invalid, consumer.totals.corrupt) == (1, 1)
    assert r.xpending(stream_key(key_prefix), consumer.group)["pending"] == 0


def test_two_consumers_one_killed_mid_batch_apply_each_event_exactly_once(ev_env, consumer_factory, redis_url,
                                                                         key_prefix, ev_schema):
    """400 users x 5 distinct clicks (= max_len): the final sequence of each user must hold exactly
    its 5 items, each once. A consumer that died after reading (entries pending with it) and a
    consumer SIGKILLed while it works both leave entries that the others claim."""
    r = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(3)
    users = [f"user-{u}" for u in range(400)]
    want = {u: set(rng.choice(20, 5, replace=False).tolist()) for u in users}
    # each user's k-th click, users interleaved
    events = [click(k * len(users) + j, u, ITEMS[sorted(want[u])[k]]) for k in range(5) for j, u in enumerate(users)]
    env = ev_env(MTRANK_EVENTS_CLAIM_IDLE_MS=500, MTRANK_EVENTS_BATCH=20)
    group, skey = "mtrank-sequences", stream_key(key_prefix)
    r.xgroup_create(skey, group, id="0", mkstream=True)
    stream.append(r, key_prefix, events[:30], 1_000_000, 3600)
    # a consumer that read a batch and died before applying it
    r.xreadgroup(group, "ghost", {skey: ">"}, count=30)
    assert r.xpending(skey, group)["pending"] == 30

    a = consumer_factory(env, "a")
    b = consumer_factory(env, "b")
    wait_for(lambda: "started" in a.log() and "started" in b.log(), a)
    rest = events[30:] + events[:50]  # and a client sends some again: duplicates

    def produce():
        for i in range(0, len(rest), 20):
            stream.append(r, key_prefix, rest[i:i + 20], 1_000_000, 3600)
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    # freeze a whenever it holds entries it read but has not applied (mid-batch), then SIGKILL it
    while True:
        a.proc.send_signal(signal.SIGSTOP)
        if r.xpending_range(skey, group, "-", "+", 10_000, consumername="a"):
            break
        a.proc.send_signal(signal.SIGCONT)
        assert producer.is_alive(), "consumer a was never caught holding entries"
        time.sleep(0.002)
    a.kill()
    producer.join()
    c = consumer_factory(env, "c")  # a fresh process joins
    deadline = time.monotonic() + 90
    while r.xpending(skey, group)["pending"] or r.xinfo_groups(skey)[0]["lag"]:
        assert time.monotonic() < deadline, b.log() + c.log()
        time.sleep(0.1)
    for u in users:
        got = seq_of(r, key_prefix, ev_schema, u)
        assert sorted(got) == sorted(i + 1 for i in want[u]), (u, got)
    assert not any(r.exists(dedup_key(key_prefix, f"e{n}")) == 0 for n in range(len(events))), "all marked"
    claimed = b.log() + c.log()
    assert "claimed" in claimed, "the entries of the dead consumers were claimed by the living"
    assert b.stop() == 0


def test_the_apply_step_takes_records_from_another_source(consumer, redis_url, key_prefix, ev_schema, ev_features):
    """What a Kafka consumer would do (docs/events.md): the same step, records named by their offsets,
    nothing acknowledged."""
    r = redis.Redis.from_url(redis_url)
    applier = Applier(r, key_prefix, "", 60)
    records = [(b"partition-0-offset-17", {b"e": encode(click(1, "u0", "i2"))})]
    assert applier.apply(records, consumer.targets).applied == 1
    assert applier.apply(records, consumer.targets).duplicates == 1, "a replay after a crash is applied once"
    assert seq_of(r, key_prefix, ev_schema, "u0")[0] == 3


def test_a_consumer_rides_out_a_redis_restart(tmp_path, ev_env, ev_schema, consumer_factory, key_prefix):
    proc = RedisProc(tmp_path / "r").start()
    try:
        seed_features(proc.url, key_prefix, ev_schema)
        r = proc.client()
        consumer = consumer_factory(ev_env(MTRANK_REDIS_URL=proc.url), "survivor")
        stream.append(r, key_prefix, [click(1, "u1", "i1")], 1000, 3600)
        wait_for(lambda: (seq_of(r, key_prefix, ev_schema, "u1") or [0])[0] == 2, consumer)
        proc.snapshot()
        proc.kill()
        time.sleep(1.5)  # the consumer sees the connection refused and retries
        proc.start()  # loads the snapshot: features, stream and group
        stream.append(r, key_prefix, [click(2, "u1", "i2")], 1000, 3600)
        wait_for(lambda: seq_of(r, key_prefix, ev_schema, "u1")[:2] == [3, 2], consumer)
        assert "redis unavailable" in consumer.log()
        assert consumer.stop() == 0
    finally:
        proc.stop()


def test_a_consumer_refuses_to_start_on_an_invalid_routing_config(tmp_path, ev_env, consumer_factory):
    bad = tmp_path / "routing.yaml"
    bad.write_text("layers: [oops\n")
    consumer = consumer_factory(ev_env(MTRANK_ROUTING_CONFIG=str(bad)), "picky")
    assert consumer.proc.wait(timeout=60) == 2, consumer.log()
    assert "cannot tell which bundles the service holds" in consumer.log() and "routing.yaml" in consumer.log()
