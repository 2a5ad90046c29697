"""Issue 14 item 6, one error shape: every non-2xx answer is ``{"error": {"code", "message",
"field"?, "details"?}, "request_id"}`` with the request id also in ``X-Request-Id`` and
``Retry-After`` on 429/503 (``tests.support.http.error_of`` checks it), whoever answered it (a
route, an exception handler, Starlette's router, the middleware), and OpenAPI documents it on every
route. 413 and 429 on a real server: tests/http/test_input_limits.py, test_overload.py; 503 of a
Redis down in fail mode: tests/service/test_app.py."""

from service.schemas import ERROR_STATUS, ErrorCode
from tests.support.http import error_of

TOKEN = "shape-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_every_error_answer_has_the_one_shape(app_client):
    with app_client(admin_token=TOKEN, store_poll_s=0) as c:
        def err(method, path, status, rid, **kw) -> dict:
            r = c.request(method, path, headers={"X-Request-Id": rid, **kw.pop("headers", {})}, **kw)
            e = error_of(r, status)
            assert r.json()["request_id"] == rid and ERROR_STATUS[ErrorCode(e["code"])] == status, r.text
            return e

        assert err("GET", "/nope", 404, "r-404")["code"] == "not_found"
        assert err("GET", "/rank", 405, "r-405")["code"] == "method_not_allowed"
        assert err("POST", "/rank", 415, "r-415", content=b"{}", headers={"content-type": "text/plain"})[
            "code"] == "unsupported_media_type"
        e = err("POST", "/rank", 422, "r-422", json={"user_id": "u0", "items": ["i1", 1.5, 2.5]})
        assert e["field"] == "items.1" and [d["field"] for d in e["details"]] == ["items.1", "items.2"]
        assert e["message"].startswith("items.1: ") and e["message"].endswith("(and 1 more)")
        e = err("POST", "/rank", 422, "r-ctx", json={"user_id": "u0", "items": ["i1"], "context": {"planet": 1}})
        assert e["code"] == "invalid_context" and e["field"] == "context.planet"
        assert err("GET", "/admin/models", 401, "r-401")["code"] == "unauthorized"
        assert err("GET", "/admin/models", 403, "r-403", headers={"Authorization": "Bearer wrong"})[
            "code"] == "forbidden"
        e = err("POST", "/admin/models/load", 422, "r-adm", json={"name": "../x", "version": 1}, headers=AUTH)
        assert e["field"] == "name"
        assert err("POST", "/admin/models/load", 404, "r-nis", json={"name": "demo", "version": 9}, headers=AUTH)[
            "code"] == "not_in_store"
        assert err("POST", "/admin/models/unload", 409, "r-409", json={"name": "demo", "version": 1},
                   headers=AUTH)["code"] == "in_use"

        def boom(inputs):
            raise RuntimeError("kaboom")

        c.app.state.mtrank.bundle.run = boom
        e = err("POST", "/rank", 500, "r-500", json={"user_id": "u0", "items": ["i1"]})
        assert e == {"code": "internal_error", "message": "internal error"}


def test_not_ready_answers_carry_request_id_and_retry_after(app_client):
    with app_client(fusion_weights={"ctr": 1.0, "dwell": 2.0}) as c:  # no serving state: not ready
        for method, path, kw in [("POST", "/rank", {"json": {"user_id": "u0", "items": ["i1"]}}),
                                 ("GET", "/models", {}), ("GET", "/readyz", {})]:
            r = c.request(method, path, headers={"X-Request-Id": f"nr-{path}"}, **kw)
            e = error_of(r, 503)
            assert e["code"] == "not_ready" and "dwell" in e["message"] and r.json()["request_id"] == f"nr-{path}"
        assert r.json()["ready"] is False and "dwell" in r.json()["reasons"][0]  # /readyz: the report as well


def test_openapi_documents_the_error_shape_on_every_route(app_client):
    with app_client(admin_token=TOKEN) as c:
        spec = c.get("/openapi.json").json()
    error_models = {"#/components/schemas/ErrorResponse", "#/components/schemas/NotReadyResponse"}
    seen = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            errors = {s: r for s, r in op["responses"].items() if s != "default" and int(s) >= 400}
            assert "500" in errors, (method, path)
            for status, resp in errors.items():
                ref = resp["content"]["application/json"]["schema"]["$ref"]
                assert ref in error_models, (method, path, status, ref)
                assert resp["headers"]["X-Request-Id"]["required"] is True
                assert ("Retry-After" in resp["headers"]) == (status in ("429", "503")), (method, path, status)
                seen += 1
    assert seen >= 20
    codes = spec["components"]["schemas"]["ErrorCode"]["enum"]
    assert set(codes) == {c.value for c in ErrorCode}
