"""Report of the serving benchmark: the issue's target ratios (:func:`targets`) and the Markdown
rendering of the JSON report (:func:`render`)."""

from __future__ import annotations

import math
import re

from bench.common import md_table
from bench.serving import overload
from bench.serving.assets import MODEL_CFG
from bench.serving.systems import ALL_SYSTEMS
from service.ranking import STAGES


def short_reason(e: BaseException | str | None) -> str:
    """One line out of an exception (or a traceback): its type and first line."""
    text = str(e).strip() if e is not None else "unknown"
    first = text.splitlines()[0] if text else "unknown"
    return (f"{type(e).__name__}: " if isinstance(e, BaseException) else "") + first[:300]


def _f(v, d=0):
    if v is None:
        return "n/a"
    return f"{v:,.{d}f}"


def _best(cells, system, n, max_p99=None):
    rows = [c for c in cells if c["system"] == system and c["n"] == n and c.get("rps")
            and (max_p99 is None or (c.get("p99_ms") is not None and c["p99_ms"] <= max_p99))]
    return max(rows, key=lambda c: c["rps"]) if rows else None


def _cell(cells, system, n, c):
    return next((x for x in cells if x["system"] == system and x["n"] == n and x["c"] == c), None)


def targets(report: dict, n: int, p99_bound: float | None) -> list[dict]:
    """The issue's targets at N = ``n``: value, threshold and pass (None when a system did not run)."""
    cells = report["cells"]
    out = []

    def add(name, value, op, threshold, detail):
        ok = None
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            ok = value >= threshold if op == ">=" else value <= threshold
        out.append({"target": name, "value": value, "op": op, "threshold": threshold, "pass": ok, "detail": detail})

    floor = _cell(cells, "floor", n, 1)
    ours_best = _best(cells, "ours", n)
    f2 = floor["rps_x2"] if floor else None
    add(f"fp32 throughput / (2 x floor) at N={n}", ours_best["rps"] / f2 if ours_best and f2 else None, ">=", 0.9,
        f"ours {_f(ours_best and ours_best['rps'])} req/s (c={ours_best and ours_best['c']}), "
        f"floor x2 {_f(f2)} req/s")
    c1 = _cell(cells, "ours", n, 1)
    add(f"p50 at c=1 / floor p50 at N={n}", c1["p50_ms"] / floor["p50_ms"] if c1 and floor else None, "<=", 1.15,
        f"ours {_f(c1 and c1['p50_ms'], 2)} ms, floor {_f(floor and floor['p50_ms'], 2)} ms")
    conc = sorted({x["c"] for x in cells if x["system"] == "ours"})
    cmid = 8 if 8 in conc else (conc[len(conc) // 2] if conc else 8)
    c8 = _cell(cells, "ours", n, cmid)
    add(f"p99 / p50 at c={cmid}, N={n}", c8["p99_ms"] / c8["p50_ms"] if c8 else None, "<=", 3.0,
        f"p99 {_f(c8 and c8['p99_ms'], 1)} ms, p50 {_f(c8 and c8['p50_ms'], 1)} ms")
    naive_best = _best(cells, "naive", n)
    bound = p99_bound if p99_bound else (naive_best["p99_ms"] if naive_best else None)
    ours_b = _best(cells, "ours", n, bound) if bound else None
    naive_b = _best(cells, "naive", n, bound) if bound else None
    add(f"ours / naive throughput at p99 <= {_f(bound, 0)} ms, N={n}",
        (ours_b["rps"] if ours_b else 0.0) / naive_b["rps"] if naive_b else None, ">=", 3.0,
        f"ours {_f(ours_b and ours_b['rps'])} req/s (c={ours_b and ours_b['c']}), naive "
        f"{_f(naive_b and naive_b['rps'])} req/s (c={naive_b and naive_b['c']}); bound = "
        + ("--p99-bound-ms" if p99_bound else "naive's p99 at its best throughput"))
    i8s = [x for x in (_best(cells, "ours-int8", n), _best(cells, "ours-int8-col", n)) if x]
    i8 = max(i8s, key=lambda x: x["rps"]) if i8s else None
    unsplit = _cell(cells, "floor-unsplit", n, 1)
    base = unsplit or floor
    b2 = base["rps_x2"] if base else None
    add(f"int8 + user side once throughput / fp32 floor x2 at N={n}", i8["rps"] / b2 if i8 and b2 else None, ">=",
        2.5, (f"{i8['system']} {_f(i8['rps'])} req/s (c={i8['c']}; each int8 system at its best: "
              + ", ".join(f"{x['system']} {_f(x['rps'])}" for x in i8s) + f"), {base['system']} x2 {_f(b2)} req/s"
              + ("" if unsplit else " (the floor's bundle already has the split: no unsplit baseline)")) if i8 and base
        else "n/a: no int8 variant ran")
    if unsplit and floor:
        add(f"user side once, in-process: floor / floor-unsplit throughput at N={n}", floor["rps"] / unsplit["rps"],
            ">=", 1.0, f"{_f(floor['rps'], 1)} vs {_f(unsplit['rps'], 1)} /s; export "
            f"{report.get('export', {}).get('commit', '')[:10]}")
    fi8 = _cell(cells, "floor-int8", n, 1)
    if fi8 and base:
        add(f"int8 + user side once, in-process: floor-int8 / {base['system']} throughput at N={n}",
            fi8["rps"] / base["rps"], ">=", 2.5, f"{_f(fi8['rps'], 1)} vs {_f(base['rps'], 1)} /s (single process)")
    q = report.get("model", {}).get("quality", {}) or {}
    d = q.get("delta")
    worst = max((abs(v) for v in d.values() if v == v), default=None) if d else None
    recorded = ((report.get("model", {}).get("precisions") or {}).get("int8") or {}).get("auc_delta")
    add("int8 AUC |delta| vs fp32, test split", worst, "<=", 0.001,
        (", ".join(f"{k} {v:+.4f}" for k, v in d.items()) + f" ({q.get('rows', 0):,} rows, onnxruntime, "
         f"{q.get('batch_rows')} rows a batch)" if d else f"n/a: no int8 AUCs ({q.get('int8_error', 'not scored')})")
        + (f"; the manifest records {', '.join(f'{k} {v:+.4f}' for k, v in recorded.items())}" if recorded else ""))
    mem = report.get("memory", {}).get("ours")
    if mem and mem.get("budget_mb"):
        worst_rss = max(mem["after"]["rss_mb_per_worker"] or [0])
        add("RSS per worker / (model + cache budget)", worst_rss / mem["budget_mb"], "<=", 1.5,
            f"{worst_rss:.0f} MB vs model {mem['model_mb']:.1f} MB + cache {mem['cache_budget_mb']:.1f} MB")
        if mem.get("runtime_baseline_mb"):
            above = worst_rss - mem["runtime_baseline_mb"]
            add("(RSS - bare runtime) / (model + cache budget)", above / mem["budget_mb"], "<=", 1.5,
                f"{above:.0f} MB above a bare interpreter with the service imported "
                f"({mem['runtime_baseline_mb']:.0f} MB)")
    for name, value, threshold, detail in overload.targets(report.get("overload")):
        add(name, value, ">=", threshold, detail)
    soak = report.get("soak")
    if soak and soak.get("growth_mb") is not None:
        add(f"RSS growth over a {soak['seconds']:.0f} s soak (last vs first window)", soak["growth_mb"], "<=",
            soak["allowed_growth_mb"], f"first {soak['first_mb']:.1f} MB, last {soak['last_mb']:.1f} MB per worker "
            f"(max over workers), {soak.get('rps', 0):.0f} req/s")
    return out


def render_cluster_read(cr: dict | None) -> list[str]:
    """The headline rows of ``bench/cluster_read.py``'s run (its whole report: ``cluster_read.md``)."""
    if not cr:
        return []
    rows = []
    for n, size in cr["results"]["sizes"].items():
        reads = size["reads"]
        single = reads["single"]
        for store in ("single", "cluster"):
            r = reads[store]
            rows.append([f"1 + {int(n):,}", store, r["p50_ms"], r["p99_ms"], r["p50_ms"] / single["p50_ms"],
                         r["p99_ms"] / single["p99_ms"], r["client_cpu_ms"]])
    return ["", "## Cluster read (bench/cluster_read.py, same run)", "",
            f"Key layout version {cr['key_layout_version']}, {cr['item_groups']} item groups; wall ms around "
            "`FeatureStore.mget` on a 3-master Redis Cluster and a single Redis on this machine (the breakdown and "
            "the comparisons: [cluster_read.md](cluster_read.md)). Target: cluster p50 within 1.5x of the single "
            "Redis.", "",
            md_table(["read", "store", "p50", "p99", "p50 / single", "p99 / single", "client CPU"], rows,
                     digits=[0, 0, 3, 3, 2, 2, 3])]


def render(report: dict) -> str:
    m, g = report["machine"], report["git"]
    lines = [f"# Serving benchmark ({report['mode']})", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; "
             f"load average at start {', '.join(f'{x:.2f}' for x in report['loadavg_start'])}, "
             f"at end {', '.join(f'{x:.2f}' for x in report.get('loadavg_end', [0, 0, 0]))}",
             f"- commit {g['commit'][:12]}{' (dirty)' if g['dirty'] else ''} \"{g['subject']}\"; export code "
             f"{report['export']['commit'][:12]} ({report['export']['date']}) \"{report['export']['subject']}\"",
             f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
             f"- {report['started_at']}, {report['seconds']:.0f} s in all; "
             f"{report['args']['duration']:.0f} s per cell after {report['args']['warmup']:.0f} s warm-up per "
             f"server and N; {report['args']['bodies']} request bodies per N (Zipf {report['args']['zipf']})"]
    d, mo = report["data"], report["model"]
    lines.append(f"- data: {d['synth_config']['n_users']:,} users, {d['synth_config']['n_items']:,} items; schema "
                 f"{d['schema']['fields']['sparse']} sparse (emb {d['schema']['embedding_dim']}), "
                 f"{d['schema']['fields']['dense']} dense, {d['schema']['fields']['sequence']} sequences")
    lines.append(f"- model: PLE {MODEL_CFG}, {mo['parameters']:,} parameters, model.onnx "
                 f"{mo['files'].get('model.onnx', 0) / 2 ** 20:.1f} MB"
                 + (f", model.int8.onnx {mo['files']['model.int8.onnx'] / 2 ** 20:.1f} MB"
                    if "model.int8.onnx" in mo["files"] else "")
                 + f"; trained 1 epoch on {mo['train_rows']:,} rows in {mo['train_seconds']:.0f} s")
    lines.append("")
    lines.append("## Systems")
    lines.append("")
    for name in sorted(report["systems"], key=lambda x: ALL_SYSTEMS.index(x) if x in ALL_SYSTEMS else 99):
        s = report["systems"][name]
        lines.append(f"- **{name}**: " + (s.get("description", "") if s.get("ran") else f"n/a ({s.get('reason')})"))
    lines += ["", "## Targets (issue 5)", ""]
    lines.append(md_table(["target", "value", "needs", "pass", "detail"],
                          [[t["target"], t["value"], f"{t['op']} {t['threshold']}",
                            "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL"), t["detail"]]
                           for t in report["targets"]], digits=3))
    lines += ["", "## Load (req/s, latency ms, CPU ms per request)", "",
              "floor: in-process single process (`x2` column = scaled to 2 cores); others: wrk on loopback, "
              "closed loop with c connections. req/s counts 2xx answers that were not degraded. `shed` = 429/503 "
              "answers with Retry-After (an overloaded service's refusals); `errors` = other non-2xx answers + "
              "socket errors (timeouts); a `*` marks cells where the two exceed 1%: wrk's latencies then include "
              "those (fast) answers. CPU: server process tree, redis-server, wrk; `other` = cores busy with "
              "anything else on the machine during the cell (noise: ~0 on a quiet machine).", ""]
    rows = []
    for c in sorted(report["cells"], key=lambda x: (x["n"], ALL_SYSTEMS.index(x["system"])
                                                   if x["system"] in ALL_SYSTEMS else 99, x["c"])):
        cpu = c["cpu_ms_per_req"]
        errs = c["non2xx"] - c["shed"] + c["socket_errors"]
        mark = "*" if errs + c["shed"] > 0.01 * max(1, c["requests"]) else ""
        rows.append([c["n"], c["system"], f"{c['c']}{mark}", c["rps"], c.get("rps_x2"), c["p50_ms"], c["p90_ms"],
                     c["p99_ms"], c["p999_ms"], errs, c["shed"], c["degraded"],
                     cpu["server"], cpu["redis"], cpu["client"], c.get("other_cores")])
    lines.append(md_table(["N", "system", "c", "req/s", "x2", "p50", "p90", "p99", "p99.9", "errors", "shed",
                           "degraded", "CPU server", "CPU redis", "CPU wrk", "other cores"], rows,
                          digits=[0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 0, 2, 3, 3, 2]))
    lines += overload.render(report.get("overload"))
    lines += render_cluster_read(report.get("cluster_read"))
    lines += ["", "## Per-stage means (ms, the service's own timers)", ""]
    rows = []
    for c in sorted(report["cells"], key=lambda x: (x["n"], x["system"], x["c"])):
        st = c.get("stages_ms") or {}
        rows.append([c["n"], c["system"], c["c"], *[st.get(s) for s in STAGES], c.get("stage_source") or "n/a",
                     None if c.get("cache_hit_rate") is None else 100 * c["cache_hit_rate"]])
    lines.append(md_table(["N", "system", "c", *STAGES, "source", "cache hit %"], rows,
                          digits=[0, 0, 0, 3, 3, 3, 3, 3, 0, 1]))
    q = mo.get("quality") or {}
    lines += ["", "## Quality (onnxruntime on the test split)", ""]
    if q.get("fp32"):
        keys = list(q["fp32"])
        rows = [["fp32", *[q["fp32"][k] for k in keys]]]
        rows.append(["int8", *[q["int8"][k] for k in keys]] if q.get("int8") else ["int8", *["n/a"] * len(keys)])
        if q.get("delta"):
            rows.append(["delta", *[q["delta"][k] for k in keys]])
        lines.append(md_table(["model", *keys], rows, digits=4))
        lines.append("")
        lines.append(f"{q['rows']:,} test rows." + ("" if q.get("int8") else
                                                    f" int8: n/a ({q.get('int8_error', 'not scored')})"))
    mem = report.get("memory", {})
    if mem:
        lines += ["", "## Memory (RSS, MB)", ""]
        rows = []
        for name, v in mem.items():
            rows.append([name, v.get("workers"), ", ".join(f"{x:.0f}" for x in v["warm"]["rss_mb_per_worker"]),
                         ", ".join(f"{x:.0f}" for x in v["after"]["rss_mb_per_worker"]), v.get("model_mb"),
                         v.get("cache_budget_mb"), v.get("runtime_baseline_mb")])
        lines.append(md_table(["system", "workers", "per worker after warm-up", "per worker after cells",
                               "model file", "cache budget", "bare runtime"], rows))
    soak = report.get("soak")
    if soak:
        lines += ["", f"## Soak ({soak['seconds']:.0f} s, c={soak['c']}, N={soak['n']})", "",
                  f"{soak['rps']:.1f} req/s, {soak['errors']} errors, {soak['shed']} shed; RSS per worker (max over "
                  f"workers) first window {soak.get('first_mb')} MB, last window {soak.get('last_mb')} MB, "
                  f"growth {soak.get('growth_mb')} MB (window {soak.get('window_s')} s)."]
    if report.get("errors"):
        lines += ["", "## Errors (whole tracebacks in the JSON)", ""]
        for e in report["errors"]:
            name, _, rest = e.partition(":")
            exc = [x for x in rest.splitlines() if re.match(r"[\w.]+(Error|Exception|Exit)\b", x)]
            lines.append(f"- {name}: {exc[-1][:300] if exc else short_reason(rest)}")
    return "\n".join(lines) + "\n"
