"""Smoke test of the watch-time bias benchmark: `bench/watch_time_bias.py --quick` end to end (small
synthetic data, two seeds through training.train.train), output into a temp dir. Asserts that
each run's figures are the bundle's report and the split means they are read against, not a bias
level (the quick model is barely trained)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_watch_time_bias_benchmark_quick(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "bench/watch_time_bias.py", "--quick", "--threads", "1", "--workdir",
                        str(tmp_path / "work"), "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=280)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    rep = json.loads((out / "watch_time_bias.json").read_text())
    assert [run["seed"] for run in rep["runs"]] == [0, 1]
    for run in rep["runs"]:
        test = run["label_means"]["test"]
        assert run["mean_label"] == pytest.approx(test["mean"], rel=1e-6)  # the report's rows are the split's
        assert run["mean_bias"] == pytest.approx(run["mean_pred"] / run["mean_label"] - 1, rel=1e-6)
        assert run["mean_bias_uncalibrated"] < run["mean_bias"]  # the correction raises the geometric-mean estimate
        assert 0 < run["test_mean_rel_se"] < 1 and test["n"] < run["label_means"]["train"]["n"]
    assert rep["target"]["threshold"] == 0.05
    assert rep["target"]["value"] == pytest.approx(max(abs(x["mean_bias"]) for x in rep["runs"]))
    assert "served bias" in (out / "watch_time_bias.md").read_text()
