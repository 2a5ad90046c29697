"""Experiment routing: user -> bucket -> variant, and the experiment config that defines it.

The bucket of a user in a layer is (the same in every process, machine and language)::

    bucket = MurmurHash3_x86_32(utf8(f"{salt}:{user_id}"), seed=0) as unsigned 32-bit % buckets

The config (YAML, ``MTRANK_ROUTING_CONFIG``) has a salt, a number of buckets (default 10,000) and
*layers*. Each layer partitions the buckets among its variants, by inclusive bucket ranges or by
percentages (given in order, they take consecutive ranges from bucket 0), so a user is in exactly
one variant per layer. Layers hash with different salts, so they are independent of each other
(orthogonal); the *ranking layer* is the one whose variant serves ``/rank``: a model (name and
version, or ``latest``), the precision it runs in (``precision: fp32`` by default, or ``int8`` for
the bundle's quantised model, when it has one) and a fusion formula with its weights. A top-level ``variants:`` list is
shorthand for one layer, the ranking layer. See the README's "Experiments" section for an example.

:func:`load_config` validates everything that can be checked without the model store and raises
:class:`RoutingConfigError` whose issues name the line and the reason. Checks that need the store
(unknown models, versions, the tasks named by fusion weights) are made when the serving state is
built (:mod:`service.serving`), which reports them the same way through :meth:`RoutingConfig.issue`.

This module does no I/O besides reading the config file, and imports neither settings nor store.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import mmh3
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from service.contract import PRECISIONS
from service.fusion import FUSIONS, weight_problems

DEFAULT_BUCKETS = 10_000
MAX_BUCKETS = 1_000_000
RANKING_LAYER = "ranking"
#: model, layer and variant names: one safe path component (no "/", "\\", leading ".", "..")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)

Loc = tuple[str | int, ...]


def bucket_of(salt: str, user_id: str, buckets: int = DEFAULT_BUCKETS) -> int:
    """The bucket of ``user_id``: unsigned MurmurHash3 x86 32 (seed 0) of ``"<salt>:<user_id>"`` % buckets."""
    return mmh3.hash(f"{salt}:{user_id}".encode(), 0, signed=False) % buckets


def is_safe_name(name: str) -> bool:
    """A name that is one plain path component: letters, digits, ``. _ -``; no leading dot, no ``..``."""
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and ".." not in name


def _is_number(s: str) -> bool:
    return s.isascii() and s.isdecimal()


def _check_name(v: Any) -> str:
    if not isinstance(v, str) or not is_safe_name(v):
        raise ValueError(f"must match {NAME_PATTERN} without '..' (got {v!r})")
    return v


# -- version policy ------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to keep loaded: the newest ``latest`` loadable ones and/or ``versions``."""

    latest: int = 0
    versions: tuple[int, ...] = ()

    def __str__(self) -> str:
        parts = [f"latest {self.latest}" if self.latest > 1 else "latest"] if self.latest else []
        parts += [str(v) for v in self.versions]
        return ", ".join(parts)


def parse_policy(value: Any) -> VersionPolicy:
    """``"latest"``, ``"latest N"``, a version (``3``), a list of them (``[3, 4]``, may hold ``latest``),
    or a comma list (``"latest, 3"``)."""
    items: list[Any]
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items:
        raise ValueError("empty version policy")
    latest, versions = 0, []
    for it in items:
        if isinstance(it, bool):
            raise ValueError(f"bad version {it!r}")
        if isinstance(it, int):
            if it < 1:
                raise ValueError(f"versions are integers >= 1, got {it}")
            versions.append(it)
            continue
        if not isinstance(it, str):
            raise ValueError(f"bad version policy entry {it!r}: use 'latest', 'latest N' or a version")
        words = it.split()
        if words and words[0] == "latest" and len(words) <= 2:
            n = 1
            if len(words) == 2:
                if not _is_number(words[1]) or int(words[1]) < 1:
                    raise ValueError(f"bad version policy {it!r}: 'latest N' needs N >= 1")
                n = int(words[1])
            latest = max(latest, n)
        elif _is_number(it) and int(it) >= 1:
            versions.append(int(it))
        else:
            raise ValueError(f"bad version policy {it!r}: use 'latest', 'latest N' or a version number")
    return VersionPolicy(latest=latest, versions=tuple(sorted(set(versions))))


Policy = Annotated[VersionPolicy, BeforeValidator(parse_policy)]
Name = Annotated[str, AfterValidator(_check_name)]


# -- config models -------------------------------------------------------------------------------

class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """The bundle a variant serves: ``version`` is an integer or ``"latest"``."""

    name: Name
    version: Any = "latest"

    @field_validator("version")
    @classmethod
    def _version(cls, v: Any) -> int | str:
        if v == "latest":
            return "latest"
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        if isinstance(v, str) and _is_number(v) and int(v) >= 1:
            return int(v)
        raise ValueError(f"must be 'latest' or a version number >= 1, got {v!r}")


class FusionSpec(_Spec):
    """Fusion formula and weights; absent parts default to MTRANK_FUSION / MTRANK_FUSION_WEIGHTS."""

    name: str | None = None
    weights: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _fusion_name(cls, v: str | None) -> str | None:
        if v is not None and v not in FUSIONS:
            raise ValueError(f"unknown fusion {v!r}; use one of {list(FUSIONS)}")
        return v


class VariantSpec(_Spec):
    name: Name
    buckets: tuple[int, int] | None = Field(default=None, description="inclusive [first, last] bucket")
    percent: float | None = Field(default=None, gt=0, le=100)
    model: ModelSpec | None = None
    precision: str | None = Field(default=None, description="fp32 (default) | int8: which model file of the bundle")
    fusion: FusionSpec | None = None

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str | None) -> str | None:
        if v is not None and v not in PRECISIONS:
            raise ValueError(f"unknown precision {v!r}; use one of {list(PRECISIONS)}")
        return v

    @property
    def model_precision(self) -> str:
        """The precision the variant's model runs in (``fp32`` unless configured)."""
        return self.precision or "fp32"


class LayerSpec(_Spec):
    name: Name
    salt: str | None = Field(default=None, min_length=1)
    variants: list[VariantSpec] = Field(min_length=1)


class RoutingConfig(_Spec):
    """A validated experiment config (build it with :func:`load_config` or :func:`parse_config`)."""

    salt: str = Field(min_length=1)
    buckets: int = Field(default=DEFAULT_BUCKETS, ge=1, le=MAX_BUCKETS)
    allow_force: bool = Field(default=False, description="honour the X-Mtrank-Variant header (QA)")
    ranking_layer: str = RANKING_LAYER
    models: dict[Name, Policy] = Field(
        default_factory=dict, description="model name -> version policy")
    layers: list[LayerSpec] = Field(min_length=1)

    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="<config>")

    # -- lookups --------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        return self._source

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def ranking(self) -> LayerSpec:
        return self.layer(self.ranking_layer)

    def layer_index(self, name: str) -> int:
        return [layer.name for layer in self.layers].index(name)

    def salt_of(self, layer: LayerSpec) -> str:
        """A layer's own salt; by default the top-level salt for the ranking layer, else ``<salt>:<layer>``."""
        if layer.salt is not None:
            return layer.salt
        return self.salt if layer.name == self.ranking_layer else f"{self.salt}:{layer.name}"

    def policy_for(self, model: str, default: VersionPolicy) -> VersionPolicy:
        return self.models.get(model, default)

    def model_names(self) -> set[str]:
        """Models named by ranking-layer variants or by the ``models:`` policies."""
        names = {v.model.name for v in self.ranking.variants if v.model is not None}
        return names | set(self.models)

    def line_of(self, loc: Loc) -> int | None:
        """1-based line of the deepest part of ``loc`` present in the file (None for built-in configs)."""
        for i in range(len(loc), -1, -1):
            if tuple(loc[:i]) in self._lines:
                return self._lines[tuple(loc[:i])]
        return None

    def issue(self, loc: Loc, message: str) -> ConfigIssue:
        return ConfigIssue(loc=tuple(loc), message=message, line=self.line_of(loc))

    def variant_loc(self, variant: str) -> Loc:
        li = self.layer_index(self.ranking_layer)
        vi = [v.name for v in self.ranking.variants].index(variant)
        return ("layers", li, "variants", vi)

    def table(self, layer: LayerSpec | str | None = None) -> LayerTable:
        layer = self.ranking if layer is None else self.layer(layer) if isinstance(layer, str) else layer
        return LayerTable.build(layer, self.salt_of(layer), self.buckets)

    def assign(self, user_id: str) -> dict[str, tuple[str, int]]:
        """``{layer: (variant, bucket)}`` of a user in every layer."""
        out = {}
        for layer in self.layers:
            t = self.table(layer)
            b = t.bucket(user_id)
            out[layer.name] = (t.variant_at(b).name, b)
        return out


# -- errors --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigIssue:
    loc: Loc
    message: str
    line: int | None = None

    @property
    def path(self) -> str:
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "<top>"

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "(no line)"
        return f"{where} ({self.path}): {self.message}"


class RoutingConfigError(ValueError):
    """An invalid routing config; :attr:`issues` name the line, the place and the reason of each problem."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]):
        self.source = source
        self.issues = sorted(issues, key=lambda i: (i.line is None, i.line or 0))
        body = "\n".join(f"  {i}" for i in self.issues)
        super().__init__(f"routing config {source} is invalid:\n{body}")


# -- the routing table of one layer --------------------------------------------------------------

@dataclass(frozen=True)
class LayerTable:
    """Bucket ranges of one layer, sorted; ``variant_at(bucket)`` by binary search."""

    name: str
    salt: str
    buckets: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]  # inclusive
    variants: tuple[VariantSpec, ...]

    @classmethod
    def build(cls, layer: LayerSpec, salt: str, buckets: int) -> LayerTable:
        ranges = sorted(zip(variant_ranges(layer, buckets), layer.variants, strict=True), key=lambda x: x[0])
        return cls(name=layer.name, salt=salt, buckets=buckets, starts=tuple(r[0] for r, _ in ranges),
                   ends=tuple(r[1] for r, _ in ranges), variants=tuple(v for _, v in ranges))

    def bucket(self, user_id: str) -> int:
        return bucket_of(self.salt, user_id, self.buckets)

    def index_at(self, bucket: int) -> int:
        return bisect.bisect_right(self.starts, bucket) - 1

    def variant_at(self, bucket: int) -> VariantSpec:
        return self.variants[self.index_at(bucket)]

    def range_of(self, variant: str) -> tuple[int, int]:
        i = [v.name for v in self.variants].index(variant)
        return self.starts[i], self.ends[i]


def variant_ranges(layer: LayerSpec, buckets: int) -> list[tuple[int, int]]:
    """Inclusive bucket range of each variant of a (validated) layer, in the layer's order."""
    fixed = [v.buckets for v in layer.variants if v.buckets is not None]
    if len(fixed) == len(layer.variants):
        return fixed
    out, cum = [], 0.0
    for v in layer.variants:
        start = round(cum * buckets / 100)
        cum += v.percent or 0.0
        out.append((start, round(cum * buckets / 100) - 1))
    return out


# -- loading with line numbers -------------------------------------------------------------------

def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], issues: list[ConfigIssue]) -> None:
    """Record the line of every key and list item under ``node``; flag duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            line = k.start_mark.line + 1
            if key in seen:
                issues.append(ConfigIssue(loc + (key,), f"duplicate key {key!r} (first on line {seen[key]})", line))
            seen[key] = line
            lines[loc + (key,)] = line
            _walk(v, loc + (key,), lines, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _walk(item, loc + (i,), lines, issues)


def _compose(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    issues: list[ConfigIssue] = []
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise RoutingConfigError(source, [ConfigIssue((), f"not valid YAML: {e.problem or e}", line)]) from None
    except yaml.YAMLError as e:
        raise RoutingConfigError(source, [ConfigIssue((), f"not valid YAML: {e}")]) from None
    if node is None or not isinstance(data, dict):
        raise RoutingConfigError(source, [ConfigIssue((), "the config must be a mapping (salt, layers or "
                                                          "variants, ...)", 1)])
    lines: dict[Loc, int] = {(): 1}
    _walk(node, (), lines, issues)
    if issues:
        raise RoutingConfigError(source, issues)
    return data, lines


def _pydantic_issues(err: ValidationError, lines: dict[Loc, int]) -> list[ConfigIssue]:
    out = []
    for e in err.errors(include_input=False):
        loc = tuple(e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        line = None
        for i in range(len(loc), -1, -1):
            if loc[:i] in lines:
                line = lines[loc[:i]]
                break
        out.append(ConfigIssue(loc, msg, line))
    return out


def parse_config(text: str, source: str = "<string>") -> RoutingConfig:
    """Parse and validate a config text; :class:`RoutingConfigError` names line and reason of each problem."""
    data, lines = _compose(text, source)
    if "variants" in data:  # shorthand: one layer, the ranking layer
        if "layers" in data:
            raise RoutingConfigError(source, [ConfigIssue(("variants",), "give either 'layers' or 'variants', "
                                                          "not both", lines.get(("variants",)))])
        name = data.get("ranking_layer", RANKING_LAYER)
        data = {k: v for k, v in data.items() if k != "variants"} | {
            "layers": [{"name": name, "variants": data["variants"]}]}
        moved = {}
        for loc, line in lines.items():
            if loc[:1] == ("variants",):
                moved[("layers", 0, "variants") + loc[1:]] = line
        moved[("layers", 0)] = moved[("layers",)] = lines[("variants",)]
        moved[("layers", 0, "name")] = lines.get(("ranking_layer",), lines[("variants",)])
        lines = {k: v for k, v in lines.items() if k[:1] != ("variants",)} | moved
    try:
        cfg = RoutingConfig.model_validate(data)
    except ValidationError as e:
        raise RoutingConfigError(source, _pydantic_issues(e, lines)) from None
    cfg._lines = lines
    cfg._source = source
    issues = check_config(cfg)
    if issues:
        raise RoutingConfigError(source, issues)
    return cfg


def load_config(path: str | os.PathLike) -> RoutingConfig:
    """Read and validate the YAML config at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RoutingConfigError(str(path), [ConfigIssue((), f"cannot read it: {e}")]) from None
    return parse_config(text, str(path))


def config_from_dict(data: Mapping[str, Any], source: str) -> RoutingConfig:
    """A config built in code (no lines), checked like a file."""
    try:
        cfg = RoutingConfig.model_validate(dict(data))
    except ValidationError as e:
        raise RoutingConfigError(source, _pydantic_issues(e, {})) from None
    cfg._source = source
    issues = check_config(cfg)
    if issues:
        raise RoutingConfigError(source, issues)
    return cfg


# -- the checks that need no model store ---------------------------------------------------------

def check_config(cfg: RoutingConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def bad(loc: Loc, msg: str) -> None:
        issues.append(cfg.issue(loc, msg))

    layer_names = [layer.name for layer in cfg.layers]
    for li, layer in enumerate(cfg.layers):
        if layer_names.index(layer.name) != li:
            bad(("layers", li, "name"), f"duplicate layer name {layer.name!r}")
    if cfg.ranking_layer not in layer_names:
        bad(("ranking_layer",), f"ranking layer {cfg.ranking_layer!r} is not one of the layers {layer_names}")
        return issues

    seen_variants: dict[str, Loc] = {}
    salts: dict[str, str] = {}
    for li, layer in enumerate(cfg.layers):
        lloc: Loc = ("layers", li)
        salt = cfg.salt_of(layer)
        if salt in salts:
            bad(lloc + ("salt",), f"layer {layer.name!r} hashes with the same salt {salt!r} as layer "
                                  f"{salts[salt]!r}: layers need different salts to be independent")
        salts[salt] = layer.name
        is_ranking = layer.name == cfg.ranking_layer
        for vi, v in enumerate(layer.variants):
            vloc = lloc + ("variants", vi)
            if v.name in seen_variants:
                bad(vloc + ("name",), f"duplicate variant name {v.name!r} (variant names are unique across layers)")
            seen_variants[v.name] = vloc
            if is_ranking and v.model is None:
                bad(vloc, f"variant {v.name!r} of the ranking layer needs a model: {{name: ..., version: ...}}")
            if not is_ranking and (v.model is not None or v.fusion is not None or v.precision is not None):
                key = "model" if v.model is not None else "fusion" if v.fusion is not None else "precision"
                bad(vloc + (key,), f"only variants of the ranking layer {cfg.ranking_layer!r} serve a model "
                                   "(precision) and fusion")
            if v.fusion is not None and v.fusion.weights is not None:
                issues.extend(check_weights(cfg, vloc + ("fusion", "weights"), v.fusion.weights))
        issues.extend(_check_partition(cfg, layer, lloc))
    return issues


def check_weights(cfg: RoutingConfig, loc: Loc, weights: Mapping[str, Any]) -> list[ConfigIssue]:
    return [cfg.issue(loc if task is None else loc + (task,), message)
            for task, message in weight_problems(weights)]


def _check_partition(cfg: RoutingConfig, layer: LayerSpec, lloc: Loc) -> list[ConfigIssue]:
    out: list[ConfigIssue] = []
    n = cfg.buckets
    vs = layer.variants
    by_range = [v.buckets is not None for v in vs]
    by_pct = [v.percent is not None for v in vs]
    for vi, v in enumerate(vs):
        if by_range[vi] and by_pct[vi]:
            out.append(cfg.issue(lloc + ("variants", vi, "percent"),
                                 f"variant {v.name!r} has both buckets and percent: give one"))
        elif not (by_range[vi] or by_pct[vi]):
            out.append(cfg.issue(lloc + ("variants", vi),
                                 f"variant {v.name!r} needs 'buckets: [first, last]' or 'percent'"))
    if out:
        return out
    if any(by_range) and any(by_pct):
        vi = by_pct.index(True) if by_range[0] else by_range.index(True)
        key = "percent" if by_range[0] else "buckets"
        return [cfg.issue(lloc + ("variants", vi, key), f"layer {layer.name!r} mixes bucket ranges and percentages:"
                                                        " use one kind for all its variants")]
    if all(by_pct):
        total = math.fsum(v.percent for v in vs)  # type: ignore[misc]
        if abs(total - 100.0) > 1e-9:
            out.append(cfg.issue(lloc + ("variants",), f"percentages of layer {layer.name!r} sum to {total:g}, "
                                                       "not 100"))
        for vi, v in enumerate(vs):
            share = v.percent * n / 100  # type: ignore[operator]
            if abs(share - round(share)) > 1e-6:
                out.append(cfg.issue(lloc + ("variants", vi, "percent"),
                                     f"{v.percent:g}% of {n} buckets is not a whole number of buckets"))
        return out
    # explicit ranges: inside [0, n-1], no overlaps, no gaps
    spans = []
    for vi, v in enumerate(vs):
        first, last = v.buckets  # type: ignore[misc]
        loc = lloc + ("variants", vi, "buckets")
        if first > last:
            out.append(cfg.issue(loc, f"range [{first}, {last}] of {v.name!r} is empty: first > last"))
        elif first < 0 or last > n - 1:
            out.append(cfg.issue(loc, f"range [{first}, {last}] of {v.name!r} is outside buckets 0..{n - 1}"))
        else:
            spans.append((first, last, vi, v.name))
    if out:
        return out
    spans.sort()
    expect = 0
    prev = None
    for first, last, vi, name in spans:
        loc = lloc + ("variants", vi, "buckets")
        if prev is not None and first <= prev[1]:
            out.append(cfg.issue(loc, f"range [{first}, {last}] of {name!r} overlaps [{prev[0]}, {prev[1]}] of "
                                      f"{prev[3]!r} (line {cfg.line_of(lloc + ('variants', prev[2], 'buckets'))})"))
        elif first > expect:
            out.append(cfg.issue(loc, f"buckets {expect}-{first - 1} of layer {layer.name!r} are not assigned "
                                      "to any variant"))
        expect = max(expect, last + 1)
        prev = (first, last, vi, name) if prev is None or last > prev[1] else prev
    if expect < n:
        out.append(cfg.issue(lloc + ("variants",), f"buckets {expect}-{n - 1} of layer {layer.name!r} are not "
                                                   "assigned to any variant"))
    return out


def implicit_config(model_name: str, model_version: int | None, fusion: str, weights: Mapping[str, float] | None,
                    policy: str | VersionPolicy = "latest") -> RoutingConfig:
    """The config of a service without MTRANK_ROUTING_CONFIG: one variant "default" on all buckets.
    ``weights`` None: the bundle's default weights (:func:`service.fusion.default_weights`)."""
    models = {model_name: [model_version]} if model_version is not None else {model_name: str(policy)}
    return config_from_dict({
        "salt": "mtrank",
        "models": models,
        "layers": [{"name": RANKING_LAYER, "variants": [{
            "name": "default", "percent": 100,
            "model": {"name": model_name, "version": model_version or "latest"},
            "fusion": {"name": fusion, **({"weights": dict(weights)} if weights is not None else {})},
        }]}],
    }, source="environment (MTRANK_MODEL_NAME, MTRANK_MODEL_VERSION, MTRANK_FUSION, MTRANK_FUSION_WEIGHTS)")
