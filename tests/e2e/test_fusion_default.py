"""Any task set serves with default settings (issue 11): a real bundle trained on two binary tasks
named ``click`` and ``like`` (not ctr/cvr/watch_time) gets its fusion weights from its own tasks
(1.0 per binary task) when MTRANK_FUSION_WEIGHTS is unset, and ranks; weights that name tasks the
model lacks leave it not ready with a message naming the setting."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import redis
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from training.data.synth import SynthConfig, generate
from training.materialize import load_features
from training.train import TrainConfig, train

pytestmark = pytest.mark.slow  # trains a model of its own (two other binary tasks)


@pytest.fixture(scope="module")
def click_like(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("click-like")
    data = root / "data"
    generate(data, SynthConfig(n_users=200, n_items=400, n_exposures=4_000, seed=5), progress=False)
    spec_path = data / "dataset.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["tasks"] = [{"name": "click", "kind": "binary", "label": "click"},
                     {"name": "like", "kind": "binary", "label": "conversion"}]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    store = root / "store"
    bundle, _ = train(data, name="cl", store=store, cfg=TrainConfig(arch="mmoe", epochs=1, batch_size=1024),
                      progress=False)
    prefix = f"mtrank-cl-{os.getpid()}"
    client = redis.Redis.from_url(redis_server)
    load_features(data, bundle, client, prefix=prefix, progress=False)
    ex = pd.read_parquet(data / "exposures.parquet", columns=["user_id", "item_id"])
    yield {"store": store, "prefix": prefix, "redis_url": redis_server, "user": str(ex.user_id.iloc[0]),
           "items": [str(i) for i in ex.item_id.drop_duplicates().iloc[:40]]}
    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i:i + 5000])


def settings_for(d, **kw) -> Settings:
    return Settings(redis_url=d["redis_url"], redis_prefix=d["prefix"], model_store=str(d["store"]), model_name="cl",
                    store_poll_s=0, **kw)


def test_two_other_binary_tasks_serve_with_default_settings(click_like, monkeypatch):
    monkeypatch.delenv("MTRANK_FUSION_WEIGHTS", raising=False)
    with TestClient(create_app(settings_for(click_like))) as c:
        assert c.get("/readyz").status_code == 200
        m = c.get("/models").json()
        assert [t["name"] for t in m["tasks"]] == ["click", "like"]
        assert m["fusion"] == {"name": "weighted_product", "weights": {"click": 1.0, "like": 1.0}}
        r = c.post("/rank", json={"user_id": click_like["user"], "items": click_like["items"]})
    assert r.status_code == 200, r.text
    rows = r.json()["items"]
    assert len(rows) == len(click_like["items"]) and set(rows[0]["scores"]) == {"click", "like"}
    for row in rows:  # the default weighted product: click^1 * like^1
        want = max(row["scores"]["click"], 1e-7) * max(row["scores"]["like"], 1e-7)
        assert row["score"] == pytest.approx(want, rel=1e-6)
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()


def test_weights_for_other_tasks_name_the_setting(click_like):
    s = settings_for(click_like, fusion_weights={"ctr": 1.0, "cvr": 1.0, "watch_time": 0.2})
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        reason = " ".join(r.json()["reasons"])
        assert "MTRANK_FUSION_WEIGHTS" in reason and "click" in reason and "ctr" in reason
        assert c.post("/rank", json={"user_id": click_like["user"], "items": click_like["items"]}).status_code == 503
