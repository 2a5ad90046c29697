"""Training report: ``report.json`` and ``report.png``.

``report.json``: the train and model config, run info, the test metrics (as served: see
:func:`training.calibration.served_metrics`), the per-epoch history, the post-hoc ``calibration``
of each task (:class:`service.contract.OutputCalibration`, fitted on validation), the test
``reliability`` diagrams before (``uncalibrated``) and after (``served``) it, and ``definitions``
of the calibration metrics.

``report.png``: per task, the train/validation loss and the validation metrics per epoch; below,
one reliability diagram per probability (CTR, CVR on clicks, CTCVR) and per regression task
(mean predicted vs mean observed per decile of the prediction), uncalibrated and as served.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from service.contract import OutputCalibration
from training.metrics import ECE_BINS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFINITIONS = {
    "ece": f"expected calibration error on the test split, {ECE_BINS} equal-width bins of the predicted "
           f"probability on [0, 1] (row i in bin min(floor({ECE_BINS} p_i), {ECE_BINS - 1})): "
           "sum over bins of |bin| / N * |mean label - mean prediction|",
    "logloss": "mean binary cross-entropy (natural log) on the test split",
    "rows": "ctr and ctcvr: all test rows; cvr: the clicked test rows (p(conversion | click)); "
            "regression tasks: the rows where their condition holds (clicks)",
    "mean_pred": "mean served prediction in the label's unit (seconds) on the clicked test rows; "
                 "mean_label the observed mean there; mean_bias = mean_pred / mean_label - 1",
    "uncalibrated": "<family>_uncalibrated/<name>: the same metric of the model's own outputs "
                    "(sigmoid(logit), expm1(max(pred, 0))) before the post-hoc calibration",
}


def write_report(out_dir: Path, *, cfg: dict, model_config: dict, history: list[dict],
                 test_metrics: dict[str, float], info: dict,
                 calibration: dict[str, OutputCalibration] | None = None,
                 reliability: dict[str, dict] | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    reliability = reliability or {}
    report = {"train_config": cfg, "model_config": model_config, "info": info,
              "test_metrics": test_metrics, "history": history,
              "calibration": {k: v.model_dump(mode="json") for k, v in (calibration or {}).items()},
              "reliability": reliability, "definitions": DEFINITIONS}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str, allow_nan=True))

    tasks = list(history[0]["train"]) if history else []
    # per-epoch curves of the [0, 1] metrics (the means in seconds are in the reliability row)
    metric_names = sorted({k for h in history for k in h["val"] if not k.startswith(("loss/", "mean_"))})
    cols = max(len(tasks), len(reliability), 1)
    rows = 3 if reliability else 2
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.5 * rows), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        ax.plot(epochs, [h["train"][task] for h in history], "o-", label="train")
        ax.plot(epochs, [h["val"][f"loss/{task}"] for h in history], "s-", label="validation")
        ax.set_title(f"{task} loss")
        ax.set_xlabel("epoch")
        ax.legend()
        ax = axes[1][j]
        for name in [m for m in metric_names if m.split("/")[-1] == task or
                     (task == "cvr" and m == "auc/ctcvr")]:
            ax.plot(epochs, [h["val"].get(name, float("nan")) for h in history], "o-", label=name)
            if name in test_metrics:
                ax.axhline(test_metrics[name], ls=":", lw=1, color=ax.lines[-1].get_color())
        ax.set_title(f"{task} validation metrics (dotted: test)")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    for j, (name, curve) in enumerate(reliability.items()):
        _reliability_panel(axes[2][j], name, curve, test_metrics)
    for row in axes:
        for ax in row:
            if not ax.has_data():
                ax.axis("off")
    fig.tight_layout()
    png_path = out_dir / "report.png"
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return json_path, png_path


def _reliability_panel(ax, name: str, curve: dict, test_metrics: dict[str, float]) -> None:
    binary = curve.get("kind") == "binary"
    top = 0.0
    for side, style in (("uncalibrated", "s--"), ("served", "o-")):
        c = curve.get(side)
        if not c:
            continue
        ax.plot(c["mean_pred"], c["mean_label"], style, ms=3, label=side)
        top = max([top, *c["mean_pred"], *c["mean_label"]])
    top = 1.0 if binary else top * 1.05 or 1.0
    ax.plot([0, top], [0, top], ":", color="grey", lw=1)
    if binary:
        ece, before = test_metrics.get(f"ece/{name}"), test_metrics.get(f"ece_uncalibrated/{name}")
        sub = f"ECE {before:.4f} -> {ece:.4f}" if ece is not None and before is not None else ""
        ax.set_xlabel(f"mean predicted probability ({ECE_BINS} bins)")
        ax.set_ylabel("observed rate")
    else:
        bias, before = test_metrics.get(f"mean_bias/{name}"), test_metrics.get(f"mean_bias_uncalibrated/{name}")
        sub = f"mean bias {before:+.1%} -> {bias:+.1%}" if bias is not None and before is not None else ""
        ax.set_xlabel("mean predicted (deciles)")
        ax.set_ylabel("mean observed")
    ax.set_title(f"{name} reliability (test)\n{sub}", fontsize=9)
    ax.legend(fontsize=8)
