"""The statistics of the quality benchmark (bench/quality.py): seed summaries and paired differences.

* :func:`summary` - mean and *sample* standard deviation (``ddof=1``) over seeds;
* :func:`paired` - the difference ``a - b`` seed by seed, over the seeds both sides have (the same
  seed means the same split and the same initialisation seed), its mean and sample std, and a
  verdict: ``gain`` only when the paired mean is better than zero by more than two paired std,
  ``loss`` when worse by more than two paired std, ``level`` otherwise, ``pending`` with fewer
  than two common seeds. Standard library and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

#: fewest common seeds a paired verdict is stated on
MIN_PAIRS = 2


def summary(values: list[float]) -> dict:
    """``{"n", "mean", "std"}`` of finite values; std is the sample std (ddof=1), NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return {"n": int(len(v)), "mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) >= 2 else math.nan}


def paired(a: Mapping[int, float], b: Mapping[int, float], higher_is_better: bool = True) -> dict:
    """The paired difference ``a - b`` over the seeds present (and finite) in both.

    Returns ``{"seeds", "diffs", "n", "mean", "std", "verdict"}``; the verdict reads the sign with
    ``higher_is_better`` (for an error metric a negative difference is the gain)."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n >= 2 else math.nan
    if n < MIN_PAIRS:
        verdict = "pending"
    else:
        better = mean if higher_is_better else -mean
        verdict = "gain" if better > 2 * std else "loss" if -better > 2 * std else "level"
    return {"seeds": seeds, "diffs": d.tolist(), "n": n, "mean": mean, "std": std, "verdict": verdict}
