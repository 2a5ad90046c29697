"""The quality benchmark's statistics (bench/quality_stats.py): sample std, paired differences over
common seeds, and the two-paired-std rule for calling a difference a gain."""

import math

import numpy as np
import pytest

from bench.quality_stats import paired, summary


def test_summary_is_the_sample_std():
    s = summary([1.0, 2.0, 3.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)  # ddof=1, NaN dropped
    assert math.isnan(summary([5.0])["std"]) and summary([])["n"] == 0


def test_paired_uses_common_seeds_only():
    a = {0: 0.80, 1: 0.81, 2: 0.82, 3: 0.90}
    b = {0: 0.79, 1: 0.80, 2: 0.80, 4: 0.10}
    r = paired(a, b)
    assert r["seeds"] == [0, 1, 2] and r["n"] == 3
    d = np.array([0.01, 0.01, 0.02])
    assert r["mean"] == pytest.approx(d.mean()) and r["std"] == pytest.approx(d.std(ddof=1))
    assert r["verdict"] == "gain"  # 0.0133 > 2 * 0.0058


def test_verdicts():
    # the example: per-seed differences -0.0016 / +0.0038 / +0.0039 are not a gain
    assert paired({0: -0.0016, 1: 0.0038, 2: 0.0039}, {0: 0, 1: 0, 2: 0})["verdict"] == "level"
    assert paired({0: 0.5, 1: 0.6}, {0: 0.7, 1: 0.8})["verdict"] == "loss"
    # an error metric: lower is better, so a negative difference is the gain
    assert paired({0: 0.90, 1: 0.91, 2: 0.90}, {0: 1.0, 1: 1.0, 2: 1.01}, higher_is_better=False)["verdict"] == "gain"
    assert paired({0: 1.0}, {0: 0.0})["verdict"] == "pending"  # one common seed says nothing
    assert paired({0: 1.0, 1: float("nan")}, {0: 0.0, 1: 0.0})["verdict"] == "pending"
    assert paired({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})["verdict"] == "level"
