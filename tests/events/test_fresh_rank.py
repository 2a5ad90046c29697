"""A click changes the next ranking through the user's sequence: real uvicorn, a real
`mtrank events consume` process, the real ONNX bundle. The scores after the click are the model's
scores on the user's features with the clicked item prepended to the sequence."""

from __future__ import annotations

import dataclasses
import time

import httpx
import numpy as np
import onnxruntime as ort
import redis

from service.contract import MODEL_FILE, namespace, user_key
from tests.support.bundles import reference_inputs

ITEMS = [f"i{i}" for i in range(10)]


def scores(base: str, user: str) -> dict[str, dict[str, float]]:
    r = httpx.post(f"{base}/rank", json={"user_id": user, "items": ITEMS}, timeout=10)
    assert r.status_code == 200, r.text
    assert not r.json()["missing"]["user"]
    return {it["item_id"]: it["scores"] for it in r.json()["items"]}


def model_scores(store, data, user: str) -> dict[str, dict[str, float]]:
    sess = ort.InferenceSession(str(store / "demo" / "1" / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, reference_inputs(data, user, ITEMS))
    return {item: {n: float(o.reshape(-1)[j]) for n, o in zip(names, outs, strict=True)}
            for j, item in enumerate(ITEMS)}


def close(a: dict, b: dict) -> bool:
    return all(np.isclose(a[i][t], b[i][t], rtol=1e-5, atol=1e-6) for i in a for t in a[i])


def test_a_click_changes_the_next_rank_through_the_sequence(server_factory, consumer_factory, ev_env, ev_store,
                                                            ev_features, ev_schema, redis_url, key_prefix):
    srv = server_factory(ev_env())
    consumer = consumer_factory(ev_env(), "fresh")
    before = scores(srv.base, "u1")
    assert close(before, model_scores(ev_store, ev_features, "u1"))

    r = httpx.post(f"{srv.base}/events", json={"events": [
        {"event_id": "click-1", "user_id": "u1", "item_id": "i7", "type": "click", "ts": time.time()}]}, timeout=10)
    assert r.status_code == 202, r.text
    old_seq = ev_features.users["u1"][2]
    new_seq = np.concatenate([[8], old_seq[:-1]])  # i7 is index 8; most recent first
    client = redis.Redis.from_url(redis_url)
    key = user_key(namespace(key_prefix, ev_schema), "u1")
    deadline = time.monotonic() + 30
    while np.frombuffer(client.get(key), "<i4")[-5:].tolist() != new_seq.tolist():
        assert time.monotonic() < deadline, consumer.log()
        time.sleep(0.01)

    after = scores(srv.base, "u1")
    sparse, dense, _ = ev_features.users["u1"]
    fresh = dataclasses.replace(ev_features, users={**ev_features.users, "u1": (sparse, dense, new_seq)})
    assert close(after, model_scores(ev_store, fresh, "u1")), "the new sequence is what the model scored"
    assert not close(after, before), "and the scores changed"
