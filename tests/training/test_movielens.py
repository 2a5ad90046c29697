"""The MovieLens-100K exposure log: protocol, features as of the exposure, split column, spec.

Reads the real files from ../shared/datasets/movielens-100k (research use only; never copied) and
writes only to pytest's tmp dirs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data.movielens import DEFAULT_SOURCE, build, dataset_spec
from training.data.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
FILES = ("exposures.parquet", "items.parquet", "dataset.yaml")

pytestmark = pytest.mark.skipif(not (DEFAULT_SOURCE / "u.data").is_file(),
                                reason=f"MovieLens-100K not found at {DEFAULT_SOURCE}")


def _repo_outputs_since(t0: float) -> list[Path]:
    """Files named like our outputs (or any Parquet) inside the repository written since t0."""
    skip = {".venv", ".git", "__pycache__", ".pytest_cache", "node_modules"}
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        for f in files:
            if f in FILES or f.endswith(".parquet"):
                p = Path(root) / f
                if p.stat().st_mtime >= t0:
                    found.append(p)
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    t0 = time.time() - 1
    out = tmp_path_factory.mktemp("ml100k")
    spec_path = build(out, seed=0)
    ex = pq.read_table(out / "exposures.parquet")
    it = pq.read_table(out / "items.parquet")
    ratings = pd.read_csv(DEFAULT_SOURCE / "u.data", sep="\t", header=None,
                          names=["user_id", "movie_id", "rating", "ts"])
    return dict(out=out, spec_path=spec_path, ex=ex, df=ex.to_pandas(), it=it, ratings=ratings, t0=t0)


def test_default_source_is_beside_the_repository():
    assert DEFAULT_SOURCE == REPO.parent / "shared" / "datasets" / "movielens-100k"


def test_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        build(tmp_path / "out", source=tmp_path / "nowhere")


def test_files_schema_and_counts(data):
    out, ex, it, ratings = data["out"], data["ex"], data["it"], data["ratings"]
    assert data["spec_path"] == out / "dataset.yaml"
    for f in FILES:
        assert (out / f).is_file()
    assert ex.num_rows == 2 * len(ratings) == 200_000
    assert it.num_rows == 1682
    types = {"user_id": pa.int64(), "movie_id": pa.int64(), "ts": pa.int64(), "click": pa.int8(),
             "conversion": pa.int8(), "rating": pa.float32(), "split": pa.string(),
             "age_bucket": pa.string(), "gender": pa.string(), "occupation": pa.string(),
             "zip_prefix": pa.string(), "rated_movies": pa.list_(pa.int64()),
             "liked_movies": pa.list_(pa.int64())}
    for name, t in types.items():
        assert ex.schema.field(name).type == t, name
    assert it.schema.field("genres").type == pa.list_(pa.string())
    df = data["df"]
    assert np.all(np.diff(df["ts"].to_numpy()) >= 0)  # sorted by time
    assert set(df["age_bucket"]) == {"<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert set(df["gender"]) == {"M", "F"}
    assert set(df["zip_prefix"]) == {*map(str, range(10)), "non-us"}


def test_label_semantics(data):
    df, ratings = data["df"], data["ratings"]
    click, conv, rating = df["click"].to_numpy(), df["conversion"].to_numpy(), df["rating"].to_numpy()
    assert click.mean() == 0.5
    assert np.array_equal(click, np.tile([1, 0], len(df) // 2))  # positive, then its negative
    pos = click == 1
    assert np.all(conv[~pos] == 0) and np.all(rating[~pos] == 0)
    assert set(np.unique(rating[pos])) == {1, 2, 3, 4, 5}
    assert np.array_equal(conv[pos], (rating[pos] >= 4).astype(conv.dtype))
    # the positives are exactly the ratings
    got = df.loc[pos, ["user_id", "movie_id", "rating", "ts"]].sort_values(["user_id", "movie_id"])
    want = ratings.sort_values(["user_id", "movie_id"])
    assert np.array_equal(got.to_numpy(dtype=np.int64), want.to_numpy(dtype=np.int64))


def test_negatives_unrated_same_timestamp(data):
    df, ratings = data["df"], data["ratings"]
    p, n = df.iloc[0::2].reset_index(drop=True), df.iloc[1::2].reset_index(drop=True)
    for c in ("user_id", "ts", "split", "age_bucket", "gender", "occupation", "zip_prefix"):
        assert np.array_equal(p[c].to_numpy(), n[c].to_numpy()), c
    for c in ("rated_movies", "liked_movies"):
        assert all(np.array_equal(a, b) for a, b in zip(p[c], n[c], strict=True)), c
    rated = set(zip(ratings["user_id"], ratings["movie_id"], strict=True))
    assert not any((u, m) in rated for u, m in zip(n["user_id"], n["movie_id"], strict=True))
    assert n["movie_id"].between(1, 1682).all()
    assert n["movie_id"].nunique() > 1500  # drawn over the catalogue, not a handful of movies


def _brute_force(ratings: pd.DataFrame, user: int, ts: int, liked: bool) -> list[int]:
    r = ratings[(ratings.user_id == user) & (ratings.ts < ts)]
    if liked:
        r = r[r.rating >= 4]
    return r.sort_values(["ts", "movie_id"], ascending=False)["movie_id"].head(20).tolist()


def test_sequences_strictly_before_most_recent_first(data):
    df, ratings = data["df"], data["ratings"]
    rated_lens = df["rated_movies"].map(len).to_numpy()
    liked_lens = df["liked_movies"].map(len).to_numpy()
    assert rated_lens.max() == 20 and liked_lens.max() == 20 and rated_lens.min() == 0
    assert np.all(liked_lens <= rated_lens)
    rng = np.random.default_rng(1)
    # random rows plus rows whose timestamp is shared by several of the user's ratings
    dup = df[(df.click == 1) & df.duplicated(["user_id", "ts"], keep=False)].index.to_numpy()
    rows = np.concatenate([rng.choice(len(df), 40, replace=False), rng.choice(dup, 20, replace=False)])
    by_key = ratings.set_index(["user_id", "movie_id"])
    for i in rows:
        row = df.iloc[i]
        u, ts = int(row.user_id), int(row.ts)
        assert list(row.rated_movies) == _brute_force(ratings, u, ts, liked=False), i
        assert list(row.liked_movies) == _brute_force(ratings, u, ts, liked=True), i
        seq_ts = by_key.loc[[(u, m) for m in row.rated_movies], "ts"].to_numpy()
        assert np.all(seq_ts < ts) and np.all(np.diff(seq_ts) <= 0)  # before, most recent first
        if len(row.liked_movies):
            assert by_key.loc[[(u, m) for m in row.liked_movies], "rating"].min() >= 4
    # tie rows really exercise "strictly": the same-ts rating is absent from the sequence
    row = df.loc[dup[0]]
    same = ratings[(ratings.user_id == row.user_id) & (ratings.ts == row.ts)]["movie_id"]
    assert not set(same) & set(row.rated_movies)


def test_liked_only_high_ratings(data):
    df, ratings = data["df"], data["ratings"]
    liked = ratings.loc[ratings.rating >= 4]
    high = set(zip(liked["user_id"], liked["movie_id"], strict=True))
    sample = df.iloc[::97]
    assert all((u, m) in high for u, seq in zip(sample.user_id, sample.liked_movies, strict=True) for m in seq)


def test_split_column_per_user_time_order(data):
    df = data["df"]
    assert set(df["split"]) == {"train", "valid", "test"}
    share = df["split"].value_counts(normalize=True)
    assert abs(share["test"] - 0.1) < 0.01 and abs(share["valid"] - 0.1) < 0.01
    g = df.groupby(["user_id", "split"])["ts"].agg(["min", "max"]).unstack("split")
    assert g.notna().all().all()  # every user has train, valid and test rows
    assert np.all(g[("min", "test")] >= g[("max", "train")])
    assert np.all(g[("min", "test")] >= g[("max", "valid")])
    assert np.all(g[("min", "valid")] >= g[("max", "train")])


def test_items_and_genres(data):
    it = data["it"].to_pandas()
    raw = pd.read_csv(DEFAULT_SOURCE / "u.item", sep="|", header=None, encoding="latin-1")
    flags = raw.iloc[:, 5:].to_numpy().astype(bool)
    names = pd.read_csv(DEFAULT_SOURCE / "u.genre", sep="|", header=None)[0].tolist()
    assert np.array_equal(it["movie_id"], np.arange(1, 1683))
    assert [len(g) for g in it["genres"]] == flags.sum(1).tolist()
    assert max(len(g) for g in it["genres"]) <= 6
    assert all(g[0] == p for g, p in zip(it["genres"], it["primary_genre"], strict=True))
    assert list(it["genres"][0]) == [names[j] for j in np.flatnonzero(flags[0])]
    # every genre is somebody's primary genre: the genres sequence never falls into OOV (= padding)
    assert set(it["primary_genre"]) == set(names)
    yb = it["year_bucket"]
    assert yb.isna().sum() == 1 and yb.dropna().astype(int).mod(5).eq(0).all()
    assert it.loc[it.movie_id == 1, "year_bucket"].item() == "1995"


def test_determinism(tmp_path, data):
    out = data["out"]
    same = build(tmp_path / "same", seed=0).parent
    for f in FILES:
        assert (same / f).read_bytes() == (out / f).read_bytes(), f
    other = build(tmp_path / "other", seed=1).parent
    a, b = pq.read_table(other / "exposures.parquet"), data["ex"]
    assert not a.equals(b)
    assert a.drop(["movie_id"]).equals(b.drop(["movie_id"]))  # only the negatives differ


def test_spec_and_generic_prepare(data):
    from training.data.dataset import prepare

    spec = load_spec(data["out"])
    assert spec.name == "movielens-100k" and spec.user_features_per_exposure and spec.users is None
    assert spec.model_dump() == dataset_spec().model_dump()
    tasks = {t.name: t for t in spec.tasks}
    assert (tasks["ctr"].label, tasks["ctr"].condition) == ("click", None)
    assert (tasks["cvr"].label, tasks["cvr"].condition) == ("conversion", "ctr")
    assert (tasks["rating"].kind, tasks["rating"].label, tasks["rating"].condition) == ("regression", "rating", "ctr")

    ds = prepare(data["out"])
    s = ds.schema
    assert [f.name for f in s.sparse_of("user")] == ["user_id", "age_bucket", "gender", "occupation", "zip_prefix"]
    assert [(f.name, f.max_len, f.vocab_of) for f in s.sequence_of("user")] == [
        ("rated_movies", 20, "movie_id"), ("liked_movies", 20, "movie_id")]
    assert [f.name for f in s.sparse_of("item")] == ["movie_id", "primary_genre", "year_bucket"]
    assert [(f.name, f.max_len, f.vocab_of) for f in s.sequence_of("item")] == [("genres", 6, "primary_genre")]
    assert not s.dense and not s.sparse_of("context")
    sizes = {f.name: f.vocab_size for f in s.sparse}
    assert sizes["user_id"] == 944 and sizes["movie_id"] == 1683 and sizes["primary_genre"] == 20
    assert len(ds) == 200_000 and ds.users.seq.shape == (200_000, 40)
    assert np.array_equal(ds.user_row, np.arange(200_000))
    assert (ds.item_row >= 0).all()
    # encoded sequences keep every id (no OOV collapsing into padding 0)
    lens = data["df"]["rated_movies"].map(len).to_numpy()
    assert np.array_equal((ds.users.seq[:, :20] > 0).sum(1), lens)
    assert (ds.items.seq > 0).sum() == data["it"].column("genres").combine_chunks().flatten().__len__()
    assert ds.labels["click"].mean() == 0.5 and set(np.unique(ds.labels["rating"])) == {0, 1, 2, 3, 4, 5}
    assert ds.time is not None and len(ds.split("random")[2]) == 20_000
    # `--split column`: the per-user time split column written by the loader
    train, valid, test = ds.split("column")
    want = tuple((ds.split_column == part).sum() for part in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == want
    assert len(test) > 0 and len(valid) > 0 and len(train) + len(valid) + len(test) == len(ds)


def test_nothing_written_inside_the_repository(data):
    assert not data["out"].resolve().is_relative_to(REPO)
    assert _repo_outputs_since(data["t0"]) == []


def test_negatives_without_replacement_per_user(data):
    """Each user's negatives are distinct movies the user never rated: no (user, movie) repeats
    among the negatives, so no test negative duplicates a train row."""
    df, ratings = data["df"], data["ratings"]
    neg = df.iloc[1::2]
    assert not neg.duplicated(["user_id", "movie_id"]).any()
    assert neg.groupby("user_id").size().equals(ratings.groupby("user_id").size())  # one per rating
    pairs = set(zip(ratings["user_id"], ratings["movie_id"], strict=True))
    assert not any(p in pairs for p in zip(neg["user_id"], neg["movie_id"], strict=True))
    # and so no exposure (user, movie) appears twice in the whole log
    assert not df.duplicated(["user_id", "movie_id"]).any()


def test_negatives_draw_refuses_an_impossible_user():
    from training.data.movielens import _negatives

    rated = np.zeros((3, 5), bool)  # users 1-2, movies 1-4
    rated[1, [1, 2]] = True
    neg = _negatives(np.array([1, 1, 2, 2, 2, 2]), rated, np.random.default_rng(0))
    assert sorted(neg[:2]) == [3, 4] and sorted(neg[2:]) == [1, 2, 3, 4]
    rated[1, 3] = True
    with pytest.raises(ValueError, match="user 1"):
        _negatives(np.array([1, 1]), rated, np.random.default_rng(0))
