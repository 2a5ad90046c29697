"""From a dataset spec to encoded numpy arrays (no torch).

``prepare(spec)`` reads the tables, builds the vocabularies and dense stats (the feature schema)
and encodes everything; ``encode_entities(...)`` re-encodes user/item tables with the schema and
vocabularies of an existing bundle (what ``mtrank features load`` does). Both sides share one
encoding path, so the ids a model was trained with are the ids put into Redis.

Layout: the user and item tables are encoded once (one row per entity); an exposure points at
its user row and item row. ``EncodedDataset.inputs(rows)`` gathers the model inputs for a batch
of exposures, keyed by ONNX input name (``user_sparse``, ``item_dense``, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from service.contract import (
    DenseField,
    Entity,
    FeatureSchema,
    SequenceField,
    SparseField,
    TaskSpec,
    model_inputs,
)
from training.data.spec import DatasetSpec, FeatureSpec, Table, load_spec

log = logging.getLogger(__name__)


def read_table(spec: DatasetSpec, table: Table, columns: list[str] | None = None) -> pd.DataFrame:
    """One table of the spec (Parquet, or CSV with the table's separator and header options)."""
    path = spec.path(table.path)
    if not table.is_csv:
        return pd.read_parquet(path, columns=columns)
    if table.header:
        return pd.read_csv(path, sep=table.separator, usecols=columns)
    return pd.read_csv(path, sep=table.separator, header=None, names=table.columns, usecols=columns)


def as_str(col: pd.Series) -> pd.Series:
    """Ids as strings ("12", not "12.0"); missing stays missing."""
    if pd.api.types.is_float_dtype(col) and col.dropna().mod(1).eq(0).all():
        col = col.astype("Int64")
    return col.astype("string")


@dataclass
class RawData:
    spec: DatasetSpec
    exposures: pd.DataFrame
    users: pd.DataFrame  # indexed by the user key (as str)
    items: pd.DataFrame  # indexed by the item key (as str)


def _entity_table(spec: DatasetSpec, entity: Entity, exposures: pd.DataFrame) -> pd.DataFrame:
    table = spec.users if entity == "user" else spec.items
    key_in_exposures = spec.exposures.user_key if entity == "user" else spec.exposures.item_key
    cols = [f.col for f in spec.features if f.entity == entity]
    if entity == "user" and spec.user_features_per_exposure:  # one snapshot per exposure row
        key = key_in_exposures
        df = exposures[list(dict.fromkeys([key, *cols]))]
    elif table is not None:
        key = table.key
        df = read_table(spec, table, columns=list(dict.fromkeys([key, *cols])))
    else:  # no table: the last exposure row of each entity carries its features
        key = key_in_exposures
        df = exposures[list(dict.fromkeys([key, *cols]))].drop_duplicates(key, keep="last")
    df = df.set_index(as_str(df[key]).rename(None))
    if df.index.duplicated().any() and not (entity == "user" and spec.user_features_per_exposure):
        raise ValueError(f"{entity} table has duplicate keys")
    return df


def read_raw(spec: DatasetSpec | str | Path, max_rows: int | None = None) -> RawData:
    if not isinstance(spec, DatasetSpec):
        spec = load_spec(spec)
    ex = read_table(spec, spec.exposures)
    if max_rows is not None and len(ex) > max_rows:
        ex = ex.iloc[:max_rows]
    ex = ex.reset_index(drop=True)
    missing = [c for c in [spec.exposures.user_key, spec.exposures.item_key, *[t.label for t in spec.tasks],
                           *[f.col for f in spec.features if f.entity == "context"]] if c not in ex.columns]
    if missing:
        raise ValueError(f"exposures table lacks columns {missing}")
    return RawData(spec, ex, _entity_table(spec, "user", ex), _entity_table(spec, "item", ex))


# ---------------------------------------------------------------- vocabularies and schema

def _column_of(raw: RawData, f: FeatureSpec) -> pd.Series:
    if f.entity == "user":
        return raw.users[f.col]
    if f.entity == "item":
        return raw.items[f.col]
    return raw.exposures[f.col]


def _sequence_values(col: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """A sequence column as one flat Series of its elements, plus each row's length.

    Accepts lists/arrays (Parquet list columns) and '|'-separated strings (CSV)."""
    vals = col.to_numpy(dtype=object)
    if len(vals) and all(isinstance(v, np.ndarray) for v in vals):  # Parquet: fast path
        lens = np.fromiter((len(v) for v in vals), dtype=np.int64, count=len(vals))
        flat = np.concatenate(vals) if lens.sum() else np.zeros(0)
        return pd.Series(flat), lens
    seqs = [[] if v is None or (isinstance(v, float) and np.isnan(v)) else
            (v.split("|") if isinstance(v, str) and v else [] if isinstance(v, str) else list(v)) for v in vals]
    lens = np.fromiter((len(q) for q in seqs), dtype=np.int64, count=len(seqs))
    return pd.Series([x for q in seqs for x in q], dtype=object), lens


def build_schema(raw: RawData) -> tuple[FeatureSchema, dict[str, list[str]]]:
    """Vocabularies (most frequent first, deterministic) and dense stats from the data."""
    vocabs: dict[str, list[str]] = {}
    sparse, dense, seq = [], [], []
    for f in raw.spec.features:
        col = _column_of(raw, f)
        if f.kind == "sparse":
            uniq_counts = col.value_counts(dropna=True)  # count on raw values, stringify the few uniques
            counts = pd.Series(uniq_counts.to_numpy(), index=as_str(uniq_counts.index.to_series()).to_numpy())
            counts = counts.groupby(level=0).sum()
            counts = counts[counts >= f.min_count]
            order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            vocabs[f.name] = [k for k, _ in order]
            sparse.append(SparseField(name=f.name, entity=f.entity, vocab_size=len(vocabs[f.name]) + 1,
                                      embedding_dim=f.embedding_dim))
        elif f.kind == "dense":
            x = pd.to_numeric(col, errors="coerce").astype("float64")
            mean, std = float(np.nanmean(x)), float(np.nanstd(x))
            dense.append(DenseField(name=f.name, entity=f.entity, mean=mean if np.isfinite(mean) else 0.0,
                                    std=std if np.isfinite(std) and std > 1e-12 else 1.0))
        else:
            seq.append(SequenceField(name=f.name, entity=f.entity, max_len=f.max_len, vocab_of=f.vocab_of,
                                      event=f.event))
    digest = hashlib.sha256(json.dumps(vocabs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return FeatureSchema(sparse=sparse, dense=dense, sequence=seq, vocab_sha256=digest), vocabs


# ---------------------------------------------------------------- encoding

def _encode_sparse(col: pd.Series, vocab: list[str]) -> np.ndarray:
    """Vocabulary index of each value (0 = missing / out of vocabulary), whole-column."""
    codes, uniques = pd.factorize(col, use_na_sentinel=True)  # fast on raw values; few uniques
    idx = pd.Index(vocab).get_indexer(as_str(pd.Series(uniques))).astype(np.int64) + 1  # -1 (unknown) -> 0
    return np.where(codes >= 0, idx[np.maximum(codes, 0)] if len(idx) else 0, 0).astype(np.int64)


def _encode_sequence(col: pd.Series, vocab: list[str], max_len: int) -> np.ndarray:
    flat, lens = _sequence_values(col)
    codes = _encode_sparse(flat, vocab) if len(flat) else np.zeros(0, np.int64)
    out = np.zeros((len(col), max_len), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    pos = np.arange(len(codes)) - np.repeat(starts, lens)  # position within its own sequence
    row = np.repeat(np.arange(len(col)), lens)
    keep = pos < max_len  # most recent first: keep the head
    out[row[keep], pos[keep]] = codes[keep]
    return out


def encode_fields(df: pd.DataFrame, schema: FeatureSchema, entity: Entity, vocabs: dict[str, list[str]],
                  columns: dict[str, str], fill_dense: bool = True) -> dict[str, np.ndarray]:
    """Encode one entity's columns into {"sparse", "dense", "seq"} arrays in schema order. A missing
    dense value is the field's mean, or NaN without ``fill_dense`` (the feature store: the reading
    model substitutes its own mean, so the stored bytes do not depend on the statistics)."""
    n = len(df)
    sp = schema.sparse_of(entity)
    de = schema.dense_of(entity)
    sq = schema.sequence_of(entity)
    out = {
        "sparse": np.stack([_encode_sparse(df[columns[f.name]], vocabs[f.name]) for f in sp], 1)
        if sp else np.zeros((n, 0), np.int64),
        "dense": np.stack([pd.to_numeric(df[columns[f.name]], errors="coerce").astype("float32")
                           .fillna(f.mean if fill_dense else np.nan).to_numpy(np.float32) for f in de], 1)
        if de else np.zeros((n, 0), np.float32),
        "seq": np.concatenate([_encode_sequence(df[columns[f.name]], vocabs[f.vocab_of], f.max_len) for f in sq], 1)
        if sq else np.zeros((n, 0), np.int64),
    }
    return out


@dataclass
class EntityTable:
    ids: np.ndarray  # raw ids (str), one per row
    sparse: np.ndarray  # int64 [n, k]
    dense: np.ndarray  # float32 [n, k]
    seq: np.ndarray  # int64 [n, W]


def encode_entities(raw: RawData, schema: FeatureSchema, vocabs: dict[str, list[str]], entity: Entity,
                    latest_only: bool = True, fill_dense: bool = True) -> EntityTable:
    """Encode the user or item table. With per-exposure user snapshots, ``latest_only`` keeps each
    user's latest one (what the feature store serves); training passes False to keep them all.
    ``fill_dense``: see :func:`encode_fields`."""
    df = raw.users if entity == "user" else raw.items
    if latest_only and entity == "user" and raw.spec.user_features_per_exposure:
        t = raw.spec.exposures.time
        order = np.argsort(raw.exposures[t].to_numpy(), kind="stable") if t else np.arange(len(df))
        df = df.iloc[order]
        df = df[~df.index.duplicated(keep="last")]
    columns = {f.name: f.col for f in raw.spec.features}
    missing = [f.name for f in schema.all_fields() if f.entity == entity and f.name not in columns]
    if missing:
        raise ValueError(f"the data has no column for schema fields {missing}")
    arrays = encode_fields(df, schema, entity, vocabs, columns, fill_dense)
    return EntityTable(ids=df.index.to_numpy(dtype=object), **arrays)


@dataclass
class EncodedDataset:
    schema: FeatureSchema
    tasks: list[TaskSpec]
    vocabs: dict[str, list[str]]
    users: EntityTable
    items: EntityTable
    user_row: np.ndarray  # int64 [E]
    item_row: np.ndarray  # int64 [E]
    context: dict[str, np.ndarray]  # {"sparse": [E, k], "dense": [E, k]}
    labels: dict[str, np.ndarray]  # label column -> float32 [E]
    time: np.ndarray | None  # int64/float [E] or None
    split_column: np.ndarray | None = None  # str [E]: "train" | "valid" | "test", when the spec names one

    def __len__(self) -> int:
        return len(self.user_row)

    def inputs(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for a batch of exposure rows, keyed by ONNX input name."""
        tables = {"user": (self.users, self.user_row[rows]), "item": (self.items, self.item_row[rows])}
        out = {}
        for spec in model_inputs(self.schema):
            key = {"sparse": "sparse", "dense": "dense", "sequence": "seq"}[spec.kind]
            if spec.entity == "context":
                out[spec.name] = self.context[key][rows]
            else:
                table, idx = tables[spec.entity]
                out[spec.name] = getattr(table, key)[idx]
        return out

    def label(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.labels[name][rows]

    def split(self, how: str = "random", fractions=(0.8, 0.1, 0.1), seed: int = 42):
        """Reproducible train/validation/test row indices: random (seeded), by time (the last
        rows in time are the test split), or the dataset's own split column."""
        n = len(self)
        if how == "column":
            if self.split_column is None:
                raise ValueError("a column split needs exposures.split in the dataset spec")
            rows = np.arange(n)
            parts = tuple(rows[self.split_column == name] for name in ("train", "valid", "test"))
            if any(len(p) == 0 for p in parts):
                raise ValueError("the split column must have train, valid and test rows")
            return parts
        if how == "random":
            order = np.random.default_rng(seed).permutation(n)
        elif how == "time":
            if self.time is None:
                raise ValueError("a time split needs exposures.time in the dataset spec")
            order = np.argsort(self.time, kind="stable")
        else:
            raise ValueError(f"unknown split {how!r} (random|time|column)")
        a = int(n * fractions[0])
        b = a + int(n * fractions[1])
        return order[:a], order[a:b], order[b:]


def prepare(spec: DatasetSpec | str | Path, max_rows: int | None = None) -> EncodedDataset:
    """Read, build the schema and encode a whole dataset for training."""
    raw = read_raw(spec, max_rows=max_rows)
    spec = raw.spec
    schema, vocabs = build_schema(raw)
    users = encode_entities(raw, schema, vocabs, "user", latest_only=False)
    items = encode_entities(raw, schema, vocabs, "item")
    ex = raw.exposures
    if spec.user_features_per_exposure:
        user_row = np.arange(len(ex))  # each exposure has its own user snapshot row
    else:
        user_row = pd.Index(users.ids).get_indexer(as_str(ex[spec.exposures.user_key]))
    item_row = pd.Index(items.ids).get_indexer(as_str(ex[spec.exposures.item_key]))
    keep = (user_row >= 0) & (item_row >= 0)
    if not keep.all():
        log.warning("dropping %d exposures whose user or item is not in the entity tables", int((~keep).sum()))
        ex = ex[keep]
        user_row, item_row = user_row[keep], item_row[keep]
    columns = {f.name: f.col for f in spec.features}
    context = encode_fields(ex, schema, "context", vocabs, columns)
    labels = {t.label: pd.to_numeric(ex[t.label], errors="coerce").fillna(0).to_numpy(np.float32) for t in spec.tasks}
    time = ex[spec.exposures.time].to_numpy() if spec.exposures.time else None
    split_column = ex[spec.exposures.split].astype(str).to_numpy() if spec.exposures.split else None
    return EncodedDataset(schema=schema, tasks=list(spec.tasks), vocabs=vocabs, users=users, items=items,
                          user_row=user_row.astype(np.int64), item_row=item_row.astype(np.int64),
                          context={"sparse": context["sparse"], "dense": context["dense"]},
                          labels=labels, time=time, split_column=split_column)
