"""Test-split metrics from raw model outputs and labels.

* the mean loss of each task (``loss/<task>``, :func:`training.losses.task_losses`);
* AUC of each unconditional binary task (``auc/ctr``);
* for a conditional binary task the AUC on the condition's positive rows (``auc/cvr``, CVR on
  clicks) and the AUC of the joint probability on all rows (``auc/ctcvr``, :func:`joint_name`);
* RMSE and MAE of log1p(label) for regression tasks, on the condition's rows when it has one
  (``rmse_log1p/watch_time``, ``mae_log1p/watch_time``).

Used by the trainer (:func:`training.train.evaluate`) and the int8 check (:mod:`training.quantize`).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from service.contract import TaskSpec
from training.losses import task_losses


def joint_name(task: TaskSpec, cond: TaskSpec) -> str:
    """The name of the joint probability of a conditional binary task (``ctcvr`` for ctr -> cvr)."""
    return "ctcvr" if (cond.name, task.name) == ("ctr", "cvr") else f"{cond.name}_{task.name}"


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def metrics_of(raw: dict[str, np.ndarray], labels: dict[str, np.ndarray], tasks: list[TaskSpec]) -> dict[str, float]:
    """The metrics (module doc) from raw outputs (logits / log1p predictions) and labels by label name."""
    by_name = {t.name: t for t in tasks}
    m: dict[str, float] = {}
    with torch.no_grad():
        losses = task_losses({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in raw.items()},
                             {k: torch.from_numpy(v) for k, v in labels.items()}, tasks)
    for name, value in losses.items():
        m[f"loss/{name}"] = float(value)
    for t in tasks:
        y = labels[t.label]
        if t.kind == "binary":
            p = 1 / (1 + np.exp(-raw[t.name].astype(np.float64)))
            if t.condition is None:
                m[f"auc/{t.name}"] = _auc(y, p)
            else:
                cond = by_name[t.condition]
                yc = labels[cond.label] > 0
                pc = 1 / (1 + np.exp(-raw[cond.name].astype(np.float64)))
                m[f"auc/{t.name}"] = _auc(y[yc], p[yc])  # e.g. CVR AUC on clicked rows
                m[f"auc/{joint_name(t, cond)}"] = _auc(yc * y, pc * p)  # e.g. CTCVR on all rows
        else:
            sel = labels[by_name[t.condition].label] > 0 if t.condition else np.ones(len(y), bool)
            err = np.maximum(raw[t.name][sel], 0) - np.log1p(np.maximum(y[sel], 0))
            m[f"rmse_log1p/{t.name}"] = float(np.sqrt(np.mean(err ** 2))) if sel.any() else float("nan")
            m[f"mae_log1p/{t.name}"] = float(np.mean(np.abs(err))) if sel.any() else float("nan")
    return m
