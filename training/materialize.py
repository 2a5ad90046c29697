"""Materialise user and item features into Redis for a bundle (``mtrank features load``).

The entities are encoded with the bundle's own schema and vocabularies (the same code path as
training), packed with ``service.codec`` and written with pipelined MSETs, one key per entity,
under a namespace that carries the schema's fingerprint (the key layout is the contract's:
:func:`service.contract.namespace`): loading features for a new schema writes new keys and never
touches what a running model reads. Re-running overwrites the same keys with the same bytes
(idempotent). No torch here, and nothing of the service but its contract (``service.contract``,
``service.codec``).

On a Redis Cluster (a ``redis.cluster.RedisCluster`` client, e.g. from a ``redis+cluster://`` URL)
each batch is written with ``mset_nonatomic``: one MSET per hash slot, pipelined per node by the
cluster client (a plain MSET across slots is refused by the cluster). Item keys carry a hash tag
of one of :data:`service.contract.ITEM_GROUPS` groups, so a batch of items is at most that many
MSETs; the reader (:meth:`service.redis_client.FeatureStore.mget`) reads them back through the same
key functions, a bounded number of MGETs per node.

The namespace meta key is written last, after every value, and carries a fresh ``load_id`` (and
the ``key_layout`` version the keys were written in, :data:`service.contract.KEY_LAYOUT_VERSION`):
serving processes read it in their feature MGET and empty their item caches when it changes
(see :mod:`service.features`), so a reload is picked up at the next request.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from tqdm.auto import tqdm

from service.codec import EntityCodec
from service.contract import (
    KEY_LAYOUT_VERSION,
    MANIFEST_FILE,
    VOCAB_FILE,
    BundleManifest,
    item_keys,
    meta_key,
    namespace,
    user_key,
)
from training.data.dataset import encode_entities, read_raw


@dataclass
class LoadSummary:
    namespace: str
    users: int
    items: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        return (f"loaded {self.users:,} users and {self.items:,} items ({self.bytes / 1e6:.1f} MB) "
                f"into namespace {self.namespace!r} in {self.seconds:.1f}s")


def load_features(data: str | Path, bundle_dir: str | Path, client: redis.Redis | RedisCluster,
                  prefix: str = "mtrank", chunk: int = 2000, progress: bool = True) -> LoadSummary:
    """Write the users' and items' packed features of ``data`` for the bundle in ``bundle_dir``
    through the redis-py ``client`` (the module doc), then the namespace meta key."""
    t0 = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.from_json((bundle_dir / MANIFEST_FILE).read_text())
    vocabs = json.loads((bundle_dir / VOCAB_FILE).read_text())
    schema = manifest.feature_schema
    ns = namespace(prefix, schema)
    raw = read_raw(data)
    counts, total_bytes = {}, 0
    for entity in ("user", "item"):
        table = encode_entities(raw, schema, vocabs, entity, fill_dense=False)  # NaN: the reader's mean
        values = EntityCodec.for_schema(schema, entity).encode(table.sparse, table.dense, table.seq)
        keys = [user_key(ns, i) for i in table.ids] if entity == "user" else item_keys(ns, table.ids)
        with tqdm(total=len(keys), desc=f"{entity} features", unit=entity, disable=not progress) as bar:
            for i in range(0, len(keys), chunk * 10):
                _write(client, keys[i:i + chunk * 10], values[i:i + chunk * 10], chunk)
                bar.update(min(chunk * 10, len(keys) - i))
        counts[entity] = len(keys)
        total_bytes += sum(len(v) for v in values)
    summary = LoadSummary(ns, counts["user"], counts["item"], total_bytes, round(time.perf_counter() - t0, 2))
    client.set(meta_key(ns), json.dumps({
        "schema_fingerprint": schema.fingerprint(), "model": manifest.name, "version": manifest.version,
        "users": summary.users, "items": summary.items, "loaded_at": time.time(), "load_id": uuid.uuid4().hex,
        "key_layout": KEY_LAYOUT_VERSION,
    }))
    return summary


def _write(client, keys: list[str], values: list[bytes], chunk: int) -> None:
    """Write one batch: MSETs of ``chunk`` keys in one pipeline, or per slot on a cluster."""
    if isinstance(client, RedisCluster):
        client.mset_nonatomic(dict(zip(keys, values, strict=True)))
        return
    pipe = client.pipeline(transaction=False)
    for j in range(0, len(keys), chunk):
        pipe.mset(dict(zip(keys[j:j + chunk], values[j:j + chunk], strict=True)))
    pipe.execute()
