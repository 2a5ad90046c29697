"""Fresh behaviour sequences: which feature namespaces an event updates, and the one server-side
step that updates them (``apply.lua``).

**Targets.** The namespaces of the bundles the service holds, found the way the service finds them:
the routing config (MTRANK_ROUTING_CONFIG, else the implicit one of MTRANK_MODEL_NAME /
_VERSION and MTRANK_VERSION_POLICY), the store listing and :func:`service.serving.planner.plan`;
``latest N`` walks the newest versions whose features Redis confirms
(:func:`~service.serving.planner.take_latest`). Only bundles whose features are confirmed
(:func:`~service.serving.feature_check.check_features`) are targets: a namespace without loaded
features is left alone. Versions an operator loaded or unloaded through the admin API live in one
server process only and are not seen here. Several bundles of one schema share one target.

**The update.** A user sequence field names the event that feeds it (``event: click`` in the dataset
spec -> :attr:`service.contract.SequenceField.event`). The raw item id is mapped to its index with
the bundle's own vocabulary (of the field's ``vocab_of``; an unknown item is 0, out of vocabulary,
exactly as training encodes it) and prepended: sequences are most recent first (training keeps the
head, :func:`training.data.dataset._encode_sequence`), so the oldest element drops off the end.
A user without a value gets one with the schema defaults (index 0, dense means) and the new
sequence - what ``/rank`` would use for that user anyway, now with the fresh behaviour.

**Atomicity and idempotency.** One ``EVALSHA`` per batch (:meth:`Applier.apply`): for each event,
``SET NX EX`` of its dedup key (:func:`dedup_key`) and, only when that succeeds, every update of
it; then ``XACK`` of every entry of the batch. The script runs atomically, so an event is applied
and marked and its entry acknowledged together, or not at all (a consumer killed before the script
leaves its entries pending; another consumer claims and applies them). The same ``event_id`` again
within ``MTRANK_EVENTS_DEDUP_TTL_S`` (a client retry, a redelivery) is not applied twice. Events
that update nothing (e.g. impressions when no sequence follows them) are acknowledged only, and
cost no dedup key. The keys of one batch span namespaces, so the consumer needs a single Redis
(not a Cluster).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from service.codec import EntityCodec
from service.contract import VOCAB_FILE, BundleManifest, FeatureSchema, meta_key, namespace, user_key, vocab_lookup
from service.events.record import FIELD, decode, stream_key
from service.redis_client import FeatureStore
from service.serving import BundleKey, planner, sources
from service.serving.feature_check import FeatureCheckError, check_features
from service.settings import Settings
from service.store import BundleError, bundle_signature, read_manifest

log = logging.getLogger("service.events")

SCRIPT = files("service.events").joinpath("apply.lua").read_text()
_ITEM = struct.Struct("<i")


def dedup_key(prefix: str, event_id: str) -> str:
    """The key that marks ``event_id`` as applied (expires after MTRANK_EVENTS_DEDUP_TTL_S)."""
    return f"{stream_key(prefix)}:seen:{event_id}"


@dataclass(frozen=True)
class Slot:
    """One event-fed sequence field of a packed user value."""

    name: str
    offset: int  # bytes from the start of the value
    max_len: int
    lookup: Mapping[str, int]  # raw item id -> index in the field's vocabulary (absent = 0)


@dataclass(frozen=True)
class Target:
    """One feature namespace to update: the user value with the schema defaults and, per event
    type, the sequence fields it feeds."""

    namespace: str
    default: bytes
    slots: Mapping[str, tuple[Slot, ...]]
    bundles: tuple[str, ...] = ()  # which held bundles read it (for the log)


def seq_offset(codec: EntityCodec) -> int:
    """Where the sequences start in a packed value (the codec owns the layout)."""
    fields = codec.dtype.fields
    assert fields is not None  # a structured dtype
    return int(fields["seq"][1])


def target_of(prefix: str, schema: FeatureSchema, vocabs: Mapping[str, Sequence[str]], source: str = "") -> Target:
    """The target of one schema with its bundle's vocabularies (``vocab.json``: index = position + 1;
    positions at or above ``vocab_size - 1`` are out of the table and stay 0, as in the fetcher)."""
    codec = EntityCodec.for_schema(schema, "user")
    seq_at = seq_offset(codec)
    sizes = {f.name: f.vocab_size for f in schema.sparse}
    lookups: dict[str, dict[str, int]] = {}
    slots: dict[str, list[Slot]] = {}
    pos = 0
    for f in schema.sequence_of("user"):
        if f.event is not None:
            if f.vocab_of not in lookups:
                lookups[f.vocab_of] = vocab_lookup(vocabs.get(f.vocab_of, ()), sizes[f.vocab_of])
            slots.setdefault(f.event, []).append(Slot(f.name, seq_at + 4 * pos, f.max_len, lookups[f.vocab_of]))
        pos += f.max_len
    default = codec.encode(np.zeros((1, codec.n_sparse), np.int64), codec.dense_defaults[None, :],
                           np.zeros((1, codec.seq_width), np.int64))[0]
    return Target(namespace(prefix, schema), default, {k: tuple(v) for k, v in slots.items()}, (source,))


@dataclass
class _Confirmed:
    """What :func:`planner.take_latest` asks of a held bundle."""

    path: Path
    manifest: BundleManifest
    features_confirmed: bool = True


@dataclass
class TargetFinder:
    """The targets of the bundles the service holds now (see the module doc); vocabularies are
    read again only when a bundle's files change."""

    settings: Settings
    store: FeatureStore
    _cache: dict[tuple, Target] = field(default_factory=dict)

    def held(self) -> list[_Confirmed]:
        s = self.settings
        policy = sources.default_policy(s)
        cfg = sources.read_config(s, policy)  # as the service reads it
        root = Path(s.model_store)
        plan = planner.plan(cfg, sources.listing(root, planner.model_names(cfg, ())), policy, (), (), str(root))
        out: dict[tuple[str, int], _Confirmed] = {}

        def get(key: BundleKey) -> _Confirmed | None:
            try:
                path, manifest = read_manifest(root, key.name, key.version, key.precision)
                check_features(self.store, s, manifest)
            except FeatureCheckError as e:
                if e.transient:  # Redis down must not read as "no features": raise, keep the old targets
                    self.store.client.exists(meta_key(namespace(s.redis_prefix, manifest.feature_schema)))
                return None
            except BundleError:
                return None
            found = out[(key.name, key.version)] = _Confirmed(path, manifest)
            return found

        planner.walk(plan, get)
        return list(out.values())

    def targets(self) -> list[Target]:
        by_ns: dict[str, Target] = {}
        cache: dict[tuple, Target] = {}
        for h in self.held():
            m = h.manifest
            sig = (str(h.path), bundle_signature(h.path))
            t = self._cache.get(sig)
            if t is None:
                t = target_of(self.settings.redis_prefix, m.feature_schema, _vocabs(h.path), f"{m.name} v{m.version}")
            cache[sig] = t
            if not t.slots:
                continue
            have = by_ns.get(t.namespace)
            by_ns[t.namespace] = t if have is None else Target(t.namespace, t.default, t.slots,
                                                               have.bundles + t.bundles)
        self._cache = cache
        return list(by_ns.values())


def _vocabs(path: Path) -> dict[str, list[str]]:
    raw = json.loads((path / VOCAB_FILE).read_bytes())
    return {k: [str(x) for x in v] for k, v in raw.items()} if isinstance(raw, dict) else {}


@dataclass
class Counts:
    applied: int = 0  # events applied (their dedup key was new)
    duplicates: int = 0  # events seen before (not applied again)
    created: int = 0  # user values created with the schema defaults
    corrupt: int = 0  # updates skipped: the value in Redis did not decode
    no_update: int = 0  # entries acknowledged without an update (no sequence follows their type)
    invalid: int = 0  # entries that are not events (or were trimmed before they were read)

    def add(self, other: Counts) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


class Applier:
    """Builds the script's arguments for a batch of stream entries and runs it (see the module doc).
    ``group``: the consumer group whose entries the script acknowledges; ``""`` for a source that is
    not the events stream (e.g. Kafka records: their ids are then only names in the log)."""

    def __init__(self, client, prefix: str, group: str, dedup_ttl_s: int):
        self.client = client
        self.prefix = prefix
        self.stream = stream_key(prefix)
        self.group = group
        self.ttl = dedup_ttl_s
        self.script = client.register_script(SCRIPT)

    def apply(self, entries: Iterable[tuple[bytes, Mapping[bytes, bytes] | None]],
              targets: Sequence[Target]) -> Counts:
        """Apply and acknowledge ``entries`` (``(id, fields)`` as XREADGROUP returns them)."""
        counts = Counts()
        keys: list[str] = [self.stream]
        events: list = []
        ack_only: list[bytes] = []
        n = 0
        for entry_id, fields in entries:
            raw = fields.get(FIELD) if fields else None
            try:
                ev = decode(raw) if raw is not None else None
            except ValidationError:
                ev = None
            if ev is None:
                log.warning("stream entry %s is not an event: acknowledged without an update", entry_id)
                counts.invalid += 1
                ack_only.append(entry_id)
                continue
            updates = []
            for ti, t in enumerate(targets, start=1):
                slots = t.slots.get(ev.type, ())
                if slots:
                    key = user_key(t.namespace, ev.user_id)
                    for s in slots:
                        updates.append((key, ti, s.offset, s.max_len, _ITEM.pack(s.lookup.get(ev.item_id, 0))))
            if not updates:
                counts.no_update += 1
                ack_only.append(entry_id)
                continue
            n += 1
            keys.append(dedup_key(self.prefix, ev.event_id))
            events += [entry_id, len(updates)]
            for key, *rest in updates:
                keys.append(key)
                events += rest
        if not n and not ack_only:
            return counts
        args = [self.group, self.ttl, len(targets), *(t.default for t in targets), n, *events, len(ack_only),
                *ack_only]
        applied, dups, created, corrupt = self.script(keys=keys, args=args, client=self.client)
        counts.applied, counts.duplicates, counts.created, counts.corrupt = applied, dups, created, corrupt
        return counts
