"""Dataset spec: a small YAML/JSON file that says how a user's own data maps onto the contract.

Example (the one `mtrank synth` writes)::

    name: synth
    exposures: {path: exposures.parquet, user_key: user_id, item_key: item_id, time: ts}
    users: {path: users.parquet, key: user_id}        # optional: else taken from exposures
    items: {path: items.parquet, key: item_id}        # optional: else taken from exposures
    features:
      - {name: user_id, entity: user, kind: sparse}
      - {name: activity, entity: user, kind: dense}
      - {name: clicked_items, entity: user, kind: sequence, max_len: 20, vocab_of: item_id, event: click}
      - {name: item_id, entity: item, kind: sparse}
      - {name: hour, entity: context, kind: sparse}
    tasks:
      - {name: ctr, kind: binary, label: click}
      - {name: cvr, kind: binary, label: conversion, condition: ctr}
      - {name: watch_time, kind: regression, label: watch_time, condition: ctr}

Paths are relative to the spec file. Tables are Parquet (``.parquet``/``.pq``) or CSV (``.csv``,
comma-separated, or ``.tsv``, tab-separated, by default). A CSV table may say its separator
(``sep: ";"``) and that it has no header line (``header: false``, then ``columns:`` names its
columns in order)::

    exposures: {path: log.csv, sep: ";", header: false, columns: [uid, iid, t, click, like],
                user_key: uid, item_key: iid, time: t}
 A feature's
``column`` defaults to its name. User features are read from the users table when there is one,
else from the exposure rows (last row per user); items likewise. Context features always come
from the exposure rows. Sequence columns are lists (Parquet) or ``|``-separated strings (CSV),
most recent first. With ``user_features_per_exposure: true`` every exposure row carries its own
user snapshot (for behaviour sequences "as of the exposure"), and the feature store receives
each user's latest one.

The spec is validated completely when it is loaded (:func:`load_spec`): unknown keys, wrong
types, duplicate names, a spec without an item feature (the items are what is ranked), sequences
without a sparse vocabulary, task conditions, and every column the spec names against the
tables' headers. A problem raises :class:`SpecError`, one line naming the field, e.g.
``spec.features[3].kind: Input should be 'sparse', 'dense' or 'sequence'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.contract import Entity, EventType, TaskSpec

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")


class SpecError(ValueError):
    """A dataset spec that cannot be used. ``str()`` is one line naming the field."""


class _At(ValueError):
    """A validator's problem at ``loc`` relative to the model it validates (see :func:`_where`)."""

    def __init__(self, loc: tuple[str | int, ...], msg: str):
        super().__init__(msg)
        self.loc, self.msg = loc, msg


def _where(loc: tuple[str | int, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _one_line(e: ValidationError) -> str:
    problems = []
    for err in e.errors():
        loc, msg = tuple(err["loc"]), err["msg"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _At):
            loc, msg = loc + cause.loc, cause.msg
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] != "missing" and isinstance(err.get("input"), (str, int, float, bool)):
            msg += f" (got {err['input']!r})"
        problems.append(f"{_where(loc)}: {msg}")
    return "; ".join(problems)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: feature keys only serving reads (which outcome event feeds a user sequence online): they change
#: no training row, so a dataset's identity (bench/quality.py's data version) leaves them out
SERVING_ONLY_KEYS = ("event",)


class FeatureSpec(_Spec):
    name: str = Field(min_length=1)
    entity: Entity
    kind: Literal["sparse", "dense", "sequence"]
    column: str | None = None
    embedding_dim: int = Field(default=16, ge=1)
    max_len: int | None = Field(default=None, ge=1)
    vocab_of: str | None = None
    min_count: int = Field(default=1, ge=1)  # sparse values seen fewer times map to OOV
    # a user sequence: the outcome event whose items `mtrank events consume` prepends to it online
    event: EventType | None = None

    @property
    def col(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        for key in ("max_len", "vocab_of"):
            if self.kind == "sequence" and getattr(self, key) is None:
                raise _At((key,), f"a sequence feature needs {key}")
            if self.kind != "sequence" and getattr(self, key) is not None:
                raise _At((key,), f"only a sequence feature has {key} (this one is {self.kind})")
        if self.event is not None and (self.kind != "sequence" or self.entity != "user"):
            raise _At(("event",), f"only a user sequence follows an event (this one is a {self.entity} {self.kind})")
        return self


class Table(_Spec):
    """A table file. CSV only: ``sep`` (default by extension) and ``header``; without a header
    line, ``columns`` names the columns in file order."""

    path: str = Field(min_length=1)
    sep: str | None = Field(default=None, min_length=1)
    header: bool = True
    columns: list[str] | None = None

    @property
    def is_csv(self) -> bool:
        return Path(self.path).suffix.lower() in CSV_SUFFIXES

    @property
    def separator(self) -> str:
        return self.sep or CSV_SUFFIXES.get(Path(self.path).suffix.lower(), ",")

    @model_validator(mode="after")
    def _check(self) -> Table:
        suffix = Path(self.path).suffix.lower()
        if suffix not in CSV_SUFFIXES and suffix not in PARQUET_SUFFIXES:
            raise _At(("path",), f"unsupported table format {suffix or '(no extension)'!r} "
                                 f"(use {', '.join([*PARQUET_SUFFIXES, *CSV_SUFFIXES])})")
        if not self.is_csv:
            for key, default in (("sep", None), ("header", True), ("columns", None)):
                if getattr(self, key) != default:
                    raise _At((key,), "only a CSV table has this option (this one is Parquet)")
        if not self.header and not self.columns:
            raise _At(("columns",), "a table without a header line needs its column names here")
        if self.header and self.columns is not None:
            raise _At(("columns",), "the table has a header line, which names the columns "
                                    "(set header: false to name them here)")
        if self.columns is not None:
            dup = _first_duplicate(self.columns)
            if dup is not None:
                raise _At(("columns", dup), f"duplicate column name {self.columns[dup]!r}")
        return self


class ExposureTable(Table):
    user_key: str
    item_key: str
    time: str | None = None
    # a column of "train" / "valid" / "test" for a split fixed by the data (``--split column``)
    split: str | None = None


class EntityTable(Table):
    key: str


def _first_duplicate(values: list) -> int | None:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            return i
        seen.add(v)
    return None


class DatasetSpec(_Spec):
    name: str = Field(min_length=1)
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
    def _check(self) -> DatasetSpec:
        f_names = [f.name for f in self.features]
        dup = _first_duplicate(f_names)
        if dup is not None:
            raise _At(("features", dup, "name"), f"duplicate feature name {f_names[dup]!r}")
        sparse = {f.name for f in self.features if f.kind == "sparse"}
        for i, f in enumerate(self.features):
            if f.kind == "sequence" and f.vocab_of not in sparse:
                raise _At(("features", i, "vocab_of"), f"{f.vocab_of!r} is not a sparse feature of this spec")
        if not any(f.entity == "item" for f in self.features):
            raise _At(("features",), "no item feature: the model ranks items, so it needs at least one "
                                     "(e.g. the item key: {name: item_id, entity: item, kind: sparse, "
                                     f"column: {self.exposures.item_key}}})")
        if self.user_features_per_exposure and self.users is not None:
            raise _At(("users",), "user_features_per_exposure reads user features from the exposures: "
                                  "drop `users`")
        if not self.tasks:
            raise _At(("tasks",), "at least one task is needed")
        t_names = [t.name for t in self.tasks]
        dup = _first_duplicate(t_names)
        if dup is not None:
            raise _At(("tasks", dup, "name"), f"duplicate task name {t_names[dup]!r}")
        tasks = {t.name: t for t in self.tasks}
        for i, t in enumerate(self.tasks):
            if t.condition is None:
                continue
            cond = tasks.get(t.condition)
            if cond is None or cond.kind != "binary" or cond is t:
                raise _At(("tasks", i, "condition"), f"{t.condition!r} must name another, binary task")
            if cond.condition is not None:
                raise _At(("tasks", i, "condition"), f"{t.condition!r} has a condition itself "
                                                     "(conditions are one level deep)")
        return self

    def path(self, rel: str) -> Path:
        return (self.root / rel).resolve()

    def check_columns(self) -> None:
        """Every column the spec names exists in its table (read from the files' headers only)."""
        ex = self.exposures
        ex_cols = set(table_columns(self.path(ex.path), ex, "exposures"))
        user_cols = ex_cols if self.users is None else \
            set(table_columns(self.path(self.users.path), self.users, "users"))
        item_cols = ex_cols if self.items is None else \
            set(table_columns(self.path(self.items.path), self.items, "items"))

        def need(loc: tuple, column: str, cols: set[str], table: str) -> None:
            if column not in cols:
                raise SpecError(f"{_where(loc)}: no column {column!r} in the {table} table "
                                f"(it has {_some(sorted(cols))})")

        for key in ("user_key", "item_key", "time", "split"):
            if getattr(ex, key) is not None:
                need(("exposures", key), getattr(ex, key), ex_cols, "exposures")
        for entity, table in (("users", self.users), ("items", self.items)):
            if table is not None:
                need((entity, "key"), table.key, user_cols if entity == "users" else item_cols, entity)
        for i, t in enumerate(self.tasks):
            need(("tasks", i, "label"), t.label, ex_cols, "exposures")
        for i, f in enumerate(self.features):
            if f.entity == "context" or (f.entity == "user" and self.user_features_per_exposure):
                cols, table = ex_cols, "exposures"
            elif f.entity == "user":
                cols, table = user_cols, "users" if self.users is not None else "exposures"
            else:
                cols, table = item_cols, "items" if self.items is not None else "exposures"
            need(("features", i, "column" if f.column else "name"), f.col, cols, table)


def _some(names: list[str], n: int = 12) -> str:
    if not names:
        return "no columns"
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def table_columns(path: Path, table: Table, key: str) -> list[str]:
    """A table's column names, from its header (or the spec) without reading the rows. ``key``:
    where the table is in the spec (exposures, users, items), for the error."""
    if not path.is_file():
        raise SpecError(f"{_where((key, 'path'))}: no such file {path}")
    if not table.is_csv:
        import pyarrow.parquet as pq
        return list(pq.read_schema(path).names)
    import pandas as pd
    if table.header:
        return [str(c) for c in pd.read_csv(path, sep=table.separator, nrows=0).columns]
    columns = list(table.columns or [])
    fields = pd.read_csv(path, sep=table.separator, header=None, nrows=1).shape[1]
    if fields != len(columns):
        raise SpecError(f"{_where((key, 'columns'))}: {len(columns)} names, but the first line of {path.name} "
                        f"has {fields} fields (separator {table.separator!r})")
    return columns


def load_spec(path: str | Path, check_columns: bool = True) -> DatasetSpec:
    """Read and validate a spec file, or ``dataset.yaml`` inside a directory.

    Raises :class:`SpecError` (one line, naming the field) for any problem, including a column the
    spec names that its table lacks (``check_columns``; reads the headers only)."""
    p = Path(path)
    if p.is_dir():
        p = p / "dataset.yaml"
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"dataset spec {p}: cannot read it ({e.strerror or e})") from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise SpecError(f"dataset spec {p}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"dataset spec {p}: spec: expected a mapping of keys (name, exposures, features, "
                        f"tasks, ...), got {type(data).__name__}")
    try:
        spec = DatasetSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"dataset spec {p}: {_one_line(e)}") from None
    spec.root = p.parent.resolve()
    if check_columns:
        try:
            spec.check_columns()
        except SpecError as e:
            raise SpecError(f"dataset spec {p}: {e}") from None
    return spec


def dump_spec(spec: DatasetSpec, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True),
                                         sort_keys=False))
