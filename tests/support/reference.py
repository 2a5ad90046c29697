"""Expected scores computed without the service's feature code: the packed values are read back from
Redis by the test itself, decoded with the codec and run through onnxruntime directly."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort

from service.codec import EntityCodec
from service.contract import BundleManifest
from service.features import item_key, namespace, user_key


def expected_outputs(world, user: str, items: list[str], context: dict) -> dict[str, np.ndarray]:
    """Features read back from Redis by the test itself, run through onnxruntime directly."""
    bundle = world["bundle"]
    manifest = BundleManifest.from_json((bundle / "manifest.json").read_text())
    schema = manifest.feature_schema
    vocabs = json.loads((bundle / "vocab.json").read_text())
    ns = namespace(world["prefix"], schema)
    raw = world["redis"].mget([user_key(ns, user), *[item_key(ns, i) for i in items]])
    u = EntityCodec.for_schema(schema, "user").decode(raw[:1])
    it = EntityCodec.for_schema(schema, "item").decode(raw[1:])
    ctx = np.array([[vocabs[f.name].index(str(context[f.name])) + 1 for f in schema.sparse_of("context")]],
                   dtype=np.int64)
    feeds = {"user_sparse": u.sparse, "user_dense": u.dense, "user_seq": u.seq,
             "item_sparse": it.sparse, "item_dense": it.dense, "context_sparse": ctx}
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    return dict(zip([o.name for o in sess.get_outputs()], out, strict=True))
