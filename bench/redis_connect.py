"""Redis reads with warm pools against the previous request path (issue 14 item 1), side by side in one run.

    python bench/redis_connect.py            # ~1 min; writes bench/results/redis_connect.{md,json}

The baseline is ``service/redis_client.py`` of ``--baseline`` (default: the commit before the warm
pools), loaded from git next to the current module, both over the same benchmark-owned
redis-servers. Scenarios:

* **healthy read**: ``FeatureStore.mget`` of 1 user + 500 item keys (100-byte values) on a healthy
  loopback Redis; rounds alternate between the two stores; p50/p99 of the request-path cost.
* **black-holed Redis**: a password-protected redis-server stopped with SIGSTOP (the kernel still
  accepts connections, nothing answers AUTH or anything else); reads with a 5 ms budget (what is
  left of a request's 15 ms ``MTRANK_REDIS_DEADLINE_MS``), the breaker disabled (it would hide the
  per-read cost after 3 reads), 5 ms apart: how long each read takes to give up.
* **unresolvable host**: ``redis://mtrank-no-such-host.invalid:6379``, the same reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, OwnedRedis, git, git_info, machine_info, md_table, write_json  # noqa: E402
from service import redis_client  # noqa: E402
from service.settings import Settings  # noqa: E402

BASELINE = "fc1748f"  # the last commit whose request path connected on a request
PASSWORD = "bench-pw"
SHORT_BUDGET_S = 0.005


def load_baseline(rev: str, workdir: Path):
    src = subprocess.run(["git", "show", f"{rev}:service/redis_client.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = workdir / "redis_client_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("redis_client_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def healthy(mods: dict, url: str, reads: int, rounds: int) -> dict:
    import redis

    c = redis.Redis.from_url(url)
    keys = ["u:1"] + [f"i:{i}" for i in range(500)]
    c.mset({k: os.urandom(100) for k in keys})
    c.close()
    stores = {name: m.make_store(Settings(redis_url=url, redis_deadline_ms=500)) for name, m in mods.items()}
    lat: dict[str, list[float]] = {name: [] for name in mods}
    try:
        for st in stores.values():
            for _ in range(200):  # warm: connections, allocations
                st.mget(keys)
        for _ in range(rounds):
            for name, st in stores.items():
                for _ in range(reads):
                    t = time.perf_counter()
                    st.mget(keys)
                    lat[name].append(time.perf_counter() - t)
    finally:
        for st in stores.values():
            st.close()
    return {name: {"p50_us": statistics.median(x) * 1e6, "p99_us": pct(x, 0.99) * 1e6, "reads": len(x)}
            for name, x in lat.items()}


def failing_reads(mods: dict, url: str, n: int, stop_pid: int | None = None) -> dict:
    """Reads with a short budget against an unanswering or unresolvable Redis (breaker disabled)."""
    out = {}
    for name, m in mods.items():
        st = m.make_store(Settings(redis_url=url, redis_deadline_ms=15, breaker_failures=1_000_000))
        try:
            if stop_pid is not None:
                st.mget(["k"])  # healthy first: the previous store connects its pool on this read
                os.kill(stop_pid, signal.SIGSTOP)
            lat, reasons = [], {}
            try:
                for _ in range(n):
                    t = time.perf_counter()
                    try:
                        st.mget(["k"], deadline_s=SHORT_BUDGET_S)
                        reason = "ok"
                    except redis_client.StoreUnavailable as e:  # the same class name in both modules
                        reason = e.reason
                    except Exception as e:  # noqa: BLE001 - the baseline's own StoreUnavailable
                        reason = getattr(e, "reason", type(e).__name__)
                    lat.append(time.perf_counter() - t)
                    reasons[reason] = reasons.get(reason, 0) + 1
                    time.sleep(0.005)
            finally:
                if stop_pid is not None:
                    os.kill(stop_pid, signal.SIGCONT)
        finally:
            st.close()
        out[name] = {"p50_ms": statistics.median(lat) * 1e3, "max_ms": max(lat) * 1e3, "reasons": reasons,
                     "reads": n}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help="git revision of the previous service/redis_client.py")
    p.add_argument("--reads", type=int, default=2000, help="healthy reads per store per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--failing", type=int, default=60, help="reads per store against a failing Redis")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mtrank-bench-conn-") as tmp:
        work = Path(tmp)
        mods = {"before": load_baseline(a.baseline, work), "warm pools": redis_client}
        plain = OwnedRedis(work / "plain")
        try:
            res_healthy = healthy(mods, plain.url, a.reads, a.rounds)
        finally:
            plain.stop()
        res_blackhole = {}
        for name, m in mods.items():  # a fresh server per store: the previous one's sockets are gone
            r = OwnedRedis(work / f"auth-{len(res_blackhole)}")
            try:
                import redis

                redis.Redis.from_url(r.url).config_set("requirepass", PASSWORD)
                url = f"redis://:{PASSWORD}@127.0.0.1:{r.port}/0"
                res_blackhole.update(failing_reads({name: m}, url, a.failing, stop_pid=r.proc.pid))
            finally:
                r.stop()
        res_dns = failing_reads(mods, "redis://mtrank-no-such-host.invalid:6379/0", a.failing)

    rows = [["healthy read, 1 + 500 keys: p50 µs", *(res_healthy[n]["p50_us"] for n in mods),
             res_healthy["warm pools"]["p50_us"] / res_healthy["before"]["p50_us"]],
            ["healthy read, 1 + 500 keys: p99 µs", *(res_healthy[n]["p99_us"] for n in mods),
             res_healthy["warm pools"]["p99_us"] / res_healthy["before"]["p99_us"]]]
    for label, res in (("black-holed Redis (SIGSTOP, AUTH)", res_blackhole), ("unresolvable host", res_dns)):
        for q in ("p50_ms", "max_ms"):
            rows.append([f"{label}, {SHORT_BUDGET_S * 1e3:.0f} ms budget: {q.replace('_', ' ')}",
                         *(res[n][q] for n in mods), res["warm pools"][q] / res["before"][q]])
    table = md_table(["read", "before", "warm pools", "warm pools / before"], rows, digits=[1, 2, 2, 3])
    reasons = "\n".join(f"- {label}, answers: " + "; ".join(f"{n}: {res[n]['reasons']}" for n in mods)
                        for label, res in (("black-holed", res_blackhole), ("unresolvable", res_dns)))
    mach = machine_info()
    md = (f"# Redis reads: warm pools against the previous request path\n\n"
          f"- machine: {mach['cpu']}, {mach['cores']} cores, load average at start "
          f"{', '.join(f'{x:.2f}' for x in mach['loadavg'])}\n"
          f"- commit {git('rev-parse', '--short=12', 'HEAD')}; before = service/redis_client.py of {a.baseline}\n"
          f"- healthy: {a.rounds} alternating rounds of {a.reads} reads per store; failing: {a.failing} reads "
          f"per store, 5 ms apart, breaker disabled\n\n{table}\n\n{reasons}\n\n"
          "Before, a read that found no open connection connected on the request path: DNS with no timeout, "
          "then connect and AUTH each with the store's whole 15 ms deadline as the timeout, whatever was left "
          "of the request's budget. With warm pools a read never connects: it takes a warm connection or "
          "gives up within its own budget. The machine is shared: compare the columns of one run.\n")
    out = Path(a.out_dir)
    write_json(out / "redis_connect.json", {"machine": mach, "git": git_info(), "baseline": a.baseline,
                                             "healthy": res_healthy, "black_holed": res_blackhole,
                                             "unresolvable": res_dns})
    (out / "redis_connect.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
