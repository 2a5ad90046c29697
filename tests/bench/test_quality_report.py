"""bench/quality.py's bookkeeping without training: run files named by their configuration, the
selection on validation, the seeds of the selected configuration, capped runs left out, pending
cells, and the report written from whatever exists."""

import argparse
import json

import pytest

import bench.quality as q


@pytest.fixture
def args(tmp_path, monkeypatch):
    # the data's identity (content_version, tested below) needs the generated data; bookkeeping does not
    monkeypatch.setattr(q, "data_version", lambda name: "d" * 8)
    monkeypatch.setattr(q, "label_means", lambda args, name: {"rating": {
        k: {"n": 400, "mean": 3.0, "se": 0.05} for k in ("train", "validation", "test")}})
    monkeypatch.setattr(q, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(q, "OUT", tmp_path / "quality")
    return argparse.Namespace(epochs=50, patience=3, batch_size=2048, split_seed=0,
                              models=list(q.MODELS), ablations=list(q.ABLATIONS))


def write(args, model, knobs, seed, val, auc, capped=False):
    cfg = q.run_config(args, "movielens-time", model, knobs)
    path = q.run_path(cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"auc/ctr": auc, "auc/cvr": auc, "auc/ctcvr": auc, "rmse/rating": 1.0, "rmse_log1p/rating": 0.2,
               "mean_label/rating": 3.0, "mean_pred/rating": 3.03, "mean_bias/rating": 0.01,
               "mean_pred_uncalibrated/rating": 2.85, "mean_bias_uncalibrated/rating": -0.05}
    path.write_text(json.dumps({**cfg, "seed": seed, "best_val_total": val, "best_epoch": 50 if capped else 7,
                                "epochs_run": 50 if capped else 10, "capped": capped, "train_seconds": 60.0,
                                "params": 1, "metrics": metrics}))


def test_selection_seeds_pairs_and_pending(args):
    todo = q.plan(args, "movielens-time")
    assert len(todo) == len(q.MODELS) * len(q.GRID) and all(s == 0 for _, s in todo)  # the grid comes first
    for name, knobs in q.GRID.items():  # ple: g2 has the lowest validation loss; rechub-ple: g0
        write(args, "ple", knobs, 0, val=0.5 if name == "g2" else 0.6, auc=0.80)
        write(args, "rechub-ple", knobs, 0, val=0.5 if name == "g0" else 0.6, auc=0.78)
    assert q.selected(args, "movielens-time", "ple")[0] == "g2"
    assert q.selected(args, "movielens-time", "mmoe")[0] is None  # grid incomplete: no selection yet
    todo = [(c, s) for c, s in q.plan(args, "movielens-time") if not q.run_path(c, s).exists()]  # as run() does
    ple_seeds = [s for c, s in todo if c["model"] == "ple" and c["knobs"] == dict(sorted(q.GRID["g2"].items()))]
    assert ple_seeds == [1, 2, 3, 4]  # the selected configuration at seeds 1-4 (seed 0 is the grid run)
    no_bn = [c for c, _ in todo if c["knobs"].get("batch_norm") is False and c["model"] == "ple"]
    assert no_bn and no_bn[0]["knobs"]["lr"] == q.GRID["g2"]["lr"]  # ablations ride on the selection
    for s, d in zip(range(1, 5), (0.010, 0.012, 0.011, 0.013), strict=True):
        write(args, "ple", q.GRID["g2"], s, val=0.5, auc=0.80 + d)
        write(args, "rechub-ple", q.GRID["g0"], s, val=0.5, auc=0.80, capped=(s == 4))
    rep = q.aggregate(args)
    d = rep["datasets"]["movielens-time"]
    assert d["selected"]["ple"] == "g2" and d["selected"]["mmoe"] is None
    assert d["variants"]["ple"]["summary"]["auc/ctr"]["n"] == 5
    assert d["variants"]["rechub-ple"]["capped_seeds"] == [4]
    row = next(r for r in d["comparisons"] if (r["a"], r["b"]) == ("ple", "rechub-ple"))
    ctr = row["metrics"]["auc/ctr"]
    assert ctr["seeds"] == [0, 1, 2, 3]  # seed 4's peer run is capped: left out
    assert ctr["diffs"] == pytest.approx([0.02, 0.01, 0.012, 0.011]) and ctr["verdict"] == "gain"
    q.report_files(rep)
    md = (q.OUT.with_suffix(".md")).read_text()
    assert "pending" in md and "| ple | g2 |" in md and "capped: seeds [4]" in md
    assert " pending, estimated " in md and "the grid is complete" not in md
    # the regression output as an expected value: served and uncorrected bias per model
    assert "| ple | 3.0000 ± 0.0000 | 3.0300 ± 0.0000 | 0.0100 ± 0.0000 | 2.8500 ± 0.0000 | -0.0500 ± 0.0000 |" in md
    assert "| mmoe | pending | pending | pending | pending | pending |" in md
    assert "test 3 ± 0.05 (n=400). The test mean's own standard error is 1.7% of it" in md


def test_data_version_is_the_rows_and_spec_training_reads(tmp_path):
    import pandas as pd
    import yaml

    from training.data.synth import SynthConfig, generate

    root = tmp_path / "synth"
    generate(root, SynthConfig(n_users=40, n_items=60, n_exposures=400, seed=3), progress=False)
    v = q.content_version(root)
    # the same rows written again (a new file, a new writer) and a serving-only annotation: the same data
    table = next(root.glob("*.parquet"))
    pd.read_parquet(table).to_parquet(table, index=False)
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    seq = next(f for f in spec["features"] if f["kind"] == "sequence" and f["entity"] == "user")
    seq["event"] = "conversion" if seq.get("event") == "click" else "click"
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    assert q.content_version(root) == v
    # one value changed: other data
    df = pd.read_parquet(table)
    col = next(c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]))
    df.loc[0, col] = df.loc[0, col] + 1
    df.to_parquet(table, index=False)
    assert q.content_version(root) != v


def test_label_means_are_the_clicked_rows_of_each_split(tmp_path, monkeypatch):
    import numpy as np

    from training.data.synth import SynthConfig, generate

    root = tmp_path / "synth"
    generate(root, SynthConfig(n_users=40, n_items=60, n_exposures=2_000, seed=3), progress=False)
    monkeypatch.setattr(q, "built", lambda name: root)
    args = argparse.Namespace(split_seed=0)
    wt = q.label_means(args, "synth")["watch_time"]
    ds = q.load_dataset("synth")
    clicked = ds.label("click", np.arange(len(ds))) > 0
    assert sum(s["n"] for s in wt.values()) == clicked.sum()  # every clicked row in exactly one split
    test_rows = ds.split("random", (0.8, 0.1, 0.1), 0)[2]
    y = ds.label("watch_time", test_rows)[ds.label("click", test_rows) > 0].astype(float)
    assert wt["test"]["n"] == len(y) and wt["test"]["mean"] == pytest.approx(y.mean())
    assert wt["test"]["se"] == pytest.approx(y.std(ddof=1) / np.sqrt(len(y)))
