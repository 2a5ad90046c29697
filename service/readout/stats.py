"""The statistics of the readout, at the user level (users are what is randomised).

* **Ratio metrics** (CTR at k, conversion rate, watch seconds per shown item): per user, the sum of
  the numerator and of the denominator; the variant's value is sum(y) / sum(x) and its variance
  comes from the **delta method** over the users (Deng et al., "Applying the Delta Method in Metric
  Analytics", 2018)::

      var(R) ~= (var(y) - 2 R cov(x, y) + R^2 var(x)) / (n mean(x)^2)

  The relative lift of treatment over control, L = R_t / R_c - 1, has (independent groups)
  se(L) ~= (R_t / R_c) sqrt(var(R_t) / R_t^2 + var(R_c) / R_c^2); intervals are normal, 95 %.
* **AUC** (per task, over the shown candidates): a **user-level bootstrap**: users are resampled
  with replacement (each replicate weights a user's rows by how often it was drawn); the interval
  is the 2.5-97.5 percentile of the replicates, and the lift's interval the percentiles of the
  ratio of independent replicates of the two variants.
* **Sample-ratio mismatch**: Pearson's chi-square of the users per variant against the shares
  the routing config assigns (scipy); a p-value under 0.001 is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)
SRM_ALPHA = 1e-3


@dataclass(frozen=True)
class Estimate:
    """A value with its 95 % interval (NaN where it cannot be computed)."""

    value: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def covers(self, x: float) -> bool:
        return self.lo <= x <= self.hi


NAN = Estimate(math.nan, math.nan, math.nan)


def ratio(y: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(sum(y) / sum(x), its variance by the delta method) over users (one entry per user)."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2 or x.sum() <= 0:
        return math.nan, math.nan
    r = y.sum() / x.sum()
    mx = x.mean()
    cov = np.cov(y, x, ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * mx * mx)
    return float(r), float(max(var, 0.0))


def ratio_estimate(y: np.ndarray, x: np.ndarray) -> Estimate:
    r, var = ratio(y, x)
    se = math.sqrt(var) if var == var else math.nan
    return Estimate(r, r - Z95 * se, r + Z95 * se)


def ratio_lift(y_t: np.ndarray, x_t: np.ndarray, y_c: np.ndarray, x_c: np.ndarray) -> Estimate:
    """Relative lift R_t / R_c - 1 with its delta-method interval."""
    rt, vt = ratio(y_t, x_t)
    rc, vc = ratio(y_c, x_c)
    if not (rc > 0) or math.isnan(rt):
        return NAN
    q = rt / rc
    se = q * math.sqrt(vt / rt ** 2 + vc / rc ** 2) if rt > 0 else math.nan
    return Estimate(q - 1, q - 1 - Z95 * se, q - 1 + Z95 * se)


class AUCSampler:
    """Weighted AUC of fixed scores and labels, fast under changing row weights (the bootstrap):
    the rows are sorted and grouped by score once; each AUC is then O(rows)."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray, users: np.ndarray):
        s = np.asarray(scores, dtype=np.float64)
        ok = np.isfinite(s)
        self.s, self.y = s[ok], (np.asarray(labels)[ok] > 0).astype(np.float64)
        _, self.group = np.unique(self.s, return_inverse=True)  # ascending scores; ties share a group
        self.n_groups = int(self.group.max()) + 1 if len(self.s) else 0
        _, self.user = np.unique(np.asarray(users)[ok], return_inverse=True)
        self.n_users = int(self.user.max()) + 1 if len(self.s) else 0

    def auc(self, user_weights: np.ndarray | None = None) -> float:
        w = np.ones(len(self.s)) if user_weights is None else user_weights[self.user]
        pos = np.bincount(self.group, w * self.y, self.n_groups)
        neg = np.bincount(self.group, w * (1 - self.y), self.n_groups)
        p, n = pos.sum(), neg.sum()
        if p <= 0 or n <= 0:
            return math.nan
        below = np.cumsum(neg) - neg  # negatives with a strictly lower score
        return float((pos * (below + 0.5 * neg)).sum() / (p * n))

    def replicates(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """AUCs of ``n`` user-level bootstrap resamples."""
        if self.n_users == 0:
            return np.full(n, math.nan)
        out = np.empty(n)
        for b in range(n):
            counts = np.bincount(rng.integers(0, self.n_users, self.n_users), minlength=self.n_users)
            out[b] = self.auc(counts.astype(np.float64))
        return out


def percentile_estimate(value: float, replicates: np.ndarray) -> Estimate:
    reps = replicates[np.isfinite(replicates)]
    if math.isnan(value) or len(reps) < 10:
        return Estimate(value, math.nan, math.nan)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return Estimate(value, float(lo), float(hi))


@dataclass(frozen=True)
class SRM:
    chi2: float
    p: float
    observed: dict[str, int]
    expected: dict[str, float]  # users

    @property
    def mismatch(self) -> bool:
        return self.p < SRM_ALPHA


def srm(observed: Mapping[str, int], shares: Mapping[str, float]) -> SRM | None:
    """Chi-square test of users per variant against the configured shares (variants with a share
    only; None with fewer than two)."""
    from scipy.stats import chisquare

    names = [v for v in shares if shares[v] > 0]
    if len(names) < 2:
        return None
    obs = np.array([observed.get(v, 0) for v in names], dtype=np.float64)
    total_share = sum(shares[v] for v in names)
    exp = np.array([shares[v] / total_share for v in names]) * obs.sum()
    if obs.sum() == 0:
        return None
    chi2, p = chisquare(obs, exp)
    return SRM(float(chi2), float(p), {v: int(o) for v, o in zip(names, obs, strict=True)},
               {v: float(e) for v, e in zip(names, exp, strict=True)})
