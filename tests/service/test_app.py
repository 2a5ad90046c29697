import logging

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.contract import MODEL_FILE
from tests.support.http import error_of
from tests.support.ports import free_port


def closed_port() -> int:
    """A loopback port nothing listens on (``free_port`` closes its socket before returning)."""
    return free_port()


@pytest.fixture
def client(make_settings, features):
    with TestClient(create_app(make_settings())) as c:
        yield c


def direct_run(store_root, inputs):
    sess = ort.InferenceSession(str(store_root / "demo" / "1" / MODEL_FILE), providers=["CPUExecutionProvider"])
    return dict(zip(["ctr", "cvr", "watch_time"], sess.run(["ctr", "cvr", "watch_time"], inputs), strict=True))


def test_rank_matches_direct_onnxruntime(client, store_root, features, reference):
    items = ["i3", "i0", "nope", "i7", "i1", "i9"]
    r = client.post("/rank", json={"user_id": "u1", "items": items, "context": {"hour": 13, "distance_km": 2.5},
                                   "request_id": "req-1"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["request_id"] == "req-1"
    assert body["model"] == {"name": "demo", "version": 1}
    assert body["missing"] == {"user": False, "items": 1}
    want = direct_run(store_root, reference(features, "u1", items, hour_index=14, distance=2.5))
    fused = want["ctr"].astype(np.float64) * want["cvr"] * (1 + want["watch_time"].astype(np.float64)) ** 0.2
    order = sorted(range(len(items)), key=lambda i: (-fused[i], i))
    assert [it["item_id"] for it in body["items"]] == [items[i] for i in order]
    for it, i in zip(body["items"], order, strict=True):
        for task in ("ctr", "cvr", "watch_time"):
            assert abs(it["scores"][task] - float(want[task][i])) <= 1e-6
        assert it["score"] == pytest.approx(fused[i], rel=1e-6)
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_top_k_missing_user_generated_request_id_and_int_ids(client):
    r = client.post("/rank", json={"user_id": 12345, "items": [1, "i2", "i4", "i5"], "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 2
    assert body["missing"] == {"user": True, "items": 1}
    assert len(body["request_id"]) == 32 and int(body["request_id"], 16) >= 0
    full = client.post("/rank", json={"user_id": 12345, "items": [1, "i2", "i4", "i5"]}).json()
    assert full["items"][:2] == body["items"]
    assert {it["item_id"] for it in full["items"]} == {"1", "i2", "i4", "i5"}


def test_duplicate_ids_each_scored_in_request_order(client):
    body = client.post("/rank", json={"user_id": "u0", "items": ["i2", "i5", "i2"]}).json()
    ids = [it["item_id"] for it in body["items"]]
    assert sorted(ids) == ["i2", "i2", "i5"]
    dup = [it for it in body["items"] if it["item_id"] == "i2"]
    assert dup[0] == dup[1]


def test_health_ready_models(client, redis_url):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "degraded": False}
    m = client.get("/models").json()
    assert m["name"] == "demo" and m["version"] == 1 and m["architecture"] == "test-mlp"
    assert [t["name"] for t in m["tasks"]] == ["ctr", "cvr", "watch_time"]
    assert m["provider"] == "CPUExecutionProvider" and m["requested_providers"] == ["CPUExecutionProvider"]
    assert m["inputs"] == ["user_sparse", "user_dense", "user_seq", "item_sparse", "item_dense",
                           "context_sparse", "context_dense"]
    assert m["metrics"] == {"auc_ctr": 0.7}
    assert redis_url not in str(m)
    assert client.get("/openapi.json").status_code == 200


def test_not_ready_when_redis_down(make_settings, features):
    url = f"redis://127.0.0.1:{closed_port()}/0"
    with TestClient(create_app(make_settings(redis_url=url, redis_timeout_ms=200, redis_failure_mode="fail"))) as c:
        r = c.get("/readyz")
        assert error_of(r, 503)["code"] == "not_ready"
        assert r.json()["ready"] is False and "redis" in r.json()["reasons"][0]
        r = c.post("/rank", json={"user_id": "u0", "items": ["i1"]})
        assert error_of(r, 503) == {"code": "feature_store_unavailable", "message": "feature store unavailable"}
        assert c.get("/healthz").status_code == 200
    # the default failure mode answers with default features instead, marked degraded: the replica
    # can still answer /rank usefully, so it stays ready, saying degraded and why
    with TestClient(create_app(make_settings(redis_url=url, redis_timeout_ms=200))) as c:
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["ready"] is True and r.json()["degraded"] is True and "redis" in r.json()["reasons"][0]
        r = c.post("/rank", json={"user_id": "u0", "items": ["i1"]})
        assert r.status_code == 200 and r.json()["degraded"] is True and r.json()["degraded_reason"]


@pytest.mark.parametrize("down", [False, True])
def test_password_not_logged_or_shown(make_settings, features, redis_url, caplog, down):
    url = redis_url.replace("redis://", "redis://:hunter2@")
    if down:
        url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    with caplog.at_level(logging.DEBUG):
        with TestClient(create_app(make_settings(redis_url=url, redis_timeout_ms=300))) as c:
            r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["degraded"] is down  # degrade mode: ready, degraded
            assert "hunter2" not in r.text
            if down:
                assert ":***@127.0.0.1" in r.text
            m = c.get("/models")
            assert m.status_code == 200 and "hunter2" not in m.text
            c.post("/rank", json={"user_id": "u0", "items": ["i1"]})
    assert caplog.records and not any("hunter2" in r.getMessage() for r in caplog.records)
    assert any(":***@" in r.getMessage() for r in caplog.records)


def loc_names(resp):
    return [str(x) for e in error_of(resp, 422)["details"] for x in e["loc"]]


@pytest.mark.parametrize("payload,field", [
    ({"user_id": "u0", "items": []}, "items"),
    ({"user_id": "u0", "items": "i1"}, "items"),
    ({"user_id": "u0", "items": ["i1", ""]}, "items"),
    ({"user_id": "u0", "items": [{"id": 1}]}, "items"),
    ({"items": ["i1"]}, "user_id"),
    ({"user_id": "", "items": ["i1"]}, "user_id"),
    ({"user_id": ["u0"], "items": ["i1"]}, "user_id"),
    ({"user_id": "u0", "items": ["i1"], "top_k": 0}, "top_k"),
    ({"user_id": "u0", "items": ["i1"], "top_k": "many"}, "top_k"),
    ({"user_id": "u0", "items": ["i1"], "context": "morning"}, "context"),
    ({"user_id": "u0", "items": ["i1"], "context": {"weather": "rain"}}, "weather"),
    ({"user_id": "u0", "items": ["i1"], "context": {"hour": [1]}}, "hour"),
    ({"user_id": "u0", "items": ["i1"], "topk": 3}, "topk"),
    ({"user_id": "u0", "items": ["i1"] * 6}, "items"),  # max_items=5
])
def test_bad_input_is_422_naming_the_field(make_settings, features, payload, field):
    with TestClient(create_app(make_settings(max_items=5)), raise_server_exceptions=False) as c:
        r = c.post("/rank", json=payload)
    assert r.status_code == 422, r.text
    assert field in loc_names(r)


def test_non_json_bodies(client):
    r = client.post("/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    r = client.post("/rank", content=b'{"user_id": "u0", "items": ["i1"]}', headers={"content-type": "text/plain"})
    assert "application/json" in error_of(r, 415)["message"]
    r = client.post("/rank", content=b"user_id=u0", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = client.post("/rank", content=b'{"user_id": "u0", "items": ["i1"]}')
    assert r.status_code == 415
    r = client.post("/rank", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/rank", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/rank", content=b'{"user_id": "u0", "items": ["i1"]}',
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_bundle_fails_to_load(make_settings, features, store_root):
    with open(store_root / "demo" / "1" / MODEL_FILE, "ab") as f:
        f.write(b"tampered")
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "sha256 mismatch" in r.json()["reasons"][0]
        r = c.post("/rank", json={"user_id": "u0", "items": ["i1"]})
        assert "sha256 mismatch" in error_of(r, 503)["message"]
        assert c.get("/models").status_code == 503


def test_fusion_weights_for_unknown_task_not_ready(make_settings, features):
    s = make_settings(fusion_weights={"ctr": 1.0, "dwell": 2.0})
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "dwell" in r.json()["reasons"][0]
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).status_code == 503


def test_unexpected_error_is_500_logged_with_request_id(make_settings, features, caplog):
    app = create_app(make_settings())
    with TestClient(app, raise_server_exceptions=False) as c:
        def boom(inputs):
            raise RuntimeError("kaboom")
        app.state.mtrank.bundle.run = boom
        with caplog.at_level(logging.ERROR, logger="service.app"):
            r = c.post("/rank", json={"user_id": "u0", "items": ["i1"], "request_id": "rid-77"})
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal_error", "message": "internal error"},
                                                 "request_id": "rid-77"}
    assert any("rid-77" in rec.getMessage() for rec in caplog.records)


def test_weighted_sum_fusion(make_settings, features):
    s = make_settings(fusion="weighted_sum", fusion_weights={"ctr": 1.0, "cvr": 2.0, "watch_time": 0.5})
    with TestClient(create_app(s)) as c:
        body = c.post("/rank", json={"user_id": "u0", "items": ["i1", "i2", "i3"]}).json()
    for it in body["items"]:
        sc = it["scores"]
        want = sc["ctr"] + 2 * sc["cvr"] + 0.5 * np.log1p(sc["watch_time"])
        assert it["score"] == pytest.approx(want, rel=1e-6)


def test_unusable_redis_url_still_starts(make_settings):
    with TestClient(create_app(make_settings(redis_url="redis://:pw@127.0.0.1:notaport/0"))) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "Port could not be cast" in r.text and "pw" not in r.text
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).status_code == 503


def test_unexpected_redis_client_error_takes_the_replica_out_of_rotation(make_settings, features):
    """A redis-py that does not take what the request path passes it (issue 11: redis 6.4 and
    ``driver_info``) raises TypeError on every read: not a Redis outage that degraded mode could
    answer. Each /rank is a 500, and /readyz says so (503) until a read succeeds again."""
    import redis as redis_py

    from service.redis_conn import WarmPool, connection_kwargs

    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as c:
        store = c.app.state.mtrank.redis_client
        node = store._single
        good = node.pool
        # a real warm pool whose connections get a keyword their class does not take
        kw = {**connection_kwargs(store.client.connection_pool, 1.0), "driver_info_v9": None}
        node.pool = WarmPool(node.name, redis_py.Connection, kw, 1, 1.0, paused=lambda: False, scrub=str).start()
        assert node.pool.wait_ready(5)
        try:
            r = c.post("/rank", json={"user_id": "u0", "items": ["i1"]})
            assert r.status_code == 500
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["ready"] is False
            assert any("TypeError" in x and "every /rank fails" in x for x in r.json()["reasons"]), r.json()
        finally:
            node.pool.close()
            node.pool = good
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).status_code == 200
        assert c.get("/readyz").json() == {"ready": True, "degraded": False}
