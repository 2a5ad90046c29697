"""The real server: ``uvicorn --factory service.app:create_app`` in a subprocess."""

import subprocess
import sys

import httpx
import pytest

from tests.support.server import ROOT, Server


def test_service_never_imports_torch():
    code = ("import sys, service.app, service.ranking, service.features, service.store, service.fusion, "
            "service.routing, service.serving, service.admin, service.access_log, "
            "service.settings, service.schemas; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_uvicorn_factory_serves_rank(tmp_path, store_root, features, redis_url, key_prefix):
    srv = Server({
        "MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": key_prefix, "MTRANK_MODEL_STORE": str(store_root),
        "MTRANK_MODEL_NAME": "demo", "MTRANK_PROVIDERS": "cuda,cpu", "MTRANK_FUSION_WEIGHTS": '{"ctr": 1, "cvr": 1}',
        "MTRANK_ORT_INTRA_OP_THREADS": "1", "MTRANK_REDIS_DEADLINE_MS": "2000",
    }, tmp_path / "server.log")
    try:
        base = srv.start(timeout=30).base
        r = httpx.post(f"{base}/rank", json={"user_id": "u0", "items": ["i1", "i2", "nope"], "top_k": 2}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) == 2 and body["missing"] == {"user": False, "items": 1}
        s = body["items"][0]["scores"]
        assert body["items"][0]["score"] == pytest.approx(s["ctr"] * s["cvr"], rel=1e-6)
        assert httpx.get(f"{base}/models", timeout=5).json()["provider"] in ("CPUExecutionProvider",
                                                                             "CUDAExecutionProvider")
    finally:
        srv.stop()
    text = srv.log()
    assert "serving demo v1" in text and redis_url.split("//")[1] in text
