"""A real (small) ONNX bundle built with ``onnx.helper`` - no torch - and features written into the
test Redis with the service's own codec and key helpers.

The model mirrors what training exports: embedding tables as initializers + Gather, the mean of
the sequence embeddings, the user/context parts expanded to the N items (from the shape of
``item_sparse``), an MLP, Sigmoid heads for ctr/cvr and ``exp(relu(x)) - 1`` for watch_time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import redis
from onnx import TensorProto, helper, numpy_helper

from service.codec import EntityCodec
from service.contract import (
    MANIFEST_FILE,
    MODEL_FILE,
    VOCAB_FILE,
    BundleManifest,
    DenseField,
    FeatureSchema,
    SequenceField,
    SparseField,
    model_inputs,
    sha256_file,
)
from service.features import item_key, meta_key, namespace, user_key
from tests.support.contract import TASKS

DIM = 4
HIDDEN = 8


def default_vocabs() -> dict[str, list[str]]:
    return {
        "user_id": [f"u{i}" for i in range(10)],
        "gender": ["m", "f", "x"],
        "item_id": [f"i{i}" for i in range(20)],
        "category": [f"c{i}" for i in range(5)],
        "hour": [str(h) for h in range(24)],
    }


def make_schema(vocabs: dict[str, list[str]] | None = None) -> FeatureSchema:
    vocabs = vocabs or default_vocabs()
    vsha = hashlib.sha256(json.dumps(vocabs, sort_keys=True).encode()).hexdigest()
    size = {k: len(v) + 1 for k, v in vocabs.items()}
    return FeatureSchema(
        sparse=[
            SparseField(name="user_id", entity="user", vocab_size=size["user_id"], embedding_dim=DIM),
            SparseField(name="gender", entity="user", vocab_size=size["gender"], embedding_dim=DIM),
            SparseField(name="item_id", entity="item", vocab_size=size["item_id"], embedding_dim=DIM),
            SparseField(name="category", entity="item", vocab_size=size["category"], embedding_dim=DIM),
            SparseField(name="hour", entity="context", vocab_size=size["hour"], embedding_dim=DIM),
        ],
        dense=[
            DenseField(name="age", entity="user", mean=30.0, std=10.0),
            DenseField(name="price", entity="item", mean=10.0, std=5.0),
            DenseField(name="popularity", entity="item", mean=0.5, std=0.25),
            DenseField(name="distance_km", entity="context", mean=3.0, std=2.0),
        ],
        sequence=[SequenceField(name="clicked", entity="user", max_len=5, vocab_of="item_id")],
        vocab_sha256=vsha,
    )


def build_model(schema: FeatureSchema, seed: int = 0) -> onnx.ModelProto:
    """A small real ranking model for ``schema`` (outputs ctr, cvr, watch_time [N])."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    # one table for every sparse field, with a row offset per field
    offsets, tables, off = {}, [], 0
    for f in schema.sparse:
        offsets[f.name] = off
        tables.append(rng.normal(0, 0.5, size=(f.vocab_size, DIM)).astype(np.float32))
        off += f.vocab_size
    const("emb", np.concatenate(tables))
    const("reshape_flat", np.array([0, -1], dtype=np.int64))

    graph_inputs = []
    entity_vecs: dict[str, str] = {}
    for ent in ("user", "context", "item"):
        batch = f"{ent}_batch"
        parts: list[str] = []
        for mi in model_inputs(schema):
            if mi.entity != ent:
                continue
            elem = TensorProto.INT64 if mi.dtype == "int64" else TensorProto.FLOAT
            graph_inputs.append(helper.make_tensor_value_info(mi.name, elem, [batch, mi.width]))
            if mi.kind == "sparse":
                o = const(f"{mi.name}_off", np.array([offsets[n] for n in mi.fields], dtype=np.int64))
                idx = node("Add", [mi.name, o], f"{mi.name}_idx")
                e = node("Gather", ["emb", idx], f"{mi.name}_emb")  # [B, k, D]
                parts.append(node("Reshape", [e, "reshape_flat"], f"{mi.name}_flat"))
            elif mi.kind == "dense":
                mean = const(f"{mi.name}_mean", np.array([schema.field(n).mean for n in mi.fields], np.float32))
                std = const(f"{mi.name}_std", np.array([schema.field(n).std for n in mi.fields], np.float32))
                c = node("Sub", [mi.name, mean], f"{mi.name}_c")
                parts.append(node("Div", [c, std], f"{mi.name}_z"))
            else:  # sequence: mean of the embeddings of each field's ids
                start = 0
                for fname in mi.fields:
                    sf = schema.field(fname)
                    s = node("Slice", [mi.name, const(f"{fname}_s0", np.array([start], np.int64)),
                                       const(f"{fname}_s1", np.array([start + sf.max_len], np.int64)),
                                       const(f"{fname}_ax", np.array([1], np.int64))], f"{fname}_ids")
                    idx = node("Add", [s, const(f"{fname}_off", np.array(offsets[sf.vocab_of], np.int64))],
                               f"{fname}_idx")
                    e = node("Gather", ["emb", idx], f"{fname}_emb")  # [B, L, D]
                    parts.append(node("ReduceMean", [e], f"{fname}_mean", axes=[1], keepdims=0))
                    start += sf.max_len
        entity_vecs[ent] = node("Concat", parts, f"{ent}_vec", axis=1) if len(parts) > 1 else parts[0]

    # broadcast user/context (batch 1) to the N items: Expand to [N, 1]
    shp = node("Shape", ["item_sparse"], "item_shape")
    n = node("Slice", [shp, const("z0", np.array([0], np.int64)), const("z1", np.array([1], np.int64))], "n_items")
    target = node("Concat", [n, const("one", np.array([1], np.int64))], "expand_to", axis=0)
    u = node("Expand", [entity_vecs["user"], target], "user_n")
    c = node("Expand", [entity_vecs["context"], target], "context_n")
    x = node("Concat", [u, c, entity_vecs["item"]], "x", axis=1)

    width = sum(
        (mi.width * DIM if mi.kind == "sparse" else mi.width if mi.kind == "dense"
         else len(mi.fields) * DIM) for mi in model_inputs(schema))
    w1 = const("w1", rng.normal(0, 1 / np.sqrt(width), size=(width, HIDDEN)).astype(np.float32))
    b1 = const("b1", rng.normal(0, 0.1, size=HIDDEN).astype(np.float32))
    w2 = const("w2", rng.normal(0, 1 / np.sqrt(HIDDEN), size=(HIDDEN, len(TASKS))).astype(np.float32))
    b2 = const("b2", np.array([-0.5, -1.0, 1.0], np.float32))
    h = node("Relu", [node("Add", [node("MatMul", [x, w1], "xw1"), b1], "h0")], "h")
    logits = node("Add", [node("MatMul", [h, w2], "hw2"), b2], "logits")
    for j, t in enumerate(TASKS):
        col = node("Gather", [logits, const(f"col{j}", np.array(j, np.int64))], f"{t.name}_logit", axis=1)
        if t.kind == "binary":
            node("Sigmoid", [col], t.name)
        else:
            ex = node("Exp", [node("Relu", [col], f"{t.name}_relu")], f"{t.name}_exp")
            node("Sub", [ex, const("f_one", np.array(1.0, np.float32))], t.name)
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["item_batch"]) for t in TASKS]
    graph = helper.make_graph(nodes, "mtrank_test", graph_inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mtrank-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_bundle(store_root: Path, name: str = "demo", version: int = 1, seed: int | None = None,
                 schema: FeatureSchema | None = None, vocabs: dict[str, list[str]] | None = None) -> Path:
    """Write a complete bundle to ``store_root/name/version`` and return its directory."""
    vocabs = vocabs or default_vocabs()
    schema = schema or make_schema(vocabs)
    d = Path(store_root) / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(schema, seed=version if seed is None else seed), str(d / MODEL_FILE))
    (d / VOCAB_FILE).write_text(json.dumps(vocabs))
    inputs = model_inputs(schema)
    manifest = BundleManifest(
        name=name, version=version, architecture="test-mlp", tasks=TASKS, inputs=inputs,
        outputs=[t.name for t in TASKS], feature_schema=schema, metrics={"auc_ctr": 0.7},
        sha256=sha256_file(d / MODEL_FILE), library_versions={"onnx": onnx.__version__},
    )
    (d / MANIFEST_FILE).write_text(manifest.to_json())
    return d


@dataclass
class FeatureData:
    """What was written to Redis, for building reference inputs in tests."""

    schema: FeatureSchema
    prefix: str
    users: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # id -> (sparse, dense, seq) rows
    items: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def put_entities(client: redis.Redis, prefix: str, schema: FeatureSchema, entity: str,
                 rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    codec = EntityCodec.for_schema(schema, entity)
    ids = list(rows)
    values = codec.encode(np.array([rows[i][0] for i in ids]), np.array([rows[i][1] for i in ids]),
                          np.array([rows[i][2] for i in ids]))
    ns = namespace(prefix, schema)
    keyf = user_key if entity == "user" else item_key
    client.mset({keyf(ns, i): v for i, v in zip(ids, values, strict=True)})


def seed_features(redis_url: str, prefix: str, schema: FeatureSchema, n_users: int = 3, n_items: int = 10,
                  seed: int = 7) -> FeatureData:
    rng = np.random.default_rng(seed)
    f = schema.field
    users = {}
    for u in range(n_users):
        sparse = np.array([u + 1, rng.integers(1, f("gender").vocab_size)], dtype=np.int64)
        dense = np.array([rng.uniform(18, 60)], dtype=np.float32)
        seq = np.zeros(5, dtype=np.int64)
        k = int(rng.integers(0, 6))
        seq[:k] = rng.integers(1, f("item_id").vocab_size, size=k)
        users[f"u{u}"] = (sparse, dense, seq)
    items = {}
    for i in range(n_items):
        sparse = np.array([i + 1, rng.integers(1, f("category").vocab_size)], dtype=np.int64)
        dense = np.array([rng.uniform(1, 30), rng.uniform(0, 1)], dtype=np.float32)
        items[f"i{i}"] = (sparse, dense, np.zeros(0, dtype=np.int64))
    client = redis.Redis.from_url(redis_url)
    put_entities(client, prefix, schema, "user", users)
    put_entities(client, prefix, schema, "item", items)
    client.close()
    write_meta(redis_url, prefix, schema, n_users=n_users, n_items=n_items)
    return FeatureData(schema=schema, prefix=prefix, users=users, items=items)


def write_meta(redis_url: str, prefix: str, schema: FeatureSchema, fingerprint: str | None = None,
               n_users: int = 0, n_items: int = 0) -> str:
    """The namespace meta key, as `mtrank features load` writes it (``fingerprint`` to fake another schema)."""
    key = meta_key(namespace(prefix, schema))
    client = redis.Redis.from_url(redis_url)
    client.set(key, json.dumps({"schema_fingerprint": fingerprint or schema.fingerprint(), "model": "test",
                                "version": 1, "users": n_users, "items": n_items, "loaded_at": time.time()}))
    client.close()
    return key


def publish_bundle(store_root: Path, name: str = "demo", version: int = 2, **kw) -> Path:
    """Publish a bundle the way training does: write it under ``<name>/.tmp-<uuid>``, then rename."""
    staging = Path(store_root) / name / f".tmp-{uuid.uuid4().hex}"
    built = write_bundle(staging, name=name, version=version, **kw)
    final = Path(store_root) / name / str(version)
    os.rename(built, final)
    os.rmdir(staging / name)
    os.rmdir(staging)
    return final


def corrupt_bundle(store_root: Path, how: str, name: str = "demo", version: int = 2,
                   redis_url: str | None = None, prefix: str | None = None) -> Path:
    """Publish a broken version: ``checksum`` (model bytes changed after the manifest), ``truncated``
    (ONNX cut in half, manifest sha256 updated to match), ``schema`` (another vocabulary: no features
    in Redis for its schema), ``meta`` (Redis meta of its namespace names another schema)."""
    staging = Path(store_root) / name / f".tmp-{uuid.uuid4().hex}"
    if how in ("schema", "meta"):
        vocabs = default_vocabs()
        vocabs["category"] = vocabs["category"] + ["c-new"]
        d = write_bundle(staging, name=name, version=version, vocabs=vocabs)
        if how == "meta":
            write_meta(redis_url, prefix, make_schema(vocabs), fingerprint="0" * 64)
    else:
        d = write_bundle(staging, name=name, version=version)
        model = d / MODEL_FILE
        data = model.read_bytes()
        if how == "checksum":
            model.write_bytes(data[:-8] + bytes(8))
        elif how == "truncated":
            model.write_bytes(data[: len(data) // 2])
            m = json.loads((d / MANIFEST_FILE).read_text())
            m["sha256"] = sha256_file(model)
            (d / MANIFEST_FILE).write_text(json.dumps(m))
        else:
            raise ValueError(how)
    final = Path(store_root) / name / str(version)
    os.rename(d, final)
    os.rmdir(staging / name)
    os.rmdir(staging)
    return final


def reference_inputs(data: FeatureData, user_id: str, item_ids: list[str], hour_index: int = 0,
                     distance: float | None = None) -> dict[str, np.ndarray]:
    """Model inputs built straight from what was written (defaults for ids never written)."""
    s = data.schema
    f = s.field
    u_def = (np.zeros(2, np.int64), np.array([f("age").mean], np.float32), np.zeros(5, np.int64))
    i_def = (np.zeros(2, np.int64), np.array([f("price").mean, f("popularity").mean], np.float32), None)
    u = data.users.get(user_id, u_def)
    its = [data.items.get(i, i_def) for i in item_ids]
    return {
        "user_sparse": u[0].reshape(1, -1).astype(np.int64),
        "user_dense": u[1].reshape(1, -1).astype(np.float32),
        "user_seq": u[2].reshape(1, -1).astype(np.int64),
        "item_sparse": np.array([r[0] for r in its], dtype=np.int64),
        "item_dense": np.array([r[1] for r in its], dtype=np.float32),
        "context_sparse": np.array([[hour_index]], dtype=np.int64),
        "context_dense": np.array([[f("distance_km").mean if distance is None else distance]], dtype=np.float32),
    }
