"""Goodput under overload (issue 14 item 4): our service (fp32, defaults) at N = ``--target-n`` driven
by closed-loop clients at c = 8, 32 and 64 (``--overload-levels``), of two kinds:

* ``retry``: sends the next request as soon as an answer arrives, a 429 included (a client that
  retries a refusal at once);
* ``honour``: after a 429/503 with ``Retry-After`` waits that long before its next request.

Both are wrk (``bench/wrk/rank.lua`` in mode retry/honour: one thread per connection, so that the
Lua clock times each accepted request exactly). The (c, kind) slices of ``--overload-slice``
seconds are interleaved, ``--overload-rounds`` rounds, the order rotated each round, the server idle
before each slice: background load on the machine hits every slice alike. Per (c, kind): useful
req/s (200, not degraded), the latency percentiles of the accepted requests only (merged over the
rounds), refusals/s, errors, server CPU per useful answer. Target: useful req/s at c = 32 and 64
>= 0.8 x the best useful req/s (per client kind).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import cpu_seconds, md_table, process_tree
from bench.serving import log
from bench.serving.systems import Server, run_wrk

KINDS = ("retry", "honour")
TARGET = 0.8


def run(server: Server, bodies: Path, n: int, levels: list[int], rounds: int, slice_s: float) -> dict:
    """The interleaved slices against ``server`` (started and warm), aggregated per (c, kind)."""
    from bench.serving.load import answers, wait_idle

    plan = [(c, k) for c in levels for k in KINDS]
    raw: dict[tuple[int, str], dict] = {key: {"secs": 0.0, "useful": 0, "requests": 0, "shed": 0, "failed": 0,
                                              "degraded": 0, "cpu": 0.0, "accepted_ms": [], "statuses": {}}
                                        for key in plan}
    for r in range(rounds):
        shift = r % len(plan)
        for c, kind in plan[shift:] + plan[:shift]:
            wait_idle(server.pid)
            cpu0 = cpu_seconds(process_tree(server.pid))
            res, _ = run_wrk(server.base, bodies, c, slice_s, offset=997 * r, headers=server.headers, mode=kind)
            cpu1 = cpu_seconds(process_tree(server.pid))
            got = answers(res)
            acc = raw[(c, kind)]
            acc["secs"] += res["duration_us"] / 1e6
            acc["useful"] += got["ok"] - got["degraded"]
            acc["requests"] += res["requests"]
            acc["shed"] += got["shed"]
            acc["failed"] += got["failed"]
            acc["degraded"] += got["degraded"]
            acc["cpu"] += cpu1 - cpu0
            acc["accepted_ms"] += res.get("accepted_ms", [])
            for k, v in got["statuses"].items():
                acc["statuses"][str(k)] = acc["statuses"].get(str(k), 0) + v
            useful = (got["ok"] - got["degraded"]) / max(1e-9, res["duration_us"] / 1e6)
            log(f"  overload round {r + 1}/{rounds} c={c} {kind}: {useful:.1f} useful/s, {got['shed']} shed, "
                f"{got['failed']} failed")
    cells = []
    for (c, kind), acc in raw.items():
        lat = np.asarray(acc["accepted_ms"], dtype=float)
        pct = {f"p{p}_ms": float(np.percentile(lat, q)) if lat.size else None
               for p, q in (("50", 50), ("90", 90), ("99", 99), ("999", 99.9))}
        cells.append({"c": c, "kind": kind, "seconds": round(acc["secs"], 2), "useful_rps": acc["useful"] / acc["secs"],
                      "requests": acc["requests"], "shed": acc["shed"], "shed_rps": acc["shed"] / acc["secs"],
                      "failed": acc["failed"], "degraded": acc["degraded"], "statuses": acc["statuses"],
                      "accepted": int(lat.size), **pct,
                      "cpu_ms_per_useful": 1e3 * acc["cpu"] / max(1, acc["useful"]),
                      "server_cores": acc["cpu"] / acc["secs"]})
    return {"n": n, "levels": levels, "rounds": rounds, "slice_s": slice_s, "system": server.name,
            "cells": cells, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def targets(ov: dict | None) -> list[tuple[str, float | None, float, str]]:
    """(target, value, threshold, detail) per client kind and overloaded level (c > the smallest)."""
    if not ov:
        return []
    out = []
    for kind in KINDS:
        cells = [x for x in ov["cells"] if x["kind"] == kind]
        if not cells:
            continue
        best = max(cells, key=lambda x: x["useful_rps"])
        for x in sorted(cells, key=lambda x: x["c"]):
            if x["c"] == min(ov["levels"]):
                continue
            out.append((f"overload goodput, {kind} client: useful req/s at c={x['c']} / best, N={ov['n']}",
                        x["useful_rps"] / best["useful_rps"] if best["useful_rps"] else None, TARGET,
                        f"{x['useful_rps']:.1f} vs {best['useful_rps']:.1f} req/s (c={best['c']}); "
                        f"{x['shed_rps']:.0f} refusals/s"))
    return out


def render(ov: dict | None) -> list[str]:
    if not ov:
        return []
    lines = ["", f"## Overload: goodput (ours, N={ov['n']})", "",
             f"Closed-loop wrk clients, one thread per connection; `retry` sends its next request at once "
             f"after a 429, `honour` first waits the 429's Retry-After. {ov['rounds']} rounds of "
             f"{ov['slice_s']:.0f} s slices per (c, client), interleaved (order rotated each round), the server "
             f"idle before each slice. useful = 200 and not degraded; latency = accepted (200) requests only, "
             f"measured by the client, merged over the rounds.", ""]
    rows = [[x["c"], x["kind"], x["useful_rps"], x["p50_ms"], x["p90_ms"], x["p99_ms"], x["p999_ms"], x["shed_rps"],
             x["failed"], x["degraded"], x["cpu_ms_per_useful"], x["server_cores"],
             x["useful_rps"] / x["server_cores"] if x["server_cores"] else None]
            for x in sorted(ov["cells"], key=lambda x: (KINDS.index(x["kind"]), x["c"]))]
    lines.append(md_table(["c", "client", "useful req/s", "p50", "p90", "p99", "p99.9", "429/s", "errors",
                           "degraded", "server CPU ms / useful", "server cores", "useful / server core-s"], rows,
                          digits=[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 2, 2, 1]))
    lines += ["", "`server cores`: CPU the service's processes got during the slices (of 2); on a shared machine a "
                  "slice's goodput follows it, and `useful / server core-s` (useful answers per CPU-second of the "
                  "service) shows whether overload itself (refusals, retries) cost the service work."]
    return lines
