"""The feature check: does Redis hold features for a bundle's schema?

``mtrank features load`` writes the namespace's meta key (:func:`service.contract.meta_key`) after
the data; it names the schema fingerprint. A bundle is served only when that key exists and names
the bundle's schema. Run between :func:`service.store.read_manifest` and
:func:`service.store.open_bundle`, so a refused bundle costs no checksum and no session.
"""

from __future__ import annotations

import json

import redis

from service.contract import BundleManifest, meta_key, namespace
from service.redis_client import FeatureStore
from service.settings import Settings
from service.store import BundleError


class FeatureCheckError(BundleError):
    """The features in Redis do not confirm the bundle's schema. ``transient``: may pass later
    (Redis unreachable, features not loaded yet); otherwise they are for another schema.
    ``answered``: Redis answered (the meta key is absent or names another schema), as opposed to
    "cannot tell" (no client, Redis unreachable)."""

    def __init__(self, message: str, transient: bool, answered: bool = True):
        super().__init__(message)
        self.transient = transient
        self.answered = answered


def check_features(store: FeatureStore | None, settings: Settings, manifest: BundleManifest,
                   no_store_reason: str = "none") -> None:
    """Return when Redis holds features for the manifest's schema; else :class:`FeatureCheckError`:
    transient when it cannot tell (no client, Redis down, no meta key yet), permanent when the meta
    key is not ours or names another schema."""
    schema = manifest.feature_schema
    key = meta_key(namespace(settings.redis_prefix, schema))
    if store is None:
        raise FeatureCheckError(f"cannot check the features: no Redis client ({no_store_reason})", True, False)
    try:
        raw = store.get(key)
    except redis.RedisError as e:
        raise FeatureCheckError(f"cannot check the features in Redis {settings.redis_url_redacted}: "
                                f"{type(e).__name__}: {e}", True, False) from None
    if raw is None:
        raise FeatureCheckError(f"no features for its schema in Redis: {key} is absent (run `mtrank "
                                f"features load` for {manifest.name} v{manifest.version})", True)
    try:
        have = json.loads(raw)["schema_fingerprint"]
    except (ValueError, TypeError, KeyError):
        raise FeatureCheckError(f"{key} is not the JSON written by `mtrank features load`", False) from None
    fp = schema.fingerprint()
    if have != fp:
        raise FeatureCheckError(f"schema mismatch: the features in Redis ({key}) are for schema {str(have)[:12]}, "
                                f"the bundle's schema is {fp[:12]}", False)
