"""End to end: synthesise -> train -> export -> load features into a real Redis -> serve -> /rank.

The check of the scores is independent of the service's own feature code: the test reads the
packed values back from Redis itself, decodes them with the codec, runs onnxruntime directly
and recomputes the fusion formula.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.contract import BundleManifest
from service.settings import Settings
from tests.support.ports import free_port
from tests.support.reference import expected_outputs
from training.data.synth import SynthConfig, generate
from training.materialize import load_features
from training.train import TrainConfig, train

WEIGHTS = {"ctr": 1.0, "cvr": 0.5, "watch_time": 0.3}


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    generate(data, SynthConfig(n_users=800, n_items=2000, n_exposures=40_000, seed=3), progress=False)
    store = root / "store"
    bundle, metrics = train(data, name="e2e", store=store,
                            cfg=TrainConfig(arch="ple", epochs=2, batch_size=1024), progress=False)
    client = redis.Redis.from_url(redis_server)
    prefix = f"mtrank-e2e-{os.getpid()}"
    summary = load_features(data, bundle, client, prefix=prefix, progress=False)
    yield {"data": data, "store": store, "bundle": bundle, "metrics": metrics, "prefix": prefix,
           "summary": summary, "redis": client, "redis_url": redis_server}
    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i:i + 5000])


def make_client(w, **overrides) -> TestClient:
    s = Settings(redis_url=w["redis_url"], redis_prefix=w["prefix"], model_store=str(w["store"]),
                 model_name="e2e", fusion_weights=WEIGHTS, **{"redis_deadline_ms": 2000, **overrides})
    return TestClient(create_app(s))


@pytest.mark.slow
def test_training_produced_a_bundle_with_sane_metrics(world):
    m = world["metrics"]
    manifest = BundleManifest.from_json((world["bundle"] / "manifest.json").read_text())
    assert manifest.version == 1 and manifest.architecture == "ple"
    assert [t.name for t in manifest.tasks] == ["ctr", "cvr", "watch_time"]
    for k in ("auc/ctr", "auc/cvr", "auc/ctcvr", "rmse_log1p/watch_time", "mae_log1p/watch_time"):
        assert k in m and np.isfinite(m[k]), k
    assert m["auc/ctr"] > 0.55  # learned something beyond chance even on this tiny set
    assert (world["bundle"] / "report.png").stat().st_size > 1000
    assert world["summary"].users == 800 and world["summary"].items == 2000


@pytest.mark.slow
def test_rank_scores_equal_onnxruntime_on_redis_features(world):
    ex = pd.read_parquet(world["data"] / "exposures.parquet", columns=["user_id", "item_id"])
    user = str(ex.user_id.iloc[0])
    items = [str(i) for i in ex.item_id.drop_duplicates().iloc[:298]] + ["no-such-item", "nope-2"]
    context = {"hour": 21, "device": "android"}
    with make_client(world) as client:
        r = client.post("/rank", json={"user_id": user, "items": items, "context": context})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "e2e", "version": 1}
    assert body["missing"] == {"user": False, "items": 2}
    assert len(body["items"]) == 300 and body["request_id"]
    expected = expected_outputs(world, user, items, context)
    pos = {item: i for i, item in enumerate(items)}
    for row in body["items"]:
        i = pos[row["item_id"]]
        for task in ("ctr", "cvr", "watch_time"):
            assert row["scores"][task] == pytest.approx(float(expected[task][i]), rel=1e-5, abs=1e-5), task
        s = row["scores"]
        fused = s["ctr"] ** WEIGHTS["ctr"] * s["cvr"] ** WEIGHTS["cvr"] * (1 + s["watch_time"]) ** WEIGHTS["watch_time"]
        assert row["score"] == pytest.approx(fused, rel=1e-4)
        assert s["watch_time"] >= 0 and 0 <= s["ctr"] <= 1 and 0 <= s["cvr"] <= 1
    scores = [row["score"] for row in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert len({row["score"] for row in body["items"]}) > 100  # the model discriminates between items


@pytest.mark.slow
def test_missing_user_and_top_k(world):
    ex = pd.read_parquet(world["data"] / "exposures.parquet", columns=["item_id"])
    items = [str(i) for i in ex.item_id.drop_duplicates().iloc[:50]]
    with make_client(world) as client:
        r = client.post("/rank", json={"user_id": "never-seen-user", "items": items, "top_k": 7})
        bad = client.post("/rank", json={"user_id": "u", "items": []})
        notjson = client.post("/rank", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert r.json()["missing"] == {"user": True, "items": 0}
    assert len(r.json()["items"]) == 7
    assert bad.status_code == 422 and "items" in bad.text
    assert notjson.status_code in (400, 422)


def test_service_path_imports_no_torch():
    code = ("import sys, service.app, service.cli, training.materialize, training.data.dataset;"
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow
def test_mtrank_demo_runs_end_to_end(tmp_path, redis_server):
    """The README's main command, shrunk: synth -> train -> export -> features -> serve -> rank 500."""
    port = free_port()
    prefix = f"mtrank-demo-{os.getpid()}"
    exe = os.path.join(os.path.dirname(sys.executable), "mtrank")
    cmd = [exe, "demo", "--no-serve", "--port", str(port), "--data", str(tmp_path / "data"),
           "--store", str(tmp_path / "store"), "--users", "600", "--items", "1500", "--exposures", "20000",
           "--epochs", "1"]
    env = dict(os.environ, MTRANK_REDIS_URL=redis_server, MTRANK_REDIS_PREFIX=prefix)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = out.stdout + out.stderr
    try:
        assert out.returncode == 0, log[-3000:]
        assert "POST /rank with 500 candidates -> HTTP 200" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert (tmp_path / "store" / "demo" / "1" / "model.onnx").exists()
    finally:
        client = redis.Redis.from_url(redis_server)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i:i + 5000])
