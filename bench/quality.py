"""Model-quality benchmark: our architectures and torch-rechub's PLE/MMoE, several seeds, on
MovieLens-100K (random and per-user time split) and on synthetic data, in one run.

    pip install -e '.[train,bench]'
    python bench/quality.py                       # everything (long: ~1-2 h on 2 cores)
    python bench/quality.py --seeds 1 --datasets movielens-random --models ple,rechub-ple

Every model is trained by the same loop (training.train.fit: same split, features, losses with
ESMM, Adam, early stopping on the validation loss, best epoch restored) with default
hyper-parameters: nothing is tuned on the test split. Reported on the test split: AUC of CTR,
CVR (clicked rows) and CTCVR (all rows), RMSE of log1p(regression label) on clicked rows; mean
and standard deviation over seeds; parameters; training seconds; onnxruntime latency of the
exported model at batch 500 (user batch 1). Writes bench/results/quality.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rechub_peer import RechubConfig, RechubModel  # noqa: E402

from training.data.dataset import EncodedDataset, prepare  # noqa: E402
from training.models import build_model  # noqa: E402
from training.train import TrainConfig, evaluate, fit  # noqa: E402

MODELS = {
    "shared_bottom": ("shared_bottom", {}),
    "mmoe": ("mmoe", {}),
    "ple": ("ple", {}),
    "dtrn+ple": ("dtrn", {"backbone": "ple"}),
    "ple+ml": ("ple", {"mutual_learning": True}),
    "dtrn+ple+ml": ("dtrn", {"backbone": "ple", "mutual_learning": True}),
    "rechub-ple": ("rechub", {"model": "ple"}),
    "rechub-mmoe": ("rechub", {"model": "mmoe"}),
}
CACHE = Path(tempfile.gettempdir()) / "mtrank-bench-data"


def dataset(name: str) -> tuple[EncodedDataset, str]:
    """(encoded data, split) for a benchmark dataset; files go to a temp cache, never the repo."""
    if name.startswith("movielens"):
        from training.data.movielens import build

        out = CACHE / "movielens-100k"
        if not (out / "dataset.yaml").exists():
            build(out)
        return prepare(out), ("column" if name.endswith("time") else "random")
    if name == "synth":
        from training.data.synth import SynthConfig, generate

        out = CACHE / "synth-200k"
        if not (out / "dataset.yaml").exists():
            generate(out, SynthConfig(n_users=5_000, n_items=10_000, n_exposures=200_000, seed=11), progress=False)
        return prepare(out), "random"
    raise ValueError(f"unknown dataset {name!r}")


def make_model(key: str, ds: EncodedDataset):
    arch, overrides = MODELS[key]
    if arch == "rechub":
        return RechubModel(ds.schema, ds.tasks, RechubConfig(**overrides))
    return build_model(arch, ds.schema, ds.tasks, **overrides)


def onnx_latency_ms(model, ds: EncodedDataset, rows: np.ndarray, n: int = 500, repeats: int = 50) -> float:
    """Median onnxruntime latency of the exported model: one user (batch 1), n items."""
    import onnxruntime as ort

    from training.export import ServingModel, _export_onnx

    inputs = ds.inputs(rows[:n])
    feeds = {k: (v[:1] if k.startswith(("user_", "context_")) else v) for k, v in inputs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        _export_onnx(ServingModel(model).eval(), feeds, path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for _ in range(5):
            sess.run(None, feeds)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def run(args) -> dict:
    """Seed-major order (every dataset and model at seed 0, then seed 1, ...), writing the JSON after
    every run: a stopped benchmark still leaves whole seeds behind (`--render` tables them)."""
    out = Path(args.out).with_suffix(".json")
    report = {"machine": platform.platform(), "torch": torch.__version__, "args": vars(args), "runs": []}
    if args.resume and out.exists():  # keep the runs already done, do the rest
        report["runs"] = json.loads(out.read_text())["runs"]
    done = {(r["dataset"], r["model"], r["seed"]) for r in report["runs"]}
    data = {d: dataset(d) for d in args.datasets.split(",")}
    for seed in range(args.seeds):
        for dname, (ds, split) in data.items():
            for key in args.models.split(","):
                if (dname, key, seed) in done:
                    continue
                cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, split=split, seed=seed,
                                  patience=args.patience)
                torch.manual_seed(seed)
                model = make_model(key, ds)
                t0 = time.perf_counter()
                model, history, (_, _, test_rows) = fit(ds, cfg, progress=False, model=model)
                seconds = time.perf_counter() - t0
                m = evaluate(model, ds, test_rows)
                try:
                    latency = onnx_latency_ms(model, ds, test_rows)
                except Exception as e:  # a peer that does not export: say so, keep going
                    print(f"  ({key}: ONNX export failed: {type(e).__name__}: {e})", flush=True)
                    latency = float("nan")
                rec = {"dataset": dname, "model": key, "seed": seed, "epochs": len(history),
                       "best_epoch": int(np.argmin([h["val_total"] for h in history])) + 1,
                       "train_seconds": round(seconds, 1), "params": sum(p.numel() for p in model.parameters()),
                       "onnx_ms_at_500": latency, **{k: v for k, v in m.items() if not k.startswith("loss/")}}
                report["runs"].append(rec)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=2))
                shown = {k: round(v, 4) for k, v in rec.items() if k.startswith(("auc", "rmse"))}
                print(f"{dname:18} {key:14} seed {seed}  {seconds:6.1f}s  {shown}", flush=True)
    return report


def table(report: dict) -> str:
    runs = report["runs"]
    lines = []
    for dname in dict.fromkeys(r["dataset"] for r in runs):
        first = next(r for r in runs if r["dataset"] == dname)
        metrics = [k for k in first if k.startswith(("auc/", "rmse_log1p/"))]
        lines += [f"\n### {dname}\n",
                  "| model | " + " | ".join(metrics) + " | params | train s | ONNX ms @500 | n |",
                  "|---" * (len(metrics) + 5) + "|"]
        for key in dict.fromkeys(r["model"] for r in runs if r["dataset"] == dname):
            rs = [r for r in runs if r["dataset"] == dname and r["model"] == key]
            cells = []
            for k in metrics:
                v = np.array([r[k] for r in rs], dtype=float)
                cells.append(f"{np.nanmean(v):.4f} ± {np.nanstd(v):.4f}")
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {rs[0]['params']:,} | "
                         f"{np.nanmean([r['train_seconds'] for r in rs]):.0f} | "
                         f"{np.nanmean([r['onnx_ms_at_500'] for r in rs]):.2f} | {len(rs)} |")
    seeds = sorted({r["seed"] for r in runs})
    return (f"Mean ± std over seeds {seeds} (test split; n per row in the last column). "
            "AUC: higher is better; RMSE of log1p(label) on "
            f"clicked rows: lower is better.\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="movielens-random,movielens-time,synth")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--out", default="bench/results/quality")
    p.add_argument("--render", action="store_true", help="only re-render the table from the JSON")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the JSON, do the rest")
    args = p.parse_args()
    report = json.loads(Path(args.out).with_suffix(".json").read_text()) if args.render else run(args)
    md = table(report)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(f"# Model quality\n\n{md}")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
