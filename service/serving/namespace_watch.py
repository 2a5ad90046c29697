"""The watcher's re-check of the held bundles' feature namespaces (issue 14).

A bundle's features were checked once, when it loaded (:mod:`service.serving.feature_check`). A
Redis restarted without persistence, a ``FLUSHALL`` or ``mtrank features gc`` can remove them
later. So at every watcher tick :func:`recheck` reads the meta key of every held bundle whose
features are confirmed. Absent, or naming another schema: the bundle is marked lost
(:attr:`~service.serving.state.LoadedBundle.features_lost`) with one WARNING line, and the rebuild
that follows gives its variants an ``unavailable`` reason: ``/rank`` answers 503 for the users they
serve (never ranks them on defaults), ``/readyz`` names them, and ``latest`` falls back to a held
version whose features are still there. Redis unreachable is no finding (the breaker and degraded
mode cover it). A lost bundle is re-checked by every rebuild
(:meth:`~service.serving.bundles.BundleCache.get`) and serves again, with one INFO line, once
``mtrank features load`` has written its features again. ``mtrank_features_lost`` counts the held
bundles in that state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

from service import metrics
from service.redis_client import FeatureStore
from service.serving.feature_check import FeatureCheckError, check_features
from service.serving.state import BundleKey, LoadedBundle
from service.settings import Settings

log = logging.getLogger("service.serving")


def recheck(held: dict[BundleKey, LoadedBundle], store: FeatureStore | None, settings: Settings) -> bool:
    """Mark (in ``held``) the confirmed bundles whose features are no longer in Redis; True when any was."""
    if store is None:
        return False
    changed = False
    for key, lb in list(held.items()):
        if not lb.features_confirmed:
            continue  # never confirmed (lenient start) or lost already: the rebuild re-checks it
        try:
            check_features(store, settings, lb.bundle.manifest)
        except FeatureCheckError as e:
            if not e.answered:
                continue  # Redis unreachable: cannot tell
            held[key] = replace(lb, features_confirmed=False, features_lost=str(e))
            log.warning("features of %s vanished from Redis: %s; its variants answer 503 until they are loaded "
                        "again", key, e)
            changed = True
    return changed


def publish(held: Mapping[BundleKey, LoadedBundle]) -> None:
    """Set ``mtrank_features_lost`` to the number of held bundles whose features vanished."""
    metrics.set_features_lost(sum(lb.features_lost is not None for lb in held.values()))


def unavailable(lb: LoadedBundle) -> str | None:
    """Why a variant served by ``lb`` cannot rank (None when it can)."""
    if lb.features_lost is None:
        return None
    return f"the features of {lb.key} vanished from Redis ({lb.features_lost})"
