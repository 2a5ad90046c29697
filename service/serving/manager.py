"""The manager that builds the serving state and swaps it in.

:class:`ServingManager` builds a new :class:`~service.serving.state.ServingState` on start, on
:meth:`~ServingManager.reload` (the watcher thread or ``POST /admin/reload``) and on the operator's
load/unload calls; these are serialised by one lock. A rebuild:

1. reads the routing config (:func:`~service.serving.sources.read_config`: MTRANK_ROUTING_CONFIG,
   or the implicit one-variant config built from MTRANK_MODEL_NAME / _VERSION / MTRANK_FUSION);
2. plans the bundles to hold (:func:`service.serving.planner.plan`) and loads the ones not yet
   held through the bundle cache (:class:`~service.serving.bundles.BundleCache`: manifest, feature
   check, sha256, session, warm-up; refusals kept and retried);
3. resolves each variant's bundle (:func:`~service.serving.planner.resolve`) and checks its fusion
   weights against the bundle's tasks, then builds one ranker per variant (the variants of one
   version share its feature fetcher);
4. swaps in the new state, or, on any error, keeps the old one and reports the error (naming the
   config line) - at start, an invalid routing config stops the service instead.

The watcher's tick (:meth:`ServingManager.poll`) first re-checks the held bundles' features
(:mod:`~service.serving.namespace_watch`): a bundle whose namespace vanished makes its variants
answer 503 until its features are loaded again.

Precisions and operator load/unload (fp32 loads, unloads of every precision, refusals as
:class:`~service.serving.state.OperatorError`): see :mod:`service.serving.state`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import MappingProxyType

from service.features import FeatureFetcher
from service.ranking import Ranker
from service.redis_client import FeatureStore
from service.routing import ConfigIssue, LayerTable, RoutingConfig, RoutingConfigError, VariantSpec
from service.serving import namespace_watch, planner, sources
from service.serving.bundles import BundleCache, ReloadReport
from service.serving.state import (
    BundleKey,
    InUse,
    LoadedBundle,
    LoadRefused,
    ModelVersion,
    NotInStore,
    ServingState,
    Variant,
)
from service.settings import Settings
from service.store import ProviderError, list_versions

log = logging.getLogger("service.serving")

#: batch sizes of the warm-up runs of every newly loaded bundle (capped at MTRANK_MAX_ITEMS, which
#: is warmed up as well)
WARMUP_SIZES = (1, 16, 128, 512)


class ServingManager:
    """Owns the serving state and every change to it (see the module doc)."""

    def __init__(self, settings: Settings, store: FeatureStore | None, store_error: str | None = None):
        self.settings = settings
        self.store = store
        self.store_error = store_error  # why there is no store client
        self.root = Path(settings.model_store)
        self.default_policy = sources.default_policy(settings)
        # the largest request (max_items) is warmed up too: its first-run allocations happen here
        self.warmup_sizes = tuple(sorted({min(n, settings.max_items) for n in WARMUP_SIZES} | {settings.max_items}))
        self.bundles = BundleCache(settings, store, store_error, self.warmup_sizes)
        self.operator_loaded: set[ModelVersion] = set()
        self.held_out: set[ModelVersion] = set()  # unloaded by an operator
        self.generation = 0
        self.last_report: ReloadReport | None = None
        self.last_error: str | None = None
        self._state: ServingState | None = None
        self._lock = threading.Lock()  # rebuilds only; /rank never takes it
        self._fetchers: dict[ModelVersion, FeatureFetcher] = {}
        self._config: RoutingConfig | None = None  # the last valid config
        self._snapshot: tuple | None = None
        self._first = True

    @property
    def state(self) -> ServingState | None:
        """The current state (one attribute read: what a request uses from start to end)."""
        return self._state

    @property
    def not_ready(self) -> str | None:
        """Why there is no serving state (None once there is one): the one source of "not ready"."""
        if self._state is not None:
            return None
        if self.store is None:
            return f"redis client: {self.store_error or 'none'}"
        return self.last_error or "starting"

    @property
    def config_path(self) -> str | None:
        return self.settings.routing_config

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    # -- changes ---------------------------------------------------------------------------------

    def start(self) -> ReloadReport:
        """First load. Raises :class:`RoutingConfigError` when MTRANK_ROUTING_CONFIG is invalid (the
        service must not start); without a routing config, problems leave the service not ready."""
        with self._lock:
            snap = self._take_snapshot()  # before reading: a change made meanwhile is seen at the next poll
            report = self._rebuild("start")
            self._first = False
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
        """The watcher's tick: re-check the held bundles' features (:mod:`.namespace_watch`), then
        rebuild when the store or the config file changed, or when a bundle waits for its features
        in Redis (lost ones included); None when there was nothing to do."""
        with self._lock:
            namespace_watch.recheck(self.bundles.held, self.store, self.settings)
        snap = self._take_snapshot()
        pending = self.store is not None and (self._state is None or self.bundles.pending())
        report = self.reload("watch") if snap != self._snapshot or pending else None
        namespace_watch.publish(self.bundles.held)
        return report

    def load_model(self, mv: ModelVersion) -> tuple[LoadedBundle, ReloadReport | None]:
        """Operator load of one version in fp32 (kept until unloaded): the held bundle and the
        rebuild's report (None when it was held already)."""
        fp32 = BundleKey(mv.name, mv.version)
        with self._lock:
            if fp32 in self.bundles.held:
                self.operator_loaded.add(mv)
                return self.bundles.held[fp32], None
            if mv.version not in list_versions(self.root, mv.name):
                raise NotInStore(f"model {mv.name!r} version {mv.version} is not in the store")
            self.operator_loaded.add(mv)
            was_out = mv in self.held_out
            self.held_out.discard(mv)
            self.bundles.refused.pop(fp32, None)  # an explicit load retries a refused bundle
            report = self._rebuild("admin load")
            if fp32 not in self.bundles.held:
                self.operator_loaded.discard(mv)
                if was_out:
                    self.held_out.add(mv)
                raise LoadRefused(f"{mv} was not loaded: {report.refused.get(str(mv)) or report.error or 'not loaded'}")
            return self.bundles.held[fp32], report

    def unload_model(self, mv: ModelVersion) -> ReloadReport:
        """Operator unload of every precision. The version stays out (even under ``latest``) until
        it is loaded again or a variant pins it."""
        with self._lock:
            if not self._holds(mv):
                raise NotInStore(f"{mv} is not loaded")
            users = self._state.users_of(mv) if self._state is not None else []
            if users:
                raise InUse(f"{mv} serves variants {users}: change the routing config first "
                            "(pin another version) and reload")
            self.held_out.add(mv)
            self.operator_loaded.discard(mv)
            report = self._rebuild("admin unload")
            if self._holds(mv):  # the config pins it after all (e.g. changed on disk meanwhile)
                self.held_out.discard(mv)
                raise InUse(f"{mv} is still needed: {report.error or 'pinned by the config'}")
            return report

    def _holds(self, mv: ModelVersion) -> bool:
        return any(k.model_version == mv for k in self.bundles.held)

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
            if self._first and (self.config_path or isinstance(e, ProviderError)):
                log.error("%s", report.error)  # strict providers: refuse to start, naming the provider
                raise
            if not expected and not repeated:
                log.exception("rebuilding the serving state failed")
            if self._state is None:
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

    def _rebuild_into(self, report: ReloadReport) -> None:
        cfg = sources.read_config(self.settings, self.default_policy)
        held, issues = self._load_planned(cfg, report)
        table = cfg.table()
        hint = "" if self.config_path else " (set MTRANK_FUSION_WEIGHTS to the model's tasks, or unset it)"
        resolved = planner.resolve_variants(cfg, table, held, issues, self.settings, self._why_missing, hint)
        self.bundles.forget_unwanted()
        if self.store is None:
            self._config, self.bundles.held = cfg, held
            return
        variants, fetchers = self._variants(table, resolved)
        self._swap(cfg, table, held, variants, fetchers, report)

    def _load_planned(self, cfg: RoutingConfig, report: ReloadReport
                      ) -> tuple[dict[BundleKey, LoadedBundle], list[ConfigIssue]]:
        """Step 1-2: the planned bundles, loaded (or taken from the cache) in plan order."""
        self.bundles.begin()
        listing = sources.listing(self.root, planner.model_names(cfg, self.operator_loaded))
        plan = planner.plan(cfg, listing, self.default_policy, self.operator_loaded, self.held_out, str(self.root))
        held: dict[BundleKey, LoadedBundle] = {}

        def get(key: BundleKey) -> LoadedBundle | None:
            lb = held.get(key) or self.bundles.get(key, self._first, report)
            if lb is not None:
                held[key] = lb
            return lb

        planner.walk(plan, get)
        return held, plan.issues

    def _why_missing(self, name: str, version: int | None, precision: str) -> str:
        root = self.root
        return planner.why_missing(name, version, precision, list_versions(root, name), sources.models_in_store(root),
                                   {k: r.reason for k, r in self.bundles.refused.items()}, self.held_out, str(root))

    def _variants(self, table: LayerTable, resolved: list[tuple[VariantSpec, LoadedBundle]]
                  ) -> tuple[list[Variant], dict[ModelVersion, FeatureFetcher]]:
        """Step 3b: one ranker per variant; the precisions of one version share its schema, so its fetcher
        (kept across generations)."""
        assert self.store is not None
        fetchers: dict[ModelVersion, FeatureFetcher] = {}
        variants = []
        for (spec, lb), first, last in zip(resolved, table.starts, table.ends, strict=True):
            b = lb.bundle
            mv = lb.key.model_version
            fetcher = fetchers.get(mv) or self._fetchers.get(mv)
            if fetcher is None or fetcher.schema != b.manifest.feature_schema:
                fetcher = FeatureFetcher(self.store, b.manifest.feature_schema, self.settings, b.vocabs,
                                         inputs=b.manifest.inputs)
            fetchers[mv] = fetcher
            fname, weights = planner.fusion_of(spec, b.manifest.tasks, self.settings)
            ranker = Ranker(b, fetcher, fusion_name=fname, weights=weights, variant=spec.name)
            assert spec.model is not None  # checked by routing.check_config
            variants.append(Variant(name=spec.name, first=first, last=last, model_spec=str(spec.model.version),
                                    ranker=ranker, unavailable=namespace_watch.unavailable(lb)))
        return variants, fetchers

    def _swap(self, cfg: RoutingConfig, table: LayerTable, held: dict[BundleKey, LoadedBundle],
              variants: list[Variant], fetchers: dict[ModelVersion, FeatureFetcher], report: ReloadReport) -> None:
        """Step 4: swap in a new state (one reference), or keep the old one when nothing changed."""
        old = self._state
        unchanged = old is not None and old.config == cfg and dict(old.bundles) == held and all(
            ov.ranker.bundle is nv.ranker.bundle for ov, nv in zip(old.variants, variants, strict=True))
        if not unchanged:
            report.dropped = [str(k) for k in sorted(self.bundles.held) if k not in held]
            self.generation += 1
            self._state = ServingState(generation=self.generation, config=cfg, table=table, variants=tuple(variants),
                                       by_name=MappingProxyType({v.name: v for v in variants}),
                                       bundles=MappingProxyType(dict(held)), created_at=time.time())
            report.changed = True
            log.info("serving generation %d (%s, %s): %s%s", self.generation, report.trigger, cfg.source,
                     "; ".join(f"{v.name} [{v.first}-{v.last}] -> {v.key} "
                               f"{v.ranker.fusion_name} {v.ranker.weights}" for v in variants),
                     f"; dropped {report.dropped}" if report.dropped else "")
        self.bundles.held, self._fetchers, self._config = held, fetchers, cfg

    def _take_snapshot(self) -> tuple:
        return sources.snapshot(self.settings, self.root, self._config, self.operator_loaded)
