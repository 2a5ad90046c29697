"""The ranking pipeline: request -> features -> model -> fusion -> ordered response bytes.

Everything between Redis and the response works on whole numpy arrays; only the final list of
response items is built in Python (and serialised with orjson). Each stage is timed with
``time.perf_counter`` and the timings travel on the :class:`RankResult`.

Duplicate item ids are scored once per occurrence (see :mod:`service.schemas`).

Two response shapes, the same values: the default one object per ranked item, or (``columnar``,
negotiated in :mod:`service.columnar`) parallel arrays written by orjson straight from numpy.

When the feature store could not be read and ``MTRANK_REDIS_FAILURE_MODE=degrade``, the request
is still ranked (schema defaults plus cached items, see :mod:`service.features`) and the response
says so: ``"degraded": true, "degraded_reason": "timeout" | "down" | "circuit_open"``; both fields
are always present (``false`` / ``null`` when healthy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import orjson

from service import fusion
from service.features import FeatureFetcher
from service.schemas import RankRequest
from service.store import Bundle

STAGES = ("fetch", "assemble", "inference", "fusion", "serialise")


@dataclass
class RankResult:
    body: bytes  # the JSON response
    request_id: str
    n_items: int
    n_returned: int
    user_missing: bool
    items_missing: int
    items_corrupt: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"
    degraded: str | None = None  # the reason the features were not (all) read from Redis
    items_from_cache: int = 0
    # every candidate's task scores and fused score, and the values the fetcher read (user, items):
    # what the prediction log records (service.predlog)
    scored: tuple[dict[str, np.ndarray], np.ndarray, tuple[list, list] | None] | None = None


class Ranker:
    """Ranks requests with one loaded bundle, one feature fetcher and one fusion (thread-safe: no
    mutable state). One ranker serves one variant; variants of one bundle share its ``fetcher``.
    The serving layer decides the fusion and weights (:func:`service.serving.planner.fusion_of`);
    weights naming tasks the model does not have fail here, at load time."""

    def __init__(self, bundle: Bundle, fetcher: FeatureFetcher, fusion_name: str, weights: dict[str, float],
                 variant: str = "default"):
        self.bundle = bundle
        manifest = bundle.manifest
        self.fusion_name = fusion_name
        self.weights = dict(weights)
        self.kinds = fusion.validate_weights(self.fusion_name, self.weights, manifest.tasks)
        self.fetcher = fetcher
        self.tasks = list(manifest.outputs)
        self.variant = variant
        self._model_ref = {"name": manifest.name, "version": manifest.version}

    @property
    def model_ref(self) -> dict:
        return dict(self._model_ref)

    def rank_result(self, request: RankRequest, bucket: int | None = None, columnar: bool = False) -> RankResult:
        """Rank one request; ``bucket`` (the user's routing bucket) is echoed in the response;
        ``columnar``: the body is the columnar response (:mod:`service.columnar`)."""
        t_start = time.perf_counter()
        feats = self.fetcher.fetch(request.user_id, request.items, request.context)

        t0 = time.perf_counter()
        scores = self.bundle.run(feats.inputs)
        t1 = time.perf_counter()
        fused = fusion.fuse(self.fusion_name, self.weights, scores, self.kinds)
        idx = fusion.order(fused, request.top_k)
        t2 = time.perf_counter()

        serialise = self._serialise_columnar if columnar else self._serialise
        body = serialise(request, bucket, idx, fused, scores, feats.user_missing, feats.items_missing, feats.degraded)
        t3 = time.perf_counter()
        timings = {**feats.timings, "inference": t1 - t0, "fusion": t2 - t1, "serialise": t3 - t2,
                   "total": t3 - t_start}
        return RankResult(body=body, request_id=request.request_id, n_items=feats.n_items,
                          n_returned=int(idx.size), user_missing=feats.user_missing,
                          items_missing=feats.items_missing, items_corrupt=feats.items_corrupt,
                          timings=timings, degraded=feats.degraded, items_from_cache=feats.items_from_cache,
                          scored=(scores, fused, feats.raw))

    def _serialise(self, request: RankRequest, bucket: int | None, idx: np.ndarray, fused: np.ndarray,
                   scores: dict[str, np.ndarray], user_missing: bool, items_missing: int,
                   degraded: str | None = None) -> bytes:
        items = request.items
        ids = [items[i] for i in idx.tolist()]
        # orjson writes NaN/inf as null, as the response model documents
        top = fused[idx].tolist()
        per_task = [scores[t][idx].tolist() for t in self.tasks]
        tasks = self.tasks
        ranked = [
            {"item_id": item_id, "score": s, "scores": dict(zip(tasks, task_values, strict=True))}
            for item_id, s, task_values in zip(ids, top, zip(*per_task, strict=True), strict=True)
        ]
        return orjson.dumps({
            "request_id": request.request_id,
            "variant": self.variant,
            "bucket": bucket,
            "model": self._model_ref,
            "items": ranked,
            "missing": {"user": user_missing, "items": items_missing},
            "degraded": degraded is not None,
            "degraded_reason": degraded,
        })

    def _serialise_columnar(self, request: RankRequest, bucket: int | None, idx: np.ndarray, fused: np.ndarray,
                            scores: dict[str, np.ndarray], user_missing: bool, items_missing: int,
                            degraded: str | None = None) -> bytes:
        """The columnar body: float64 arrays (the exact values ``.tolist()`` gives the default
        response), NaN/inf written as null by orjson."""
        items = request.items
        return orjson.dumps({
            "request_id": request.request_id,
            "variant": self.variant,
            "bucket": bucket,
            "model": self._model_ref,
            "item_ids": [items[i] for i in idx.tolist()],
            "score": fused[idx].astype(np.float64, copy=False),
            "scores": {t: scores[t][idx].astype(np.float64, copy=False) for t in self.tasks},
            "missing": {"user": user_missing, "items": items_missing},
            "degraded": degraded is not None,
            "degraded_reason": degraded,
        }, option=orjson.OPT_SERIALIZE_NUMPY)
