"""Issue 15 item 4, the readout's statistics on synthetic logs with a known truth: intervals cover
the true lift in most seeds, an A/A test shows no sample-ratio mismatch and intervals covering 0,
a 55/45 split against a configured 50/50 is flagged, and the AUC is the AUC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from service.readout import report, stats
from service.readout.join import candidates

K = 5


def synthetic(seed: int, users: dict[str, int], lift: float = 0.0, base_ctr: float = 0.1) -> pd.DataFrame:
    """A labelled candidate frame: users with their own CTR (beta), a few requests of K shown items
    each; the treatment 'B' multiplies every user's click probability by 1 + lift. The ctr score is
    informative (the true probability plus noise)."""
    rng = np.random.default_rng(seed)
    frames = []
    for variant, n_users in users.items():
        p_user = rng.beta(2, 2 / base_ctr - 2, n_users) * (1 + lift if variant == "B" else 1.0)
        n_req = rng.integers(1, 6, n_users)
        user = np.repeat(np.arange(n_users), n_req * K)
        p = p_user[user]
        click = (rng.random(len(p)) < p).astype(float)
        rid = np.repeat(np.arange(n_req.sum()), K)
        frames.append(pd.DataFrame({
            "rid": [f"{variant}-{r}" for r in rid], "ts": 0, "user": [f"{variant}-{u}" for u in user],
            "variant": variant, "forced": False, "pos": np.tile(np.arange(K), n_req.sum()),
            "item": [f"i{j}" for j in range(len(p))], "score": p, "s:ctr": p + rng.normal(0, 0.05, len(p)),
            "click": click, "conversion": click * (rng.random(len(p)) < 0.2),
            "watch": click * rng.exponential(30, len(p)),
        }))
    return pd.concat(frames, ignore_index=True)


def test_intervals_cover_the_true_lift_in_most_seeds():
    covered, excluded_zero = 0, 0
    seeds = range(40)
    for seed in seeds:
        rep = report.build(synthetic(seed, {"A": 1500, "B": 1500}, lift=0.15), k=K, task_events={}, seed=seed)
        e = rep.variant("B").lifts[f"ctr@{K}"]
        covered += e.covers(0.15)
        excluded_zero += e.lo > 0
    assert covered >= 34, f"95% intervals covered the true lift in {covered}/40 seeds"
    assert excluded_zero >= 20, f"a 15% lift was detected in only {excluded_zero}/40 seeds"


def test_a_a_shows_no_srm_and_intervals_covering_zero():
    shares = {"A": 0.5, "B": 0.5}
    covering = 0
    for seed in range(10):
        rep = report.build(synthetic(100 + seed, {"A": 1000, "B": 1000}), k=K, shares=shares, bootstrap=60,
                           seed=seed)
        assert rep.srm is not None and not rep.srm.mismatch, rep.srm
        lifts = rep.variant("B").lifts
        covering += all(lifts[m].covers(0.0) for m in (f"ctr@{K}", f"cvr@{K}", "watch_s", "auc:ctr"))
    assert covering >= 7, f"A/A: every interval covered 0 in only {covering}/10 seeds"


def test_a_55_45_split_is_flagged_as_srm():
    rep = report.build(synthetic(7, {"A": 2200, "B": 1800}), k=K, shares={"A": 0.5, "B": 0.5}, bootstrap=50)
    assert rep.srm is not None and rep.srm.mismatch and rep.srm.p < 1e-3
    assert rep.srm.observed == {"A": 2200, "B": 1800}
    assert any("SAMPLE RATIO MISMATCH" in n for n in rep.notes)
    assert "MISMATCH" in report.text(rep) and "MISMATCH" in report.markdown(rep)
    # the same counts against the split they came from are fine
    assert not report.build(synthetic(7, {"A": 2200, "B": 1800}), k=K, shares={"A": 0.55, "B": 0.45},
                            bootstrap=50).srm.mismatch


def test_auc_is_the_auc_and_bootstrap_reweights_users():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    s = np.round(rng.random(3000), 2)  # ties
    y = (rng.random(3000) < s).astype(int)
    users = rng.integers(0, 200, 3000)
    sampler = stats.AUCSampler(s, y, users)
    assert sampler.auc() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    w = rng.integers(0, 3, 200).astype(float)
    keep = np.repeat(np.arange(3000), w[np.unique(users, return_inverse=True)[1]].astype(int))
    assert sampler.auc(w) == pytest.approx(roc_auc_score(y[keep], s[keep]), abs=1e-12)
    reps = sampler.replicates(200, np.random.default_rng(0))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert lo < sampler.auc() < hi and hi - lo < 0.08


def test_delta_method_matches_the_user_bootstrap():
    rng = np.random.default_rng(11)
    x = rng.integers(1, 30, 2000).astype(float)
    y = rng.binomial(x.astype(int), rng.beta(2, 18, 2000)).astype(float)
    r, var = stats.ratio(y, x)
    boot = [y[i].sum() / x[i].sum() for i in (rng.integers(0, 2000, 2000) for _ in range(400))]
    assert np.sqrt(var) == pytest.approx(np.std(boot), rel=0.2)


def test_forced_requests_are_left_out():
    df = synthetic(5, {"A": 300, "B": 300})
    forced = synthetic(6, {"B": 200}, lift=2.0).assign(forced=True)
    forced["rid"] = "f-" + forced["rid"]
    rep = report.build(pd.concat([df, forced], ignore_index=True), k=K, bootstrap=50)
    clean = report.build(df, k=K, bootstrap=50)
    assert rep.forced_requests == forced["rid"].nunique()
    assert rep.variant("B").users == 300 and rep.variant("B").requests == clean.variant("B").requests
    assert rep.variant("B").metrics[f"ctr@{K}"] == clean.variant("B").metrics[f"ctr@{K}"]


def test_candidates_frame_from_records():
    recs = [{"v": 2, "rid": "r1", "ts": 5, "user": "p1", "variant": "A", "forced": False, "items": ["a", "b", "c"],
             "score": [0.1, 0.9, 0.5], "scores": {"ctr": [0.2, 0.8, 0.4]}, "top": [1, 2]},
            {"v": 2, "rid": "r2", "ts": 6, "user": "p2", "variant": "B", "forced": True, "items": ["d"],
             "score": [0.3], "scores": {"ctr": [0.3], "cvr": [0.1]}, "top": [0]}]
    df = candidates(recs)
    assert df["item"].tolist() == ["a", "b", "c", "d"] and df["pos"].tolist() == [-1, 0, 1, 0]
    assert df["s:ctr"].tolist() == [0.2, 0.8, 0.4, 0.3]
    assert df["s:cvr"].isna().tolist() == [True, True, True, False]
    assert df["forced"].tolist() == [False, False, False, True]
    top = candidates(recs, returned_only=True)
    assert top["item"].tolist() == ["b", "c", "d"] and top["pos"].tolist() == [0, 1, 0]
    assert top["score"].tolist() == [0.9, 0.5, 0.3] and top["s:ctr"].tolist() == [0.8, 0.4, 0.3]
