"""Training report: metrics JSON plus a PNG of loss and metric curves per task."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_report(out_dir: Path, *, cfg: dict, model_config: dict, history: list[dict],
                 test_metrics: dict[str, float], info: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"train_config": cfg, "model_config": model_config, "info": info,
              "test_metrics": test_metrics, "history": history}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str, allow_nan=True))

    tasks = list(history[0]["train"]) if history else []
    metric_names = sorted({k for h in history for k in h["val"] if not k.startswith("loss/")})
    cols = max(len(tasks), 1)
    fig, axes = plt.subplots(2, cols,
                             figsize=(4.2 * cols, 7), squeeze=False)
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
    fig.tight_layout()
    png_path = out_dir / "report.png"
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return json_path, png_path
