"""int8 through HTTP against the unsplit fp32 floor (issue 14 item 9), interleaved.

    python bench/serve.py --build-only     # the serving benchmark's assets (cached)
    python bench/int8_http.py              # ~5 min: writes bench/results/int8_http.{md,json}

On a machine shared with other work the full serving benchmark measures the floors first and the
servers minutes later, so background load skews the "int8 through HTTP / floor-unsplit x2" ratio.
Here the systems of that ratio take turns in ``--slice``-second slices, ``--rounds`` rounds,
order rotated each round: ``floor-unsplit`` (in-process, 1 onnxruntime thread, the baseline),
``floor-int8`` (the same in-process ranker on the int8 variant: what a server adds to it is the
HTTP layer's cost), ``ours-int8`` (default response) and ``ours-int8-col`` (columnar response) under wrk at ``--c``
connections, N = ``--n`` candidates, the same bodies. Two ratios: throughput (req/s over 2 x the
floor's, as in serve.py) and CPU (the floor's CPU per request, its process plus Redis, over the
server's, Redis's and wrk's per useful answer): the CPU ratio is what the throughput ratio would be
on 2 cores that nothing else uses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, OwnedRedis, git_info, machine_info, md_table, write_json  # noqa: E402
from bench.serving import log  # noqa: E402
from bench.serving.assets import build_data, build_model, make_bodies, read_bodies  # noqa: E402
from bench.serving.load import floor_cell, http_cell  # noqa: E402
from bench.serving.systems import start_floor, start_server  # noqa: E402

STAGES = ["fetch", "assemble", "inference", "fusion", "serialise"]
SYSTEMS = ("floor-unsplit", "floor-int8", "ours-int8", "ours-int8-col")
FLOORS = SYSTEMS[:2]  # in-process; floor-int8 (the int8 ranker without HTTP) splits a server's cost


def main(argv=None) -> int:
    import bench.serve as serve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--c", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--slice", type=float, default=8.0)
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mtrank-bench-serve"))
    p.add_argument("--train-rows", type=int, help="rows the bench model trains on (bench/serve.py's default "
                   "when omitted; fewer build faster: the model's shape, hence its cost, is the same)")
    a = p.parse_args(argv)
    sa = serve.parse_args(["--workdir", a.workdir, "--systems", ",".join(SYSTEMS),
                           *(["--train-rows", str(a.train_rows)] if a.train_rows else [])])
    data_dir, _ = build_data(Path(a.workdir), sa)
    model_dir, model_info = build_model(Path(a.workdir), data_dir, sa)
    bundle, store = model_dir / model_info["bundle"], model_dir / "store"
    run_dir = Path(tempfile.mkdtemp(prefix="int8-", dir=a.workdir))
    rds = OwnedRedis(run_dir / "redis")
    floors, servers, cells = {}, {}, []
    try:
        serve.load_redis(sa, rds, data_dir, store, bundle)
        path = make_bodies(data_dir, [a.n], 500, 1.0, 7, run_dir)[a.n]
        bodies = read_bodies(path)
        for s in FLOORS:
            floors[s] = start_floor(s, store, rds.url, run_dir, bundle, model_dir / model_info["unsplit"]["file"])
        for s in SYSTEMS[len(FLOORS):]:
            servers[s] = start_server(s, sa, store, rds.url, run_dir, model_dir)[0]
        for r in range(a.rounds):
            order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]
            for s in order:
                cell = (floor_cell(s, floors[s].ranker, bodies, a.n, a.slice, 1.0, rds.pid) if s in floors
                        else http_cell(s, servers[s], path, a.n, a.c, a.slice, rds.pid, offset=97 * r))
                cells.append({**cell, "round": r})
                log(f"round {r + 1}/{a.rounds} {s}: {cell['rps']:.1f}/s, CPU server "
                    f"{cell['cpu_ms_per_req']['server']:.2f} ms/req, other cores {cell.get('other_cores', 0):.2f}")
    finally:
        for f in floors.values():
            f.close()
        for srv in servers.values():
            srv.stop()
        rds.stop()
    agg = {}
    for s in SYSTEMS:
        mine = [c for c in cells if c["system"] == s]
        secs = sum(c["duration_s"] for c in mine)
        good = sum(c["rps"] * c["duration_s"] for c in mine)
        cpu = {k: sum(c["cpu_ms_per_req"][k] * c["rps"] * c["duration_s"] for c in mine) / max(1e-9, good)
               for k in ("server", "redis", "client")}
        stages = [c["stages_ms"] for c in mine if c.get("stages_ms")]
        agg[s] = {"rps": good / secs, "cpu_ms_per_req": cpu, "cpu_total_ms": sum(cpu.values()),
                  "other_cores": sum(c.get("other_cores", 0) * c["duration_s"] for c in mine) / secs,
                  "stages_ms": {k: float(np.mean([st[k] for st in stages])) for k in stages[0]} if stages else {}}
    base = agg["floor-unsplit"]
    ratios = {s: {"throughput": agg[s]["rps"] / (2 * base["rps"]),
                  "cpu": base["cpu_total_ms"] / agg[s]["cpu_total_ms"]} for s in SYSTEMS[1:]}
    model = {"train_rows": model_info["train_rows"], "parameters": model_info["parameters"],
             "config": model_info["config"], "int8": model_info["precisions"].get("int8", {}).get("method"),
             "files": model_info["files"]}
    report = {"benchmark": "int8_http", "args": vars(a), "machine": machine_info(), "git": git_info(), "model": model,
              "systems": agg, "ratios": ratios, "cells": cells, "target": 2.5,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(a.out_dir)
    write_json(out / "int8_http.json", report)
    rows = [[s, v["rps"], v["cpu_ms_per_req"]["server"], v["cpu_ms_per_req"]["redis"], v["cpu_ms_per_req"]["client"],
             v["cpu_total_ms"], v["other_cores"], *((ratios[s]["throughput"], ratios[s]["cpu"]) if s in ratios
                                                    else (None, None))] for s, v in agg.items()]
    m = report["machine"]
    md = "\n".join([
        "# int8 through HTTP vs the unsplit fp32 floor (interleaved)", "",
        f"- machine: {m['cpu']}, {m['cores']} cores; load average {', '.join(f'{x:.2f}' for x in m['loadavg'])}",
        f"- commit {report['git']['commit'][:12]}{' (dirty)' if report['git']['dirty'] else ''}; N = {a.n}, "
        f"c = {a.c} for the servers, {a.rounds} rounds of {a.slice:.0f} s slices, order rotated each round",
        f"- model: {model['parameters']:,} parameters, trained on {model['train_rows']:,} rows; int8 method "
        f"{model['int8']}", "",
        "CPU ms per request (floor: its process + Redis; servers: per useful answer, server tree + Redis + wrk). "
        "Ratios against the floor: throughput = req/s / (2 x floor req/s); CPU = floor CPU / system CPU per "
        "request (the throughput ratio on 2 otherwise idle cores). Target >= 2.5.", "",
        md_table(["system", "req/s", "CPU server", "CPU redis", "CPU wrk", "CPU total", "other cores",
                  "throughput ratio", "CPU ratio"], rows, digits=[0, 1, 2, 2, 2, 2, 2, 3, 3]), "",
        "Per-stage means (ms, the service's own timers; the floor's are in-process):", "",
        md_table(["system", *STAGES], [[s, *(v["stages_ms"].get(k) for k in STAGES)] for s, v in agg.items()],
                 digits=[0, *[3] * len(STAGES)]), ""])
    (out / "int8_http.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
