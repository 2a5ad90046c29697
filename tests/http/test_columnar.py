"""The columnar /rank response (issue 14 item 9), negotiated with ``Accept``: a real server on the
test bundle and Redis features. Both shapes carry the same ids, scores and order; every other
``Accept`` gets the default response, unchanged; the OpenAPI documents both."""

import httpx

from service.columnar import MEDIA_TYPE, wants_columnar

REQUEST = {"user_id": "u0", "items": ["i1", "i2", "nope", "i3", "i1", "i7", "i5"], "context": {"hour": 20},
           "request_id": "col-1"}


def as_columns(default: dict) -> dict:
    """The default response rewritten in the columnar shape (what the columnar answer must equal)."""
    items = default.pop("items")
    tasks = list(items[0]["scores"])
    return {**default, "item_ids": [it["item_id"] for it in items], "score": [it["score"] for it in items],
            "scores": {t: [it["scores"][t] for it in items] for t in tasks}}


def test_columnar_and_default_responses_agree(env_for, serve_factory):
    srv = serve_factory(env_for())
    url = f"{srv.base}/rank"
    with httpx.Client(timeout=10) as c:
        plain = c.post(url, json=REQUEST)
        col = c.post(url, json=REQUEST, headers={"accept": MEDIA_TYPE})
        top = c.post(url, json={**REQUEST, "top_k": 3}, headers={"accept": f"{MEDIA_TYPE}, application/json;q=0.5"})
        top_plain = c.post(url, json={**REQUEST, "top_k": 3})
        others = [c.post(url, json=REQUEST, headers={"accept": a}) for a in
                  ("application/json", "*/*", "text/html", "application/vnd.other+json", "garbage;;q=x,,",
                   f"{MEDIA_TYPE};q=0", f"{MEDIA_TYPE};q=0.5, application/json")]
        spec = c.get(f"{srv.base}/openapi.json").json()

    assert plain.status_code == col.status_code == 200, (plain.text, col.text)
    assert plain.headers["content-type"] == "application/json"
    assert col.headers["content-type"] == MEDIA_TYPE
    d, k = plain.json(), col.json()
    assert "items" not in k and len(d["items"]) == len(REQUEST["items"])
    assert k == as_columns(d)  # same ids, scores (exactly: both are the float64 values) and order
    assert k["score"] == sorted(k["score"], reverse=True)
    assert k["missing"] == {"user": False, "items": 1} and k["degraded"] is False

    assert top.headers["content-type"] == MEDIA_TYPE and len(top.json()["item_ids"]) == 3
    assert top.json() == as_columns(top_plain.json())

    for r in others:  # anything else: the default response, byte for byte
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.request.headers
        assert r.content == plain.content

    content = spec["paths"]["/rank"]["post"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", MEDIA_TYPE}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/RankResponse"}
    col_schema = content[MEDIA_TYPE]["schema"]
    assert {"item_ids", "score", "scores", "model", "missing"} <= set(col_schema["properties"])
    for ref in ("ModelRef", "Missing"):  # the refs the columnar schema uses resolve
        assert ref in spec["components"]["schemas"]


def test_accept_negotiation():
    assert not wants_columnar(None) and not wants_columnar("") and not wants_columnar("application/json")
    assert wants_columnar(MEDIA_TYPE) and wants_columnar(MEDIA_TYPE.upper())
    assert wants_columnar(f"application/json;q=0.9, {MEDIA_TYPE}")
    assert wants_columnar(f"{MEDIA_TYPE}, */*")  # equal preference: the client named it
    assert not wants_columnar(f"{MEDIA_TYPE};q=0.5, application/json")
    assert not wants_columnar(f"{MEDIA_TYPE};q=0")
    assert not wants_columnar(f"{MEDIA_TYPE};q=abc")
    assert not wants_columnar(f"{MEDIA_TYPE}x")  # another type that starts with the same letters
