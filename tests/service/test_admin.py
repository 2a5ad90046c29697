"""The operator's API: bearer token (404 when disabled, 401, 403), names that cannot leave the
store, listing, loading and unloading bundles (409 while a variant serves one)."""

import logging

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.bundles import corrupt_bundle, publish_bundle
from tests.support.http import error_of

TOKEN = "s3cr3t-admin-Token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = [("post", "/admin/reload", None), ("get", "/admin/models", None),
          ("post", "/admin/models/load", {"name": "demo", "version": 1}),
          ("post", "/admin/models/unload", {"name": "demo", "version": 1})]


@pytest.fixture
def admin(make_settings, features):
    def make(token=TOKEN, **kw):
        return TestClient(create_app(make_settings(admin_token=token, store_poll_s=0, **kw)))
    return make


def call(c, method, path, body=None, headers=None):
    if method == "get":
        return c.get(path, headers=headers or {})
    return c.post(path, json=body, headers=headers or {})


@pytest.mark.parametrize("token", [None, ""])
def test_disabled_without_token(admin, token):
    with admin(token=token) as c:
        for method, path, body in ROUTES:
            assert call(c, method, path, body, AUTH).status_code == 404, path
            assert call(c, method, path, body).status_code == 404, path
        assert c.get("/admin/reload").status_code == 404
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).status_code == 200


@pytest.mark.parametrize("header,status", [
    (None, 401), ("", 401), ("Bearer", 401), ("Bearer ", 401), (f"Basic {TOKEN}", 401), (TOKEN, 401),
    (f"Bearer {TOKEN} extra", 401), ("Bearer wrong", 403), (f"Bearer {TOKEN}x", 403), (f"Bearer {TOKEN[:-1]}", 403),
    (f"bearer {TOKEN}", 200), (f"Bearer {TOKEN}", 200),
])
def test_bearer_token(admin, header, status):
    with admin() as c:
        for method, path, body in ROUTES[:2]:
            r = call(c, method, path, body, {} if header is None else {"Authorization": header})
            assert r.status_code == status, (path, r.text)
            if status == 401:
                assert r.headers["www-authenticate"].startswith("Bearer")
            assert TOKEN not in r.text


def test_token_never_logged_or_shown(admin, caplog):
    with caplog.at_level(logging.DEBUG):
        with admin() as c:
            assert call(c, "get", "/admin/models", headers=AUTH).status_code == 200
            call(c, "get", "/admin/models", headers={"Authorization": "Bearer nope"})
            listing = call(c, "get", "/admin/models", headers=AUTH).text
            assert TOKEN not in c.get("/models").text and TOKEN not in listing
    assert caplog.records and not any(TOKEN in r.getMessage() for r in caplog.records)
    assert TOKEN not in repr(c.app.state.mtrank.settings)


@pytest.mark.parametrize("body,field", [
    ({"name": "..", "version": 1}, "name"),
    ({"name": "../demo", "version": 1}, "name"),
    ({"name": "demo/../../etc", "version": 1}, "name"),
    ({"name": "/etc", "version": 1}, "name"),
    ({"name": "a\\b", "version": 1}, "name"),
    ({"name": ".tmp-abc", "version": 1}, "name"),
    ({"name": "demo%2F..", "version": 1}, "name"),
    ({"name": "", "version": 1}, "name"),
    ({"name": "demo", "version": "../1"}, "version"),
    ({"name": "demo", "version": "1/../2"}, "version"),
    ({"name": "demo", "version": 0}, "version"),
    ({"name": "demo", "version": -1}, "version"),
    ({"name": "demo", "version": True}, "version"),
    ({"name": "demo", "version": 1.5}, "version"),
    ({"name": "demo"}, "version"),
    ({"name": "demo", "version": 1, "path": "/tmp"}, "path"),
])
@pytest.mark.parametrize("path", ["/admin/models/load", "/admin/models/unload"])
def test_names_cannot_escape_the_store(admin, body, field, path):
    with admin() as c:
        r = c.post(path, json=body, headers=AUTH)
        assert field in [str(x) for e in error_of(r, 422)["details"] for x in e["loc"]]


def test_list_load_unload(admin, store_root):
    publish_bundle(store_root, version=2)  # latest: 2 serves, 1 is not held
    with admin() as c:
        m = call(c, "get", "/admin/models", headers=AUTH).json()
        assert [(b["version"], b["used_by"]) for b in m["bundles"]] == [(2, ["default"])]
        assert m["routing"]["variants"][0]["model"] == {"name": "demo", "version": 2}
        # load an older version (e.g. to have a rollback ready): held, not serving
        r = c.post("/admin/models/load", json={"name": "demo", "version": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json()["loaded"] and r.json()["bundle"]["used_by"] == []
        m = call(c, "get", "/admin/models", headers=AUTH).json()
        assert [(b["version"], b["operator_loaded"]) for b in m["bundles"]] == [(1, True), (2, False)]
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).json()["model"]["version"] == 2
        # it survives reloads
        assert c.post("/admin/reload", headers=AUTH).status_code == 200
        assert [b["version"] for b in call(c, "get", "/admin/models", headers=AUTH).json()["bundles"]] == [1, 2]
        # the serving one cannot be unloaded
        r = c.post("/admin/models/unload", json={"name": "demo", "version": 2}, headers=AUTH)
        assert error_of(r, 409)["code"] == "in_use" and "default" in r.json()["error"]["message"]
        # the other one can
        r = c.post("/admin/models/unload", json={"name": "demo", "version": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json()["unloaded"]
        assert [b["version"] for b in call(c, "get", "/admin/models", headers=AUTH).json()["bundles"]] == [2]
        assert c.post("/admin/models/unload", json={"name": "demo", "version": 1}, headers=AUTH).status_code == 404
        # unknown versions and models
        assert c.post("/admin/models/load", json={"name": "demo", "version": 9}, headers=AUTH).status_code == 404
        assert c.post("/admin/models/load", json={"name": "nosuch", "version": 1}, headers=AUTH).status_code == 404
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).status_code == 200


def test_unloaded_version_stays_out_of_latest_policy(admin, store_root, tmp_path):
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("salt: s\nmodels: {demo: latest 2}\nvariants:\n"
                   "  - {name: main, percent: 100, model: {name: demo, version: 2}}\n")
    publish_bundle(store_root, version=2)
    with admin(routing_config=str(cfg)) as c:
        held = lambda: [b["version"] for b in call(c, "get", "/admin/models", headers=AUTH).json()["bundles"]]  # noqa
        assert held() == [1, 2]
        assert c.post("/admin/models/unload", json={"name": "demo", "version": 1}, headers=AUTH).status_code == 200
        c.post("/admin/reload", headers=AUTH)
        assert held() == [2]
        assert call(c, "get", "/admin/models", headers=AUTH).json()["unloaded_by_operator"] == [
            {"name": "demo", "version": 1}]
        assert c.post("/admin/models/load", json={"name": "demo", "version": 1}, headers=AUTH).status_code == 200
        assert held() == [1, 2]


def test_load_refused_bundle_is_422_with_reason(admin, store_root):
    corrupt_bundle(store_root, "checksum", version=2)
    with admin() as c:
        r = c.post("/admin/models/load", json={"name": "demo", "version": 2}, headers=AUTH)
        assert "sha256 mismatch" in error_of(r, 422)["message"]
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).json()["model"]["version"] == 1
