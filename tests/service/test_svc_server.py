"""The real server: ``uvicorn --factory service.app:create_app`` in a subprocess."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_never_imports_torch():
    code = ("import sys, service.app, service.ranking, service.features, service.store, service.fusion, "
            "service.routing, service.serving, service.admin, service.access_log, "
            "service.settings, service.schemas; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_uvicorn_factory_serves_rank(tmp_path, store_root, features, redis_url, key_prefix):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env.update({
        "MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": key_prefix, "MTRANK_MODEL_STORE": str(store_root),
        "MTRANK_MODEL_NAME": "demo", "MTRANK_PROVIDERS": "cuda,cpu", "MTRANK_FUSION_WEIGHTS": '{"ctr": 1, "cvr": 1}',
        "MTRANK_ORT_INTRA_OP_THREADS": "1", "MTRANK_REDIS_DEADLINE_MS": "2000",
    })
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server not ready: " + (tmp_path / "server.log").read_text())
            time.sleep(0.1)
        r = httpx.post(f"{base}/rank", json={"user_id": "u0", "items": ["i1", "i2", "nope"], "top_k": 2}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) == 2 and body["missing"] == {"user": False, "items": 1}
        s = body["items"][0]["scores"]
        assert body["items"][0]["score"] == pytest.approx(s["ctr"] * s["cvr"], rel=1e-6)
        assert httpx.get(f"{base}/models", timeout=5).json()["provider"] in ("CPUExecutionProvider",
                                                                             "CUDAExecutionProvider")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "serving demo v1" in text and redis_url.split("//")[1] in text
