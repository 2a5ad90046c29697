"""The shared contract between training and the service (pydantic, no torch).

Training writes it into every bundle (``manifest.json``); the service and the feature loader
read it back. Two objects:

* :class:`FeatureSchema` - every model input field, which entity owns it (user, item or the
  request context), its kind (sparse id, dense number, sequence of ids) and what the model needs
  to know about it (vocabulary size, normalisation stats, max length, defaults).
* :class:`BundleManifest` - one exported model version: name, version, architecture, tasks,
  ONNX input/output names, the schema, test metrics, the sha256 of ``model.onnx``, when it was
  made and with which library versions; optionally other precisions of the same model
  (``precisions["int8"]``: ``model.int8.onnx``, its sha256, how it was quantised and its metric
  deltas against fp32 on the test split). A manifest without ``precisions`` (older bundles) has
  the fp32 model only. ``calibration`` records the post-hoc maps the exported graph already
  applies to each task's output (:class:`OutputCalibration`; fitted on the validation split); a
  manifest without it (older bundles) serves the model's outputs uncalibrated. The service reads
  neither to score: both are in the ONNX graph.

Index 0 of every sparse/sequence vocabulary is reserved for "missing or out of vocabulary",
which is also the padding value of sequences. Dense fields are stored and sent *raw*; the model
normalises them itself with the stats below, so the default of a missing dense value is its mean.

And the Redis layout of the online features (:func:`namespace`, :func:`user_key`,
:func:`item_key`, :func:`meta_key`; values are :mod:`service.codec` packed bytes), version
:data:`KEY_LAYOUT_VERSION`::

    ns   = f"{prefix}:{schema.fingerprint()[:12]}"
    user = f"{ns}:u:{user_id}"
    item = f"{ns}:i:{{{h}.{k}.{j}}}:{item_id}"  # k = crc32(item_id) % ITEM_GROUPS, h = crc32(ns)
    meta = f"{ns}:meta"

The braces are a Redis Cluster hash tag: a cluster hashes only ``{h.k.j}``, so the items of a
namespace live in :data:`ITEM_GROUPS` slots and one request's items need at most that many
MGETs in all, however many items it asks for (a single Redis reads them in one ``MGET``
as before). ``j`` spreads the groups evenly over the slots (:func:`_item_heads`); ``h`` puts
each namespace's groups in other slots.

The namespace holds the schema fingerprint (:meth:`FeatureSchema.fingerprint`: key layout and
codec versions, stored fields, vocabularies - not normalisation statistics), so a model only ever
reads features written in its own layout and vocabularies, and retrains that change neither share
the namespace. ``mtrank features load`` (:mod:`training.materialize`) writes them; the service
(:mod:`service.features`) reads them; ``mtrank features gc`` (:mod:`service.namespaces`) removes
the ones no held or pinned bundle uses.

This module and :mod:`service.codec` are the whole contract: they import nothing from the rest of
the service (Redis client, settings) nor from training (``tests/test_imports.py`` checks).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import zlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from itertools import count
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

Entity = Literal["user", "item", "context"]
ENTITIES: tuple[Entity, ...] = get_args(Entity)
#: the outcome events a client reports (``POST /events``; the entry format is :mod:`service.events.record`)
EventType = Literal["impression", "click", "conversion", "watch"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
VOCAB_FILE = "vocab.json"
#: the precisions a bundle can be served in: fp32 is ``model.onnx``; the others are optional files
OptionalPrecision = Literal["int8"]
Precision = Literal["fp32", OptionalPrecision]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
PRECISION_FILES: dict[Precision, str] = {"fp32": MODEL_FILE, "int8": "model.int8.onnx"}
#: version of the packed-bytes value format (:mod:`service.codec`, which owns the layout; the number
#: lives here so that the schema fingerprint covers it without importing the codec)
CODEC_FORMAT_VERSION = 1
#: the entities with values in Redis (context fields come with the request)
STORED_ENTITIES: tuple[Entity, ...] = ("user", "item")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparseField(_Strict):
    """A categorical id. ``vocab_size`` counts index 0 (missing / OOV)."""

    kind: Literal["sparse"] = "sparse"
    name: str
    entity: Entity
    vocab_size: int = Field(ge=2)
    embedding_dim: int = Field(default=16, ge=1)


class DenseField(_Strict):
    """A real number, normalised inside the model as ``(x - mean) / std``."""

    kind: Literal["dense"] = "dense"
    name: str
    entity: Entity
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)

    @property
    def default(self) -> float:
        return self.mean


class SequenceField(_Strict):
    """A list of ids (most recent first), padded with 0 up to ``max_len``.

    ``vocab_of`` names the sparse field whose vocabulary and embedding table it shares (for
    example the user's last clicked items share ``item_id``'s embeddings).
    """

    kind: Literal["sequence"] = "sequence"
    name: str
    entity: Entity
    max_len: int = Field(ge=1)
    vocab_of: str
    #: the outcome event whose items ``mtrank events consume`` prepends to this (user) sequence online
    #: (e.g. ``click`` -> ``clicked_items``); None = written by ``mtrank features load`` only
    event: EventType | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_event(self, handler):
        # left out when None, so a schema without events dumps (and fingerprints) as before the field existed
        out = handler(self)
        if isinstance(out, dict) and out.get("event", "") is None:
            del out["event"]
        return out


AnyField = SparseField | DenseField | SequenceField


class FeatureSchema(_Strict):
    sparse: list[SparseField]
    dense: list[DenseField] = []
    sequence: list[SequenceField] = []
    # sha256 of the vocabularies the indices were made with: two schemas with the same fields
    # but different vocabularies are different schemas (and so use different Redis namespaces).
    vocab_sha256: str = ""

    @model_validator(mode="after")
    def _check(self) -> FeatureSchema:
        names = [f.name for f in self.all_fields()]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate field names: {sorted(dup)}")
        sparse = {f.name: f for f in self.sparse}
        for s in self.sequence:
            if s.vocab_of not in sparse:
                raise ValueError(f"sequence field {s.name!r}: vocab_of {s.vocab_of!r} is not a sparse field")
            if s.entity == "context":
                raise ValueError(f"sequence field {s.name!r}: context sequences are not supported")
            if s.event is not None and s.entity != "user":
                raise ValueError(f"sequence field {s.name!r}: only a user sequence follows an event")
        return self

    def all_fields(self) -> list[AnyField]:
        return [*self.sparse, *self.dense, *self.sequence]

    def sparse_of(self, entity: Entity) -> list[SparseField]:
        return [f for f in self.sparse if f.entity == entity]

    def dense_of(self, entity: Entity) -> list[DenseField]:
        return [f for f in self.dense if f.entity == entity]

    def sequence_of(self, entity: Entity) -> list[SequenceField]:
        return [f for f in self.sequence if f.entity == entity]

    def field(self, name: str) -> AnyField:
        for f in self.all_fields():
            if f.name == name:
                return f
        raise KeyError(name)

    def fingerprint(self) -> str:
        """Identity of the *stored bytes* of this schema's features: sha256 over :meth:`storage_layout`.

        Two schemas with the same fingerprint read and write the same keys with the same bytes, so
        they share a Redis namespace; normalisation statistics and embedding sizes (which live in
        the bundle) do not change it."""
        canon = json.dumps(self.storage_layout(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def storage_layout(self) -> dict:
        """Everything that decides the keys and values ``mtrank features load`` writes: the key
        layout and codec versions, each entity's fields in codec order (name, kind; dtypes follow
        from the kind and the codec version), each sequence's ``max_len`` and vocabulary, each
        sparse field's ``vocab_size`` and the vocabularies' digest (stored ids are indices into
        them). Not dense ``mean``/``std`` (missing dense values are stored as NaN and take the
        reading model's mean) nor ``embedding_dim``."""
        def of(entity: Entity) -> list[dict]:
            return ([{"name": f.name, "kind": f.kind, "vocab_size": f.vocab_size} for f in self.sparse_of(entity)]
                    + [{"name": f.name, "kind": f.kind} for f in self.dense_of(entity)]
                    + [{"name": f.name, "kind": f.kind, "max_len": f.max_len, "vocab_of": f.vocab_of}
                       for f in self.sequence_of(entity)])
        return {"key_layout": KEY_LAYOUT_VERSION, "codec": CODEC_FORMAT_VERSION, "vocab_sha256": self.vocab_sha256,
                "entities": {e: of(e) for e in STORED_ENTITIES}}


class TaskSpec(_Strict):
    """One prediction task.

    ``kind`` binary -> a probability in [0, 1]; regression -> a non-negative value.
    ``condition`` names the binary task whose positive rows define this task's sample space
    (cvr and watch_time happen only after a click). For a binary task with a condition the
    model is trained ESMM-style over all exposures: p(condition) * p(task) is supervised by
    ``condition_label & label``. A regression task with a condition is fitted on the rows where
    the condition holds, on ``log1p(label)``; the model outputs ``expm1`` of it (>= 0).
    """

    name: str
    kind: Literal["binary", "regression"]
    label: str
    condition: str | None = None


class ModelInput(_Strict):
    """A named ONNX input: one entity and kind, the fields in column order."""

    name: str
    entity: Entity
    kind: Literal["sparse", "dense", "sequence"]
    dtype: Literal["int64", "float32"]
    fields: list[str]
    width: int


class PrecisionFile(_Strict):
    """Another precision of the bundle's model (e.g. int8): its file, checksum and quality against fp32.

    ``method`` says how it was made (e.g. ``dynamic/per-channel``); ``auc_delta`` is
    ``AUC(int8) - AUC(fp32)`` per AUC metric of the test split (``ctr``, ``cvr``, ``ctcvr``);
    ``metric_delta`` the same difference for every test metric (RMSE...); ``max_abs_diff`` the
    largest output difference per task on those rows (probabilities; ``log1p`` for regression);
    ``rows`` how many test rows were scored; ``within_tolerance`` whether every AUC moved by at
    most ``tolerance``.
    """

    file: str
    sha256: str
    method: str
    auc_delta: dict[str, float] = {}
    metric_delta: dict[str, float] = {}
    max_abs_diff: dict[str, float] = {}
    rows: int = 0
    tolerance: float = 0.001
    within_tolerance: bool = True

    @model_validator(mode="after")
    def _check(self) -> PrecisionFile:
        if "/" in self.file or "\\" in self.file or self.file.startswith(".") or self.file in (
                MODEL_FILE, MANIFEST_FILE, VOCAB_FILE):
            raise ValueError(f"file {self.file!r} must be a plain file name other than the bundle's own files")
        return self


class OutputCalibration(_Strict):
    """A post-hoc map from one task's raw model output to the served value, fitted on the
    validation split and applied inside the exported ONNX graph (so the service scores with it
    without knowing it is there).

    * ``platt`` (binary task): ``p = sigmoid(scale * logit + shift)`` - Platt scaling of the logit
      (``scale > 0``: the ranking, hence the AUC, is unchanged). For a task with a condition (CVR)
      it is fitted on the condition's positive rows: the served CVR is ``p(conversion | click)``.
    * ``smearing`` (regression task): ``y = max(scale * exp(max(pred, 0)) - 1, 0)`` where ``pred``
      estimates ``E[log1p y]``; ``scale = mean(exp(log1p y - max(pred, 0)))`` over the validation
      rows (Duan's smearing estimate, 1983), so ``y`` estimates the *expected* value rather than the
      geometric-mean-like ``expm1(E[log1p y])``. ``shift`` is 0.
    * ``ratio`` (regression task): the same map with ``scale = mean(1 + y) / mean(exp(max(pred, 0)))``
      over the validation rows, so that the mean served value equals the observed mean there
      (the default of training: see :mod:`training.calibration`).

    ``rows``: how many validation rows it was fitted on.
    """

    method: Literal["platt", "smearing", "ratio"]
    scale: float = Field(gt=0, allow_inf_nan=False)
    shift: float = Field(default=0.0, allow_inf_nan=False)
    rows: int = Field(ge=1)
    split: Literal["validation"] = "validation"


#: which calibration method fits which task kind
CALIBRATION_KIND = {"platt": "binary", "smearing": "regression", "ratio": "regression"}


class BundleManifest(BaseModel):
    format_version: int = 1
    name: str
    version: int = Field(ge=1)
    architecture: str
    tasks: list[TaskSpec]
    inputs: list[ModelInput]
    outputs: list[str]
    feature_schema: FeatureSchema
    metrics: dict[str, float] = {}
    train_config: dict = {}
    sha256: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    library_versions: dict[str, str] = {}
    #: other precisions of the model (absent in older bundles: fp32 only)
    precisions: dict[OptionalPrecision, PrecisionFile] = {}
    #: post-hoc calibration the ONNX graph applies, by task (absent in older bundles: none)
    calibration: dict[str, OutputCalibration] = {}

    model_config = ConfigDict(extra="forbid", frozen=True)

    def model_file(self, precision: str = "fp32") -> tuple[str, str]:
        """``(file name, sha256)`` of the model in ``precision``; KeyError when the bundle lacks it."""
        if precision == "fp32":
            return MODEL_FILE, self.sha256
        for p, entry in self.precisions.items():  # the keys are Precision literals, ``precision`` any str
            if p == precision:
                return entry.file, entry.sha256
        raise KeyError(precision)

    @model_validator(mode="after")
    def _check(self) -> BundleManifest:
        task_names = [t.name for t in self.tasks]
        if sorted(task_names) != sorted(self.outputs):
            raise ValueError(f"outputs {self.outputs} must be one per task {task_names}")
        kinds = {t.name: t.kind for t in self.tasks}
        for task, c in self.calibration.items():
            if task not in kinds:
                raise ValueError(f"calibration for {task!r}, which is not a task ({task_names})")
            if CALIBRATION_KIND[c.method] != kinds[task]:
                raise ValueError(f"calibration of {task!r}: {c.method} is for {CALIBRATION_KIND[c.method]} tasks, "
                                 f"{task!r} is {kinds[task]}")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> BundleManifest:
        return cls.model_validate_json(text)


def model_inputs(schema: FeatureSchema) -> list[ModelInput]:
    """The ONNX inputs a schema gives, in a fixed order; entities/kinds without fields are left out.

    Names are ``<entity>_<kind>`` (``user_sparse``, ``user_seq``, ``item_dense``, ``context_sparse``...).
    A sequence input concatenates its fields' padded ids, so its width is the sum of max_len.
    """
    out: list[ModelInput] = []
    for entity in ENTITIES:
        sp, de, sq = schema.sparse_of(entity), schema.dense_of(entity), schema.sequence_of(entity)
        if sp:
            out.append(ModelInput(name=f"{entity}_sparse", entity=entity, kind="sparse", dtype="int64",
                                  fields=[f.name for f in sp], width=len(sp)))
        if de:
            out.append(ModelInput(name=f"{entity}_dense", entity=entity, kind="dense", dtype="float32",
                                  fields=[f.name for f in de], width=len(de)))
        if sq:
            out.append(ModelInput(name=f"{entity}_seq", entity=entity, kind="sequence", dtype="int64",
                                  fields=[f.name for f in sq], width=sum(f.max_len for f in sq)))
    return out


def vocab_lookup(values: Sequence[object], vocab_size: int) -> dict[str, int]:
    """Raw value -> index of a bundle vocabulary (``vocab.json``): the value at position i has index
    i + 1; 0 is out of vocabulary, and so is every index at or above ``vocab_size`` (outside the
    embedding table)."""
    return {str(v): i + 1 for i, v in enumerate(values) if i + 1 < vocab_size}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Redis layout of the online features (see the module doc)
# ---------------------------------------------------------------------------------------------

#: hex digits of the fingerprint in a namespace's name
NAMESPACE_HEX = 12


def namespace(prefix: str, schema: FeatureSchema) -> str:
    return f"{prefix}:{schema.fingerprint()[:NAMESPACE_HEX]}"


#: version of the key layout below (the key functions and :data:`ITEM_GROUPS`): part of every schema
#: fingerprint, so of every namespace; bump it whenever a key of the same feature would be spelt
#: differently, so that new keys land in a new namespace
KEY_LAYOUT_VERSION = 2
#: item hash-tag groups per namespace: on a cluster a request's items touch at most this many slots
#: (12: few MGETs per read, and an equal share on 2, 3, 4, 6 or 12 masters; docs/contract.md)
ITEM_GROUPS = 12
#: Redis Cluster's hash slots (a key's slot: CRC16 of its hash tag, mod this)
CLUSTER_SLOTS = 16384


def user_key(ns: str, user_id: str) -> str:
    return f"{ns}:u:{user_id}"


def item_group(item_id: str) -> int:
    """The item's hash-tag group, ``0 <= k < ITEM_GROUPS``: stable across processes and machines."""
    return zlib.crc32(item_id.encode()) % ITEM_GROUPS


def cluster_slot(tag: str) -> int:
    """The Redis Cluster hash slot of a hash tag (CRC16/XMODEM, as the server computes it)."""
    return binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS


@lru_cache(maxsize=256)
def _item_heads(ns: str) -> tuple[str, ...]:
    """Every item key of ``ns`` is one of these ``ITEM_GROUPS`` heads followed by the item id.

    Group ``k``'s tag is ``<h>.<k>.<j>``: ``h`` the namespace's crc32 (so namespaces use different
    slots), ``j`` the first counter that puts the tag's slot in the middle half of the ``k``-th of
    ``ITEM_GROUPS`` equal slot ranges. The groups are thus spread evenly over the slot space:
    masters holding equal contiguous slot ranges (as ``redis-cli --cluster create`` leaves them)
    hold equal numbers of groups, give or take one, which a hash alone would not give with so few
    groups; exactly equal numbers when their count divides ``ITEM_GROUPS`` (their boundaries then
    fall on the ranges' ends, give or take a slot, and the middle half keeps every tag clear)."""
    h = f"{zlib.crc32(ns.encode()):08x}"
    heads = []
    for k in range(ITEM_GROUPS):
        lo, hi = k * CLUSTER_SLOTS // ITEM_GROUPS, (k + 1) * CLUSTER_SLOTS // ITEM_GROUPS
        lo, hi = lo + (hi - lo) // 4, hi - (hi - lo) // 4
        j = next(j for j in count() if lo <= cluster_slot(f"{h}.{k}.{j}") < hi)
        heads.append(f"{ns}:i:{{{h}.{k}.{j}}}:")
    return tuple(heads)


def item_key(ns: str, item_id: str) -> str:
    return _item_heads(ns)[zlib.crc32(item_id.encode()) % ITEM_GROUPS] + item_id


def item_keys(ns: str, item_ids: Iterable[str]) -> list[str]:
    """``[item_key(ns, i) for i in item_ids]``, faster (for a request's or a load's whole list)."""
    heads, crc, n = _item_heads(ns), zlib.crc32, ITEM_GROUPS
    return [heads[crc(i.encode()) % n] + i for i in item_ids]


def meta_key(ns: str) -> str:
    return f"{ns}:meta"
