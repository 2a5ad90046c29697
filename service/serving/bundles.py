"""The bundle cache: loads, verifies, refuses, retries and unloads the bundles the service holds.

Loading one bundle (:meth:`BundleCache.get`): its manifest (:func:`service.store.read_manifest`),
**the feature check** (:mod:`service.serving.feature_check`), then sha256, onnxruntime session and
warm-up batches (:func:`service.store.open_bundle`). A bundle that fails a step is *refused*, with
the reason logged once and kept for ``GET /admin/models``; it is retried when its files change (or,
for feature-check failures, which depend on Redis, at every poll).

At the very first load of the process the feature check is lenient: when it cannot confirm the
features (Redis down, or the features not loaded yet) the bundle still loads, with a warning, so
that a service started before ``mtrank features load`` still comes up as it always did; such a
bundle is used by ``latest`` only when no confirmed version exists, and is re-checked on each
rebuild. A meta key naming another schema refuses the bundle always.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service import metrics
from service.contract import BundleManifest
from service.redis_client import FeatureStore
from service.serving.feature_check import FeatureCheckError, check_features
from service.serving.state import BundleKey, LoadedBundle
from service.settings import Settings
from service.store import BundleError, ProviderError, bundle_signature, open_bundle, read_manifest

log = logging.getLogger("service.serving")


@dataclass(frozen=True)
class Refusal:
    signature: tuple
    reason: str
    transient: bool
    at: float


@dataclass
class ReloadReport:
    """What one rebuild did (``GET /admin/models`` shows the last one; ``POST /admin/reload`` answers it)."""

    trigger: str
    ok: bool = True
    changed: bool = False
    generation: int = 0
    loaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "ok": self.ok, "changed": self.changed, "generation": self.generation,
                "loaded": self.loaded, "refused": self.refused, "dropped": self.dropped, "error": self.error,
                "seconds": round(self.seconds, 3)}


class BundleCache:
    """The held bundles and the refused ones. Not thread-safe: the manager's lock serialises use."""

    def __init__(self, settings: Settings, store: FeatureStore | None, no_store_reason: str | None,
                 warmup_sizes: Sequence[int]):
        self.settings = settings
        self.root = Path(settings.model_store)
        self.store = store
        self.no_store_reason = no_store_reason or "none"
        self.warmup_sizes = tuple(warmup_sizes)
        self.held: dict[BundleKey, LoadedBundle] = {}  # the bundles of the current state
        self.refused: dict[BundleKey, Refusal] = {}
        self._attempted: set[BundleKey] = set()  # keys asked for by the rebuild in progress

    def begin(self) -> None:
        """A rebuild starts: what it asks for (:meth:`get`) is remembered until :meth:`forget_unwanted`."""
        self._attempted = set()

    def forget_unwanted(self) -> None:
        """Refusals of versions the rebuild did not ask for are forgotten (retried if wanted again)."""
        self.refused = {k: r for k, r in self.refused.items() if k in self._attempted}

    def pending(self) -> bool:
        """A bundle waits for its features in Redis (worth a rebuild at every poll)."""
        return any(r.transient for r in self.refused.values()) or any(
            not lb.features_confirmed for lb in self.held.values())

    def get(self, key: BundleKey, first_start: bool, report: ReloadReport) -> LoadedBundle | None:
        """The held bundle of ``key`` (its features re-checked if unconfirmed), else a fresh load;
        None when refused (the reason in :attr:`refused` and ``report``). A :class:`ProviderError`
        at the first start propagates (MTRANK_PROVIDERS_STRICT: the service does not start)."""
        self._attempted.add(key)
        cur = self.held.get(key)
        if cur is not None:
            if cur.features_confirmed:
                return cur
            try:  # loaded leniently at start, or its features vanished: confirm it now if Redis says so
                check_features(self.store, self.settings, cur.bundle.manifest, self.no_store_reason)
            except FeatureCheckError:
                return cur
            if cur.features_lost is not None:
                log.info("features of %s are back in Redis: its variants rank again", key)
            else:
                log.info("features of %s confirmed in Redis", key)
            return replace(cur, features_confirmed=True, features_lost=None)
        sig = bundle_signature(self.root / key.name / str(key.version))
        prev = self.refused.get(key)
        if prev is not None and not prev.transient and prev.signature == sig:
            report.refused[str(key)] = prev.reason
            return None
        s = self.settings
        try:
            path, manifest = read_manifest(self.root, key.name, key.version, key.precision)
            confirmed = self._confirm(manifest, lenient=first_start)
            bundle = open_bundle(path, manifest, key.precision, providers=s.provider_list, strict=s.providers_strict,
                                 intra_op_threads=s.ort_threads, warmup=self.warmup_sizes)
        except BundleError as e:
            if isinstance(e, ProviderError) and first_start:
                raise
            transient = isinstance(e, FeatureCheckError) and e.transient
            reason = str(e)
            if prev is None or prev.reason != reason:  # counted and logged once per distinct refusal
                metrics.record_model_load(key.name, "refused")
                log.warning("refused bundle %s: %s%s", key, reason, " (retried at each poll)" if transient else "")
            self.refused[key] = Refusal(sig, reason, transient, time.time())
            report.refused[str(key)] = reason
            return None
        self.refused.pop(key, None)
        metrics.record_model_load(key.name, "loaded")
        report.loaded.append(str(key))
        return LoadedBundle(bundle=bundle, signature=sig, features_confirmed=confirmed, loaded_at=time.time())

    def _confirm(self, manifest: BundleManifest, lenient: bool) -> bool:
        """True when the features are confirmed; when they cannot be told yet (transient) False with
        a warning if ``lenient``, else the :class:`FeatureCheckError`."""
        try:
            check_features(self.store, self.settings, manifest, self.no_store_reason)
        except FeatureCheckError as e:
            if not (lenient and e.transient):
                raise
            log.warning("%s v%d: %s; loading it anyway at start (not preferred by 'latest' and rechecked at "
                        "each poll)", manifest.name, manifest.version, e)
            return False
        return True
