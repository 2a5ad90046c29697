"""Feature namespaces in Redis: which exist, which a deployment needs, and removing the rest
(``mtrank features gc``).

A namespace is ``<prefix>:<12 hex digits of the schema fingerprint>``
(:func:`service.contract.namespace`); each of its keys starts with ``<namespace>:``.

* :func:`survey` SCANs ``<prefix>:*`` on every master (SCAN is per node: on a cluster each primary
  is scanned) and counts the keys of each namespace, reading its meta key. Keys under the prefix
  that belong to no namespace (the prediction-log stream ``mtrank:predictions``...) are counted
  apart and never touched; keys outside the prefix are never even listed.
* :func:`needed` plans as the service does (:func:`service.serving.planner.plan` over the routing
  config, the model store's listing and the operator's pins, ``keep``): every bundle held by
  version keeps its namespace; a ``latest N`` policy keeps every candidate the service walks,
  newest first, up to the N-th whose features are in Redis (so a newer version whose features are
  being loaded right now is kept too). Bundles whose manifest the service would refuse keep
  nothing.
* :func:`collect` deletes the other namespaces: each one's meta key first (a serving process
  then sees it vanished, never half there), then its keys, with UNLINK in batches (per hash slot
  on a cluster).

It plans from *this* deployment's routing config: deployments that share a Redis use distinct
prefixes (or ``--keep`` each other's versions). Versions an operator loaded into a running service
(``POST /admin/models/load``) live in that process only: pass them with ``keep``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from service.contract import NAMESPACE_HEX, meta_key, namespace
from service.serving import planner, sources
from service.serving.state import BundleKey, ModelVersion
from service.settings import Settings
from service.store import BundleError, read_manifest

#: keys per UNLINK (and per SCAN call's COUNT hint)
BATCH = 500


@dataclass
class Namespace:
    name: str
    keys: int = 0
    meta: dict | None = None  # its meta key's JSON (None: absent or not JSON)
    needed_by: list[str] = field(default_factory=list)  # bundles that keep it ("demo v3", "demo v3 int8")

    def describe_meta(self) -> str:
        m = self.meta
        if m is None:
            return "no meta key"
        return f"{m.get('model', '?')} v{m.get('version', '?')}, fingerprint {str(m.get('schema_fingerprint'))[:12]}"


@dataclass
class Survey:
    prefix: str
    namespaces: dict[str, Namespace]
    other_keys: int  # under the prefix but in no namespace: never touched
    masters: int

    def unused(self) -> list[Namespace]:
        return [ns for _, ns in sorted(self.namespaces.items()) if not ns.needed_by]


def masters(client: redis.Redis | RedisCluster) -> list[redis.Redis]:
    """A plain client per master: the cluster's primaries, or the one server."""
    if isinstance(client, RedisCluster):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)


def _pattern(prefix: str) -> re.Pattern[bytes]:
    return re.compile(re.escape(prefix.encode()) + rb":([0-9a-f]{%d}):" % NAMESPACE_HEX)


def _scan(node: redis.Redis, prefix: str) -> Iterator[bytes]:
    for key in node.scan_iter(match=_glob_escape(prefix) + ":*", count=BATCH):
        yield key if isinstance(key, bytes) else str(key).encode()


def survey(client: redis.Redis | RedisCluster, prefix: str) -> Survey:
    """Every namespace under ``prefix`` with its key count and meta key (see the module doc)."""
    pat = _pattern(prefix)
    found: dict[str, Namespace] = {}
    other = 0
    nodes = masters(client)
    for node in nodes:
        for key in _scan(node, prefix):
            m = pat.match(key)
            if m is None:
                other += 1
                continue
            name = f"{prefix}:{m.group(1).decode()}"
            found.setdefault(name, Namespace(name)).keys += 1
    for space in found.values():
        raw = client.get(meta_key(space.name))
        try:
            meta = json.loads(raw) if raw is not None else None
        except ValueError:
            meta = None
        space.meta = meta if isinstance(meta, dict) else None
    return Survey(prefix, found, other, len(nodes))


class _Candidate:
    def __init__(self, confirmed: bool):
        self.features_confirmed = confirmed


def needed(settings: Settings, sv: Survey, keep: Collection[ModelVersion] = ()) -> dict[str, list[str]]:
    """``{namespace: [bundle, ...]}`` of the bundles the service would hold (the module doc); also
    fills each surveyed namespace's ``needed_by``. The routing config, model name and version policy
    come from ``settings`` (as the service reads them); ``keep``: operator pins."""
    root = Path(settings.model_store)
    policy = sources.default_policy(settings)
    cfg = sources.read_config(settings, policy)
    listing = sources.listing(root, planner.model_names(cfg, keep))
    plan = planner.plan(cfg, listing, policy, keep, (), str(root))
    out: dict[str, list[str]] = {}

    def visit(key: BundleKey) -> _Candidate | None:
        try:
            _, manifest = read_manifest(root, key.name, key.version, key.precision)
        except BundleError:
            return None  # the service refuses it: it needs no features
        schema = manifest.feature_schema
        ns = namespace(sv.prefix, schema)
        out.setdefault(ns, []).append(str(key))
        meta = sv.namespaces[ns].meta if ns in sv.namespaces else None
        confirmed = meta is not None and meta.get("schema_fingerprint") == schema.fingerprint()
        return _Candidate(True) if confirmed else None  # unconfirmed: refused by a running service

    planner.walk(plan, visit)
    for ns, users in out.items():
        if ns in sv.namespaces:
            sv.namespaces[ns].needed_by = users
    return out


def collect(client: redis.Redis | RedisCluster, sv: Survey, doomed: Collection[str]) -> int:
    """Delete the namespaces ``doomed`` (names from ``sv``): meta keys first, then every key of
    theirs, UNLINK in batches. Returns how many keys were deleted."""
    doomed = set(doomed)
    unknown = doomed - set(sv.namespaces)
    if unknown:
        raise ValueError(f"not namespaces under {sv.prefix!r}: {sorted(unknown)}")
    deleted = sum(int(client.unlink(meta_key(ns))) for ns in sorted(doomed))
    pat = _pattern(sv.prefix)
    cluster = isinstance(client, RedisCluster)
    for node in masters(client):
        buf: list[bytes] = []
        for key in _scan(node, sv.prefix):
            m = pat.match(key)
            if m is not None and f"{sv.prefix}:{m.group(1).decode()}" in doomed:
                buf.append(key)
            if len(buf) >= BATCH:
                deleted += _unlink(node, buf, cluster)
                buf = []
        if buf:
            deleted += _unlink(node, buf, cluster)
    return deleted


def _unlink(node: redis.Redis, keys: list[bytes], cluster: bool) -> int:
    """UNLINK ``keys`` on ``node``: one command, or on a cluster node one per hash slot (a
    multi-key command must stay within a slot), pipelined."""
    if not cluster:
        return int(node.unlink(*keys))
    by_slot: dict[int, list[bytes]] = {}
    for k in keys:
        by_slot.setdefault(key_slot(k), []).append(k)
    pipe = node.pipeline(transaction=False)
    for group in by_slot.values():
        pipe.unlink(*group)
    return sum(int(n) for n in pipe.execute())
