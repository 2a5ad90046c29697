"""Training data as served: the prediction log's candidates with the features the service read
(the packed bytes logged, decoded with the serving bundle's schema and vocabularies) and their
labels from the outcome events, written as Parquet plus a dataset spec that ``mtrank train``
reads directly (``mtrank logs export --with-outcomes``).

One row per logged candidate of the records that carry features (``MTRANK_PREDLOG_FEATURES_RATE``),
forced-variant requests included (their features and outcomes are as real as any; the A/B
readout is what leaves them out). Columns:

* ``request_id``, ``user`` (the pseudonym: the spec's user key), ``item`` (the item key), ``ts``
  (the request's time), ``variant``, ``position`` (among the returned items, -1 when not returned);
* every feature of the bundle's schema under its own name, as served: sparse values mapped back
  through the bundle's vocabulary (``None`` where the index was 0: missing or out of vocabulary),
  dense values as stored, sequences as lists of values (padding dropped), context values as the
  request sent them;
* one label column per task of the bundle, named as the bundle's task labels, filled from the
  outcome the task maps to (:data:`service.readout.join.DEFAULT_TASK_EVENTS`): 0/1 for click and
  conversion, watch seconds for watch.

The user features carry the user's own feature values (for example a ``user_id`` sparse field,
mapped back to the id): this file is training data and as sensitive as the feature store.

The spec says ``user_features_per_exposure: true`` (each row keeps the user snapshot it was ranked
with); the item features come from each item's last row.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from service.codec import EntityCodec
from service.contract import VOCAB_FILE, BundleManifest, FeatureSchema, TaskSpec
from service.readout import join
from service.store import read_manifest, read_vocabs
from training.data.spec import DatasetSpec, ExposureTable, FeatureSpec, dump_spec

EXPOSURES = "exposures.parquet"
KEYS = ("request_id", "user", "item", "ts", "variant", "position")


@dataclass
class Exported:
    rows: int
    requests: int
    skipped: int  # records without features, or of a bundle whose schema differs from the first one
    labelled: dict[str, float]  # label column -> its sum
    path: Path


class _Decoder:
    """Packed values of one bundle back into feature values (its schema and vocabularies)."""

    def __init__(self, manifest: BundleManifest, vocabs: Mapping[str, list[str]]):
        self.schema: FeatureSchema = manifest.feature_schema
        self.vocabs = vocabs
        self.codecs = {e: EntityCodec.for_schema(self.schema, e) for e in ("user", "item")}

    def _values(self, name: str, idx: np.ndarray) -> list:
        vocab = self.vocabs.get(name, [])
        return [vocab[i - 1] if 0 < i <= len(vocab) else None for i in idx.tolist()]

    def columns(self, entity: str, raw: list[bytes | None]) -> dict[str, list]:
        d = self.codecs[entity].decode(raw)
        out: dict[str, list] = {}
        for j, f in enumerate(self.schema.sparse_of(entity)):  # type: ignore[arg-type]
            out[f.name] = self._values(f.name, d.sparse[:, j])
        for j, f in enumerate(self.schema.dense_of(entity)):  # type: ignore[arg-type]
            out[f.name] = d.dense[:, j].astype(np.float64).tolist()
        start = 0
        for f in self.schema.sequence_of(entity):  # type: ignore[arg-type]
            block = d.seq[:, start:start + f.max_len]
            start += f.max_len
            out[f.name] = [[v for v in self._values(f.vocab_of, row[row > 0]) if v is not None] for row in block]
        return out


def _b64(v: str | None) -> bytes | None:
    return None if v is None else base64.b64decode(v)


def rows(records: Iterable[Mapping], store: str | Path) -> tuple[pd.DataFrame, BundleManifest | None, int]:
    """The candidates of the records that carry features, one row each, features decoded; with the
    manifest of the first such record's bundle (the schema every row has) and the records skipped."""
    decoders: dict[tuple[str, int], tuple[BundleManifest, _Decoder]] = {}
    first: BundleManifest | None = None
    frames: list[pd.DataFrame] = []
    skipped = 0
    for r in records:
        feats = r.get("features")
        if not feats:
            skipped += 1
            continue
        key = (r["model"], int(r["version"]))
        if key not in decoders:
            path, manifest = read_manifest(store, *key)
            decoders[key] = (manifest, _Decoder(manifest, read_vocabs(path / VOCAB_FILE, manifest)))
        manifest, dec = decoders[key]
        if first is None:
            first = manifest
        elif manifest.feature_schema.model_copy(update={"vocab_sha256": ""}) != \
                first.feature_schema.model_copy(update={"vocab_sha256": ""}):
            skipped += 1
            continue
        items = r["items"]
        n = len(items)
        pos = np.full(n, -1, dtype=np.int64)
        top = r.get("top") or []
        pos[np.asarray(top, dtype=np.int64)] = np.arange(len(top))
        cols: dict[str, list] = {"request_id": [r["rid"]] * n, "user": [r["user"]] * n, "item": list(items),
                                 "ts": [r["ts"]] * n, "variant": [r["variant"]] * n, "position": pos.tolist()}
        user = dec.columns("user", [_b64(feats.get("user"))])
        cols.update({k: v * n for k, v in user.items()})
        cols.update(dec.columns("item", [_b64(v) for v in feats.get("items") or [None] * n]))
        ctx = r.get("context") or {}
        for f in [*dec.schema.sparse_of("context"), *dec.schema.dense_of("context")]:
            cols[f.name] = [ctx.get(f.name)] * n
        frames.append(pd.DataFrame(cols))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(KEYS))
    return df, first, skipped


def spec_of(manifest: BundleManifest, name: str) -> DatasetSpec:
    """The dataset spec of an export: the bundle's features and tasks over the exported columns."""
    schema = manifest.feature_schema
    dims = {f.name: f.embedding_dim for f in schema.sparse}
    features = []
    for f in schema.all_fields():
        kw: dict = {"name": f.name, "entity": f.entity, "kind": f.kind}
        if f.kind == "sparse":
            kw["embedding_dim"] = dims[f.name]
        if f.kind == "sequence":
            kw.update(max_len=f.max_len, vocab_of=f.vocab_of)
        features.append(FeatureSpec(**kw))
    tasks = [TaskSpec(name=t.name, kind=t.kind, label=t.label, condition=t.condition) for t in manifest.tasks]
    return DatasetSpec(name=name, exposures=ExposureTable(path=EXPOSURES, user_key="user", item_key="item", time="ts"),
                       features=features, tasks=tasks, user_features_per_exposure=True)


def export(records: Iterable[Mapping], events: pd.DataFrame, store: str | Path, out: str | Path,
           task_events: Mapping[str, str] = join.DEFAULT_TASK_EVENTS, window_s: float = 3600.0,
           returned_only: bool = False) -> Exported:
    """Write ``out/exposures.parquet`` and ``out/dataset.yaml`` (see the module doc)."""
    out = Path(out)
    records = list(records)
    df, manifest, skipped = rows(records, store)
    if manifest is None or df.empty:
        raise ValueError("no prediction-log records with features: serve with MTRANK_PREDLOG_FEATURES_RATE > 0")
    if returned_only:
        df = df[df["position"] >= 0].reset_index(drop=True)
    cands = df[["request_id", "user", "item", "ts", "position"]].rename(columns={"request_id": "rid",
                                                                                 "position": "pos"})
    labelled = join.label(cands.drop_duplicates(["rid", "item"]), events, window_s).frame
    outcomes = labelled.set_index(["rid", "item"])[list(join.OUTCOMES)]
    idx = pd.MultiIndex.from_arrays([df["request_id"], df["item"]])
    sums = {}
    for t in manifest.tasks:
        outcome = task_events.get(t.name)
        if outcome is None:
            raise ValueError(f"task {t.name!r}: no outcome maps to it; say --task-event {t.name}=OUTCOME "
                             f"(one of {list(join.OUTCOMES)})")
        df[t.label] = outcomes[outcome].reindex(idx).fillna(0.0).to_numpy()
        sums[t.label] = float(df[t.label].sum())
    df["ts"] = pd.to_datetime(df["ts"], unit="ms", utc=True)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / EXPOSURES, index=False)
    dump_spec(spec_of(manifest, f"{manifest.name}-served"), out / "dataset.yaml")
    return Exported(rows=len(df), requests=int(df["request_id"].nunique()), skipped=skipped, labelled=sums,
                    path=out)
