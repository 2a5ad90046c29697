"""Online features: the fetcher that turns one request into model inputs.

The Redis layout (one key per user and item under a namespace that holds the schema fingerprint,
plus the namespace's meta key) is part of the contract: :func:`service.contract.namespace` and
its key functions.

:meth:`FeatureFetcher.fetch` does one ``MGET`` (user key + every item key, in request order),
decodes the reply with whole-array numpy operations and builds the ONNX inputs: user and context
inputs with batch 1 (the graph broadcasts them), item inputs with batch N. Missing values and
values that fail to decode (corrupt) get the schema defaults (index 0, dense mean) and are counted
as missing; corrupt ones are counted by the caller's metrics and summed up in at most one WARNING
per minute and fetcher, without entity ids (the ids are logged at DEBUG only).

Item cache and invalidation: with ``MTRANK_ITEM_CACHE_SIZE`` > 0 the fetcher keeps the raw
values of recently read items (:class:`~service.item_cache.ItemCache`) and asks Redis only for
the user, the namespace meta key and the items it does not hold - still one MGET. The meta key is
rewritten by every ``mtrank features load`` after the data (it carries ``loaded_at`` and a
``load_id``), so a reply whose meta value differs from the one the cache was filled under empties
the cache; the items this request took from the cache are then read again (one more MGET, once
per load). Only values that decoded cleanly are cached.

Degraded mode: when the store raises :class:`~service.redis_client.StoreUnavailable` (deadline,
Redis down, circuit open) and ``MTRANK_REDIS_FAILURE_MODE=degrade``, the request is answered from
what is at hand - the schema defaults for the user and the items, the cached items, and on a
cluster the values of the nodes that did answer - and :attr:`Features.degraded` names the reason.
With ``fail`` the error propagates (the app answers 503).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.codec import Decoded, EntityCodec
from service.contract import (
    FeatureSchema,
    ModelInput,
    item_key,
    item_keys,
    meta_key,
    model_inputs,
    namespace,
    user_key,
    vocab_lookup,
)
from service.item_cache import ItemCache
from service.redis_client import StoreUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)

#: most corrupt entity ids named in one (DEBUG) log line
_LOG_IDS = 20
#: at most one WARNING summing up corrupt values per fetcher per this many seconds
CORRUPT_LOG_INTERVAL_S = 60.0


class _CorruptTally:
    """Corrupt-value counts since the last summary line; :meth:`add` returns the totals (users,
    items, requests, seconds) when a summary is due (the first one at once), else None."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._since = -math.inf
        self._counts = [0, 0, 0]

    def add(self, users: int, items: int) -> tuple[int, int, int, float] | None:
        with self._lock:
            c = self._counts
            c[0] += users
            c[1] += items
            c[2] += 1
            now = time.monotonic()
            if now - self._since < self.interval_s:
                return None
            out = (c[0], c[1], c[2], 0.0 if self._since == -math.inf else now - self._since)
            self._since, self._counts = now, [0, 0, 0]
            return out


class ContextError(ValueError):
    """A request context entry the schema does not accept; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"context[{key!r}]: {message}")
        self.key = key
        self.reason = message


@dataclass
class Features:
    """Model inputs for one request plus what was missing."""

    inputs: dict[str, np.ndarray]  # ONNX input name -> array (manifest dtype)
    n_items: int
    user_missing: bool  # no usable user value (absent or corrupt)
    items_missing: int  # items without a usable value (absent or corrupt)
    user_corrupt: bool = False
    items_corrupt: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds: fetch (MGET), assemble
    degraded: str | None = None  # why Redis could not be read ("timeout", "down", "circuit_open")
    items_from_cache: int = 0
    raw: tuple[list, list] | None = None  # the values read (user, items), for the prediction log


class FeatureSource(Protocol):
    """What the fetcher reads: :class:`~service.redis_client.FeatureStore` implements it. ``mget``
    answers within ``deadline_s`` (its default) or raises
    :class:`~service.redis_client.StoreUnavailable`."""

    deadline_s: float

    def mget(self, keys: Sequence[str], deadline_s: float | None = None) -> list[bytes | None]: ...


class FeatureFetcher:
    """Fetch and assemble features for one schema from ``store``.

    ``settings``: the key prefix (MTRANK_REDIS_PREFIX), the failure mode and the item cache.
    ``vocabs``: ``{sparse field: [value, ...]}`` from the bundle (value at position i has index
    i + 1); only the context fields' vocabularies are used here (user/item values are stored as
    indices already). ``inputs`` defaults to :func:`~service.contract.model_inputs` of the schema
    and must agree with it (the codec's column order is the schema order).
    """

    def __init__(self, store: FeatureSource, schema: FeatureSchema, settings: Settings,
                 vocabs: Mapping[str, Sequence[str]], inputs: Sequence[ModelInput] | None = None):
        self.redis = store
        self.degrade = settings.redis_failure_mode == "degrade"
        cache = ItemCache(settings.item_cache_size, settings.item_cache_ttl_s)
        self.cache: ItemCache | None = cache if cache.enabled else None
        self.schema = schema
        self.ns = namespace(settings.redis_prefix, schema)
        self._meta_key = meta_key(self.ns)
        expected = model_inputs(schema)
        self.inputs = list(inputs) if inputs is not None else expected
        if self.inputs != expected:
            raise ValueError("model inputs do not match the feature schema layout: "
                             f"{[i.name for i in self.inputs]} vs {[i.name for i in expected]}")
        self.user_codec = EntityCodec.for_schema(schema, "user")
        self.item_codec = EntityCodec.for_schema(schema, "item")
        self._ctx_sparse = schema.sparse_of("context")
        self._ctx_dense = schema.dense_of("context")
        self._ctx_lookup: dict[str, dict[str, int]] = {}
        for f in self._ctx_sparse:
            if f.name not in vocabs:
                raise ValueError(f"no vocabulary for context field {f.name!r}")
            self._ctx_lookup[f.name] = vocab_lookup(vocabs[f.name], f.vocab_size)
        self._ctx_sparse_pos = {f.name: j for j, f in enumerate(self._ctx_sparse)}
        self._ctx_dense_pos = {f.name: j for j, f in enumerate(self._ctx_dense)}
        self._ctx_dense_default = np.array([[f.default for f in self._ctx_dense]], dtype=np.float32)
        self._corrupt = _CorruptTally(CORRUPT_LOG_INTERVAL_S)

    # -- request path ---------------------------------------------------------------------------

    def fetch(self, user_id: str, item_ids: Sequence[str], context: Mapping[str, Any] | None = None) -> Features:
        # the context is checked first: a bad request must not cost a Redis round trip
        ctx_sparse, ctx_dense = self.context_arrays(context or {})
        ns = self.ns
        t0 = time.perf_counter()
        until = time.monotonic() + self.redis.deadline_s
        degraded = None
        cache = self.cache
        if cache is None:
            keys = [user_key(ns, user_id)]
            keys.extend(item_keys(ns, item_ids))
            values, degraded = self._read(keys)
            user_values, item_values, fetched, from_cache = values[:1], values[1:], None, 0
        else:
            item_values = cache.get_many(item_ids)
            fetched = [j for j, v in enumerate(item_values) if v is None]
            from_cache = len(item_ids) - len(fetched)
            keys = [user_key(ns, user_id), self._meta_key]
            keys.extend(item_keys(ns, [item_ids[j] for j in fetched]))
            values, degraded = self._read(keys)
            for j, v in zip(fetched, values[2:], strict=True):
                item_values[j] = v
            user_values, tag = values[:1], values[1]
            if degraded is None and cache.retag(tag) and from_cache:
                # features were reloaded: what came from the cache may be old, read it again
                again = sorted(set(range(len(item_ids))).difference(fetched))
                fresh, degraded = self._read([item_key(ns, item_ids[j]) for j in again], until)
                if degraded is None:
                    for j, v in zip(again, fresh, strict=True):
                        item_values[j] = v
                    fetched, from_cache = list(range(len(item_ids))), 0
        t1 = time.perf_counter()
        user = self.user_codec.decode(user_values)
        items = self.item_codec.decode(item_values)
        if cache is not None and degraded is None and fetched:
            ok = (~(items.missing | items.corrupt)).tolist()
            cache.put([(item_ids[j], item_values[j]) for j in fetched if ok[j]], tag)
        self._log_corrupt(user_id, item_ids, user, items)
        arrays = {
            ("user", "sparse"): user.sparse, ("user", "dense"): user.dense, ("user", "sequence"): user.seq,
            ("item", "sparse"): items.sparse, ("item", "dense"): items.dense, ("item", "sequence"): items.seq,
            ("context", "sparse"): ctx_sparse, ("context", "dense"): ctx_dense,
        }
        inputs = {mi.name: np.ascontiguousarray(arrays[(mi.entity, mi.kind)], dtype=mi.dtype) for mi in self.inputs}
        t2 = time.perf_counter()
        return Features(
            inputs=inputs,
            n_items=len(item_ids),
            user_missing=bool(user.missing[0] or user.corrupt[0]),
            items_missing=int(np.count_nonzero(items.missing | items.corrupt)),
            user_corrupt=bool(user.corrupt[0]),
            items_corrupt=int(np.count_nonzero(items.corrupt)),
            timings={"fetch": t1 - t0, "assemble": t2 - t1},
            degraded=degraded,
            items_from_cache=from_cache,
            raw=(user_values, item_values),
        )

    def _read(self, keys: list[str], until: float | None = None) -> tuple[list, str | None]:
        """One MGET -> (values, None); when the store is unavailable and degrading is allowed ->
        (what could be read, ``None`` elsewhere; the reason), else the error propagates. ``until``
        (monotonic): the end of the request's budget when it is not the first read."""
        try:
            if until is not None:
                return self.redis.mget(keys, max(until - time.monotonic(), 0.001)), None
            return self.redis.mget(keys), None
        except StoreUnavailable as e:
            if not self.degrade:
                raise
            log.debug("feature store unavailable (%s), degrading %s", e.reason, self.ns)
            return (e.partial if e.partial is not None else [None] * len(keys)), e.reason

    def cache_stats(self) -> dict[str, int]:
        """Item cache counters: hits, misses, size, clears (zeros when the cache is off)."""
        return self.cache.stats() if self.cache is not None else {"hits": 0, "misses": 0, "size": 0, "clears": 0}

    def context_arrays(self, context: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Context inputs (batch 1): sparse int64 [1, n] by vocabulary lookup, dense float32 [1, n].

        Sparse values may be strings or integers (looked up as ``str(value)``; unknown -> 0);
        dense values are finite numbers; ``None`` or an absent key means missing (index 0 /
        the field's mean). Any other key or type raises :class:`ContextError`."""
        sparse = np.zeros((1, len(self._ctx_sparse)), dtype=np.int64)
        dense = self._ctx_dense_default.copy()
        for key, value in context.items():
            if key in self._ctx_sparse_pos:
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (str, int)):
                    raise ContextError(key, f"expected a string or integer, got {type(value).__name__}")
                sparse[0, self._ctx_sparse_pos[key]] = self._ctx_lookup[key].get(str(value), 0)
            elif key in self._ctx_dense_pos:
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ContextError(key, f"expected a number, got {type(value).__name__}")
                if abs(value) > 3.4e38 or not math.isfinite(value):
                    raise ContextError(key, "must be a finite float32 number")
                dense[0, self._ctx_dense_pos[key]] = value
            else:
                known = sorted([*self._ctx_sparse_pos, *self._ctx_dense_pos])
                raise ContextError(key, f"unknown context field; known: {known}")
        return sparse, dense

    def _log_corrupt(self, user_id: str, item_ids: Sequence[str], user: Decoded, items: Decoded) -> None:
        """Corrupt values: counted (``mtrank_corrupt_features_total``, by the caller), summed up here
        in at most one WARNING per :data:`CORRUPT_LOG_INTERVAL_S` without any id; the ids only at DEBUG."""
        bad_items = np.flatnonzero(items.corrupt)
        bad_user = bool(user.corrupt[0])
        if not (bad_user or bad_items.size):
            return
        if log.isEnabledFor(logging.DEBUG):
            names = [item_ids[i] for i in bad_items[:_LOG_IDS].tolist()]
            more = f" (+{bad_items.size - _LOG_IDS} more)" if bad_items.size > _LOG_IDS else ""
            log.debug("corrupt feature values in %s: user=%s corrupt_user=%s corrupt_items=%d %s%s",
                      self.ns, user_id, bad_user, bad_items.size, names, more)
        summary = self._corrupt.add(int(bad_user), int(bad_items.size))
        if summary is not None:
            users, n_items, requests, seconds = summary
            log.warning("corrupt feature values in %s, scored with defaults: %d user and %d item values in %d "
                        "requests over the last %.0f s (ids at DEBUG)", self.ns, users, n_items, requests, seconds)
