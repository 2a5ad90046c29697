"""A/B with one variant's features gone (issue 14): when the namespace of variant B's bundle
vanishes from Redis (here its meta key is deleted, as ``mtrank features gc`` or a flush would), the
watcher's tick makes B answer 503 - never ranked on defaults - while A keeps ranking; /readyz stays
200 but degraded, naming B; writing the features back restores B at the next tick."""

import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.contract import meta_key, namespace
from tests.support.bundles import default_vocabs, make_schema, publish_bundle, seed_features, write_meta

CONFIG = """\
salt: ab
allow_force: true
models:
  demo: [1, 2]
variants:
  - {name: A, percent: 50, model: {name: demo, version: 1}}
  - {name: B, percent: 50, model: {name: demo, version: 2}}
"""
BODY = {"user_id": "u1", "items": ["i1", "i2", "i3"]}
TOKEN = "ab-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_variant_whose_features_vanished_answers_503_while_the_other_ranks(make_settings, features, store_root,
                                                                            redis_url, key_prefix, tmp_path):
    vocabs = default_vocabs()
    vocabs["category"] = [*vocabs["category"], "c-new"]  # another vocabulary: another namespace
    publish_bundle(store_root, version=2, vocabs=vocabs)
    schema_b = make_schema(vocabs)
    seed_features(redis_url, key_prefix, schema_b)
    assert namespace(key_prefix, schema_b) != namespace(key_prefix, features.schema)
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(CONFIG)

    def rank(variant: str):
        return c.post("/rank", json=BODY, headers={"X-Mtrank-Variant": variant})

    with TestClient(create_app(make_settings(routing_config=str(cfg), store_poll_s=0, admin_token=TOKEN))) as c:
        manager = c.app.state.mtrank.manager
        assert rank("A").status_code == 200 and rank("B").status_code == 200
        redis.Redis.from_url(redis_url).delete(meta_key(namespace(key_prefix, schema_b)))
        manager.poll()  # the watcher's tick
        r = rank("B")
        assert r.status_code == 503 and "variant 'B'" in r.text and "vanished" in r.text, r.text
        assert rank("A").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] is True and body["degraded"] is True
        assert any("variant 'B'" in x and "vanished" in x for x in body["reasons"]), body
        held = {b["version"]: b["features_lost"] for b in c.get("/admin/models", headers=AUTH).json()["bundles"]}
        assert held[1] is None and "is absent" in held[2], held

        write_meta(redis_url, key_prefix, schema_b)  # features loaded again
        manager.poll()
        assert rank("B").status_code == 200
        assert c.get("/readyz").json() == {"ready": True, "degraded": False}
