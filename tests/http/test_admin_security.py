"""Issue 6, admin security: for every admin route, no credentials -> 401 (with a Bearer challenge),
a wrong token -> 403; model names and versions cannot reach outside the model store, whatever the
route (a complete, valid bundle placed next to the store is never loaded)."""

import pytest

from tests.support.bundles import write_bundle
from tests.support.http import error_of, raw_request

TOKEN = "adm1n-t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"name": "demo", "version": 1}
ROUTES = [("POST", "/admin/reload", None), ("GET", "/admin/models", None),
          ("POST", "/admin/models/load", BODY), ("POST", "/admin/models/unload", BODY)]


@pytest.fixture
def admin(app_client):
    return lambda **kw: app_client(admin_token=TOKEN, store_poll_s=0, **kw)


def call(c, method, path, body=None, headers=None):
    return c.request(method, path, json=body, headers=headers or {})


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_missing_credentials_401_wrong_token_403(admin, method, path, body):
    with admin() as c:
        for headers in ({}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Basic Zm9vOmJhcg=="},
                        {"Authorization": TOKEN}, {"Authorization": f"Token {TOKEN}"}):
            r = call(c, method, path, body, headers)
            assert error_of(r, 401)["code"] == "unauthorized", (headers, r.text)
            assert r.headers["www-authenticate"] == 'Bearer realm="mtrank-admin"'
        for wrong in ("wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "\u00e9" * 4):
            r = call(c, method, path, body, {"Authorization": f"Bearer {wrong}".encode()})
            assert error_of(r, 403)["code"] == "forbidden" and "www-authenticate" not in r.headers, (wrong, r.text)
            assert TOKEN not in r.text
        # the request was refused before anything ran: the right token still finds the state untouched
        assert call(c, "GET", "/admin/models", None, AUTH).json()["bundles"][0]["version"] == 1
        assert c.post("/rank", json={"user_id": "u0", "items": ["i1"]}).status_code == 200


TRAVERSALS = [
    {"name": "..", "version": 1}, {"name": "../outside/evil", "version": 1}, {"name": "../../evil", "version": 1},
    {"name": "/tmp", "version": 1}, {"name": "demo/../../outside/evil", "version": 1},
    {"name": "..\\outside\\evil", "version": 1}, {"name": "%2e%2e", "version": 1},
    {"name": "..%2Foutside", "version": 1}, {"name": ".hidden", "version": 1}, {"name": "~", "version": 1},
    {"name": "evil\u2024\u2024", "version": 1}, {"name": "demo\x00", "version": 1}, {"name": "a" * 200, "version": 1},
    {"name": "demo", "version": "../1"}, {"name": "demo", "version": "1/../../outside"},
    {"name": "demo", "version": "1\x00"}, {"name": "demo", "version": "\u0661"}, {"name": "demo", "version": 0},
    {"name": ["demo"], "version": 1}, {"name": {"$path": "/"}, "version": 1},
]


@pytest.mark.parametrize("path", ["/admin/models/load", "/admin/models/unload"])
def test_names_and_versions_cannot_leave_the_store(admin, tmp_path, store_root, path):
    # a perfectly loadable bundle right next to the store, at every place a traversal could land
    for where in (tmp_path / "outside", tmp_path, store_root.parent):
        write_bundle(where, name="evil", version=1)
    with admin() as c:
        for body in TRAVERSALS:
            r = c.post(path, json=body, headers=AUTH)
            assert r.status_code == 422, (body, r.status_code, r.text)
            assert {"name", "version"} & {str(x) for e in error_of(r, 422)["details"] for x in e["loc"]}
        # an ordinary name that is not in the store is just unknown
        r = c.post(path, json={"name": "evil", "version": 1}, headers=AUTH)
        assert r.status_code == 404
        listing = c.get("/admin/models", headers=AUTH).json()
    assert "evil" not in str(listing)


def test_admin_paths_do_not_normalise_into_routes(admin, env_for, server_factory):
    srv = server_factory(env_for(MTRANK_ADMIN_TOKEN=TOKEN))
    for target in ("/admin/%2e%2e/admin/models", "/admin/models/..%2F..%2Fmodels", "/admin/models/load/..",
                   "/%2e%2e/admin/models", "/admin//models"):
        status, _, _ = raw_request(srv.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}")
        assert status in (404, 405), (target, status)
    status, _, body = raw_request(srv.port, f"GET /admin/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}")
    assert status == 200 and b"evil" not in body
