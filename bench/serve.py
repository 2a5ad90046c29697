"""Serving benchmark (issue 5): our service against its in-process floor and a naive peer.

    python bench/serve.py                  # full run: N = 100, 500, 1000; c = 1, 8, 32; 15 s a cell
    python bench/serve.py --soak 600       # ... plus a 10-minute memory soak of our service
    python bench/serve.py --quick          # smoke run on tiny data (about a minute), output to a temp dir

One run, on one trained PLE and one Redis with the same features loaded:

The code is in ``bench/serving/`` (assets, systems, load, report); this file is the entry point.

1. **Assets** (cached under ``--workdir``, default ``$TMPDIR/mtrank-bench-serve``, keyed by the
   settings and by the sources they depend on): synthetic data from ``training.data.synth`` (100k
   users, 200k items) widened to the issue's schema (24 sparse fields of dim 16, 8 dense fields,
   2 sequences: see :func:`widen`); a PLE (2 levels, 2 shared + 1 specific expert per task,
   experts [256, 128]) trained 1 epoch on a prefix of the log through ``training.train.train``
   (the ``mtrank train`` code path, which also exports the bundle and runs its parity gate); the
   trained torch model saved for the naive peer; fp32 and int8 (``model.int8.onnx``, which the
   export writes with ``TrainConfig.int8``) AUC on the test split with onnxruntime.
2. **Redis**: a redis-server the benchmark starts on a free port (and stops); features loaded
   with ``mtrank features load`` (packed bytes, ours) and as one hash per entity (the naive peer).
3. **Requests**: per N, ``--bodies`` JSON bodies: a uniform random user, N distinct items drawn
   with Zipf popularity (exponent ``--zipf`` over the items ranked by exposures in the log), a
   random context. The floor and every server get the same bodies.
4. **Systems**
   * ``floor``: in-process, no HTTP: the service's own ranker (built by its ServingManager) with
     1 onnxruntime thread and no item cache, called in a loop over the bodies: one Redis MGET,
     decode, onnxruntime, fusion, sort, response bytes. Single process; "x2" = scaled to 2 cores.
   * ``naive``: ``bench/naive_peer`` under uvicorn, 2 workers x 1 torch thread.
   * ``ours``: ``mtrank serve`` with its defaults (workers, threads, cache, logs), fp32 bundle
     (the user-side-once graph: see ``export`` in the JSON).
   * ``ours-nocache``: the same with ``MTRANK_ITEM_CACHE_SIZE=0``.
   * ``ours-int8``: a routing config whose one variant says ``precision: int8``.
   * ``ours-int8-col``: the same, the client asking for the columnar response (``Accept:
     application/vnd.mtrank.columnar+json``, see ``service.columnar``).
   * ``floor-int8``: the floor on that int8 variant.
   * ``floor-unsplit``: the floor on the same trained model exported without the user-side split
     (``ServingModel(request_once=False)``): the fp32 baseline of the "int8 + user side once"
     target. n/a when that export failed (the reason is in the JSON).
5. **Load**: wrk (``bench/wrk/rank.lua``) on loopback, 1 thread, closed loop at each concurrency
   for ``--duration`` seconds after a ``--warmup`` per server and N. Per cell: req/s (2xx answers
   that were not degraded; the JSON also has all 2xx and all answers), latency
   p50/p90/p99/p99.9 (wrk's histogram), non-2xx answers (``shed``: the 429/503 ones of an
   overloaded service), socket errors, "degraded" answers; CPU seconds
   per request of the server's process tree, of redis-server and of wrk (``/proc/<pid>/stat``
   utime+stime before/after; wrk by ``getrusage(RUSAGE_CHILDREN)``) per useful answer (2xx, not
   degraded), and the CPU the rest of the
   machine used meanwhile (``/proc/stat``: a busy machine shows up there); the per-stage means
   from the service's own timers (``/metrics`` ``mtrank_rank_stage_seconds``) and the item cache's
   hit rate (``mtrank_item_cache_hits/misses``).
6. **Overload** (``bench/serving/overload.py``): goodput of ``ours`` at c = 8, 32, 64 with a client
   that retries a 429 at once and one that honours Retry-After, interleaved slices.
7. **Cluster read** (``--cluster-read``, on in a full run): ``bench/cluster_read.py`` in the same
   run (its own 3-master cluster and single Redis; its files beside ``serve.md``), the headline
   rows repeated in ``serve.md``.
8. **Memory**: resident set per worker after warm-up and after the cells, against the model file
   plus the cache budget (also above the RSS of a bare interpreter that imported the service);
   ``--soak S`` runs our service at concurrency 8, N = ``--target-n``, for S seconds, sampling RSS.
9. **Output**: a Markdown table (printed, and ``serve.md``) and ``serve.json`` in ``--out-dir``
   (default ``bench/results/``; a ``--quick`` run writes to a temp dir unless told), with the
   machine, the commit and the issue's target ratios with pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, OwnedRedis, fmt, git_info, machine_info, path_commit, worker_pids, write_json  # noqa: E402
from bench.serving import log, overload  # noqa: E402
from bench.serving.assets import (  # noqa: E402
    MODEL_NAME,
    build_data,
    build_model,
    data_dir_of,
    make_bodies,
    model_dir_of,
    prune_cache,
    read_bodies,
)
from bench.serving.load import floor_cell, http_cell, memory_budget, memory_sample, runtime_baseline_mb, soak  # noqa: E402
from bench.serving.report import render, short_reason, targets  # noqa: E402
from bench.serving.systems import ALL_SYSTEMS, clean_env, run_wrk, start_floor, start_server  # noqa: E402

FULL = dict(users=100_000, items=200_000, exposures=1_000_000, train_rows=600_000, train_threads=0,
            sizes="100,500,1000", concurrency="1,8,32", duration=15.0, warmup=3.0, bodies=500,
            systems=",".join(ALL_SYSTEMS), overload="8,32,64", overload_rounds=3, overload_slice=5.0,
            cluster_read=True)
QUICK = dict(users=1_000, items=2_000, exposures=20_000, train_rows=20_000, train_threads=1, sizes="100",
             concurrency="1,4", duration=2.0, warmup=1.0, bodies=40, systems="floor,naive,ours", overload="2,4",
             overload_rounds=1, overload_slice=1.0, cluster_read=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, N=100, c=1,4, 2 s cells (smoke run)")
    p.add_argument("--out-dir", help="where serve.md/serve.json go (default bench/results; "
                                     "--quick: <workdir>/quick-results)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mtrank-bench-serve"),
                   help="cache of data and models, and the run's scratch files")
    p.add_argument("--sizes", help="candidates per request (default 100,500,1000)")
    p.add_argument("--concurrency", help="wrk connections (default 1,8,32)")
    p.add_argument("--duration", type=float, help="seconds per cell (default 15)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per server and N (default 3)")
    p.add_argument("--bodies", type=int, help="pre-generated request bodies per N (default 500)")
    p.add_argument("--systems", help=f"comma list of {', '.join(ALL_SYSTEMS)} (default all)")
    p.add_argument("--workers", type=int, help="MTRANK_WORKERS of our service (default: the service's default)")
    p.add_argument("--naive-workers", type=int, default=2)
    p.add_argument("--naive-threads", type=int, default=1, help="torch intra-op threads per naive worker")
    p.add_argument("--zipf", type=float, default=1.0, help="exponent of the candidates' popularity")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--exposures", type=int)
    p.add_argument("--train-rows", type=int)
    p.add_argument("--train-threads", type=int, help="torch threads while training the model (0 = all cores; "
                                                     "--quick: 1, which is faster on a busy machine)")
    p.add_argument("--target-n", type=int, help="N of the target ratios (default 500, --quick 100)")
    p.add_argument("--p99-bound-ms", type=float, help="p99 bound of the ours/naive ratio (default: the "
                                                      "naive peer's p99 at its best throughput)")
    p.add_argument("--overload", help="concurrencies of the goodput-under-overload run of ours at --target-n "
                                       "(default 8,32,64; --quick: 2,4; '' = skip)")
    p.add_argument("--overload-rounds", type=int, help="interleaved rounds of the overload run (default 3)")
    p.add_argument("--overload-slice", type=float, help="seconds per (c, client) slice and round (default 5)")
    p.add_argument("--cluster-read", action=argparse.BooleanOptionalAction, default=None,
                   help="run bench/cluster_read.py in this run too (default: on in a full run, off with --quick)")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of memory soak (0 = none; the issue asks 600)")
    p.add_argument("--soak-interval", type=float, default=5.0, help="seconds between RSS samples of the soak")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached data and model")
    p.add_argument("--build-only", action="store_true", help="build (or find) the cached data and model, then exit")
    p.add_argument("--keep", action="store_true", help="keep the run's scratch files (server logs, bodies)")
    a = p.parse_args(argv)
    base = QUICK if a.quick else FULL
    for k, v in base.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.sizes = [int(x) for x in str(a.sizes).split(",") if x]
    a.concurrency = [int(x) for x in str(a.concurrency).split(",") if x]
    a.systems = [x.strip() for x in str(a.systems).split(",") if x.strip()]
    a.overload = [int(x) for x in str(a.overload).split(",") if x.strip()]
    bad = set(a.systems) - set(ALL_SYSTEMS)
    if bad:
        p.error(f"unknown systems {sorted(bad)}")
    if a.target_n is None:
        a.target_n = a.sizes[len(a.sizes) // 2] if 500 not in a.sizes else 500
    if a.out_dir is None:
        a.out_dir = str(Path(a.workdir) / "quick-results") if a.quick else str(ROOT / "bench" / "results")
    return a


def estimate_seconds(a, n_http_systems: int) -> float:
    cells = len(a.sizes) * (len(a.concurrency) * n_http_systems) * a.duration
    warm = len(a.sizes) * n_http_systems * a.warmup
    floor = len(a.sizes) * (a.duration + a.warmup) * sum(s.startswith("floor") for s in a.systems)
    over = len(a.overload) * len(overload.KINDS) * a.overload_rounds * (a.overload_slice + 1) + 30 if a.overload else 0
    return cells + warm + floor + 25 * n_http_systems + over + a.soak


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if a.build_only:
        data_dir, _ = build_data(workdir, a)
        build_model(workdir, data_dir, a)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    t_start = time.time()
    prune_cache(workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    out_dir = Path(a.out_dir)
    report: dict = {"benchmark": "serve", "mode": "quick" if a.quick else "full",
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0,
                    "args": dict(vars(a)), "machine": machine_info(), "git": git_info(),
                    "export": path_commit("training/export.py"), "systems": {}, "cells": [], "memory": {},
                    "overload": None, "cluster_read": None, "soak": None, "targets": [], "errors": []}
    report["loadavg_start"] = report["machine"]["loadavg"]

    def save():
        report["seconds"] = time.time() - t_start
        report["loadavg_end"] = list(os.getloadavg())
        report["targets"] = targets(report, a.target_n, a.p99_bound_ms)
        write_json(out_dir / "serve.json", report)
        (out_dir / "serve.md").write_text(render(report))

    # the assets are built in a child process: torch never loads into this one (the floor runs here)
    if a.rebuild or not ((data_dir_of(workdir, a) / "bench-data.json").exists()
                         and (model_dir_of(workdir, a) / "bench-model.json").exists()):
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--build-only"], cwd=ROOT, check=True)
    a.rebuild = False
    data_dir, report["data"] = build_data(workdir, a)
    model_dir, model_info = build_model(workdir, data_dir, a)
    report["model"] = model_info
    bundle = model_dir / model_info["bundle"]
    log(f"model: {model_info['parameters']:,} parameters, files {model_info['files']}")

    systems = report["systems"]
    unsplit = model_info["unsplit"]
    for s in ALL_SYSTEMS:
        if s not in a.systems:
            systems[s] = {"ran": False, "reason": "not asked for (--systems)"}
        elif s == "floor-unsplit" and not unsplit["file"]:
            systems[s] = {"ran": False, "reason": unsplit["reason"]}
    floors = [s for s in a.systems if s.startswith("floor") and s not in systems]
    http_systems = [s for s in a.systems if not s.startswith("floor")]
    log(f"expected duration of the measurements: ~{estimate_seconds(a, len(http_systems)) / 60:.0f} min "
        f"(+ Redis load)")

    rds = OwnedRedis(run_dir / "redis")
    try:
        report["redis"] = load_redis(a, rds, data_dir, model_dir / "store", bundle)
        bodies = make_bodies(data_dir, a.sizes, a.bodies, a.zipf, a.seed, run_dir)
        for system in floors:
            run_floor(system, a, report, rds, run_dir, model_dir, bundle, bodies)
            save()
        baseline = None if a.quick else runtime_baseline_mb()
        for system in http_systems:
            run_http(system, a, report, rds, run_dir, model_dir, bundle, bodies, baseline)
            save()
        if a.overload and "ours" in a.systems:
            report["overload"] = run_overload(a, report, rds, run_dir, model_dir, bodies)
            save()
        if a.soak > 0:
            report["soak"] = soak(a, model_dir / "store", rds, run_dir, bodies)
    finally:
        rds.stop()
    if a.cluster_read:  # after our own Redis and servers stopped: it starts four redis-servers of its own
        log("cluster read (bench/cluster_read.py)")
        subprocess.run([sys.executable, str(ROOT / "bench" / "cluster_read.py"), "--out", str(out_dir),
                        *(["--quick"] if a.quick else [])], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        cr = json.loads((out_dir / "cluster_read.json").read_text())
        report["cluster_read"] = {k: cr[k] for k in ("key_layout_version", "item_groups", "results", "finished")}
    save()
    print(render(report))
    log(f"wrote {out_dir / 'serve.md'} and {out_dir / 'serve.json'} ({time.time() - t_start:.0f} s)")
    if a.keep:
        log(f"kept the run's scratch files (server logs, bodies) in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def load_redis(a, rds: OwnedRedis, data_dir: Path, store: Path, bundle: Path) -> dict:
    """Our features with ``mtrank features load``; the naive peer's hashes when it runs."""
    log(f"redis-server pid {rds.pid} on {rds.url}; loading features (mtrank features load)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "service.cli", "features", "load", "--data", str(data_dir),
                    "--model-name", MODEL_NAME, "--store", str(store), "--redis-url", rds.url, "--quiet"],
                   cwd=ROOT, env=clean_env(), check=True, capture_output=True, text=True)
    out: dict = {"ours_load_seconds": round(time.perf_counter() - t0, 1)}
    if "naive" in a.systems:
        from bench.naive_peer.load import load_hashes

        log("loading the naive peer's hashes (HSET per entity)")
        with rds.client() as client:
            out["naive_load"] = load_hashes(data_dir, bundle, client)
    out["used_memory_mb"] = round(rds.used_memory() / 2 ** 20, 1)
    return out


def run_floor(system: str, a, report: dict, rds: OwnedRedis, run_dir: Path, model_dir: Path, bundle: Path,
              bodies: dict[int, Path]) -> None:
    """The floor's cells (c=1) at every N, in this process."""
    floor = None
    try:
        unsplit = report["model"]["unsplit"]["file"]
        floor = start_floor(system, model_dir / "store", rds.url, run_dir, bundle,
                            model_dir / unsplit if unsplit else None)
        report["systems"][system] = floor.info
        for n in a.sizes:
            log(f"{system} N={n}")
            cell = floor_cell(system, floor.ranker, read_bodies(bodies[n]), n, a.duration, a.warmup, rds.pid)
            report["cells"].append(cell)
            log(f"  {cell['rps']:.1f}/s p50 {cell['p50_ms']:.2f} ms p99 {cell['p99_ms']:.2f} ms")
    except Exception as e:  # noqa: BLE001 - reported, the other systems still run
        report["systems"][system] = {"ran": False, "reason": short_reason(e)}
        report["errors"].append(f"{system}: {traceback.format_exc(limit=3)}")
    finally:
        if floor is not None:
            floor.close()


def run_http(system: str, a, report: dict, rds: OwnedRedis, run_dir: Path, model_dir: Path, bundle: Path,
             bodies: dict[int, Path], baseline: float | None) -> None:
    """An HTTP system's cells: per N a warm-up, then wrk at each concurrency; its memory."""
    server = None
    try:
        server, desc = start_server(system, a, model_dir / "store", rds.url, run_dir, model_dir)
        report["systems"][system] = {"ran": True, "description": desc}
        warm_mem = None
        for n in a.sizes:
            run_wrk(server.base, bodies[n], max(a.concurrency), a.warmup, headers=server.headers)  # warm-up
            if warm_mem is None:
                warm_mem = memory_sample(server)
            for c in a.concurrency:
                log(f"{system} N={n} c={c}")
                cell = http_cell(system, server, bodies[n], n, c, a.duration, rds.pid)
                report["cells"].append(cell)
                log(f"  {cell['rps']:.1f}/s p50 {fmt(cell['p50_ms'], 2)} ms p99 {fmt(cell['p99_ms'], 2)} ms "
                    f"errors {cell['non2xx'] - cell['shed'] + cell['socket_errors']} shed {cell['shed']} "
                    f"stages {cell['stage_source']}")
        mem = {"workers": len(worker_pids(server.pid)), "warm": warm_mem, "after": memory_sample(server),
               "metrics_endpoint": server.metrics}
        if system.startswith("ours"):
            mem.update(memory_budget(bundle, system))
            mem["runtime_baseline_mb"] = baseline
            report["systems"][system]["models"] = server.get("/models").json()
        report["memory"][system] = mem
    except Exception as e:  # noqa: BLE001 - reported, the other systems still run
        report["systems"][system] = {"ran": False, "reason": short_reason(e)}
        report["errors"].append(f"{system}: {traceback.format_exc(limit=3)}"
                                + (f"\nserver log tail:\n{server.tail()}" if server else ""))
        log(f"{system} failed: {e}")
    finally:
        if server is not None:
            server.stop()


def run_overload(a, report: dict, rds: OwnedRedis, run_dir: Path, model_dir: Path, bodies: dict[int, Path]):
    """Goodput under overload (bench/serving/overload.py) of ours at N = --target-n; None if it failed."""
    n = a.target_n if a.target_n in bodies else a.sizes[0]
    log(f"overload: ours, N={n}, c={a.overload}, {a.overload_rounds} rounds of {a.overload_slice:.0f} s slices")
    server = None
    try:
        server, _ = start_server("ours", a, model_dir / "store", rds.url, run_dir, model_dir)
        server.name = "ours"
        run_wrk(server.base, bodies[n], max(a.overload), a.warmup)  # warm-up, not measured
        return overload.run(server, bodies[n], n, a.overload, a.overload_rounds, a.overload_slice)
    except Exception as e:  # noqa: BLE001 - reported, the rest of the report stands
        report["errors"].append(f"overload: {traceback.format_exc(limit=3)}"
                                + (f"\nserver log tail:\n{server.tail()}" if server else ""))
        log(f"overload failed: {short_reason(e)}")
        return None
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
