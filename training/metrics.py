"""Test-split metrics from raw model outputs and labels.

* the mean loss of each task (``loss/<task>``, :func:`training.losses.task_losses`);
* AUC of each unconditional binary task (``auc/ctr``);
* for a conditional binary task the AUC on the condition's positive rows (``auc/cvr``, CVR on
  clicks) and the AUC of the joint probability on all rows (``auc/ctcvr``, :func:`joint_name`);
* RMSE and MAE of log1p(label) for regression tasks, on the condition's rows when it has one
  (``rmse_log1p/watch_time``, ``mae_log1p/watch_time``);
* calibration of every probability on the rows its AUC uses (:func:`binary_views`): the log loss
  (``logloss/ctr``, ``logloss/cvr``, ``logloss/ctcvr``) and the expected calibration error
  (``ece/...``, :func:`ece`: 15 equal-width bins);
* the mean of a regression task in its own unit (seconds for watch time) on the condition's rows:
  ``mean_pred/watch_time`` (``expm1(max(pred, 0))``, what the model serves for the raw output
  given), ``mean_label/watch_time`` (observed) and ``mean_bias/watch_time`` = pred / label - 1.

Used by the trainer (:func:`training.train.evaluate`) and the int8 check (:mod:`training.quantize`).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import log_loss as _sk_log_loss
from sklearn.metrics import roc_auc_score

from service.contract import TaskSpec
from training.losses import task_losses


def joint_name(task: TaskSpec, cond: TaskSpec) -> str:
    """The name of the joint probability of a conditional binary task (``ctcvr`` for ctr -> cvr)."""
    return "ctcvr" if (cond.name, task.name) == ("ctr", "cvr") else f"{cond.name}_{task.name}"


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


#: bins of the expected calibration error and the reliability diagrams
ECE_BINS = 15


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins on [0, 1]:
    ``sum_k |B_k| / N * |mean(y in B_k) - mean(p in B_k)|``, where row ``i`` is in bin
    ``min(floor(p_i * bins), bins - 1)`` (the last bin includes 1). NaN without rows."""
    r = reliability(y, p, bins)
    n = np.asarray(r["count"], float)
    if not n.sum():
        return float("nan")
    return float(np.sum(n / n.sum() * np.abs(np.asarray(r["mean_label"]) - np.asarray(r["mean_pred"]))))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """The reliability diagram of probabilities ``p`` against 0/1 labels ``y`` (bins as :func:`ece`):
    per non-empty bin its row ``count``, ``mean_pred`` and ``mean_label``."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    k = np.clip(np.floor(p * bins), 0, bins - 1).astype(np.int64)
    n = np.bincount(k, minlength=bins)
    sp, sy = np.bincount(k, p, minlength=bins), np.bincount(k, y, minlength=bins)
    keep = n > 0
    return {"count": n[keep].tolist(), "mean_pred": (sp[keep] / n[keep]).tolist(),
            "mean_label": (sy[keep] / n[keep]).tolist()}


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` against 0/1 labels ``y`` (sklearn's, natural
    log); NaN without rows."""
    return float(_sk_log_loss(y, p, labels=[0, 1])) if len(y) else float("nan")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def binary_views(raw: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                 tasks: list[TaskSpec]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (labels, probabilities)}`` of every probability the metrics judge: an unconditional
    binary task on all rows (``ctr``); a conditional one on its condition's positive rows (``cvr``
    on clicks) and its joint probability on all rows (``ctcvr``, :func:`joint_name`)."""
    by_name = {t.name: t for t in tasks}
    out = {}
    for t in tasks:
        if t.kind != "binary":
            continue
        y, p = labels[t.label], _sigmoid(raw[t.name])
        if t.condition is None:
            out[t.name] = (y, p)
        else:
            cond = by_name[t.condition]
            yc = labels[cond.label] > 0
            out[t.name] = (y[yc], p[yc])
            out[joint_name(t, cond)] = (yc * y, _sigmoid(raw[cond.name]) * p)
    return out


def regression_rows(t: TaskSpec, labels: dict[str, np.ndarray], tasks: list[TaskSpec]) -> np.ndarray:
    """The rows a regression task is judged on: its condition's positive rows, or all."""
    by_name = {x.name: x for x in tasks}
    y = labels[t.label]
    return labels[by_name[t.condition].label] > 0 if t.condition else np.ones(len(y), bool)


def label_means(ds, splits: dict[str, np.ndarray]) -> dict[str, dict[str, dict[str, float]]]:
    """Per regression task of the encoded dataset ``ds``, per named split of exposure rows: the
    observed label on the rows the task is judged on (:func:`regression_rows`) - count, mean and the
    mean's standard error (ddof=1). A mean-bias figure on a split cannot resolve less than about two
    of those standard errors."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in ds.tasks:
        if t.kind != "regression":
            continue
        out[t.name] = {}
        for name, rows in splits.items():
            labels = {x.label: ds.label(x.label, rows) for x in ds.tasks}
            y = labels[t.label][regression_rows(t, labels, ds.tasks)].astype(np.float64)
            se = float(y.std(ddof=1) / np.sqrt(len(y))) if len(y) > 1 else float("nan")
            out[t.name][name] = {"n": len(y), "mean": float(y.mean()) if len(y) else float("nan"), "se": se}
    return out


def metrics_of(raw: dict[str, np.ndarray], labels: dict[str, np.ndarray], tasks: list[TaskSpec]) -> dict[str, float]:
    """The metrics (module doc) from raw outputs (logits / log1p predictions) and labels by label name."""
    m: dict[str, float] = {}
    with torch.no_grad():
        losses = task_losses({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in raw.items()},
                             {k: torch.from_numpy(v) for k, v in labels.items()}, tasks)
    for name, value in losses.items():
        m[f"loss/{name}"] = float(value)
    for name, (y, p) in binary_views(raw, labels, tasks).items():
        m[f"auc/{name}"] = _auc(y, p)  # e.g. CVR AUC on clicked rows, CTCVR on all rows
        m[f"logloss/{name}"] = log_loss(y, p)
        m[f"ece/{name}"] = ece(y, p)
    for t in tasks:
        if t.kind != "regression":
            continue
        y = labels[t.label]
        sel = regression_rows(t, labels, tasks)
        pred = np.maximum(raw[t.name][sel].astype(np.float64), 0)
        err = pred - np.log1p(np.maximum(y[sel], 0))
        m[f"rmse_log1p/{t.name}"] = float(np.sqrt(np.mean(err ** 2))) if sel.any() else float("nan")
        m[f"mae_log1p/{t.name}"] = float(np.mean(np.abs(err))) if sel.any() else float("nan")
        mean_pred = float(np.mean(np.expm1(pred))) if sel.any() else float("nan")
        mean_label = float(np.mean(np.maximum(y[sel], 0))) if sel.any() else float("nan")
        m[f"mean_pred/{t.name}"], m[f"mean_label/{t.name}"] = mean_pred, mean_label
        m[f"mean_bias/{t.name}"] = mean_pred / mean_label - 1 if mean_label > 0 else float("nan")
    return m
