"""Measurements of the serving benchmark: one cell (a system at one N and concurrency), memory,
the soak.

Per cell: req/s (2xx answers that were not degraded; also all 2xx and all answers), latency
percentiles, non-2xx answers (``shed``: among them, the 429/503 + Retry-After refusals of an
overloaded service, which are not errors), socket errors, degraded answers; CPU seconds per useful
answer of the server's process tree, of redis-server and of the client (``/proc``; wrk by
``getrusage(RUSAGE_CHILDREN)``), and the cores the rest of the machine kept busy meanwhile
(``/proc/stat``); per-stage means from the service's own timers (``/metrics``) and the item
cache's hit rate.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import ROOT, OwnedRedis, cpu_seconds, machine_busy, process_tree, rss_bytes, worker_pids
from bench.serving import log
from bench.serving.systems import Server, run_wrk, start_ours, wrk_cmd, wrk_summary
from service.ranking import STAGES

SOCKET_ERRORS = ("connect", "read", "write", "timeout")


def _ms(us) -> float | None:
    return None if us is None else float(us) / 1e3


def answers(res: dict) -> dict:
    """The answers of a wrk summary (rank.lua) by kind: ``ok`` (2xx, ``degraded`` among them),
    ``non2xx`` (``shed`` among them: 429/503 with Retry-After), ``socket_errors``, and ``failed``:
    the non-2xx answers that were not shed plus the socket errors."""
    statuses = {int(k): v for k, v in res.get("statuses", {}).items()}
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    non2xx = sum(statuses.values()) - ok
    sock = sum(res["errors"][k] for k in SOCKET_ERRORS)
    return {"statuses": statuses, "ok": ok, "degraded": res["degraded"], "non2xx": non2xx, "shed": res["shed"],
            "socket_errors": sock, "failed": non2xx - res["shed"] + sock}


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------

def floor_cell(system: str, ranker, bodies: list[dict], n: int, duration: float, warmup: float,
               redis_pid: int) -> dict:
    """The floor: ``ranker.rank_result`` in a loop over the bodies, one process, no HTTP."""
    from service.schemas import RankRequest

    reqs = [RankRequest(**b) for b in bodies]
    t_end = time.perf_counter() + warmup
    i = 0
    while time.perf_counter() < t_end or i < 3:
        ranker.rank_result(reqs[i % len(reqs)])
        i += 1
    lat, stages, degraded = [], {s: [] for s in STAGES}, 0
    cpu0, r0, busy0 = time.process_time(), cpu_seconds([redis_pid]), machine_busy()
    t0 = time.perf_counter()
    i = 0
    while True:
        a = time.perf_counter()
        if a - t0 >= duration and i >= 3:
            break
        res = ranker.rank_result(reqs[i % len(reqs)])
        lat.append(time.perf_counter() - a)
        for s in STAGES:
            stages[s].append(res.timings.get(s, 0.0))
        degraded += res.degraded is not None
        i += 1
    wall = time.perf_counter() - t0
    good = len(lat) - degraded
    cpu1, r1, busy1 = time.process_time(), cpu_seconds([redis_pid]), machine_busy()
    ms = np.asarray(lat) * 1e3
    cpu_server, cpu_redis = cpu1 - cpu0, r1 - r0
    busy = (busy1[0] - busy0[0]) / wall
    return {"system": system, "n": n, "c": 1, "duration_s": round(wall, 3), "requests": len(lat),
            "rps": good / wall, "rps_x2": 2 * good / wall, "rps_2xx": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "p999_ms": float(np.percentile(ms, 99.9)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "non2xx": 0, "shed": 0, "socket_errors": 0,
            "degraded": degraded,
            "cpu_ms_per_req": {"server": 1e3 * cpu_server / len(lat), "redis": 1e3 * cpu_redis / len(lat),
                               "client": 0.0},
            "busy_cores": busy, "other_cores": max(0.0, busy - (cpu_server + cpu_redis) / wall),
            "stages_ms": {s: float(np.mean(v) * 1e3) for s, v in stages.items()}, "stage_source": "in-process",
            "cache_hit_rate": None}


def http_cell(system: str, server: Server, bodies: Path, n: int, c: int, duration: float, redis_pid: int,
              offset: int = 0) -> dict:
    """One wrk run against ``server`` at concurrency ``c``, after the server went idle."""
    idle_wait = wait_idle(server.pid)
    m0 = server.scrape()
    cpu0, r0, busy0 = cpu_seconds(process_tree(server.pid)), cpu_seconds([redis_pid]), machine_busy()
    t0 = time.perf_counter()
    res, wrk_cpu = run_wrk(server.base, bodies, c, duration, offset, server.headers)
    wall = time.perf_counter() - t0
    cpu1, r1, busy1 = cpu_seconds(process_tree(server.pid)), cpu_seconds([redis_pid]), machine_busy()
    stages, hit_rate = stage_delta(m0, server.scrape())
    secs = res["duration_us"] / 1e6 or wall
    got = answers(res)
    ok, degraded = got["ok"], got["degraded"]
    pct = res["latency_us"]["percentiles"] if res["requests"] else {}
    if not res["requests"]:
        res["latency_us"].update(mean=None, max=None)
    cpu_server, cpu_redis = cpu1 - cpu0, r1 - r0
    busy = (busy1[0] - busy0[0]) / wall
    reqs = max(1, ok - degraded)  # CPU per useful answer: rejected and degraded ones cost, but do not count
    return {"system": system, "n": n, "c": c, "duration_s": round(secs, 3), "requests": res["requests"],
            "rps": (ok - degraded) / secs, "rps_2xx": ok / secs, "rps_all": res["requests"] / secs,
            "p50_ms": _ms(pct.get("50")), "p90_ms": _ms(pct.get("90")), "p99_ms": _ms(pct.get("99")),
            "p999_ms": _ms(pct.get("99.9")), "mean_ms": _ms(res["latency_us"]["mean"]),
            "max_ms": _ms(res["latency_us"]["max"]), "statuses": got["statuses"], "non2xx": got["non2xx"],
            "shed": got["shed"], "socket_errors": got["socket_errors"], "errors": res["errors"], "degraded": degraded,
            "cpu_ms_per_req": {"server": 1e3 * cpu_server / reqs, "redis": 1e3 * cpu_redis / reqs,
                               "client": 1e3 * wrk_cpu / reqs},
            "busy_cores": busy, "other_cores": max(0.0, busy - (cpu_server + cpu_redis + wrk_cpu) / wall),
            "stages_ms": stages, "stage_source": "metrics" if stages else None, "cache_hit_rate": hit_rate,
            "idle_wait_s": round(idle_wait, 2)}


def wait_idle(pid: int, timeout: float = 120.0, window: float = 0.5, quiet_cores: float = 0.1) -> float:
    """Wait until the server's process tree is idle (below ``quiet_cores`` of CPU over ``window``):
    wrk leaves requests in flight when it stops, and a server still working them off would slow the
    next cell (and shed its first requests). Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c0 = cpu_seconds(process_tree(pid))
        time.sleep(window)
        if (cpu_seconds(process_tree(pid)) - c0) / window < quiet_cores:
            break
    return time.monotonic() - t0


def stage_delta(m0: list | None, m1: list | None) -> tuple[dict | None, float | None]:
    """(stage means in ms, item-cache hit rate) between two /metrics scrapes of the service."""
    if m0 is None or m1 is None:
        return None, None
    from service.metrics import CACHE_HITS, CACHE_MISSES, RANK_STAGE

    stage = RANK_STAGE.describe()[0].name
    hits, misses = (f"{m.describe()[0].name}_total" for m in (CACHE_HITS, CACHE_MISSES))

    def totals(samples) -> dict:
        t: dict = defaultdict(float)
        for name, labels, v in samples:
            if name in (f"{stage}_sum", f"{stage}_count"):
                t[(name, labels["stage"])] += v
            elif name in (hits, misses):
                t[name] += v
        return t

    t0, t1 = totals(m0), totals(m1)
    d = {k: v - t0.get(k, 0.0) for k, v in t1.items()}
    stages = {s: 1e3 * d[(f"{stage}_sum", s)] / d[(f"{stage}_count", s)] for s in STAGES
              if d.get((f"{stage}_count", s), 0.0) > 0}
    dh, dm = d.get(hits, 0.0), d.get(misses, 0.0)
    return (stages or None), (dh / (dh + dm) if dh + dm > 0 else None)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------

def memory_sample(server: Server) -> dict:
    workers = worker_pids(server.pid)
    tree = process_tree(server.pid)
    return {"workers": len(workers), "rss_mb_per_worker": [round(rss_bytes(p) / 2 ** 20, 1) for p in workers],
            "rss_mb_tree": round(sum(rss_bytes(p) for p in tree) / 2 ** 20, 1)}


def runtime_baseline_mb() -> float | None:
    """RSS of an interpreter that imported the service (FastAPI, onnxruntime, numpy...) but loaded
    no model: the runtime's own share of a worker."""
    code = ("import service.app, service.cli, onnxruntime, numpy, uvicorn, httptools; import os;"
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return round(int(r.stdout.strip().splitlines()[-1]) / 2 ** 20, 1)
    except Exception:  # noqa: BLE001 - the baseline is an extra column, not a result
        return None


def memory_budget(bundle: Path, system: str) -> dict:
    """What a worker of ``system`` should hold: its model file plus the item cache's budget
    (MTRANK_ITEM_CACHE_SIZE x the packed item value's bytes)."""
    from service.codec import EntityCodec
    from service.contract import MANIFEST_FILE, BundleManifest
    from service.settings import Settings

    m = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    model = bundle / m.model_file("int8" if system.startswith("ours-int8") else "fp32")[0]
    size = 0 if system == "ours-nocache" else Settings().item_cache_size
    model_mb = model.stat().st_size / 2 ** 20
    cache_mb = size * EntityCodec.for_schema(m.feature_schema, "item").size / 2 ** 20
    return {"model_mb": round(model_mb, 2), "cache_items": size, "cache_budget_mb": round(cache_mb, 2),
            "budget_mb": round(model_mb + cache_mb, 2),
            "budget_note": "cache budget = MTRANK_ITEM_CACHE_SIZE x packed item value bytes"}


def soak(a, store: Path, rds: OwnedRedis, run_dir: Path, bodies: dict[int, Path]) -> dict:
    """Our service at concurrency 8, N = ``a.target_n``, for ``a.soak`` seconds, RSS sampled every
    ``a.soak_interval`` seconds; growth = last window's mean minus the first's (max over workers)."""
    n = a.target_n if a.target_n in bodies else a.sizes[0]
    c = 8
    log(f"soak: ours, N={n}, c={c}, {a.soak:.0f} s, RSS every {a.soak_interval:.0f} s")
    server = start_ours("ours-soak", store, rds.url, run_dir, {}, a.workers)
    try:
        server.wait_ready()
        run_wrk(server.base, bodies[n], c, a.warmup)
        wait_idle(server.pid)
        t0 = time.monotonic()
        proc = subprocess.Popen(wrk_cmd(server.base, bodies[n], c, a.soak), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        samples = []
        while proc.poll() is None:
            samples.append({"t": round(time.monotonic() - t0, 1), **memory_sample(server)})
            time.sleep(a.soak_interval)
        out, _ = proc.communicate()
        res = wrk_summary(out)
        if res is None:
            raise RuntimeError(f"wrk gave no summary (rc {proc.returncode})")
        got = answers(res)
        window = min(60.0, a.soak / 4)
        per = [max(s["rss_mb_per_worker"]) for s in samples]
        first = [v for s, v in zip(samples, per, strict=True) if s["t"] <= window]
        last = [v for s, v in zip(samples, per, strict=True) if s["t"] >= samples[-1]["t"] - window]
        f_mb, l_mb = (float(np.mean(first)), float(np.mean(last))) if first and last else (None, None)
        return {"seconds": a.soak, "n": n, "c": c, "window_s": window, "samples": samples,
                "first_mb": None if f_mb is None else round(f_mb, 1),
                "last_mb": None if l_mb is None else round(l_mb, 1),
                "growth_mb": None if f_mb is None else round(l_mb - f_mb, 1),
                "allowed_growth_mb": round(max(10.0, 0.02 * (f_mb or 0)), 1),
                "rps": res["requests"] / max(1e-9, res["duration_us"] / 1e6), "shed": got["shed"],
                "errors": got["failed"]}
    finally:
        server.stop()
