"""Issue 15 item 3, training data as served: a real server logs every request with its packed
features; outcome events are written; ``mtrank logs export --with-outcomes`` writes Parquet and a
dataset spec with the features decoded exactly as served and the labels from the events; ``mtrank
train --data`` trains a bundle from it that loads."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pandas as pd
import pytest
import redis

from service.predlog import pseudonym
from tests.support.bundles import default_vocabs, seed_features
from tests.support.readout import KEY, event, mtrank, write_events
from tests.support.wait import wait_for


@pytest.mark.slow
def test_export_with_outcomes_trains_a_bundle(readout_env, serve, redis_url, key_prefix, schema, store_root,
                                              tmp_path):
    data = seed_features(redis_url, key_prefix, schema, n_users=10, n_items=20)
    srv = serve(readout_env(MTRANK_PREDLOG_FEATURES_RATE=1))
    rng = np.random.default_rng(0)
    events, clicked = [], set()
    with httpx.Client(base_url=srv.base, timeout=30) as c:
        for k in range(60):
            user = f"u{k % 10}"
            items = [f"i{j}" for j in rng.choice(20, 8, replace=False)] + ["i-unknown"]
            ctx = {"hour": int(rng.integers(0, 24)), "distance_km": float(rng.uniform(0, 9))}
            r = c.post("/rank", json={"user_id": user, "items": items, "context": ctx, "top_k": 4,
                                      "request_id": f"tr-{k}"})
            assert r.status_code == 200, r.text
            t = time.time()  # events without a request id join the user's latest request that showed the item
            for pos, it in enumerate(r.json()["items"]):
                if rng.random() < 0.45:
                    rid = f"tr-{k}" if pos % 2 == 0 else None  # some events know the request, some do not
                    events.append(event(user, it["item_id"], "click", t, rid=rid))
                    clicked.add((f"tr-{k}", it["item_id"]))
                    if rng.random() < 0.4:
                        events.append(event(user, it["item_id"], "conversion", t, rid=rid))
                    events.append(event(user, it["item_id"], "watch", t, rid=rid, value=float(rng.uniform(5, 60))))
    write_events(redis_url, key_prefix, events)
    rdb = redis.Redis.from_url(redis_url)
    wait_for(lambda: rdb.xlen(f"{key_prefix}:predictions") == 60, what="60 records")
    out = tmp_path / "served"
    r = mtrank("logs", "export", "--with-outcomes", "--out", str(out), "--redis-url", redis_url, "--prefix",
               key_prefix, "--stream", f"{key_prefix}:predictions", "--store", str(store_root),
               env={"MTRANK_PSEUDONYM_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert "wrote 540 candidates of 60 requests" in r.stdout, r.stdout
    df = pd.read_parquet(out / "exposures.parquet")
    assert len(df) == 540 and (df["position"] >= 0).sum() == 240
    vocab = default_vocabs()
    for row in df.sample(60, random_state=0).itertuples():
        user = row.request_id and f"u{int(row.request_id.split('-')[1]) % 10}"
        assert row.user == pseudonym(KEY.encode(), user)
        sparse, dense, seq = data.users[user]
        assert row.user_id == vocab["user_id"][sparse[0] - 1] and row.age == pytest.approx(float(dense[0]))
        assert list(row.clicked) == [vocab["item_id"][i - 1] for i in seq if i > 0]
        if row.item == "i-unknown":  # not in Redis: what was served is the defaults
            assert pd.isna(row.item_id) and row.price == pytest.approx(10.0)
        else:
            isparse, idense, _ = data.items[row.item]
            assert row.item_id == row.item and row.category == vocab["category"][isparse[1] - 1]
            assert row.price == pytest.approx(float(idense[0]))
        assert (row.click == 1) == ((row.request_id, row.item) in clicked)
    assert df["conversion"].sum() > 0 and (df["watch_time"] > 0).sum() == df["click"].sum()
    assert (df.loc[df["click"] == 0, ["conversion", "watch_time"]] == 0).all().all()
    store2 = tmp_path / "store2"
    r = mtrank("train", "--data", str(out), "--epochs", "1", "--batch-size", "64", "--store", str(store2),
               "--name", "served", "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from service.store import default_inputs, load_bundle

    bundle = load_bundle(store2, "served")
    assert set(bundle.manifest.tasks[i].name for i in range(3)) == {"ctr", "cvr", "watch_time"}
    scores = bundle.run(default_inputs(bundle.manifest, 5))
    assert all(v.shape == (5,) and np.isfinite(v).all() for v in scores.values())
