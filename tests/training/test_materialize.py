"""`mtrank features load`: packed values in a real Redis, idempotent, namespaced by schema."""

import json
import re
import zlib

import numpy as np
import redis

from service.codec import EntityCodec
from service.contract import ITEM_GROUPS, KEY_LAYOUT_VERSION, BundleManifest, item_key, meta_key, namespace, user_key
from training.data.dataset import encode_entities, prepare, read_raw
from training.data.synth import SynthConfig, generate
from training.export import export_bundle
from training.materialize import load_features
from training.models import build_model


def test_load_is_idempotent_and_namespaced(tmp_path, redis_url, key_prefix):
    data = tmp_path / "data"
    generate(data, SynthConfig(n_users=120, n_items=300, n_exposures=3000, seed=1), progress=False)
    ds = prepare(data)
    model = build_model("shared_bottom", ds.schema, ds.tasks)
    bundle = export_bundle(model, name="m", store=tmp_path / "store", train_config={}, metrics={},
                           parity_inputs=ds.inputs(np.arange(1000)), vocabs=ds.vocabs)
    client = redis.Redis.from_url(redis_url)
    s1 = load_features(data, bundle, client, prefix=key_prefix, chunk=50, progress=False)
    ns = namespace(key_prefix, ds.schema)
    assert s1.namespace == ns and (s1.users, s1.items) == (120, 300)
    keys = sorted(client.scan_iter(match=f"{key_prefix}:*", count=1000))
    assert len(keys) == 120 + 300 + 1
    # the layout, spelled out (docs/contract: changing it strands every loaded namespace)
    assert ns == f"{key_prefix}:{ds.schema.fingerprint()[:12]}"
    users = {f"{ns}:u:{u}".encode() for u in ds.users.ids}
    assert users | {f"{ns}:meta".encode()} < set(keys)
    h = f"{zlib.crc32(ns.encode()):08x}"  # key layout 2: an item key carries the hash tag of one of ITEM_GROUPS groups
    items = {re.fullmatch(rf"{ns}:i:\{{{h}\.(\d+)\.\d+\}}:(.+)", k.decode()).groups() for k in keys if b":i:" in k}
    assert items == {(str(zlib.crc32(i.encode()) % ITEM_GROUPS), i) for i in ds.items.ids}
    before = dict(zip(keys, client.mget(keys), strict=True))
    load_features(data, bundle, client, prefix=key_prefix, progress=False)  # again: same keys, same bytes
    after_keys = sorted(client.scan_iter(match=f"{key_prefix}:*", count=1000))
    assert after_keys == keys
    assert all(client.get(k) == v for k, v in before.items() if not k.endswith(b":meta"))
    meta = json.loads(client.get(meta_key(ns)))
    assert meta["schema_fingerprint"] == ds.schema.fingerprint() and meta["users"] == 120
    assert meta["key_layout"] == KEY_LAYOUT_VERSION == 2

    # the stored bytes decode to exactly what training encoded
    manifest = BundleManifest.from_json((bundle / "manifest.json").read_text())
    users = encode_entities(read_raw(data), manifest.feature_schema, ds.vocabs, "user")
    got = EntityCodec.for_schema(ds.schema, "user").decode(client.mget([user_key(ns, u) for u in users.ids]))
    np.testing.assert_array_equal(got.sparse, users.sparse)
    np.testing.assert_array_equal(got.seq, users.seq)
    np.testing.assert_allclose(got.dense, users.dense)
    assert not got.missing.any()
    assert client.get(item_key(ns, "999999")) is None

    # a schema with different vocabularies lands in another namespace, leaving this one untouched
    generate(tmp_path / "other", SynthConfig(n_users=100, n_items=200, n_exposures=2000, seed=2), progress=False)
    ds2 = prepare(tmp_path / "other")
    assert namespace(key_prefix, ds2.schema) != ns
    bundle2 = export_bundle(build_model("shared_bottom", ds2.schema, ds2.tasks), name="m2", store=tmp_path / "store",
                            train_config={}, metrics={}, parity_inputs=ds2.inputs(np.arange(1000)), vocabs=ds2.vocabs)
    load_features(tmp_path / "other", bundle2, client, prefix=key_prefix, progress=False)
    assert all(client.get(k) == v for k, v in before.items() if not k.endswith(b":meta"))
