"""``mtrank ab report``: per-variant metrics with 95 % intervals, lifts against control, and the
sample-ratio-mismatch test, from a labelled candidate frame (:func:`service.readout.join.label`).

Metrics, over the candidates *shown* (returned at positions below ``k``) of the requests the
prediction log sampled, forced-variant requests left out:

* ``ctr@k``: clicked shown items / shown items; ``cvr@k``: converted / shown; ``watch_s``: watch
  seconds / shown items (delta method over users, see :mod:`service.readout.stats`);
* ``auc:<task>``: the AUC of the task's score against its outcome over the shown candidates
  (user-level bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from service.readout import stats
from service.readout.join import DEFAULT_TASK_EVENTS
from service.readout.stats import NAN, SRM, Estimate

RATIOS = (("ctr", "click"), ("cvr", "conversion"), ("watch_s", "watch"))


@dataclass
class VariantResult:
    name: str
    users: int
    requests: int
    shown: int
    metrics: dict[str, Estimate] = field(default_factory=dict)
    lifts: dict[str, Estimate] = field(default_factory=dict)  # relative, against control (empty for control)


@dataclass
class Report:
    k: int
    control: str
    variants: list[VariantResult]
    srm: SRM | None
    forced_requests: int
    bootstrap: int
    notes: list[str] = field(default_factory=list)

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for v in self.variants:
            names.extend(m for m in v.metrics if m not in names)
        return names


def metric_name(base: str, k: int) -> str:
    return f"{base}@{k}" if base in ("ctr", "cvr") else base


def build(frame: pd.DataFrame, k: int = 10, control: str | None = None, shares: Mapping[str, float] | None = None,
          task_events: Mapping[str, str] = DEFAULT_TASK_EVENTS, bootstrap: int = 500, seed: int = 0) -> Report:
    """The report of a labelled candidate frame; ``shares``: variant -> configured share of users."""
    forced = int(frame.loc[frame["forced"], "rid"].nunique())
    df = frame[~frame["forced"]]
    present = sorted(df["variant"].unique().tolist())
    order = [v for v in (shares or {}) if v in present] + [v for v in present if v not in (shares or {})]
    if not order:
        raise ValueError("no (unforced) requests in the prediction log to report on")
    control = control or order[0]
    if control not in order:
        raise ValueError(f"control variant {control!r} has no requests; variants: {order}")
    rng = np.random.default_rng(seed)
    shown = df[(df["pos"] >= 0) & (df["pos"] < k)]
    tasks = [c[2:] for c in df.columns if c.startswith("s:") and c[2:] in task_events]
    per_user: dict[str, pd.DataFrame] = {}
    reps: dict[tuple[str, str], np.ndarray] = {}
    results = []
    for name in order:
        part = df[df["variant"] == name]
        sh = shown[shown["variant"] == name]
        users = pd.Index(part["user"].unique())
        agg = sh.groupby("user").agg(x=("item", "size"), click=("click", "sum"), conversion=("conversion", "sum"),
                                     watch=("watch", "sum")).reindex(users, fill_value=0)
        per_user[name] = agg
        res = VariantResult(name, users=len(users), requests=int(part["rid"].nunique()), shown=len(sh))
        for base, col in RATIOS:
            res.metrics[metric_name(base, k)] = stats.ratio_estimate(agg[col].to_numpy(), agg["x"].to_numpy())
        for task in tasks:
            sampler = stats.AUCSampler(sh[f"s:{task}"].to_numpy(), sh[task_events[task]].to_numpy(),
                                       sh["user"].to_numpy())
            r = sampler.replicates(bootstrap, rng)
            reps[(name, task)] = r
            res.metrics[f"auc:{task}"] = stats.percentile_estimate(sampler.auc(), r)
        results.append(res)
    ctl = per_user[control]
    for res in results:
        if res.name == control:
            continue
        agg = per_user[res.name]
        for base, col in RATIOS:
            res.lifts[metric_name(base, k)] = stats.ratio_lift(agg[col].to_numpy(), agg["x"].to_numpy(),
                                                               ctl[col].to_numpy(), ctl["x"].to_numpy())
        for task in tasks:
            a_t = res.metrics.get(f"auc:{task}", NAN).value
            a_c = next(r for r in results if r.name == control).metrics.get(f"auc:{task}", NAN).value
            if (res.name, task) in reps and (control, task) in reps and a_c > 0:
                ratio = reps[(res.name, task)] / reps[(control, task)] - 1
                res.lifts[f"auc:{task}"] = stats.percentile_estimate(a_t / a_c - 1, ratio)
    observed = {r.name: r.users for r in results}
    srm = stats.srm(observed, shares) if shares else None
    report = Report(k=k, control=control, variants=results, srm=srm, forced_requests=forced, bootstrap=bootstrap)
    if srm is not None and srm.mismatch:
        report.notes.append(f"SAMPLE RATIO MISMATCH: users per variant {srm.observed} against the configured split "
                            f"(expected {({v: round(e) for v, e in srm.expected.items()})}): chi-square "
                            f"{srm.chi2:.1f}, p = {srm.p:.2g} < {stats.SRM_ALPHA}. Do not trust the lifts until "
                            "the cause (assignment, logging, a crashing variant) is found.")
    return report


# -- output ---------------------------------------------------------------------------------------------

def _num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def _est(e: Estimate, pct: bool = False) -> str:
    if math.isnan(e.value):
        return "n/a"
    f = (lambda v: "n/a" if math.isnan(v) else f"{v * 100:+.2f}%") if pct else _num
    return f"{f(e.value)} [{f(e.lo)}, {f(e.hi)}]"


def table(report: Report) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per variant, its metrics, then one row per treatment of lifts."""
    names = report.metric_names
    header = ["variant", "users", "requests", *names]
    rows = [[v.name, str(v.users), str(v.requests), *[_est(v.metrics.get(m, NAN)) for m in names]]
            for v in report.variants]
    for v in report.variants:
        if v.name != report.control:
            rows.append([f"lift {v.name} vs {report.control}", "", "",
                         *[_est(v.lifts.get(m, NAN), pct=True) for m in names]])
    return header, rows


def _summary(report: Report) -> list[str]:
    lines = [f"shown = returned at positions < {report.k}; 95% intervals at the user level: delta method for "
             f"ctr/cvr/watch_s, user bootstrap ({report.bootstrap} resamples) for auc"]
    if report.srm is not None:
        s = report.srm
        lines.append(f"sample ratio: users {s.observed}, expected {({v: round(e) for v, e in s.expected.items()})}, "
                     f"chi-square {s.chi2:.2f}, p = {s.p:.3g}" + (" -> MISMATCH" if s.mismatch else " (ok)"))
    lines.append(f"forced-variant requests left out: {report.forced_requests}")
    return lines + report.notes


def text(report: Report) -> str:
    header, rows = table(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), "  ".join("-" * w for w in widths), *[fmt.format(*r) for r in rows]]
    return "\n".join(out + [""] + _summary(report)) + "\n"


def markdown(report: Report) -> str:
    header, rows = table(report)
    out = ["# A/B readout", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [""] + [f"- {line}" for line in _summary(report)]
    return "\n".join(out) + "\n"


def plot(report: Report, path: str | Path) -> None:
    """A PNG: one panel per metric, each treatment's relative lift with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report.metric_names
    treatments = [v for v in report.variants if v.name != report.control]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.2 + 0.9 * len(names) * max(1, len(treatments)) ** 0.5),
                             squeeze=False)
    for ax, m in zip(axes[:, 0], names, strict=True):
        for i, v in enumerate(treatments):
            e = v.lifts.get(m, NAN)
            if math.isnan(e.value):
                continue
            lo = e.value - e.lo if not math.isnan(e.lo) else 0
            hi = e.hi - e.value if not math.isnan(e.hi) else 0
            ax.errorbar([e.value * 100], [i], xerr=[[lo * 100], [hi * 100]], fmt="o", capsize=4,
                        color="tab:green" if e.excludes_zero and e.value > 0 else
                        "tab:red" if e.excludes_zero else "tab:gray")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(treatments)), [v.name for v in treatments])
        ax.set_ylim(-0.7, len(treatments) - 0.3)
        ax.set_title(m, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(f"relative lift vs {report.control}, % (95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
