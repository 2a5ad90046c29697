"""The serving state: one immutable world that answers ``/rank`` (config, routing table, bundles,
one ranker per variant), and the names of the bundles in it.

A :class:`ServingState` is never mutated once built. ``/rank`` reads
:attr:`~service.serving.manager.ServingManager.state` once at its start and uses only that object,
so a request sees the old world or the new one, never a mixture; the request path takes no lock.

Precisions: loaded bundles are keyed by :class:`BundleKey` (name, version, precision), so one
version may be held in fp32 and int8 at once; ``latest`` resolves per precision. Operator
load/unload act on a :class:`ModelVersion`: a load holds the fp32 model, an unload drops every
precision. Refusals of operator calls raise :class:`OperatorError` subclasses; the admin router
maps them to HTTP statuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from service.ranking import Ranker
from service.routing import LayerTable, RoutingConfig
from service.store import Bundle


class ModelVersion(NamedTuple):
    """One version of a model: what operators load and unload (every precision of it)."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


class BundleKey(NamedTuple):
    """One loadable model: a version in one precision (``fp32`` is ``model.onnx``)."""

    name: str
    version: int
    precision: str = "fp32"

    @property
    def model_version(self) -> ModelVersion:
        return ModelVersion(self.name, self.version)

    def __str__(self) -> str:
        """``demo v3`` (fp32), ``demo v3 int8``."""
        return f"{self.name} v{self.version}" + (f" {self.precision}" if self.precision != "fp32" else "")

    @classmethod
    def of(cls, bundle: Bundle) -> BundleKey:
        return cls(bundle.name, bundle.version, bundle.precision)


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


class OperatorError(Exception):
    """An operator load/unload that cannot be done; the message says why."""


class NotInStore(OperatorError):
    """The version is not in the store (load), or not loaded (unload)."""


class InUse(OperatorError):
    """The version serves a variant, or the config still needs it."""


class LoadRefused(OperatorError):
    """The version is in the store but could not be loaded."""


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle the service holds: ``features_confirmed`` when Redis holds features for its schema
    (False for a bundle loaded leniently at the first start, or whose features vanished);
    ``features_lost`` says why when they were confirmed once and then vanished from Redis (the
    watcher's re-check): its variants answer 503 until the features are loaded again."""

    bundle: Bundle
    signature: tuple
    features_confirmed: bool
    loaded_at: float = 0.0
    features_lost: str | None = None

    @property
    def key(self) -> BundleKey:
        return BundleKey.of(self.bundle)


@dataclass(frozen=True)
class Variant:
    """A ranking-layer variant, resolved: its bucket range, bundle, fusion and ranker."""

    name: str
    first: int
    last: int
    model_spec: str  # as configured: a version or "latest"
    ranker: Ranker
    unavailable: str | None = None  # why it cannot rank (its bundle's features vanished): 503

    @property
    def bundle(self) -> Bundle:
        return self.ranker.bundle

    @property
    def key(self) -> BundleKey:
        return BundleKey.of(self.ranker.bundle)


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
    bundles: Mapping[BundleKey, LoadedBundle]
    created_at: float = 0.0

    def route(self, user_id: str, forced: str | None = None) -> Route:
        """The variant serving ``user_id``; ``forced`` (a variant name) wins when the config allows it."""
        table = self.table
        bucket = table.bucket(user_id)
        if forced is not None and self.config.allow_force:
            v = self.by_name.get(forced)
            if v is None:
                raise UnknownVariant(forced, list(self.by_name))
            route = Route(v, bucket, True)
        else:
            route = Route(self.variants[table.index_at(bucket)], bucket, False)
        if route.variant.unavailable is not None:  # its features vanished: 503, never ranked on defaults
            raise NotReady(f"variant {route.variant.name!r}: {route.variant.unavailable}")
        return route

    def unavailable(self) -> list[str]:
        """Why variants cannot rank (one line each; empty when all can)."""
        return [f"variant {v.name!r}: {v.unavailable}" for v in self.variants if v.unavailable is not None]

    @property
    def primary(self) -> Variant:
        """The variant on bucket 0 (the only one without a routing config)."""
        return self.variants[0]

    def users_of(self, key: BundleKey | ModelVersion) -> list[str]:
        """Variants served by ``key``; a :class:`ModelVersion` matches every precision of it."""
        if isinstance(key, BundleKey):
            return [v.name for v in self.variants if v.key == key]
        return [v.name for v in self.variants if v.key.model_version == key]
