"""The serving layer: what answers ``/rank`` right now, and the manager that rebuilds and swaps it.

* :mod:`.state`: :class:`ServingState` (one immutable world), :class:`BundleKey`, routes;
* :mod:`.planner`: pure rules (config + store listing + operator pins -> bundles to hold; variant
  -> bundle);
* :mod:`.bundles`: the bundle cache (load, verify, refuse, retry, unload);
* :mod:`.feature_check`: does Redis hold features for a bundle's schema?
* :mod:`.namespace_watch`: the watcher's re-check of the held bundles' features (vanished -> 503);
* :mod:`.sources`: the routing config, store listing and snapshot a rebuild (and ``mtrank features
  gc``) reads;
* :mod:`.manager`: :class:`ServingManager` (rebuild and swap, operator load/unload);
* :mod:`.watcher`: the thread that polls the store.

The admin description (``GET /admin/models``) is :func:`service.admin.describe`.
"""

from service.serving.bundles import ReloadReport
from service.serving.manager import WARMUP_SIZES, ServingManager
from service.serving.state import (
                                   BundleKey,
                                   InUse,
                                   LoadedBundle,
                                   LoadRefused,
                                   ModelVersion,
                                   NotInStore,
                                   NotReady,
                                   OperatorError,
                                   Route,
                                   ServingState,
                                   UnknownVariant,
                                   Variant,
)
from service.serving.watcher import Watcher

__all__ = ["WARMUP_SIZES", "BundleKey", "InUse", "LoadRefused", "LoadedBundle", "ModelVersion", "NotInStore",
           "NotReady", "OperatorError", "ReloadReport", "Route", "ServingManager", "ServingState",
           "UnknownVariant", "Variant", "Watcher"]
