"""The synthetic generator: determinism, label logic, plausible rates, correlation by construction."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data.spec import load_spec
from training.data.synth import DEVICES, TRUTH_DIR, SynthConfig, Truth, generate

SMALL = SynthConfig(n_users=500, n_items=1000, n_exposures=30_000)
FILES = ("exposures.parquet", "users.parquet", "items.parquet", "dataset.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    spec_path = generate(out, SMALL, progress=False)
    ex, us, it = (pq.read_table(out / f"{t}.parquet") for t in ("exposures", "users", "items"))
    return out, spec_path, ex, us, it


def col(table, name):
    return table.column(name).to_numpy()


def test_files_and_schema(data):
    out, spec_path, ex, us, it = data
    assert spec_path == out / "dataset.yaml"
    for f in FILES:
        assert (out / f).is_file()
    assert ex.num_rows == SMALL.n_exposures
    assert us.num_rows == SMALL.n_users and it.num_rows == SMALL.n_items
    assert ex.schema.field("user_id").type == pa.int64()
    assert ex.schema.field("item_id").type == pa.int64()
    assert ex.schema.field("ts").type == pa.int64()
    assert ex.schema.field("click").type == pa.int8()
    assert ex.schema.field("conversion").type == pa.int8()
    assert ex.schema.field("watch_time").type == pa.float32()
    assert ex.schema.field("device").type == pa.string()
    assert us.schema.field("gender").type == pa.string()
    for name in ("clicked_items", "converted_items"):
        assert us.schema.field(name).type == pa.list_(pa.int64())


def test_spec_loads_and_names_existing_columns(data):
    out, spec_path, ex, us, it = data
    spec = load_spec(out)
    assert spec.name == "synth"
    assert spec.path(spec.exposures.path) == (out / "exposures.parquet").resolve()
    tables = {"user": us, "item": it, "context": ex}
    for f in spec.features:
        assert f.col in tables[f.entity].column_names, f.name
    assert {f.name for f in spec.features if f.entity == "context"} == {"hour", "device"}
    seq = {f.name: f for f in spec.features if f.kind == "sequence"}
    assert seq["clicked_items"].max_len == 20 and seq["converted_items"].max_len == 10
    assert all(f.vocab_of == "item_id" for f in seq.values())
    tasks = {t.name: t for t in spec.tasks}
    assert tasks["ctr"].label == "click" and tasks["ctr"].condition is None
    assert tasks["cvr"].condition == "ctr" and tasks["watch_time"].condition == "ctr"
    assert tasks["watch_time"].kind == "regression"
    for t in spec.tasks:
        assert t.label in ex.column_names
    for key in (spec.exposures.user_key, spec.exposures.item_key, spec.exposures.time):
        assert key in ex.column_names
    assert spec.users.key in us.column_names and spec.items.key in it.column_names


def test_determinism(tmp_path, data):
    out, *_ = data
    same = tmp_path / "same"
    generate(same, SMALL, progress=False)
    for f in FILES:
        assert (same / f).read_bytes() == (out / f).read_bytes(), f
    for f in sorted((out / TRUTH_DIR).iterdir()):
        assert (same / TRUTH_DIR / f.name).read_bytes() == f.read_bytes(), f.name
    other = tmp_path / "other"
    generate(other, SynthConfig(n_users=500, n_items=1000, n_exposures=30_000, seed=8), progress=False)
    for t in ("exposures", "users", "items"):
        assert not pq.read_table(other / f"{t}.parquet").equals(pq.read_table(out / f"{t}.parquet")), t


def test_label_logic(data):
    _, _, ex, _, it = data
    click, conv, wt = col(ex, "click"), col(ex, "conversion"), col(ex, "watch_time")
    assert set(np.unique(click)) <= {0, 1} and set(np.unique(conv)) <= {0, 1}
    assert np.all(conv <= click)                      # conversion only after a click
    assert np.all(wt[click == 0] == 0.0)
    assert np.all(wt[click == 1] > 0.0)
    # capped by 3x the item's duration
    dur = col(it, "duration_s")[col(ex, "item_id") - 1]
    assert np.all(wt <= 3.0 * dur + 1e-3)


def test_rates_plausible(data):
    _, _, ex, _, _ = data
    click, conv, wt = col(ex, "click"), col(ex, "conversion"), col(ex, "watch_time")
    ctr = click.mean()
    cvr = conv[click == 1].mean()
    assert 0.05 <= ctr <= 0.10
    assert 0.10 <= cvr <= 0.20
    assert 0.004 <= conv.mean() <= 0.02
    w = wt[click == 1]
    assert 5 < np.median(w) < 300
    assert np.quantile(w, 0.99) > 5 * np.median(w)   # heavy tail


def test_ids_time_context_in_range(data):
    _, _, ex, us, it = data
    uid, iid, ts, hour = col(ex, "user_id"), col(ex, "item_id"), col(ex, "ts"), col(ex, "hour")
    assert uid.min() >= 1 and uid.max() <= SMALL.n_users
    assert iid.min() >= 1 and iid.max() <= SMALL.n_items
    assert np.array_equal(col(us, "user_id"), np.arange(1, SMALL.n_users + 1))
    assert np.array_equal(col(it, "item_id"), np.arange(1, SMALL.n_items + 1))
    t0 = 1767225600  # 2026-01-01T00:00:00Z
    assert np.all(np.diff(ts) >= 0)                   # sorted by time
    assert ts.min() >= t0 and ts.max() < t0 + 14 * 86400
    assert np.array_equal(hour, (ts - t0) // 3600 % 24)
    assert set(ex.column("device").to_pylist()) == {"ios", "android", "web"}
    assert set(us.column("gender").to_pylist()) <= {"f", "m", "x"}
    # exposures follow popularity: the top 10% of items get far more than 10% of exposures
    counts = np.sort(np.bincount(iid, minlength=SMALL.n_items + 1))[::-1]
    assert counts[: SMALL.n_items // 10].sum() > 0.4 * len(iid)


def test_sequences(data):
    _, _, _, us, _ = data
    for name, max_len in (("clicked_items", 20), ("converted_items", 10)):
        lists = us.column(name).to_pylist()
        lens = np.array([len(x) for x in lists])
        assert lens.max() <= max_len
        assert lens.max() == max_len                  # some heavy users fill it
        assert (lens == 0).any()                      # some light users have none
        vals = np.concatenate([x for x in lists if x])
        assert vals.min() >= 1 and vals.max() <= SMALL.n_items
    # more active users have longer histories
    act = col(us, "activity")
    lens = np.array([len(x) for x in us.column("clicked_items").to_pylist()])
    assert np.corrcoef(act, lens)[0, 1] > 0.3


def test_correlated_by_construction(data):
    _, _, ex, us, it = data
    click, conv, wt = col(ex, "click") == 1, col(ex, "conversion") == 1, col(ex, "watch_time")
    # watch time is higher for clicks that convert
    assert wt[conv].mean() > 1.2 * wt[click & ~conv].mean()
    # clicks land in the categories of the user's clicked_items history more than chance,
    # and more than non-clicked exposures do
    cat = col(it, "category")
    lists = us.column("clicked_items").to_pylist()
    has = np.zeros((SMALL.n_users + 1, cat.max() + 1), bool)
    rows = np.repeat(np.arange(1, SMALL.n_users + 1), [len(x) for x in lists])
    has[rows, cat[us.column("clicked_items").combine_chunks().flatten().to_numpy() - 1]] = True
    uid, icat = col(ex, "user_id"), cat[col(ex, "item_id") - 1]
    match = has[uid, icat]
    shuffled = has[np.random.default_rng(0).permutation(uid), icat]
    assert match[click].mean() > 1.5 * shuffled[click].mean()
    assert match[click].mean() > 1.5 * match[~click].mean()


def test_side_features_predictive(data):
    _, _, ex, us, _ = data
    # CTR differs across age buckets (taste shifts by age) and by device (context effect)
    click = col(ex, "click")
    age = col(us, "age_bucket")[col(ex, "user_id") - 1]
    by_age = np.array([click[age == b].mean() for b in np.unique(age) if (age == b).sum() > 1000])
    assert by_age.max() - by_age.min() > 0.01
    dev = np.array(ex.column("device").to_pylist())
    assert click[dev == "ios"].mean() > click[dev == "web"].mean()


def test_the_ground_truth_reproduces_the_labels(data):
    """truth/ (what `mtrank simulate` draws from) is the world the labels came from: its click
    probabilities on the logged exposures average to the observed click rate and rank the clicks,
    and outcomes drawn from it match the logged rates."""
    out, _, ex, _, _ = data
    truth = Truth(out / TRUTH_DIR)
    uid, iid, hour = col(ex, "user_id") - 1, col(ex, "item_id") - 1, col(ex, "hour")
    dev = np.array([DEVICES.index(d) for d in ex.column("device").to_pylist()])
    click, conv, watch = col(ex, "click"), col(ex, "conversion"), col(ex, "watch_time")
    p = truth.p_click(uid, iid, hour, dev)
    se = np.sqrt(click.mean() * (1 - click.mean()) / len(click))
    assert abs(p.mean() - click.mean()) < 4 * se
    pos, neg = p[click == 1], p[click == 0]
    auc = (pos[:, None] > neg[None, :2000]).mean()
    assert auc > 0.6, auc
    _, c2, v2, w2 = truth.outcomes(np.random.default_rng(1), uid, iid, hour, dev)
    assert abs(c2.mean() - click.mean()) < 6 * se
    assert abs(v2.sum() / c2.sum() - conv.sum() / click.sum()) < 0.03
    assert abs(np.log(w2[c2].mean() / watch[click == 1].mean())) < 0.1
