"""Routing inside the app: every /rank is served by the variant of the user's bucket, with that
variant's model and fusion weights, and says so (variant, bucket, model) in the response and in
the access log. Invalid configs stop the start with the line and the reason."""

import json
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.access_log import JsonFormatter
from service.app import create_app
from service.routing import RoutingConfigError, bucket_of
from tests.support.http import error_of

W_CONTROL = {"ctr": 1.0, "cvr": 1.0, "watch_time": 0.2}
W_TREAT = {"ctr": 1.0, "cvr": 2.0, "watch_time": 0.5}

CONFIG = """\
salt: rt
allow_force: {allow}
layers:
  - name: ranking
    variants:
      - name: control
        buckets: [0, 4999]
        model: {{name: demo, version: 1}}
        fusion: {{name: weighted_product, weights: {{ctr: 1.0, cvr: 1.0, watch_time: 0.2}}}}
      - name: treatment
        buckets: [5000, 9999]
        model: {{name: demo, version: latest}}
        fusion: {{name: weighted_sum, weights: {{ctr: 1.0, cvr: 2.0, watch_time: 0.5}}}}
  - name: ui
    variants:
      - {{name: ui-a, percent: 50}}
      - {{name: ui-b, percent: 50}}
"""


def fused(name, weights, s):
    if name == "weighted_product":
        return float(np.exp(sum(w * (np.log(max(s[t], 1e-7)) if t != "watch_time" else np.log1p(s[t]))
                                for t, w in weights.items())))
    return sum(w * (s[t] if t != "watch_time" else np.log1p(s[t])) for t, w in weights.items())


@pytest.fixture
def routed(tmp_path, make_settings, features, store_root, bundle_factory):
    bundle_factory(store_root, version=2)

    def make(allow: bool = False, text: str | None = None, **kw):
        p = tmp_path / "routing.yaml"
        p.write_text(text if text is not None else CONFIG.format(allow=str(allow).lower()))
        return TestClient(create_app(make_settings(routing_config=str(p), store_poll_s=0, **kw)))
    return make


def test_each_user_served_by_the_variant_of_its_bucket(routed):
    users = [f"u{i}" for i in range(3)] + [f"new-{i}" for i in range(40)]
    seen = set()
    with routed() as c:
        for u in users:
            r = c.post("/rank", json={"user_id": u, "items": ["i1", "i2", "i3", "i4"]})
            assert r.status_code == 200, r.text
            body = r.json()
            bucket = bucket_of("rt", u)
            variant = "control" if bucket < 5000 else "treatment"
            assert (body["variant"], body["bucket"]) == (variant, bucket)
            if variant == "control":
                assert body["model"] == {"name": "demo", "version": 1}
                name, w = "weighted_product", W_CONTROL
            else:
                assert body["model"] == {"name": "demo", "version": 2}  # latest
                name, w = "weighted_sum", W_TREAT
            for it in body["items"]:
                assert it["score"] == pytest.approx(fused(name, w, it["scores"]), rel=1e-6)
            seen.add(variant)
    assert seen == {"control", "treatment"}


def test_variants_run_their_own_model_version(routed):
    forced = {}
    with routed(allow=True) as c:
        for v in ("control", "treatment"):
            r = c.post("/rank", json={"user_id": "u1", "items": ["i1", "i2"]}, headers={"X-Mtrank-Variant": v})
            forced[v] = {it["item_id"]: it["scores"]["ctr"] for it in r.json()["items"]}
            assert r.json()["variant"] == v
    assert forced["control"]["i1"] != forced["treatment"]["i1"]  # v1 and v2 are different models


def test_forced_variant_only_when_allowed(routed):
    user = next(f"x{i}" for i in range(100) if bucket_of("rt", f"x{i}") < 5000)  # a control user
    body = {"user_id": user, "items": ["i1"]}
    with routed(allow=False) as c:
        r = c.post("/rank", json=body, headers={"X-Mtrank-Variant": "treatment"})
        assert r.status_code == 200 and r.json()["variant"] == "control"
        # ignored, even a name that does not exist
        assert c.post("/rank", json=body, headers={"X-Mtrank-Variant": "nope"}).json()["variant"] == "control"
    with routed(allow=True) as c:
        r = c.post("/rank", json=body, headers={"X-Mtrank-Variant": "treatment"})
        assert r.status_code == 200
        assert r.json()["variant"] == "treatment" and r.json()["bucket"] == bucket_of("rt", user)
        assert r.json()["model"]["version"] == 2
        r = c.post("/rank", json=body, headers={"X-Mtrank-Variant": "nope"})
        err = error_of(r, 422)
        assert err["code"] == "unknown_variant" and err["field"] == "header.x-mtrank-variant"
        assert "treatment" in err["message"] and "nope" not in r.text  # the known ones; the header is not echoed
        assert err["details"][0]["loc"] == ["header", "x-mtrank-variant"]
        # a variant of another layer does not serve /rank
        assert c.post("/rank", json=body, headers={"X-Mtrank-Variant": "ui-a"}).status_code == 422


def test_without_routing_config_one_default_variant(make_settings, features):
    with TestClient(create_app(make_settings())) as c:
        body = c.post("/rank", json={"user_id": "u2", "items": ["i1"]}).json()
        assert body["variant"] == "default" and body["bucket"] == bucket_of("mtrank", "u2")
        assert body["model"] == {"name": "demo", "version": 1}
        m = c.get("/models").json()
        assert m["variants"] == [{"name": "default", "buckets": [0, 9999], "model": {"name": "demo", "version": 1},
                                  "fusion": {"name": "weighted_product", "weights": W_CONTROL}}]


def test_access_log_lines(routed):
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(JsonFormatter().format(record))

    h = Grab()
    logging.getLogger("service.access").addHandler(h)
    try:
        with routed(allow=True) as c:
            c.post("/rank", json={"user_id": "u0", "items": ["i1", "i2", "zz"], "request_id": "r-ok", "top_k": 2},
                   headers={"X-Mtrank-Variant": "treatment"})
            c.post("/rank", json={"user_id": "u0", "items": ["i1"], "request_id": "r-ctx", "context": {"bad": 1}})
            c.post("/rank", json={"user_id": "u0", "items": []})
    finally:
        logging.getLogger("service.access").removeHandler(h)
    lines = [json.loads(m) for m in records]
    assert len(lines) == 3
    assert all(x["logger"] == "service.access" and x["message"] == "rank" and x["level"] == "INFO" for x in lines)
    ok, ctx, invalid = lines
    assert ok["request_id"] == "r-ok" and ok["status"] == 200 and ok["variant"] == "treatment" and ok["forced"]
    assert ok["bucket"] == bucket_of("rt", "u0") and ok["model"] == {"name": "demo", "version": 2}
    assert ok["n_items"] == 3 and ok["n_returned"] == 2 and ok["missing_items"] == 1 and ok["missing_user"] is False
    assert set(ok["ms"]) == {"fetch", "assemble", "inference", "fusion", "serialise", "total"}
    assert ctx["status"] == 422 and ctx["request_id"] == "r-ctx" and ctx["error"] == "ContextError"
    assert ctx["variant"] == ("control" if bucket_of("rt", "u0") < 5000 else "treatment")
    assert invalid["status"] == 422 and invalid["error"] == "RequestValidationError"
    assert ok["degraded"] is False and ok["duration_ms"] >= ok["ms"]["total"]


def start_error(routed, text: str) -> str:
    with pytest.raises(RoutingConfigError) as e:
        with routed(text=text):
            pass
    return str(e.value)


def test_start_refused_on_invalid_config(routed):
    msg = start_error(routed, "salt: s\nvariants:\n  - {name: a, percent: 60, model: {name: demo}}\n"
                              "  - {name: b, percent: 30, model: {name: demo}}\n")
    assert "line 2" in msg and "sum to 90" in msg and "routing.yaml" in msg


def test_start_refused_on_unknown_model_version_or_task(routed):
    msg = start_error(routed, "salt: s\nvariants:\n  - name: a\n    percent: 100\n    model: {name: nosuch}\n")
    assert "line 5" in msg and "'nosuch' is not in the store" in msg and "demo" in msg
    msg = start_error(routed, "salt: s\nvariants:\n  - name: a\n    percent: 100\n"
                              "    model: {name: demo, version: 9}\n")
    assert "line 5" in msg and "version 9 is not in the store" in msg
    msg = start_error(routed, "salt: s\nvariants:\n  - name: a\n    percent: 100\n    model: {name: demo}\n"
                              "    fusion:\n      weights: {ctr: 1, dwell: 2}\n")
    assert "line 7" in msg and "dwell" in msg
    msg = start_error(routed, "salt: s\nmodels: {demo: [7]}\nvariants:\n"
                              "  - {name: a, percent: 100, model: {name: demo}}\n")
    assert "line 2" in msg and "version 7 of model 'demo' is not in the store" in msg


def test_start_refused_on_missing_config_file(tmp_path, make_settings, features):
    with pytest.raises(RoutingConfigError, match="cannot read"):
        with TestClient(create_app(make_settings(routing_config=str(tmp_path / "none.yaml")))):
            pass
