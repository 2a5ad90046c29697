"""The serving state (what answers /rank right now) and the manager that rebuilds and swaps it.

A :class:`ServingState` is immutable: the routing config, the ranking layer's routing table, the
loaded bundles and one :class:`~service.ranking.Ranker` per variant. ``/rank`` reads
:attr:`ServingManager.state` once at its start and uses only that object, so a request sees the
old world or the new one, never a mixture; the request path takes no lock.

:class:`ServingManager` builds a new state on start, on :meth:`~ServingManager.reload` (the
watcher thread or ``POST /admin/reload``) and on the admin load/unload calls; these are
serialised by one lock. A rebuild:

1. reads the routing config (MTRANK_ROUTING_CONFIG, or the implicit one-variant config built from
   MTRANK_MODEL_NAME / _VERSION / MTRANK_FUSION / _WEIGHTS);
2. decides the bundles to hold: per model, the versions the variants pin, the versions of its
   version policy (``latest N`` = the N newest loadable versions; specific versions), and those
   loaded by an operator, minus those an operator unloaded;
3. loads the ones not yet held: manifest, **the feature check** (the namespace meta key written by
   ``mtrank features load`` must exist in Redis and name the bundle's schema fingerprint),
   sha256, onnxruntime session, warm-up batches. A bundle that fails a step is *refused*, with
   the reason logged once and kept for ``GET /admin/models``; it is retried when its files change
   (or, for feature-check failures, which depend on Redis, at every poll);
4. resolves each variant's model (``latest`` = the newest held version whose features are
   confirmed) and checks its fusion weights against the bundle's tasks;
5. swaps in the new state, or, on any error, keeps the old one and reports the error (naming the
   config line) - at start, an invalid routing config stops the service instead.

At the very first load of the process the feature check is lenient: when it cannot confirm the
features (Redis down, or the features not loaded yet) the bundle still loads, with a warning, so
that a service started before ``mtrank features load`` still comes up as it always did; such a
bundle is used by ``latest`` only when no confirmed version exists, and is re-checked on each poll.
A meta key naming another schema refuses the bundle always.

Precisions: a ranking variant may ask for its model in ``precision: int8`` (the bundle's
``model.int8.onnx``); loaded bundles are keyed by ``(name, version, precision)``, so one version
may be held in fp32 and int8 at once (sharing one feature fetcher), and ``latest`` resolves per
precision (the newest version that has a loadable model in that precision). A version whose
bundle has no int8 model is refused for int8 only. Operator load/unload (``/admin/models``) act
on ``(name, version)``: a load holds the fp32 model, an unload drops every precision.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import redis

from service import fusion, metrics
from service.features import FeatureFetcher, meta_key, namespace
from service.ranking import Ranker
from service.routing import (ConfigIssue, LayerTable, RoutingConfig, RoutingConfigError, VersionPolicy,
                             implicit_config, load_config, parse_policy)
from service.settings import Settings
from service.store import Bundle, BundleError, ProviderError, bundle_signature, list_versions, load_bundle

log = logging.getLogger("service.serving")

Key = tuple[str, int, str]  # (model name, version, precision)
ModelVersion = tuple[str, int]  # (model name, version): what operators load and unload
#: batch sizes of the warm-up runs of every newly loaded bundle (capped at MTRANK_MAX_ITEMS, which
#: is warmed up as well)
WARMUP_SIZES = (1, 16, 128, 512)


class FeatureCheckError(BundleError):
    """The features in Redis do not confirm the bundle's schema. ``transient``: may pass later
    (Redis unreachable, features not loaded yet); otherwise they are for another schema."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


class NotReady(Exception):
    """No serving state yet (the reason says why); answered 503."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnknownVariant(ValueError):
    """A forced variant (X-Mtrank-Variant) that the ranking layer does not have."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown variant {name!r}; known: {known}")
        self.name = name
        self.known = known


@dataclass(frozen=True)
class LoadedBundle:
    bundle: Bundle
    signature: tuple
    features_confirmed: bool
    loaded_at: float

    @property
    def key(self) -> Key:
        return (self.bundle.name, self.bundle.version, self.bundle.precision)


@dataclass(frozen=True)
class Variant:
    """A ranking-layer variant, resolved: its bucket range, bundle, fusion and ranker."""

    name: str
    first: int
    last: int
    model_spec: str  # as configured: a version or "latest"
    ranker: Ranker

    @property
    def bundle(self) -> Bundle:
        return self.ranker.bundle

    @property
    def key(self) -> Key:
        b = self.ranker.bundle
        return (b.name, b.version, b.precision)


@dataclass(frozen=True)
class Route:
    variant: Variant
    bucket: int
    forced: bool


@dataclass(frozen=True)
class ServingState:
    """One immutable world: config + routing table + bundles + rankers. Never mutated once built."""

    generation: int
    config: RoutingConfig
    table: LayerTable  # of the ranking layer
    variants: tuple[Variant, ...]  # in table order (sorted by first bucket)
    by_name: Mapping[str, Variant]
    bundles: Mapping[Key, LoadedBundle]
    created_at: float

    def route(self, user_id: str, forced: str | None = None) -> Route:
        """The variant serving ``user_id``; ``forced`` (a variant name) wins when the config allows it."""
        table = self.table
        bucket = table.bucket(user_id)
        if forced is not None and self.config.allow_force:
            v = self.by_name.get(forced)
            if v is None:
                raise UnknownVariant(forced, list(self.by_name))
            return Route(v, bucket, True)
        return Route(self.variants[table.index_at(bucket)], bucket, False)

    @property
    def primary(self) -> Variant:
        """The variant on bucket 0 (the only one without a routing config)."""
        return self.variants[0]

    def users_of(self, key: Key | ModelVersion) -> list[str]:
        """Variants served by ``key``; a ``(name, version)`` pair matches every precision of it."""
        return [v.name for v in self.variants
                if (v.bundle.name, v.bundle.version, v.bundle.precision)[:len(key)] == tuple(key)]


@dataclass(frozen=True)
class Refusal:
    signature: tuple
    reason: str
    transient: bool
    at: float


@dataclass
class ReloadReport:
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


class AdminError(Exception):
    """An admin request that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _k(key: Key | ModelVersion) -> str:
    """``demo v3`` (fp32, or a model version), ``demo v3 int8``."""
    return f"{key[0]} v{key[1]}" + (f" {key[2]}" if len(key) > 2 and key[2] != "fp32" else "")


class ServingManager:
    """Owns the serving state and every change to it (see the module doc)."""

    def __init__(self, settings: Settings, redis_client: redis.Redis | None, client_error: str | None = None):
        self.settings = settings
        self.redis = redis_client
        self.client_error = client_error  # why there is no Redis client
        self.root = Path(settings.model_store)
        self.default_policy: VersionPolicy = parse_policy(settings.version_policy)
        # the largest request (max_items) is warmed up too: its first-run allocations happen here
        self.warmup_sizes = tuple(sorted({min(n, settings.max_items) for n in WARMUP_SIZES} | {settings.max_items}))
        self._state: ServingState | None = None
        self.not_ready: str | None = "starting"
        self._lock = threading.Lock()  # rebuilds only; /rank never takes it
        self._held: dict[Key, LoadedBundle] = {}  # the bundles of the current state
        self._fetchers: dict[ModelVersion, FeatureFetcher] = {}
        self._refused: dict[Key, Refusal] = {}
        self._attempted: set[Key] = set()  # versions tried by the rebuild in progress
        self._admin_loaded: set[ModelVersion] = set()
        self._held_out: set[ModelVersion] = set()
        self._config: RoutingConfig | None = None  # the last valid config
        self._snapshot: tuple | None = None
        self._initial = True
        self.generation = 0
        self.last_report: ReloadReport | None = None
        self.last_error: str | None = None

    # -- reading ---------------------------------------------------------------------------------

    @property
    def state(self) -> ServingState | None:
        """The current state (one attribute read: what a request uses from start to end)."""
        return self._state

    @property
    def config_path(self) -> str | None:
        return self.settings.routing_config

    # -- changes ---------------------------------------------------------------------------------

    def start(self) -> ReloadReport:
        """First load. Raises :class:`RoutingConfigError` when MTRANK_ROUTING_CONFIG is invalid (the
        service must not start); without a routing config, problems leave the service not ready."""
        with self._lock:
            snap = self._take_snapshot()  # before reading: a change made meanwhile is seen at the next poll
            report = self._rebuild("start")
            self._initial = False
            self._snapshot = snap
            return report

    def reload(self, trigger: str = "admin") -> ReloadReport:
        """Re-read the config and the store; load, refuse, drop and swap as needed."""
        with self._lock:
            snap = self._take_snapshot()
            report = self._rebuild(trigger)
            self._snapshot = snap
            return report

    def poll(self) -> ReloadReport | None:
        """The watcher's tick: rebuild when the store or the config file changed, or when a bundle
        waits for its features in Redis; None when there was nothing to do."""
        snap = self._take_snapshot()
        if snap == self._snapshot and not self._pending():
            return None
        with self._lock:
            report = self._rebuild("watch")
            self._snapshot = snap
            return report

    def load_model(self, name: str, version: int) -> dict[str, Any]:
        """Operator load of one version (kept until unloaded). AdminError 404/422 when it cannot."""
        key, fp32 = (name, version), (name, version, "fp32")
        with self._lock:
            if fp32 in self._held:
                self._admin_loaded.add(key)
                return {"loaded": False, "already": True, "bundle": self._describe_bundle(self._held[fp32])}
            if version not in list_versions(self.root, name):
                raise AdminError(404, f"model {name!r} version {version} is not in the store")
            self._admin_loaded.add(key)
            was_out = key in self._held_out
            self._held_out.discard(key)
            self._refused.pop(fp32, None)  # an explicit load retries a refused bundle
            report = self._rebuild("admin load")
            if fp32 not in self._held:
                self._admin_loaded.discard(key)
                if was_out:
                    self._held_out.add(key)
                reason = report.refused.get(_k(key)) or report.error or "not loaded"
                raise AdminError(422, f"{_k(key)} was not loaded: {reason}")
            return {"loaded": True, "already": False, "report": report.as_dict(),
                    "bundle": self._describe_bundle(self._held[fp32])}

    def unload_model(self, name: str, version: int) -> dict[str, Any]:
        """Operator unload: 404 when not loaded, 409 while a variant serves it. The version stays
        out (even under ``latest``) until it is loaded again or a variant pins it."""
        key = (name, version)
        with self._lock:
            st = self._state
            if not self._holds(key):
                raise AdminError(404, f"{_k(key)} is not loaded")
            users = st.users_of(key) if st is not None else []
            if users:
                raise AdminError(409, f"{_k(key)} serves variants {users}: change the routing config first "
                                      "(pin another version) and reload")
            self._held_out.add(key)
            self._admin_loaded.discard(key)
            report = self._rebuild("admin unload")
            if self._holds(key):  # the config pins it after all (e.g. changed on disk meanwhile)
                self._held_out.discard(key)
                raise AdminError(409, f"{_k(key)} is still needed: {report.error or 'pinned by the config'}")
            return {"unloaded": True, "report": report.as_dict()}

    def _holds(self, key: ModelVersion) -> bool:
        return any(k[:2] == key for k in self._held)

    # -- the rebuild -----------------------------------------------------------------------------

    def _rebuild(self, trigger: str) -> ReloadReport:
        t0 = time.perf_counter()
        report = ReloadReport(trigger=trigger, generation=self.generation)
        try:
            self._rebuild_into(report)
        except Exception as e:
            # a RoutingConfigError names the config line; anything else is unexpected (logged with
            # its traceback). Either way the old state keeps serving.
            expected = isinstance(e, RoutingConfigError)
            report.ok = False
            report.error = str(e) if expected else f"{type(e).__name__}: {e}"
            repeated = report.error == self.last_error  # the watcher retries: say it once
            self.last_error = report.error
            if self._initial and (self.config_path or isinstance(e, ProviderError)):
                log.error("%s", report.error)  # strict providers: refuse to start, naming the provider
                raise
            if not expected and not repeated:
                log.exception("rebuilding the serving state failed")
            if self._state is None:
                self.not_ready = report.error
                (log.debug if repeated else log.error)("model not loaded: %s", report.error)
            else:
                (log.debug if repeated else log.error)("reload (%s) failed, still serving generation %d: %s",
                                                       trigger, self.generation, report.error)
        else:
            self.last_error = None
        report.seconds = time.perf_counter() - t0
        report.generation = self.generation
        self.last_report = report
        return report

    def _read_config(self) -> RoutingConfig:
        s = self.settings
        if not self.config_path:
            return implicit_config(s.model_name, s.model_version, s.fusion, s.explicit_fusion_weights,
                                   self.default_policy)
        return load_config(self.config_path)

    def _rebuild_into(self, report: ReloadReport) -> None:
        cfg = self._read_config()
        self._attempted = set()
        held: dict[Key, LoadedBundle] = {}
        issues: list[ConfigIssue] = []
        lenient = self._initial

        # 1. the bundles to hold: per model, in each precision its variants ask for (fp32 when
        #    none names it), the pinned versions, the policy's versions and newest N; operator
        #    loads in fp32
        pinned: dict[tuple[str, str], set[int]] = {}
        precisions: dict[str, set[str]] = {}
        for v in cfg.ranking.variants:
            if v.model is not None:
                precisions.setdefault(v.model.name, set()).add(v.model_precision)
                if v.model.version != "latest":
                    pinned.setdefault((v.model.name, v.model_precision), set()).add(v.model.version)
        names = sorted(cfg.model_names() | {n for n, _ in self._admin_loaded})
        for name in names:
            on_disk = list_versions(self.root, name)
            policy = cfg.policy_for(name, self.default_policy)
            for precision in sorted(precisions.get(name) or {"fp32"}):
                want = set(pinned.get((name, precision), ()))
                want |= {v for v in policy.versions if (name, v) not in self._held_out}
                for version in sorted(want):
                    if version in on_disk:
                        lb = self._get(name, version, precision, lenient, report)
                        if lb is not None:
                            held[lb.key] = lb
                if policy.latest:
                    # the newest N loadable versions whose features are confirmed; versions loaded
                    # unconfirmed (only at start) do not count, but at most 2N are walked through
                    confirmed = walked = 0
                    for version in reversed(on_disk):
                        if confirmed >= policy.latest or walked >= 2 * policy.latest:
                            break
                        if (name, version) in self._held_out:
                            continue
                        lb = held.get((name, version, precision)) or self._get(name, version, precision, lenient,
                                                                                report)
                        if lb is not None:
                            held[lb.key] = lb
                            confirmed += lb.features_confirmed
                            walked += 1
            for version in sorted(v for n, v in self._admin_loaded if n == name):
                if version in on_disk and (name, version, "fp32") not in held:
                    lb = self._get(name, version, "fp32", lenient, report)
                    if lb is not None:
                        held[lb.key] = lb
            if name in cfg.models:
                li = ("models", name)
                for version in policy.versions:
                    if version not in on_disk and (name, version) not in self._held_out:
                        issues.append(cfg.issue(li, f"version {version} of model {name!r} is not in the store "
                                                    f"{self.root} (versions there: {on_disk})"))

        # 2. resolve the variants against what is held
        table = cfg.table()
        resolved: list[tuple[Any, LoadedBundle | None]] = []
        for spec in table.variants:
            vloc = cfg.variant_loc(spec.name)
            m = spec.model
            assert m is not None  # checked by routing.check_config
            lb = None
            precision = spec.model_precision
            if m.version == "latest":
                cands = sorted((k for k in held if k[0] == m.name and k[2] == precision), key=lambda k: k[1])
                good = [k for k in cands if held[k].features_confirmed]
                pick = (good or cands or [None])[-1]
                lb = held.get(pick) if pick else None
                if lb is None:
                    issues.append(cfg.issue(vloc + ("model",), self._why_missing(m.name, None, precision)))
            else:
                lb = held.get((m.name, m.version, precision))
                if lb is None:
                    loc = vloc + ("model", "version") if precision == "fp32" else vloc + ("precision",)
                    issues.append(cfg.issue(loc, self._why_missing(m.name, m.version, precision)))
            if lb is not None:
                fname, weights = self._fusion_of(spec, lb.bundle)
                try:
                    fusion.validate_weights(fname, weights, lb.bundle.manifest.tasks)
                except fusion.FusionConfigError as e:
                    loc = vloc + ("fusion", "weights") if spec.fusion and spec.fusion.weights else vloc
                    hint = "" if self.config_path else " (set MTRANK_FUSION_WEIGHTS to the model's tasks, or unset it)"
                    issues.append(cfg.issue(loc, f"{e} (model {lb.bundle.name} v{lb.bundle.version}){hint}"))
            resolved.append((spec, lb))
        if issues:
            raise RoutingConfigError(cfg.source, issues)
        # refusals of versions no longer wanted are forgotten (retried if they are wanted again)
        self._refused = {k: r for k, r in self._refused.items() if k in self._attempted}

        # 3. rankers (one fetcher per bundle, kept across generations)
        if self.redis is None:
            self._config, self._held = cfg, held
            self.not_ready = f"redis client: {self.client_error or 'none'}"
            return
        fetchers = {}
        variants = []
        for (spec, lb), first, last in zip(resolved, table.starts, table.ends):
            b = lb.bundle
            fkey = lb.key[:2]  # the precisions of one version share its schema, so its fetcher
            fetcher = fetchers.get(fkey) or self._fetchers.get(fkey)
            if fetcher is None or fetcher.schema != b.manifest.feature_schema:
                fetcher = FeatureFetcher(self.redis, b.manifest.feature_schema, self.settings.redis_prefix,
                                         b.vocabs, inputs=b.manifest.inputs)
            fetchers[fkey] = fetcher
            fname, weights = self._fusion_of(spec, b)
            ranker = Ranker(self.settings, b, self.redis, fusion_name=fname, weights=weights, fetcher=fetcher,
                            variant=spec.name)
            variants.append(Variant(name=spec.name, first=first, last=last, model_spec=str(spec.model.version),
                                    ranker=ranker))

        # 4. swap (or not, when nothing changed)
        old = self._state
        if old is not None and old.config == cfg and dict(old.bundles) == held and all(
                ov.ranker.bundle is nv.ranker.bundle for ov, nv in zip(old.variants, variants)):
            self._config = cfg
            self._held, self._fetchers = held, fetchers
            return
        report.dropped = [_k(k) for k in sorted(self._held) if k not in held]
        self.generation += 1
        new = ServingState(generation=self.generation, config=cfg, table=table, variants=tuple(variants),
                           by_name=MappingProxyType({v.name: v for v in variants}),
                           bundles=MappingProxyType(dict(held)), created_at=time.time())
        self._state = new  # the atomic swap: one reference
        self._held, self._fetchers, self._config = held, fetchers, cfg
        self.not_ready = None
        report.changed = True
        log.info("serving generation %d (%s, %s): %s%s", self.generation, report.trigger, cfg.source,
                 "; ".join(f"{v.name} [{v.first}-{v.last}] -> {_k(v.key)} "
                           f"{v.ranker.fusion_name} {v.ranker.weights}" for v in variants),
                 f"; dropped {report.dropped}" if report.dropped else "")

    def _fusion_of(self, spec, bundle: Bundle) -> tuple[str, dict[str, float]]:
        """The variant's fusion and weights: its own, else MTRANK_FUSION / MTRANK_FUSION_WEIGHTS,
        else (weights unset) the bundle's default weights (:func:`service.fusion.default_weights`)."""
        f = spec.fusion
        name = (f.name if f is not None and f.name else None) or self.settings.fusion
        weights = f.weights if f is not None and f.weights is not None else self.settings.explicit_fusion_weights
        if weights is None:
            weights = fusion.default_weights(bundle.manifest.tasks)
        return name, {k: float(w) for k, w in weights.items()}

    def _why_missing(self, name: str, version: int | None, precision: str = "fp32") -> str:
        on_disk = list_versions(self.root, name)
        if not on_disk:
            known = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if self.root.is_dir() else []
            return f"model {name!r} is not in the store {self.root} (models there: {known})"
        if version is not None and version not in on_disk:
            return f"model {name!r} version {version} is not in the store (versions there: {on_disk})"
        keys = [(name, version, precision)] if version is not None else [(name, v, precision) for v in reversed(on_disk)]
        reasons = [f"v{k[1]}: {self._refused[k].reason}" for k in keys if k in self._refused]
        held_out = [f"v{k[1]}" for k in keys if k[:2] in self._held_out]
        what = f"model {name!r} version {version}" if version is not None else f"no loadable version of model {name!r}"
        if precision != "fp32":
            what += f" in {precision}"
        detail = "; ".join(reasons + ([f"unloaded by an operator: {held_out}"] if held_out else []))
        return f"{what} could not be loaded: {detail or 'refused'}" if version is not None else f"{what}: {detail}"

    # -- loading one bundle ----------------------------------------------------------------------

    def _get(self, name: str, version: int, precision: str, lenient: bool,
             report: ReloadReport) -> LoadedBundle | None:
        key = (name, version, precision)
        self._attempted.add(key)
        path = self.root / name / str(version)
        cur = self._held.get(key)
        if cur is not None:
            if not cur.features_confirmed:  # loaded leniently at start: confirm it now if Redis says so
                try:
                    if self._check_features(cur.bundle.manifest, lenient=False):
                        log.info("features of %s confirmed in Redis", _k(key))
                        return replace(cur, features_confirmed=True)
                except FeatureCheckError:
                    pass
            return cur
        sig = bundle_signature(path)
        prev = self._refused.get(key)
        if prev is not None and not prev.transient and prev.signature == sig:
            report.refused[_k(key)] = prev.reason
            return None
        confirmed = [False]

        def verify(manifest) -> None:
            confirmed[0] = self._check_features(manifest, lenient)

        try:
            bundle = load_bundle(self.root, name, version, providers=self.settings.provider_list,
                                 strict=self.settings.providers_strict,
                                 intra_op_threads=self.settings.ort_threads,
                                 warmup=self.warmup_sizes, verify=verify, precision=precision)
        except BundleError as e:
            if isinstance(e, ProviderError) and self._initial:
                raise  # MTRANK_PROVIDERS_STRICT: the service does not start on the wrong provider
            transient = isinstance(e, FeatureCheckError) and e.transient
            reason = str(e)
            if prev is None or prev.reason != reason:  # counted and logged once per distinct refusal
                metrics.record_model_load(name, "refused")
                log.warning("refused bundle %s: %s%s", _k(key), reason,
                            " (retried at each poll)" if transient else "")
            self._refused[key] = Refusal(sig, reason, transient, time.time())
            report.refused[_k(key)] = reason
            return None
        self._refused.pop(key, None)
        metrics.record_model_load(name, "loaded")
        report.loaded.append(_k(key))
        return LoadedBundle(bundle=bundle, signature=sig, features_confirmed=confirmed[0], loaded_at=time.time())

    def _check_features(self, manifest, lenient: bool) -> bool:
        """True when Redis holds features for the manifest's schema. When it cannot tell (no meta
        key, Redis down) -> FeatureCheckError(transient), or False with a warning when ``lenient``.
        A meta key of another schema -> FeatureCheckError always."""
        schema = manifest.feature_schema
        ns = namespace(self.settings.redis_prefix, schema)
        key = meta_key(ns)
        fp = schema.fingerprint()
        try:
            if self.redis is None:
                raise FeatureCheckError(f"cannot check the features: no Redis client ({self.client_error})", True)
            try:
                raw = self.redis.get(key)
            except redis.RedisError as e:
                raise FeatureCheckError(f"cannot check the features in Redis {self.settings.redis_url_redacted}: "
                                        f"{type(e).__name__}: {e}", True) from None
            if raw is None:
                raise FeatureCheckError(f"no features for its schema in Redis: {key} is absent (run `mtrank "
                                        f"features load` for {manifest.name} v{manifest.version})", True)
        except FeatureCheckError as e:
            if lenient:
                log.warning("%s v%d: %s; loading it anyway at start (not preferred by 'latest' and rechecked at "
                            "each poll)", manifest.name, manifest.version, e)
                return False
            raise
        try:
            meta = json.loads(raw)
            have = meta["schema_fingerprint"]
        except (ValueError, TypeError, KeyError):
            raise FeatureCheckError(f"{key} is not the JSON written by `mtrank features load`", False) from None
        if have != fp:
            raise FeatureCheckError(f"schema mismatch: the features in Redis ({key}) are for schema {str(have)[:12]}, "
                                    f"the bundle's schema is {fp[:12]}", False)
        return True

    # -- the watcher's view ----------------------------------------------------------------------

    def _take_snapshot(self) -> tuple:
        cfg = self._config
        names = sorted((cfg.model_names() if cfg else {self.settings.model_name}) | {n for n, _ in self._admin_loaded})
        stat = _stat(self.config_path) if self.config_path else None
        return (stat, tuple((n, tuple(list_versions(self.root, n))) for n in names))

    def _pending(self) -> bool:
        """Something worth retrying at every poll: a bundle waiting for its features, or no state."""
        if self.redis is None:
            return False
        return (self._state is None or any(r.transient for r in self._refused.values())
                or any(not lb.features_confirmed for lb in self._held.values()))

    # -- description (GET /admin/models) ---------------------------------------------------------

    def _describe_bundle(self, lb: LoadedBundle) -> dict[str, Any]:
        b = lb.bundle
        st = self._state
        return {"name": b.name, "version": b.version, "precision": b.precision,
                "architecture": b.manifest.architecture, "path": str(b.path),
                "sha256": b.manifest.model_file(b.precision)[1], "provider": b.provider,
                "tasks": b.tasks, "features_confirmed": lb.features_confirmed,
                "loaded_at": lb.loaded_at, "used_by": st.users_of(lb.key) if st is not None else [],
                "operator_loaded": lb.key[:2] in self._admin_loaded and b.precision == "fp32"}

    def describe(self) -> dict[str, Any]:
        with self._lock:  # a consistent view (waits for a rebuild in progress)
            return self._describe()

    def _describe(self) -> dict[str, Any]:
        st = self._state
        out: dict[str, Any] = {
            "generation": self.generation,
            "ready": st is not None,
            "not_ready": self.not_ready if st is None else None,
            "routing_config": st.config.source if st is not None else self.config_path,
            "bundles": [self._describe_bundle(lb) for _, lb in sorted(self._held.items())],
            "refused": [{"name": k[0], "version": k[1], "precision": k[2], "reason": r.reason,
                         "retried_each_poll": r.transient}
                        for k, r in sorted(self._refused.items())],
            "unloaded_by_operator": [{"name": n, "version": v} for n, v in sorted(self._held_out)],
            "last_reload": self.last_report.as_dict() if self.last_report else None,
            "last_error": self.last_error,
        }
        if st is not None:
            cfg = st.config
            out["routing"] = {
                "salt": cfg.salt, "buckets": cfg.buckets, "allow_force": cfg.allow_force,
                "ranking_layer": cfg.ranking_layer,
                "variants": [{"name": v.name, "buckets": [v.first, v.last], "model_spec": v.model_spec,
                              "model": v.ranker.model_ref, "precision": v.bundle.precision,
                              "fusion": {"name": v.ranker.fusion_name, "weights": v.ranker.weights}}
                             for v in st.variants],
            }
        return out


def _stat(path: str | os.PathLike) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Watcher:
    """A daemon thread calling :meth:`ServingManager.poll` every ``interval`` seconds."""

    def __init__(self, manager: ServingManager, interval: float):
        self.manager = manager
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtrank-store-watcher", daemon=True)

    def start(self) -> "Watcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.manager.poll()
            except Exception:  # the watcher must survive anything; the old state keeps serving
                log.exception("store watcher: poll failed")
