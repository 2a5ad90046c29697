"""The generic dataset loader: a user's own CSV + a YAML spec -> schema, vocabularies, arrays."""

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.support.specs import SPEC, reference_log
from training.data.dataset import prepare
from training.data.spec import load_spec


@pytest.fixture
def data_dir(tmp_path):
    log = reference_log()
    log.to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(SPEC))
    return tmp_path


def test_prepare_encodes_csv_without_entity_tables(data_dir):
    ds = prepare(data_dir)
    s = ds.schema
    # vocabularies: most frequent first, index 0 reserved for missing / OOV
    assert ds.vocabs["item_id"] == ["a", "b", "c"]
    assert s.field("item_id").vocab_size == 4
    assert ds.vocabs["device"][0] == "ios"
    # users come from the last exposure row of each user
    assert list(ds.users.ids) == ["1", "2", "3"]
    np.testing.assert_array_equal(ds.users.sparse[:, 0], [1, 2, 3])  # one row per user: ties sorted by value
    # sequences: truncated to max_len, "zzz" unknown -> 0, empty -> padding
    np.testing.assert_array_equal(ds.users.seq, [[1, 2, 3], [0, 0, 0], [2, 0, 0]])
    # dense stats over the user table, missing -> mean
    age = s.field("age")
    assert age.mean == pytest.approx(30.0) and age.std == pytest.approx(10.0)
    assert ds.users.dense[1, 0] == pytest.approx(30.0)
    assert s.vocab_sha256 and len(s.vocab_sha256) == 64


def test_inputs_gather_rows_and_split_is_reproducible(data_dir):
    ds = prepare(data_dir)
    x = ds.inputs(np.array([2, 0]))
    assert set(x) == {"user_sparse", "user_dense", "user_seq", "item_sparse", "context_sparse"}
    assert x["user_sparse"].shape == (2, 1) and x["user_seq"].shape == (2, 3)
    np.testing.assert_array_equal(x["item_sparse"][:, 0], [1, 1])  # item "a"
    np.testing.assert_array_equal(x["context_sparse"][:, 0], [1, 1])  # ios
    a = ds.split("random", seed=1)
    b = ds.split("random", seed=1)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert sorted(np.concatenate(a).tolist()) == list(range(len(ds)))
    train, _, test = ds.split("time", fractions=(0.5, 0.25, 0.25))
    assert ds.time[train].max() < ds.time[test].min()


def test_spec_errors_name_the_problem(tmp_path):
    bad = dict(SPEC, features=SPEC["features"] + [{"name": "s", "entity": "user", "kind": "sequence", "max_len": 2,
                                                   "vocab_of": "nope"}])
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="nope"):
        load_spec(tmp_path)


def test_per_exposure_user_snapshots(data_dir):
    spec = dict(SPEC, user_features_per_exposure=True)
    (data_dir / "dataset.yaml").write_text(yaml.safe_dump(spec))
    ds = prepare(data_dir)
    assert len(ds.users.ids) == len(ds) == 6  # one user snapshot per exposure
    x = ds.inputs(np.arange(6))
    # each row sees its own sequence: row 4 "c", row 5 "b|zzz"
    c, b = ds.vocabs["item_id"].index("c") + 1, ds.vocabs["item_id"].index("b") + 1
    np.testing.assert_array_equal(x["user_seq"][4], [c, 0, 0])
    np.testing.assert_array_equal(x["user_seq"][5], [b, 0, 0])
    # the feature store gets each user's latest snapshot by time: user 1's is t=5 (row 0), user 3's t=6
    from training.data.dataset import encode_entities, read_raw
    latest = encode_entities(read_raw(data_dir), ds.schema, ds.vocabs, "user")
    assert sorted(latest.ids) == ["1", "2", "3"]
    row = {u: i for i, u in enumerate(latest.ids)}
    np.testing.assert_array_equal(latest.seq[row["3"]], [b, 0, 0])
    np.testing.assert_array_equal(latest.seq[row["1"]], x["user_seq"][0])


def test_split_column(data_dir):
    log = pd.read_csv(data_dir / "log.csv")
    log["part"] = ["train", "train", "valid", "train", "test", "test"]
    log.to_csv(data_dir / "log.csv", index=False)
    spec = dict(SPEC, exposures=dict(SPEC["exposures"], split="part"))
    (data_dir / "dataset.yaml").write_text(yaml.safe_dump(spec))
    tr, va, te = prepare(data_dir).split("column")
    assert tr.tolist() == [0, 1, 3] and va.tolist() == [2] and te.tolist() == [4, 5]
    (data_dir / "dataset.yaml").write_text(yaml.safe_dump(SPEC))  # no split column named
    with pytest.raises(ValueError, match="exposures.split"):
        prepare(data_dir).split("column")
