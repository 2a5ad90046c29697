"""Every architecture is servable like any other bundle: train a tiny one, export (parity gate),
load features into a real Redis, serve /rank, and compare with onnxruntime run directly on the
features read back from Redis. No service code knows the architecture."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.contract import BundleManifest
from service.settings import Settings
from tests.support.reference import expected_outputs
from training.data.synth import SynthConfig, generate
from training.materialize import load_features
from training.train import TrainConfig, train

ARCHS = {
    "shared_bottom": ("shared_bottom", {}),
    "mmoe": ("mmoe", {}),
    "ple": ("ple", {}),
    "dtrn-towers": ("dtrn", {"backbone": "towers"}),
    "dtrn-mmoe": ("dtrn", {"backbone": "mmoe"}),
    "dtrn-ple": ("dtrn", {"backbone": "ple"}),
    "ple-ml": ("ple", {"mutual_learning": True}),
    "dtrn-ple-ml": ("dtrn", {"backbone": "ple", "mutual_learning": True}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("archs")
    generate(root / "data", SynthConfig(n_users=300, n_items=600, n_exposures=5_000, seed=4), progress=False)
    prefix = f"mtrank-archs-{os.getpid()}"
    client = redis.Redis.from_url(redis_server)
    yield {"root": root, "prefix": prefix, "redis": client, "redis_url": redis_server}
    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i:i + 5000])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_serves_through_rank(data, name):
    arch, overrides = ARCHS[name]
    store = data["root"] / "store"
    bundle, _ = train(data["root"] / "data", name=name, store=store,
                      cfg=TrainConfig(arch=arch, epochs=1, batch_size=1024, model=overrides), progress=False)
    manifest = BundleManifest.from_json((bundle / "manifest.json").read_text())
    assert manifest.architecture == arch
    assert max(v for k, v in manifest.metrics.items() if k.startswith("parity_max_abs_diff")) <= 1e-4
    # the same data gives the same schema, so every bundle reads the same feature namespace
    load_features(data["root"] / "data", bundle, data["redis"], prefix=data["prefix"], progress=False)

    ex = pd.read_parquet(data["root"] / "data" / "exposures.parquet", columns=["user_id", "item_id"])
    user = str(ex.user_id.iloc[3])
    items = [str(i) for i in ex.item_id.drop_duplicates().iloc[:120]] + ["unknown-item"]
    context = {"hour": 9, "device": "web"}
    settings = Settings(redis_url=data["redis_url"], redis_prefix=data["prefix"], model_store=str(store),
                        model_name=name, fusion_weights={"ctr": 1.0, "cvr": 1.0, "watch_time": 0.2})
    with TestClient(create_app(settings)) as client:
        r = client.post("/rank", json={"user_id": user, "items": items, "context": context})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == name and body["missing"] == {"user": False, "items": 1}
    where = {"bundle": bundle, "prefix": data["prefix"], "redis": data["redis"]}
    expected = expected_outputs(where, user, items, context)
    pos = {item: i for i, item in enumerate(items)}
    assert len(body["items"]) == len(items)
    for row in body["items"]:
        for task, value in row["scores"].items():
            assert value == pytest.approx(float(expected[task][pos[row["item_id"]]]), rel=1e-5, abs=1e-5)
    scores = [row["score"] for row in body["items"]]
    assert scores == sorted(scores, reverse=True)
