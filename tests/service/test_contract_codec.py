"""The shared contract (schema, manifest) and the packed-bytes codec."""

import numpy as np
import pytest
from pydantic import ValidationError

from service import codec, contract
from service.codec import HEADER, EntityCodec
from service.contract import (
    BundleManifest,
    DenseField,
    FeatureSchema,
    SequenceField,
    SparseField,
    model_inputs,
    namespace,
)
from tests.support.contract import TASKS


def schema(**kw) -> FeatureSchema:
    return FeatureSchema(
        sparse=[SparseField(name="user_id", entity="user", vocab_size=10),
                SparseField(name="item_id", entity="item", vocab_size=20),
                SparseField(name="cat", entity="item", vocab_size=5),
                SparseField(name="hour", entity="context", vocab_size=25)],
        dense=[DenseField(name="age", entity="user", mean=30.0, std=5.0),
               DenseField(name="price", entity="item", mean=2.0, std=1.0)],
        sequence=[SequenceField(name="clicked", entity="user", max_len=4, vocab_of="item_id"),
                  SequenceField(name="bought", entity="user", max_len=2, vocab_of="item_id")],
        **kw)




def test_model_inputs_names_and_widths():
    ins = {i.name: i for i in model_inputs(schema())}
    assert list(ins) == ["user_sparse", "user_dense", "user_seq", "item_sparse", "item_dense", "context_sparse"]
    assert ins["user_seq"].width == 6 and ins["user_seq"].fields == ["clicked", "bought"]
    assert ins["item_sparse"].fields == ["item_id", "cat"] and ins["item_sparse"].dtype == "int64"
    assert ins["item_dense"].dtype == "float32"


def test_schema_validation_names_the_problem():
    with pytest.raises(ValidationError, match="vocab_of 'nope'"):
        FeatureSchema(sparse=[SparseField(name="a", entity="user", vocab_size=3)],
                      sequence=[SequenceField(name="s", entity="user", max_len=2, vocab_of="nope")])
    with pytest.raises(ValidationError, match="duplicate"):
        FeatureSchema(sparse=[SparseField(name="a", entity="user", vocab_size=3),
                              SparseField(name="a", entity="item", vocab_size=3)])


def test_fingerprint_changes_with_vocabulary():
    a, b = schema(vocab_sha256="x"), schema(vocab_sha256="y")
    assert a.fingerprint() == schema(vocab_sha256="x").fingerprint()
    assert a.fingerprint() != b.fingerprint()


def _with(field: str, **changes) -> FeatureSchema:
    """schema() with one field replaced by a copy with ``changes``."""
    s = schema()
    lists = {k: [f.model_copy(update=changes) if f.name == field else f for f in getattr(s, k)]
             for k in ("sparse", "dense", "sequence")}
    return FeatureSchema(**lists)


def test_fingerprint_ignores_what_lives_in_the_bundle():
    """Normalisation stats and embedding sizes are not stored in Redis: a retrain that changes only
    them reads the same bytes, so it shares the namespace (and a context field is never stored)."""
    base = namespace("p", schema())
    assert namespace("p", _with("age", mean=99.0, std=7.0)) == base
    assert namespace("p", _with("item_id", embedding_dim=64)) == base
    s = schema()
    assert namespace("p", FeatureSchema(sparse=s.sparse, dense=[*s.dense, DenseField(name="temp", entity="context")],
                                        sequence=s.sequence)) == base


def test_fingerprint_covers_what_changes_the_stored_bytes(monkeypatch):
    base = namespace("p", schema())
    s = schema()
    swapped = FeatureSchema(sparse=[s.sparse[0], s.sparse[2], s.sparse[1], s.sparse[3]], dense=s.dense,
                            sequence=s.sequence)  # item fields in another order
    as_dense = FeatureSchema(sparse=[f for f in s.sparse if f.name != "cat"],
                             dense=[*s.dense, DenseField(name="cat", entity="item")], sequence=s.sequence)
    others = [swapped, as_dense, _with("clicked", max_len=5), _with("cat", vocab_size=6), schema(vocab_sha256="v")]
    spaces = {namespace("p", o) for o in others}
    assert base not in spaces and len(spaces) == len(others)
    assert namespace("q", schema()) != base
    for constant in ("CODEC_FORMAT_VERSION", "KEY_LAYOUT_VERSION"):
        with monkeypatch.context() as m:
            m.setattr(contract, constant, getattr(contract, constant) + 1)
            assert namespace("p", schema()) != base, constant
    assert codec.FORMAT_VERSION == contract.CODEC_FORMAT_VERSION == codec.HEADER[2]


def test_manifest_round_trip():
    s = schema()
    m = BundleManifest(name="demo", version=3, architecture="ple", tasks=TASKS, inputs=model_inputs(s),
                       outputs=["ctr", "cvr", "watch_time"], feature_schema=s, metrics={"auc/ctr": 0.7},
                       train_config={"levels": 2}, sha256="ab" * 32, library_versions={"torch": "2.13.0"})
    back = BundleManifest.from_json(m.to_json())
    assert back == m
    assert back.feature_schema.fingerprint() == s.fingerprint()
    with pytest.raises(ValidationError, match="one per task"):
        BundleManifest(name="d", version=1, architecture="ple", tasks=TASKS, inputs=[], outputs=["ctr"],
                       feature_schema=s, sha256="0")


def test_codec_round_trip_and_defaults():
    s = schema()
    c = EntityCodec.for_schema(s, "user")
    assert c.size == 4 + 4 * 1 + 4 * 1 + 4 * 6
    sparse = np.array([[3], [7]])
    dense = np.array([[31.5], [22.0]], dtype=np.float32)
    seq = np.array([[1, 2, 3, 0, 5, 0], [19, 0, 0, 0, 0, 0]])
    values = c.encode(sparse, dense, seq)
    assert all(v[:4] == HEADER and len(v) == c.size for v in values)
    d = c.decode([values[0], None, values[1]])
    np.testing.assert_array_equal(d.sparse, [[3], [0], [7]])
    np.testing.assert_array_equal(d.dense, np.array([[31.5], [30.0], [22.0]], dtype=np.float32))  # default = mean
    np.testing.assert_array_equal(d.seq[0], seq[0])
    np.testing.assert_array_equal(d.seq[1], 0)
    assert d.missing.tolist() == [False, True, False] and not d.corrupt.any()
    assert d.sparse.dtype == np.int64 and d.dense.dtype == np.float32


def test_codec_corrupt_values_degrade_to_defaults():
    s = schema()
    c = EntityCodec.for_schema(s, "item")
    good = c.encode(np.array([[4, 2]]), np.array([[9.0]]), np.zeros((1, 0)))[0]
    out_of_range = c.encode(np.array([[99, -3]]), np.array([[np.nan]]), np.zeros((1, 0)))[0]
    d = c.decode([good, good[:-1], b"XX" + good[2:], out_of_range, b""])
    assert d.corrupt.tolist() == [False, True, True, False, True]
    np.testing.assert_array_equal(d.sparse, [[4, 2], [0, 0], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(d.dense[:, 0], [9.0, 2.0, 2.0, 2.0, 2.0])
