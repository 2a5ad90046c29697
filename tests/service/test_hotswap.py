"""Hot swap in one process: new versions are verified (manifest, sha256, ONNX, features in Redis,
warm-up) before they serve; broken ones are refused with a reason while the old version serves;
version policies, rollback by pinning, reloads of the routing config, the watcher thread."""


import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.bundles import corrupt_bundle, publish_bundle, write_meta
from tests.support.wait import wait_for

TOKEN = "hotswap-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"user_id": "u1", "items": ["i1", "i2", "i3"]}


def served(c) -> tuple[str, int]:
    r = c.post("/rank", json=BODY)
    assert r.status_code == 200, r.text
    return r.json()["variant"], r.json()["model"]["version"]


def reload(c) -> dict:
    r = c.post("/admin/reload", headers=AUTH)
    assert r.status_code in (200, 422), r.text
    return r.json() if r.status_code == 200 else r.json()["error"]["details"]  # the report either way


def admin_models(c) -> dict:
    r = c.get("/admin/models", headers=AUTH)
    assert r.status_code == 200
    return r.json()


@pytest.fixture
def app_client(make_settings, features):
    def make(**kw):
        kw.setdefault("store_poll_s", 0)
        return TestClient(create_app(make_settings(admin_token=TOKEN, **kw)))
    return make


def test_new_version_swaps_in_on_reload(app_client, store_root):
    with app_client() as c:
        assert served(c) == ("default", 1)
        publish_bundle(store_root, version=2)
        assert served(c) == ("default", 1)  # nothing changes until the reload (no watcher here)
        rep = reload(c)
        assert rep["ok"] and rep["changed"] and rep["loaded"] == ["demo v2"] and rep["dropped"] == ["demo v1"]
        assert served(c) == ("default", 2)
        assert [b["version"] for b in admin_models(c)["bundles"]] == [2]
        rep = reload(c)  # nothing new: no swap
        assert rep["ok"] and not rep["changed"] and rep["loaded"] == []


REASONS = {
    "checksum": "sha256 mismatch",
    "truncated": "onnxruntime could not load it",
    "schema": "no features for its schema in Redis",
    "meta": "schema mismatch",
}


@pytest.mark.parametrize("how", list(REASONS))
def test_corrupt_version_refused_old_keeps_serving(app_client, store_root, redis_url, key_prefix, how):
    with app_client() as c:
        corrupt_bundle(store_root, how, version=2, redis_url=redis_url, prefix=key_prefix)
        rep = reload(c)
        assert rep["ok"] and not rep["changed"]
        assert REASONS[how] in rep["refused"]["demo v2"]
        assert served(c) == ("default", 1)
        m = admin_models(c)
        assert [(b["name"], b["version"]) for b in m["bundles"]] == [("demo", 1)]
        refused = {(r["name"], r["version"]): r for r in m["refused"]}
        assert REASONS[how] in refused[("demo", 2)]["reason"]
        assert refused[("demo", 2)]["retried_each_poll"] is (how == "schema")
        # a good version after the broken one is taken
        publish_bundle(store_root, version=3)
        rep = reload(c)
        assert rep["changed"] and rep["loaded"] == ["demo v3"]
        assert served(c) == ("default", 3)


def test_features_loaded_later_are_picked_up(app_client, store_root, redis_url, key_prefix):
    from tests.support.bundles import default_vocabs, make_schema

    with app_client() as c:
        corrupt_bundle(store_root, "schema", version=2)  # its features are not in Redis yet
        assert "no features" in reload(c)["refused"]["demo v2"]
        assert served(c) == ("default", 1)
        vocabs = default_vocabs()
        vocabs["category"] = vocabs["category"] + ["c-new"]
        write_meta(redis_url, key_prefix, make_schema(vocabs))  # `mtrank features load` for v2
        rep = reload(c)
        assert rep["loaded"] == ["demo v2"] and served(c) == ("default", 2)


def test_start_without_features_serves_as_before_then_confirms(make_settings, features, store_root, redis_url,
                                                               key_prefix, caplog):
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    meta = f"{features.prefix}:{features.schema.fingerprint()[:12]}:meta"
    client.delete(meta)
    with TestClient(create_app(make_settings(admin_token=TOKEN, store_poll_s=0))) as c:
        assert served(c) == ("default", 1)
        assert admin_models(c)["bundles"][0]["features_confirmed"] is False
        write_meta(redis_url, key_prefix, features.schema)
        reload(c)
        assert admin_models(c)["bundles"][0]["features_confirmed"] is True
    assert any("loading it anyway at start" in r.getMessage() for r in caplog.records)
    client.close()


def test_latest_prefers_confirmed_features_at_start(make_settings, features, store_root):
    corrupt_bundle(store_root, "schema", version=2)  # newer, but its features are not in Redis
    with TestClient(create_app(make_settings(admin_token=TOKEN, store_poll_s=0))) as c:
        assert served(c) == ("default", 1)
        held = {b["version"]: b["features_confirmed"] for b in admin_models(c)["bundles"]}
        assert held == {1: True, 2: False}


def write_config(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


ROLLBACK = """\
salt: rb
models:
  demo: {policy}
variants:
  - name: main
    percent: 100
    model: {{name: demo, version: {version}}}
    fusion: {{weights: {{ctr: 1.0, cvr: {cvr}}}}}
"""


def test_policy_latest_n_and_rollback_by_pin(app_client, store_root, tmp_path):
    for v in (2, 3):
        publish_bundle(store_root, version=v)
    cfg = tmp_path / "routing.yaml"
    write_config(cfg, ROLLBACK.format(policy="latest 2", version="latest", cvr=1.0))
    with app_client(routing_config=str(cfg)) as c:
        assert served(c) == ("main", 3)
        assert [b["version"] for b in admin_models(c)["bundles"]] == [2, 3]
        # roll back: pin version 1 (not in the policy: loaded because a variant pins it)
        write_config(cfg, ROLLBACK.format(policy="latest 2", version=1, cvr=1.0))
        rep = reload(c)
        assert rep["ok"] and rep["loaded"] == ["demo v1"]
        assert served(c) == ("main", 1)
        assert [b["version"] for b in admin_models(c)["bundles"]] == [1, 2, 3]
        # specific versions only
        write_config(cfg, ROLLBACK.format(policy="[1]", version=1, cvr=1.0))
        assert reload(c)["dropped"] == ["demo v2", "demo v3"]
        assert [b["version"] for b in admin_models(c)["bundles"]] == [1]


def test_invalid_config_on_reload_keeps_old_and_reports(app_client, store_root, tmp_path):
    cfg = tmp_path / "routing.yaml"
    write_config(cfg, ROLLBACK.format(policy="latest", version="latest", cvr=1.0))
    with app_client(routing_config=str(cfg)) as c:
        before = c.post("/rank", json=BODY).json()
        write_config(cfg, ROLLBACK.format(policy="latest", version="latest", cvr=".nan"))
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["code"] == "reload_failed"
        report = r.json()["error"]["details"]  # the reload report, as a successful reload answers it
        assert not report["ok"] and "line 8" in report["error"] and "finite" in report["error"]
        assert c.post("/rank", json=BODY).json()["items"] == before["items"]  # old weights still
        m = admin_models(c)
        assert "line 8" in m["last_error"] and m["routing"]["variants"][0]["fusion"]["weights"]["cvr"] == 1.0
        write_config(cfg, ROLLBACK.format(policy="latest", version="latest", cvr=3.0))
        assert reload(c)["changed"]
        after = c.post("/rank", json=BODY).json()
        for it in after["items"]:
            s = it["scores"]
            assert it["score"] == pytest.approx(s["ctr"] * s["cvr"] ** 3.0, rel=1e-6)
        assert admin_models(c)["last_error"] is None


def test_pinned_version_refused_on_reload_keeps_old_config(app_client, store_root, tmp_path):
    cfg = tmp_path / "routing.yaml"
    write_config(cfg, ROLLBACK.format(policy="latest", version="latest", cvr=1.0))
    with app_client(routing_config=str(cfg)) as c:
        corrupt_bundle(store_root, "checksum", version=2)
        write_config(cfg, ROLLBACK.format(policy="latest", version=2, cvr=1.0))
        rep = reload(c)
        assert not rep["ok"] and "line 7" in rep["error"] and "sha256 mismatch" in rep["error"]
        assert served(c) == ("main", 1)


def test_watcher_picks_up_new_version_and_config(app_client, store_root, tmp_path):
    cfg = tmp_path / "routing.yaml"
    write_config(cfg, ROLLBACK.format(policy="latest", version="latest", cvr=1.0))
    with app_client(routing_config=str(cfg), store_poll_s=0.05) as c:
        assert served(c) == ("main", 1)
        publish_bundle(store_root, version=2)
        wait_for(lambda: served(c) == ("main", 2))
        write_config(cfg, ROLLBACK.format(policy="latest", version="latest", cvr=2.0))

        def weights_changed():
            it = c.post("/rank", json=BODY).json()["items"][0]
            return it["score"] == pytest.approx(it["scores"]["ctr"] * it["scores"]["cvr"] ** 2, rel=1e-6)
        wait_for(weights_changed)
        gen = admin_models(c)["generation"]
        corrupt_bundle(store_root, "truncated", version=3)
        wait_for(lambda: any(r["version"] == 3 for r in admin_models(c)["refused"]))
        assert served(c) == ("main", 2) and admin_models(c)["generation"] == gen




def test_serving_state_is_immutable_and_replaced_whole(app_client, store_root):
    with app_client() as c:
        manager = c.app.state.mtrank.manager
        old = manager.state
        publish_bundle(store_root, version=2)
        reload(c)
        new = manager.state
        assert new is not old and new.generation == old.generation + 1
        # a request that read the old reference keeps a complete old world
        assert old.primary.bundle.version == 1 and dict(old.bundles).keys() == {("demo", 1, "fp32")}
        assert new.primary.bundle.version == 2 and dict(new.bundles).keys() == {("demo", 2, "fp32")}
        route = old.route("u1")
        assert route.variant.ranker.bundle.version == 1
        with pytest.raises(TypeError):
            old.bundles[("demo", 3, "fp32")] = None  # read-only mapping
        with pytest.raises(AttributeError):
            old.generation = 7  # frozen


# --- precisions: variants in fp32 and int8 -------------------------------------------------------

PRECISION_CONFIG = """\
salt: p8
allow_force: true
variants:
  - name: control
    percent: 50
    model: {name: demo, version: latest}
  - name: fast
    percent: 50
    model: {name: demo, version: %s}
    precision: int8
"""


def served_as(c, variant: str) -> tuple[int, list[float]]:
    r = c.post("/rank", json=BODY, headers={"X-Mtrank-Variant": variant})
    assert r.status_code == 200, r.text
    return r.json()["model"]["version"], sorted(it["scores"]["ctr"] for it in r.json()["items"])


def test_int8_variant_latest_is_the_newest_version_with_an_int8_model(app_client, store_root, tmp_path):
    from tests.service.test_store import add_int8

    add_int8(store_root / "demo" / "1")
    publish_bundle(store_root, version=2)  # fp32 only
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(PRECISION_CONFIG % "latest")
    with app_client(routing_config=str(cfg)) as c:
        assert served_as(c, "control")[0] == 2
        assert served_as(c, "fast")[0] == 1  # v2 has no int8 model
        m = admin_models(c)
        held = {(b["version"], b["precision"]) for b in m["bundles"]}
        assert held == {(1, "int8"), (2, "fp32")}
        refused = {(r["version"], r["precision"]): r["reason"] for r in m["refused"]}
        assert "no int8 model in this bundle" in refused[(2, "int8")]
        assert {v["name"]: v["precision"] for v in m["routing"]["variants"]} == {"control": "fp32", "fast": "int8"}

        # a new version with both precisions: each variant moves to it, in its own precision
        v3 = publish_bundle(store_root, version=3)
        add_int8(v3)
        rep = reload(c)
        assert rep["ok"] and sorted(rep["loaded"]) == ["demo v3", "demo v3 int8"]
        (v_c, fp32), (v_f, int8) = served_as(c, "control"), served_as(c, "fast")
        assert v_c == v_f == 3
        assert fp32 != int8 and fp32 == pytest.approx(int8, abs=0.05)  # the same model, two precisions
        assert {(b["version"], b["precision"]) for b in admin_models(c)["bundles"]} == {(3, "fp32"), (3, "int8")}


def test_int8_pinned_to_a_version_without_it_is_refused_naming_the_line(app_client, store_root, tmp_path):
    from tests.service.test_store import add_int8

    add_int8(store_root / "demo" / "1")
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(PRECISION_CONFIG % "1")
    with app_client(routing_config=str(cfg)) as c:
        assert served_as(c, "fast")[0] == 1
        publish_bundle(store_root, version=2)  # fp32 only
        cfg.write_text(PRECISION_CONFIG % "2")
        rep = reload(c)
        assert not rep["ok"] and "line 10" in rep["error"] and "no int8 model" in rep["error"]
        assert served_as(c, "fast")[0] == 1  # the old state keeps serving
