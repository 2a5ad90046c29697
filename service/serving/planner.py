"""The pure half of a rebuild: which bundles to hold, and which one each variant uses.

Nothing here touches Redis, onnxruntime or the disk: the store's listing, the operator's loads
and unloads and the bundles already held come in as arguments, so every rule is unit-testable.

* :func:`plan`: per model, in each precision its variants ask for (fp32 when none names it), the
  pinned versions and the version policy's versions (:class:`~service.store.BundleKey` steps), then
  the policy's ``latest N`` (a :class:`Latest` step, walked by :func:`take_latest`); operator loads
  in fp32; minus what an operator unloaded. Policy versions missing from the store are issues.
* :func:`take_latest`: the newest N loadable versions whose features are confirmed; versions
  loaded unconfirmed (only at the first start) do not count, but at most 2N are walked through.
* :func:`resolve`: a variant's bundle among the held ones (``latest`` = the newest held version
  whose features are confirmed, else the newest held), :func:`fusion_of` its fusion and weights,
  and :func:`why_missing` the reason when there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from service import fusion
from service.routing import ConfigIssue, LayerTable, RoutingConfig, RoutingConfigError, VariantSpec, VersionPolicy
from service.serving.state import BundleKey, LoadedBundle, ModelVersion
from service.settings import Settings


@dataclass(frozen=True)
class Latest:
    """Hold the newest ``n`` loadable versions of ``name`` in ``precision``, walking ``candidates``
    (newest first, operator-unloaded versions left out)."""

    name: str
    precision: str
    n: int
    candidates: tuple[int, ...]


@dataclass
class Plan:
    steps: list[BundleKey | Latest] = field(default_factory=list)  # in load order
    issues: list[ConfigIssue] = field(default_factory=list)


def plan(cfg: RoutingConfig, listing: Mapping[str, Sequence[int]], default_policy: VersionPolicy,
         operator_loaded: Collection[ModelVersion], held_out: Collection[ModelVersion], store: str = "") -> Plan:
    """The bundles to hold under ``cfg``; ``listing``: the versions in the store (named ``store`` in
    messages) of every model of :func:`model_names` (ascending)."""
    pinned: dict[tuple[str, str], set[int]] = {}
    precisions: dict[str, set[str]] = {}
    for v in cfg.ranking.variants:
        if v.model is not None:
            precisions.setdefault(v.model.name, set()).add(v.model_precision)
            if v.model.version != "latest":
                pinned.setdefault((v.model.name, v.model_precision), set()).add(v.model.version)
    out = Plan()
    for name in model_names(cfg, operator_loaded):
        on_disk = list(listing.get(name, ()))
        policy = cfg.policy_for(name, default_policy)
        for precision in sorted(precisions.get(name) or {"fp32"}):
            want = set(pinned.get((name, precision), ()))
            want |= {v for v in policy.versions if ModelVersion(name, v) not in held_out}
            out.steps += [BundleKey(name, v, precision) for v in sorted(want) if v in on_disk]
            if policy.latest:
                cands = tuple(v for v in reversed(on_disk) if ModelVersion(name, v) not in held_out)
                out.steps.append(Latest(name, precision, policy.latest, cands))
        out.steps += [BundleKey(name, v) for n, v in sorted(operator_loaded) if n == name and v in on_disk]
        if name in cfg.models:
            for version in policy.versions:
                if version not in on_disk and ModelVersion(name, version) not in held_out:
                    out.issues.append(cfg.issue(("models", name), f"version {version} of model {name!r} is not "
                                                                  f"in the store {store} (versions there: {on_disk})"))
    return out


def model_names(cfg: RoutingConfig | None, operator_loaded: Collection[ModelVersion], default: str = "") -> list[str]:
    """The models a rebuild looks at: the config's (else ``default``) and the operator-loaded ones."""
    names = cfg.model_names() if cfg is not None else {default}
    return sorted(names | {mv.name for mv in operator_loaded})


class Confirmable(Protocol):
    @property
    def features_confirmed(self) -> bool: ...


C = TypeVar("C", bound=Confirmable)


def take_latest(step: Latest, get: Callable[[BundleKey], C | None]) -> list[C]:
    """Walk ``step.candidates`` newest first through ``get`` (None = refused) until ``step.n``
    confirmed versions are held or ``2 * step.n`` were loaded (a :class:`LoadedBundle`, or what
    ``mtrank features gc`` stands in for one)."""
    out: list[C] = []
    confirmed = 0
    for version in step.candidates:
        if confirmed >= step.n or len(out) >= 2 * step.n:
            break
        lb = get(BundleKey(step.name, version, step.precision))
        if lb is not None:
            out.append(lb)
            confirmed += lb.features_confirmed
    return out


def walk(plan: Plan, get: Callable[[BundleKey], C | None]) -> None:
    """Run every step of ``plan`` through ``get``: each pinned key once, each ``latest N`` step by
    :func:`take_latest`. The one walk of the serving manager, ``mtrank features gc`` and the events
    consumer (``get`` loads, or stands in for loading, and records what it holds)."""
    for step in plan.steps:
        if isinstance(step, BundleKey):
            get(step)
        else:
            take_latest(step, get)


def resolve(spec: VariantSpec, held: Mapping[BundleKey, LoadedBundle]) -> LoadedBundle | None:
    """The held bundle that serves ``spec`` (None when there is none)."""
    m = spec.model
    assert m is not None  # checked by routing.check_config
    precision = spec.model_precision
    if m.version != "latest":
        return held.get(BundleKey(m.name, m.version, precision))
    cands = sorted((k for k in held if k.name == m.name and k.precision == precision), key=lambda k: k.version)
    good = [k for k in cands if held[k].features_confirmed]
    pool = good or cands
    return held[pool[-1]] if pool else None


def resolve_variants(cfg: RoutingConfig, table: LayerTable, held: Mapping[BundleKey, LoadedBundle],
                     issues: list[ConfigIssue], settings: Settings, why: Callable[[str, int | None, str], str],
                     hint: str = "") -> list[tuple[VariantSpec, LoadedBundle]]:
    """Each variant of ``table`` with its bundle, the fusion weights checked against the bundle's
    tasks; :class:`RoutingConfigError` naming the config lines of ``issues`` and of these problems
    (``why(name, version or None, precision)`` says why a bundle is missing; ``hint`` follows a
    weights problem)."""
    out = []
    for spec in table.variants:
        vloc = cfg.variant_loc(spec.name)
        lb = resolve(spec, held)
        if lb is None:
            m = spec.model
            assert m is not None  # checked by routing.check_config
            version = None if m.version == "latest" else m.version
            loc = vloc + ("model",) if version is None else \
                vloc + ("model", "version") if spec.model_precision == "fp32" else vloc + ("precision",)
            issues.append(cfg.issue(loc, why(m.name, version, spec.model_precision)))
            continue
        fname, weights = fusion_of(spec, lb.bundle.manifest.tasks, settings)
        try:
            fusion.validate_weights(fname, weights, lb.bundle.manifest.tasks)
        except fusion.FusionConfigError as e:
            loc = vloc + ("fusion", "weights") if spec.fusion and spec.fusion.weights else vloc
            issues.append(cfg.issue(loc, f"{e} (model {lb.bundle.name} v{lb.bundle.version}){hint}"))
        out.append((spec, lb))
    if issues:
        raise RoutingConfigError(cfg.source, issues)
    return out


def fusion_of(spec: VariantSpec, tasks: Sequence, settings: Settings) -> tuple[str, dict[str, float]]:
    """The variant's fusion and weights: its own, else MTRANK_FUSION / MTRANK_FUSION_WEIGHTS, else
    (weights unset) the bundle's default weights (:func:`service.fusion.default_weights` of its
    manifest ``tasks``)."""
    f = spec.fusion
    name = (f.name if f is not None and f.name else None) or settings.fusion
    weights = f.weights if f is not None and f.weights is not None else settings.explicit_fusion_weights
    if weights is None:
        weights = fusion.default_weights(tasks)
    return name, {k: float(w) for k, w in weights.items()}


def why_missing(name: str, version: int | None, precision: str, on_disk: Sequence[int], models_in_store: list[str],
                refused: Mapping[BundleKey, str], held_out: Collection[ModelVersion], store: str) -> str:
    """Why no bundle serves ``name`` (``version``, or ``latest`` when None) in ``precision``."""
    if not on_disk:
        return f"model {name!r} is not in the store {store} (models there: {models_in_store})"
    if version is not None and version not in on_disk:
        return f"model {name!r} version {version} is not in the store (versions there: {list(on_disk)})"
    keys = [BundleKey(name, version, precision)] if version is not None else \
        [BundleKey(name, v, precision) for v in reversed(on_disk)]
    reasons = [f"v{k.version}: {refused[k]}" for k in keys if k in refused]
    out = [f"v{k.version}" for k in keys if k.model_version in held_out]
    what = f"model {name!r} version {version}" if version is not None else f"no loadable version of model {name!r}"
    if precision != "fp32":
        what += f" in {precision}"
    detail = "; ".join(reasons + ([f"unloaded by an operator: {out}"] if out else []))
    return f"{what} could not be loaded: {detail or 'refused'}" if version is not None else f"{what}: {detail}"
