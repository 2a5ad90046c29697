"""Dataset spec: a small YAML/JSON file that says how a user's own data maps onto the contract.

Example (the one `mtrank synth` writes)::

    name: synth
    exposures: {path: exposures.parquet, user_key: user_id, item_key: item_id, time: ts}
    users: {path: users.parquet, key: user_id}        # optional: else taken from exposures
    items: {path: items.parquet, key: item_id}        # optional: else taken from exposures
    features:
      - {name: user_id, entity: user, kind: sparse}
      - {name: activity, entity: user, kind: dense}
      - {name: clicked_items, entity: user, kind: sequence, max_len: 20, vocab_of: item_id}
      - {name: item_id, entity: item, kind: sparse}
      - {name: hour, entity: context, kind: sparse}
    tasks:
      - {name: ctr, kind: binary, label: click}
      - {name: cvr, kind: binary, label: conversion, condition: ctr}
      - {name: watch_time, kind: regression, label: watch_time, condition: ctr}

Paths are relative to the spec file. Tables are Parquet or CSV (by extension). A feature's
``column`` defaults to its name. User features are read from the users table when there is one,
else from the exposure rows (last row per user); items likewise. Context features always come
from the exposure rows. Sequence columns are lists (Parquet) or ``|``-separated strings (CSV),
most recent first. With ``user_features_per_exposure: true`` every exposure row carries its own
user snapshot (for behaviour sequences "as of the exposure"), and the feature store receives
each user's latest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.contract import Entity, TaskSpec


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureSpec(_Spec):
    name: str
    entity: Entity
    kind: Literal["sparse", "dense", "sequence"]
    column: str | None = None
    embedding_dim: int = Field(default=16, ge=1)
    max_len: int | None = Field(default=None, ge=1)
    vocab_of: str | None = None
    min_count: int = Field(default=1, ge=1)  # sparse values seen fewer times map to OOV

    @property
    def col(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _check(self) -> "FeatureSpec":
        if self.kind == "sequence" and (self.max_len is None or self.vocab_of is None):
            raise ValueError(f"sequence feature {self.name!r} needs max_len and vocab_of")
        return self


class ExposureTable(_Spec):
    path: str
    user_key: str
    item_key: str
    time: str | None = None
    # a column of "train" / "valid" / "test" for a split fixed by the data (``--split column``)
    split: str | None = None


class EntityTable(_Spec):
    path: str
    key: str


class DatasetSpec(_Spec):
    name: str
    exposures: ExposureTable
    users: EntityTable | None = None
    items: EntityTable | None = None
    features: list[FeatureSpec]
    tasks: list[TaskSpec]
    # True: user features are columns of the exposure rows, one snapshot per exposure (e.g. the
    # behaviour sequences as of the exposure's time). Training uses each row's own snapshot; the
    # feature store gets every user's latest snapshot (by exposures.time, else by row order).
    user_features_per_exposure: bool = False
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _check(self) -> "DatasetSpec":
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        for f in self.features:
            if f.kind == "sequence" and f.vocab_of not in {g.name for g in self.features if g.kind == "sparse"}:
                raise ValueError(f"feature {f.name!r}: vocab_of {f.vocab_of!r} is not a sparse feature")
        if self.user_features_per_exposure and self.users is not None:
            raise ValueError("user_features_per_exposure reads user features from the exposures: drop `users`")
        tasks = {t.name: t for t in self.tasks}
        for t in self.tasks:
            if t.condition is not None and (t.condition not in tasks or tasks[t.condition].kind != "binary"):
                raise ValueError(f"task {t.name!r}: condition {t.condition!r} must name a binary task")
        return self

    def path(self, rel: str) -> Path:
        return (self.root / rel).resolve()


def load_spec(path: str | Path) -> DatasetSpec:
    """Read a spec file, or ``dataset.yaml`` inside a directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "dataset.yaml"
    data = yaml.safe_load(p.read_text())
    spec = DatasetSpec.model_validate(data)
    spec.root = p.parent.resolve()
    return spec


def dump_spec(spec: DatasetSpec, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False))
