"""MovieLens-100K as a multi-task exposure log, by a protocol of our own (below): each rating a clicked
exposure, one sampled never-rated movie per rating an unclicked one, ``rating >= 4`` the conversion
and the rating the regression label. No published source is claimed for it: the DML paper (Ren et
al., 2023), credited here before, does not describe its data this way in anything retrievable.

Research use only: the original files are read from ``source`` (by default
``<repo>/../shared/datasets/movielens-100k``) and nothing derived from them may be committed; the
output directory is the caller's (a scratch or ``/data/`` path, never inside the repository).

Exposures (``exposures.parquet``, sorted by ``ts``; each positive row directly followed by its
negative):

* every observed rating ``(user, movie, rating, ts)`` is an exposure with ``click = 1``;
* for each one, a movie the user never rated (anywhere in the data set), at the same ``ts``, as
  an exposure with ``click = 0``. A user with ``n`` ratings gets ``n`` *distinct* negative movies,
  drawn uniformly without replacement from the movies they never rated
  (``np.random.default_rng(seed)``, users in id order): no two negatives share a (user, movie),
  and none is a rated one, so no test negative repeats a train row. (Every user of ML-100K rated
  at most 737 of the 1682 movies, so there are always enough unrated ones.) The i-th negative of
  a user goes with the user's i-th rating in ``(ts, movie_id)`` order;
* ``conversion = rating >= 4`` on clicked rows, 0 on the others;
* ``rating`` = the rating (1..5) on clicked rows, 0 on the others: the regression label that
  stands where watch time stands (tasks ``ctr``, ``cvr | ctr``, ``rating | ctr``).

Features (``entity: name (kind)``; all user features are exposure columns, one snapshot per
exposure, ``user_features_per_exposure: true``, no users table):

* user: ``user_id``; ``age_bucket`` (``<18``, ``18-24``, ``25-34``, ``35-44``, ``45-49``,
  ``50-55``, ``56+``, the MovieLens-1M buckets); ``gender`` (``M``/``F``); ``occupation``;
  ``zip_prefix`` = the first digit of the US ZIP code (its national area, 10 values), or
  ``non-us`` for the 18 users with a letter first (Canadian postal codes);
* user sequences (``vocab_of: movie_id``, max_len 20, most recent first): ``rated_movies``, the
  last 20 movies rated at a timestamp *strictly earlier* than the exposure's, and
  ``liked_movies``, the last 20 of those rated >= 4. Ratings sharing one earlier timestamp are
  ordered by movie id (a larger id counts as more recent). A negative row carries the same
  snapshot as its positive;
* item (``items.parquet``, all 1682 movies): ``movie_id``; ``primary_genre`` = the first
  genre flagged in u.item's genre order (every one of the 19 genres, ``unknown`` included, is
  the primary genre of at least one movie, so its vocabulary covers them all); ``genres``
  (sequence of genre names, ``vocab_of: primary_genre``, max_len 6 = the most genres a movie
  has), which the model pools to a normalised multi-hot; ``year_bucket``, the release year's
  5-year bin as its first year (``"1995"`` = 1995-1999), missing where u.item has no date;
* context: none (the rating time says when the rating was entered, not when a movie was shown,
  and a negative shares its positive's time, so an hour feature could not tell them apart).

Splits. ``--split random`` (the trainer's seeded 8:1:1 over rows) works as is. For the
time-ordered split, column ``split`` (``train``/``valid``/``test``) is computed per user over
their ratings ordered by ``(ts, movie_id)``: the last ``round(test * n)`` are ``test``, the
``round(valid * n)`` before them ``valid``, the rest ``train`` (``split=(train, valid, test)``
fractions, rounded half up, at least 1 where the fraction is > 0; every user has >= 20
ratings, so >= 2 each at 10%); a negative shares its positive's
split. A user's test rows are therefore never earlier than their train rows. A trainer option
``split: column`` can read ``exposures.split`` directly. Sequences are "as of the exposure", so
a test row's history includes the user's earlier test-period ratings (observed before it; no
row ever sees its own or a later label).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from service.contract import TaskSpec
from training.data.spec import DatasetSpec, EntityTable, ExposureTable, FeatureSpec, dump_spec

log = logging.getLogger(__name__)

DEFAULT_SOURCE = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "movielens-100k"

MAX_SEQ = 20          # rated_movies / liked_movies length
MAX_GENRES = 6        # the most genres one movie has in ML-100K
LIKE = 4              # rating >= LIKE is a conversion / a liked movie
AGE_EDGES = (18, 25, 35, 45, 50, 56)
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
YEAR_BIN = 5
SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------- reading

def _read(source: Path):
    source = Path(source)
    files = [source / f for f in ("u.data", "u.item", "u.user", "u.genre")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"MovieLens-100K files not found: {missing} (pass source=...)")
    ratings = pd.read_csv(source / "u.data", sep="\t", header=None,
                          names=["user_id", "movie_id", "rating", "ts"], dtype=np.int64)
    genres = pd.read_csv(source / "u.genre", sep="|", header=None, names=["genre", "idx"],
                         dtype={"genre": str, "idx": "Int64"}).dropna()
    genre_names = genres.sort_values("idx")["genre"].tolist()
    items = pd.read_csv(source / "u.item", sep="|", header=None, encoding="latin-1",
                        names=["movie_id", "title", "release", "video_release", "url", *genre_names],
                        dtype={"release": str})
    users = pd.read_csv(source / "u.user", sep="|", header=None,
                        names=["user_id", "age", "gender", "occupation", "zip"], dtype={"zip": str})
    return ratings, items, users, genre_names


# ----------------------------------------------------------------------------- features

def _user_static(users: pd.DataFrame) -> pd.DataFrame:
    age = np.asarray(AGE_LABELS, dtype=object)[np.searchsorted(AGE_EDGES, users["age"].to_numpy(), side="right")]
    z = users["zip"].fillna("").str.strip()
    zip_prefix = np.where(z.str[:1].str.isdigit(), z.str[:1], "non-us")
    return pd.DataFrame({"age_bucket": age, "gender": users["gender"].to_numpy(),
                         "occupation": users["occupation"].to_numpy(), "zip_prefix": zip_prefix},
                        index=users["user_id"].to_numpy())


def _items_table(items: pd.DataFrame, genre_names: list[str]) -> pa.Table:
    flags = items[genre_names].to_numpy().astype(bool)
    names = np.asarray(genre_names, dtype=object)
    primary = np.where(flags.any(1), names[flags.argmax(1)], None)
    lens = flags.sum(1)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    genres = pa.ListArray.from_arrays(pa.array(offsets),
                                      pa.array(np.broadcast_to(names, flags.shape)[flags].tolist(), pa.string()))
    year = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce").dt.year
    bucket = (year // YEAR_BIN * YEAR_BIN).astype("Int64").astype("string")
    return pa.table({
        "movie_id": pa.array(items["movie_id"].to_numpy(np.int64)),
        "primary_genre": pa.array(primary.tolist(), pa.string()),
        "genres": genres,
        "year_bucket": pa.array(bucket.to_numpy(dtype=object, na_value=None).tolist(), pa.string()),
    })


def _negatives(uid: np.ndarray, rated: np.ndarray, rng) -> np.ndarray:
    """One movie per row: for each user, as many distinct movies as the user has rows, drawn
    uniformly without replacement from the movies (ids ``1..rated.shape[1]-1``) the user never
    rated. ``uid`` must be grouped by user (sorted); the draws go to a user's rows in order."""
    neg = np.empty(len(uid), np.int64)
    users, starts, counts = np.unique(uid, return_index=True, return_counts=True)
    for u, start, n in zip(users, starts, counts, strict=True):
        unrated = np.flatnonzero(~rated[u, 1:]) + 1
        if n > len(unrated):
            raise ValueError(f"user {u} has {n} ratings but only {len(unrated)} unrated movies to draw negatives from")
        neg[start:start + n] = rng.choice(unrated, n, replace=False)
    return neg


def _history(key: np.ndarray, ev_key: np.ndarray, ev_movie: np.ndarray, user_start_key: np.ndarray) -> np.ndarray:
    """For each query ``key = (user, ts)`` the last MAX_SEQ events of that user with an earlier
    ts, most recent first, as an int64 matrix padded with 0. ``ev_key`` must be sorted."""
    end = np.searchsorted(ev_key, key, side="left")             # first event at or after (user, ts)
    start = np.searchsorted(ev_key, user_start_key, side="left")  # the user's first event
    idx = end[:, None] - 1 - np.arange(MAX_SEQ)[None, :]
    valid = idx >= start[:, None]
    return np.where(valid, ev_movie[np.maximum(idx, 0)], 0)


def _list_column(mat: np.ndarray) -> pa.ListArray:
    """Rows of a zero-padded (prefix-filled) matrix as a list<int64> column."""
    valid = mat > 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(mat[valid], pa.int64()))


def _time_split(uid: np.ndarray, order_in_user: np.ndarray, fractions) -> np.ndarray:
    """Split label per rating: by rank within the user's (ts, movie_id)-ordered timeline."""
    n_u = np.bincount(uid)[uid]
    n_test, n_valid = (np.where(frac > 0, np.maximum(1, np.floor(frac * n_u + 0.5)), 0).astype(np.int64)
                       for frac in (fractions[2], fractions[1]))
    from_end = n_u - 1 - order_in_user                          # 0 = the user's last rating
    code = np.where(from_end < n_test, 2, np.where(from_end < n_test + n_valid, 1, 0))
    return np.asarray(SPLITS, dtype=object)[code]


# ----------------------------------------------------------------------------- main

def build(out_dir: str | Path, source: str | Path = DEFAULT_SOURCE, seed: int = 0,
          split: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Path:
    """Writes exposures.parquet, items.parquet and dataset.yaml into out_dir; returns the
    dataset.yaml path. ``split`` gives the per-user (train, valid, test) fractions of the
    ``split`` column."""
    if len(split) != 3 or min(split) < 0 or not math.isclose(sum(split), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}")
    out = Path(out_dir)
    ratings, items, users, genre_names = _read(Path(source))
    n_users, n_movies = int(users["user_id"].max()), int(items["movie_id"].max())
    rng = np.random.default_rng(seed)

    # ratings in (user, ts, movie) order: the timeline each sequence and the split read from
    r = ratings.sort_values(["user_id", "ts", "movie_id"], kind="stable").reset_index(drop=True)
    uid, mid, rat, ts = (r[c].to_numpy(np.int64) for c in ("user_id", "movie_id", "rating", "ts"))
    key = (uid << 32) | ts                                        # ts < 2**32, so (user, ts) order
    user_start_key = uid << 32
    liked = rat >= LIKE
    rated_seq = _history(key, key, mid, user_start_key)
    liked_seq = _history(key, key[liked], mid[liked], user_start_key)
    first_of_user = np.searchsorted(uid, uid, side="left")
    split_col = _time_split(uid, np.arange(len(uid)) - first_of_user, split)

    rated = np.zeros((n_users + 1, n_movies + 1), bool)
    rated[uid, mid] = True
    neg = _negatives(uid, rated, rng)

    # exposures: ratings in time order, each positive followed by its negative
    order = np.lexsort((mid, uid, ts))
    rows = np.repeat(order, 2)
    pos = np.tile([True, False], len(order))
    movie = np.where(pos, mid[rows], neg[rows])
    click = pos.astype(np.int8)
    rating = np.where(pos, rat[rows], 0)
    static = _user_static(users).loc[uid[rows]]
    exposures = pa.table({
        "user_id": pa.array(uid[rows]),
        "movie_id": pa.array(movie.astype(np.int64)),
        "ts": pa.array(ts[rows]),
        "click": pa.array(click),
        "conversion": pa.array((pos & (rating >= LIKE)).astype(np.int8)),
        "rating": pa.array(rating.astype(np.float32)),
        "split": pa.array(split_col[rows].tolist(), pa.string()),
        **{c: pa.array(static[c].tolist(), pa.string()) for c in static.columns},
        "rated_movies": _list_column(rated_seq[rows]),
        "liked_movies": _list_column(liked_seq[rows]),
    })
    items_t = _items_table(items, genre_names)

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(exposures, out / "exposures.parquet")
    pq.write_table(items_t, out / "items.parquet")
    spec_path = out / "dataset.yaml"
    dump_spec(dataset_spec(), spec_path)
    log.info("movielens-100k: %d exposures (%d ratings), cvr|click %.4f", exposures.num_rows, len(r),
             liked.mean())
    return spec_path


def dataset_spec() -> DatasetSpec:
    """The spec describing the files :func:`build` writes."""
    def f(name, entity, kind, **kw):
        return FeatureSpec(name=name, entity=entity, kind=kind, **kw)

    return DatasetSpec(
        name="movielens-100k",
        exposures=ExposureTable(path="exposures.parquet", user_key="user_id", item_key="movie_id", time="ts",
                                split="split"),
        items=EntityTable(path="items.parquet", key="movie_id"),
        user_features_per_exposure=True,
        features=[
            *(f(n, "user", "sparse") for n in ("user_id", "age_bucket", "gender", "occupation", "zip_prefix")),
            f("rated_movies", "user", "sequence", max_len=MAX_SEQ, vocab_of="movie_id", event="click"),
            f("liked_movies", "user", "sequence", max_len=MAX_SEQ, vocab_of="movie_id", event="conversion"),
            *(f(n, "item", "sparse") for n in ("movie_id", "primary_genre", "year_bucket")),
            f("genres", "item", "sequence", max_len=MAX_GENRES, vocab_of="primary_genre"),
        ],
        tasks=[
            TaskSpec(name="ctr", kind="binary", label="click"),
            TaskSpec(name="cvr", kind="binary", label="conversion", condition="ctr"),
            TaskSpec(name="rating", kind="regression", label="rating", condition="ctr"),
        ],
    )


if __name__ == "__main__":  # python -m training.data.movielens OUT_DIR [--source DIR] [--seed N]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.out_dir, a.source, a.seed))
