"""Post-hoc calibration of the served outputs, fitted on the validation split and folded into the
exported ONNX graph (:class:`training.export.ServingModel`), and the test metrics before and after.

The fusion multiplies ``ctr * cvr * (1 + watch_time) ** w``, so the outputs are used as
probabilities and as seconds. Two maps, one per task kind (recorded in the manifest as
:class:`service.contract.OutputCalibration`):

* **Binary tasks - Platt scaling of the logit** (``TrainConfig.calibration = "platt"``, the
  default): ``p = sigmoid(a * logit + b)``, ``a`` and ``b`` a logistic regression of the label on
  the model's logit over the validation rows (for CVR the clicked rows: the served CVR is
  ``p(conversion | click)``). Chosen over isotonic regression because it is one Mul and one Add in
  the graph (isotonic would be a lookup table, piecewise constant, whose steps make a parity gate
  on float32 inputs fragile), it cannot change the ranking (``a > 0``: the CTR and CVR AUCs are
  unchanged), and two parameters do not overfit a small validation split. The identity
  (``a = 1, b = 0``) is one of the maps it can choose, so it never makes the validation log loss
  worse; a task already calibrated gets ``a ~ 1, b ~ 0``. It is not fitted (the task is served
  uncalibrated, with a warning) when the validation rows hold fewer than :data:`MIN_CLASS_ROWS`
  of either class, or when the fitted slope is not positive.
* **Regression tasks - one factor on ``1 + y``**: the model fits ``E[log1p y]`` (MSE on
  ``log1p``), and ``expm1`` of it estimates something like a geometric mean, lower than the
  expected value whenever the residual varies. The served value is
  ``max(s * exp(max(m, 0)) - 1, 0)``, with ``s`` fitted on the validation rows where the condition
  holds (clicks), by ``TrainConfig.watch_time_correction``:

  - ``"ratio"`` (the default): ``s = mean(1 + y) / mean(exp(max(m, 0)))``, a ratio estimator: the
    mean served value equals the observed mean on validation by construction, whatever the
    residuals do;
  - ``"smearing"``: Duan's smearing estimate (JASA 1983), ``s = mean(exp(log1p y - max(m, 0)))``.
    If ``log1p y = m(x) + e`` with ``e`` independent of ``x``, ``E[1 + y | x] = exp(m(x)) E[exp(e)]``
    and smearing estimates ``E[exp(e)]``; when the residual depends on ``x`` (heteroscedastic
    noise, a model that over- or under-shoots at the ends, the clip of the synthetic watch time)
    the mean is off. On the demo-size synthetic data (1M exposures, PLE, 4 epochs) the mean on
    the clicked test rows was 28.9% low uncorrected, 5.7% high with smearing and 2.6% low with
    the ratio factor - hence the default.

``"none"`` for either option exports the model's own outputs (``sigmoid(logit)``,
``expm1(max(m, 0))``). Nothing is fitted on the test split: :func:`fit` takes validation
predictions only, and :func:`served_metrics` measures on test what the bundle serves.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.linear_model import LogisticRegression

from service.contract import OutputCalibration, TaskSpec
from training.metrics import ECE_BINS, binary_views, metrics_of, regression_rows, reliability

log = logging.getLogger(__name__)

#: ``TrainConfig.calibration``: the post-hoc map of binary tasks
CALIBRATIONS = ("platt", "none")
#: ``TrainConfig.watch_time_correction``: the post-hoc map of regression tasks
WATCH_TIME_CORRECTIONS = ("ratio", "smearing", "none")
#: a binary task is calibrated only when validation has at least this many rows of each class
MIN_CLASS_ROWS = 10
#: metric families whose value :func:`served_metrics` takes from the served (calibrated) outputs;
#: each also appears as ``<family>_uncalibrated/<name>`` (the model's own outputs)
SERVED = ("auc", "ece", "logloss", "mean_pred", "mean_bias")


def check_options(calibration: str, watch_time_correction: str) -> None:
    """ValueError naming the setting when either option is not one of the known values."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {list(CALIBRATIONS)}, got {calibration!r}")
    if watch_time_correction not in WATCH_TIME_CORRECTIONS:
        raise ValueError(f"watch_time_correction must be one of {list(WATCH_TIME_CORRECTIONS)}, "
                         f"got {watch_time_correction!r}")


def fit_platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """``(a, b)`` of ``sigmoid(a * logit + b)`` by maximum likelihood (an unpenalised logistic
    regression); None when a class has fewer than :data:`MIN_CLASS_ROWS` rows or ``a <= 0``."""
    y = np.asarray(y) > 0
    if min(int(y.sum()), int((~y).sum())) < MIN_CLASS_ROWS:
        return None
    lr = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000, tol=1e-10)  # C=inf: unpenalised
    lr.fit(np.asarray(logit, np.float64)[:, None], y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return (a, b) if a > 0 and math.isfinite(a) and math.isfinite(b) else None


def fit_smearing(pred: np.ndarray, y: np.ndarray) -> float | None:
    """Duan's smearing factor ``mean(exp(log1p y - max(pred, 0)))``; None without rows."""
    if not len(y):
        return None
    s = float(np.mean(np.exp(np.log1p(np.maximum(y, 0)) - np.maximum(pred.astype(np.float64), 0))))
    return s if math.isfinite(s) and s > 0 else None


def fit_ratio(pred: np.ndarray, y: np.ndarray) -> float | None:
    """The factor ``mean(1 + y) / mean(exp(max(pred, 0)))`` (served mean = observed mean); None without rows."""
    if not len(y):
        return None
    s = float(np.mean(1 + np.maximum(y.astype(np.float64), 0))
              / np.mean(np.exp(np.maximum(pred.astype(np.float64), 0))))
    return s if math.isfinite(s) and s > 0 else None


def fit(raw: dict[str, np.ndarray], labels: dict[str, np.ndarray], tasks: list[TaskSpec],
        calibration: str, watch_time_correction: str) -> dict[str, OutputCalibration]:
    """The post-hoc maps by task, fitted on ``raw`` (logits / log1p predictions) and ``labels`` of the
    VALIDATION rows (module doc). Tasks left out are served as the model outputs them."""
    check_options(calibration, watch_time_correction)
    by_name = {t.name: t for t in tasks}
    out: dict[str, OutputCalibration] = {}
    for t in tasks:
        if t.kind == "binary" and calibration == "platt":
            rows = labels[by_name[t.condition].label] > 0 if t.condition else slice(None)  # as binary_views
            y, z = labels[t.label][rows], raw[t.name][rows]
            ab = fit_platt(z, y)
            if ab is None:
                log.warning("calibration: task %s left uncalibrated (validation: %d rows, %d positive, or the "
                            "fitted slope is not positive)", t.name, len(y), int(np.sum(y > 0)))
                continue
            out[t.name] = OutputCalibration(method="platt", scale=ab[0], shift=ab[1], rows=len(y))
        elif t.kind == "regression" and watch_time_correction != "none":
            sel = regression_rows(t, labels, tasks)
            fitter = fit_smearing if watch_time_correction == "smearing" else fit_ratio
            s = fitter(raw[t.name][sel], labels[t.label][sel])
            if s is None:
                log.warning("calibration: task %s left uncorrected (no validation rows)", t.name)
                continue
            out[t.name] = OutputCalibration(method=watch_time_correction, scale=s, rows=int(sel.sum()))
    return out


def apply(raw: dict[str, np.ndarray], calib: dict[str, OutputCalibration]) -> dict[str, np.ndarray]:
    """Raw outputs mapped as the exported graph maps them, on the raw scale (calibrated logit;
    ``log1p`` of the corrected value), so that :func:`training.metrics.metrics_of` judges the
    served outputs. Tasks without a calibration pass through."""
    out = dict(raw)
    for name, c in calib.items():
        x = raw[name].astype(np.float64)
        if c.method == "platt":
            out[name] = c.scale * x + c.shift
        else:
            out[name] = np.log1p(np.maximum(c.scale * np.exp(np.maximum(x, 0)) - 1, 0))
    return out


def served_metrics(raw: dict[str, np.ndarray], labels: dict[str, np.ndarray], tasks: list[TaskSpec],
                   calib: dict[str, OutputCalibration]) -> dict[str, float]:
    """:func:`training.metrics.metrics_of` of the TEST rows with the families in :data:`SERVED`
    (AUC, ECE, log loss, mean prediction and its bias) as served - calibration applied - and
    again as ``<family>_uncalibrated/<name>`` from the model's own outputs. The losses, the log1p
    RMSE/MAE and the observed mean are the model's (the losses it was trained on)."""
    before = metrics_of(raw, labels, tasks)
    after = metrics_of(apply(raw, calib), labels, tasks)
    out = {}
    for k, v in before.items():
        family, _, name = k.partition("/")
        if family in SERVED:
            out[k] = after[k]
            out[f"{family}_uncalibrated/{name}"] = v
        else:
            out[k] = v
    return out


def curves(raw: dict[str, np.ndarray], labels: dict[str, np.ndarray], tasks: list[TaskSpec],
           calib: dict[str, OutputCalibration], bins: int = ECE_BINS) -> dict[str, dict]:
    """Reliability diagrams for the report, ``{name: {"uncalibrated": ..., "served": ...}}``: for a
    probability :func:`training.metrics.reliability`; for a regression task the mean prediction
    and mean label (in its unit) per decile of the served prediction, on the condition's rows."""
    out: dict[str, dict] = {}
    served = apply(raw, calib)
    for side, r in (("uncalibrated", raw), ("served", served)):
        for name, (y, p) in binary_views(r, labels, tasks).items():
            out.setdefault(name, {"kind": "binary"})[side] = reliability(y, p, bins)
        for t in tasks:
            if t.kind != "regression":
                continue
            sel = regression_rows(t, labels, tasks)
            pred = np.expm1(np.maximum(r[t.name][sel].astype(np.float64), 0))
            y = np.maximum(labels[t.label][sel].astype(np.float64), 0)
            order = np.argsort(np.expm1(np.maximum(served[t.name][sel], 0)), kind="stable")
            parts = [q for q in np.array_split(order, 10) if len(q)]
            out.setdefault(t.name, {"kind": "regression"})[side] = {
                "count": [len(q) for q in parts], "mean_pred": [float(pred[q].mean()) for q in parts],
                "mean_label": [float(y[q].mean()) for q in parts]}
    return out
