"""Fusion of per-task model outputs into one ranking score, on whole arrays.

Two formulas, with a weight per task (tasks without a weight do not take part):

* ``weighted_product``: ``prod_binary p_t ** w_t * prod_regression (1 + y_t) ** w_t``, computed
  in log space with probabilities clipped to ``[1e-7, 1]`` (so ``ctr^a * cvr^b * (1+watch_time)^c``).
* ``weighted_sum``: ``sum_binary w_t * p_t + sum_regression w_t * log1p(y_t)``.

A task is *binary* (a probability) or *regression* (a non-negative value such as seconds); the
kinds come from the bundle's :class:`~service.contract.TaskSpec`. Weights that name a task the
model does not have are a configuration error, raised by :func:`validate_weights` when the
bundle is loaded, not on a request.

Default weights: without MTRANK_FUSION_WEIGHTS (and without weights in a routing variant), the
weights come from the bundle's own tasks (:func:`default_weights`): 1.0 for every binary task and
0.2 for every regression task. For the demo model's ctr/cvr/watch_time that is exactly the
documented default ``{"ctr": 1, "cvr": 1, "watch_time": 0.2}``; a model with other tasks (say
``click`` and ``like``) gets ``{"click": 1, "like": 1}`` and serves with default settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

from service.contract import TaskSpec

TaskKind = Literal["binary", "regression"]
FusionName = Literal["weighted_product", "weighted_sum"]
FUSIONS: tuple[str, ...] = get_args(FusionName)
PROB_EPS = 1e-7
#: default weight of a task by its kind (:func:`default_weights`)
DEFAULT_KIND_WEIGHT: dict[str, float] = {"binary": 1.0, "regression": 0.2}
#: kinds assumed by :func:`fuse` when the caller gives none (the demo model's tasks)
DEFAULT_KINDS: dict[str, TaskKind] = {"ctr": "binary", "cvr": "binary", "watch_time": "regression"}


class FusionConfigError(ValueError):
    """Unknown fusion, or weights that do not fit the model's tasks."""


def default_weights(tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """The weights used when none are configured: every task of the model, by its kind."""
    return {t.name: DEFAULT_KIND_WEIGHT[t.kind] for t in tasks}


def weight_problems(weights: Mapping[Any, Any]) -> list[tuple[str | None, str]]:
    """The one rule for the shape of a weights mapping (MTRANK_FUSION_WEIGHTS, a routing variant's
    ``fusion.weights``): at least one task, non-empty task names, finite numbers. Returns
    ``(task or None, message)`` pairs; the model's tasks are checked by :func:`validate_weights`."""
    out: list[tuple[str | None, str]] = []
    if not weights:
        out.append((None, "fusion weights are empty: give at least one task weight"))
    for task, w in weights.items():
        if not isinstance(task, str) or not task:
            out.append((None, f"bad task name {task!r}"))
        elif isinstance(w, bool) or not isinstance(w, (int, float)):
            out.append((task, f"weight of {task!r} must be a number, got {w!r}"))
        elif not math.isfinite(w):
            out.append((task, f"weight of {task!r} must be finite, got {w!r}"))
    return out


def validate_weights(name: str, weights: Mapping[str, float], tasks: Sequence[TaskSpec]) -> dict[str, TaskKind]:
    """Check a fusion config against a model's tasks; return ``{task: kind}`` of the weighted tasks."""
    if name not in FUSIONS:
        raise FusionConfigError(f"unknown fusion {name!r}; use one of {list(FUSIONS)}")
    kinds = {t.name: t.kind for t in tasks}
    unknown = sorted(set(weights) - set(kinds))
    if unknown:
        raise FusionConfigError(f"fusion_weights name tasks the model does not have: {unknown}; "
                                f"model tasks: {sorted(kinds)}")
    problems = weight_problems(weights)
    if problems:
        raise FusionConfigError("; ".join(message for _, message in problems))
    return {t: kinds[t] for t in weights}


def fuse(name: str, weights: Mapping[str, float], scores: Mapping[str, np.ndarray],
         kinds: Mapping[str, TaskKind] | None = None) -> np.ndarray:
    """Fused float64 score [N] from per-task arrays ``scores[task]`` [N].

    ``kinds`` gives each weighted task's kind (default :data:`DEFAULT_KINDS`)."""
    kinds = DEFAULT_KINDS if kinds is None else kinds
    if name not in FUSIONS:
        raise FusionConfigError(f"unknown fusion {name!r}; use one of {list(FUSIONS)}")
    n = len(next(iter(scores.values()))) if scores else 0
    total = np.zeros(n, dtype=np.float64)
    for task, w in weights.items():
        if task not in scores:
            raise FusionConfigError(f"no scores for weighted task {task!r}")
        if task not in kinds:
            raise FusionConfigError(f"kind of task {task!r} unknown")
        if w == 0:
            continue
        x = np.asarray(scores[task], dtype=np.float64).reshape(-1)
        binary = kinds[task] == "binary"
        if name == "weighted_product":
            term = np.log(np.clip(x, PROB_EPS, 1.0)) if binary else np.log1p(np.maximum(x, 0.0))
        else:
            term = x if binary else np.log1p(np.maximum(x, 0.0))
        total += w * term
    return np.exp(total) if name == "weighted_product" else total


def order(score: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Indices of ``score`` sorted descending, ties kept in input order (stable), NaN last; at most ``top_k``."""
    key = np.where(np.isnan(score), -np.inf, score)
    idx = np.argsort(-key, kind="stable")
    return idx if top_k is None else idx[:top_k]
