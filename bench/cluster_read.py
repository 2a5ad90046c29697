"""Cluster read (issue 14 item 2): the request path's feature read - 1 user + N item keys through
``FeatureStore.mget`` - on a real 3-master Redis Cluster next to a single Redis, in one run.

    nice -n 10 python bench/cluster_read.py           # ~1-2 min; writes bench/results/cluster_read.{md,json}
    python bench/cluster_read.py --quick              # seconds; writes to a temp dir

The benchmark starts its own redis-servers on free loopback ports (three cluster-enabled nodes
joined by ``redis-cli --cluster create``, and one plain node) and stops them at the end. It writes
the same synthetic values (an item value of 32 bytes and a user value of 156, the demo schema's
sizes) into both under the contract's key layout (``service.contract.user_key``/``item_keys``)
and reads them with the service's own ``FeatureStore`` (``service.redis_client.make_store``):

* **single**: one MGET of the user key and the N item keys (what a single Redis always does);
* **cluster**: the same keys on the cluster: per node one pipeline of one MGET per hash slot; the
  item keys' hash tags bound that to ``ITEM_GROUPS`` MGETs in all;
* **cluster, v1 keys**: for reference, the same values under the previous layout's item keys
  (``<ns>:i:<item_id>``, no hash tag), read by the same code: one MGET per hash slot of each key,
  about N MGETs;
* **cluster, N groups** (``--compare-groups``, default 32 and 8): for comparison, the same read
  with N item groups instead of ``ITEM_GROUPS`` (the contract's heads computed for N, under
  another namespace): what the choice of ``ITEM_GROUPS`` costs or saves.

Each round picks a random user and N distinct random items and reads them from every store in
turn (the order alternates from round to round), after untimed warm-up reads. Times are wall
clock (``perf_counter``) around ``store.mget(keys)``; key building is timed apart (the same on
every store). The ratio is cluster p50 / single p50 (and the same for p99). "client CPU" is the
benchmark thread's CPU time per read (``thread_time``): the client's own work, which a loaded
machine distorts less than wall time. The MGETs each node served for one read come from
``INFO commandstats`` before and after it; so does the servers' time per read (``usec`` of MGET,
over ``--server-reads`` reads of one store at a time). The client's parts (slot grouping, packing)
are timed apart on the same keys every tenth round.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import hiredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis.cluster import RedisCluster  # noqa: E402

from bench.common import ROOT, OwnedRedis, git_info, machine_info, md_table, stop_group, write_json  # noqa: E402
from service import contract  # noqa: E402
from service.contract import KEY_LAYOUT_VERSION, item_keys, user_key  # noqa: E402
from service.redis_client import _positions_by_slot, make_store  # noqa: E402
from service.settings import Settings  # noqa: E402

NS = "bench-cr:000000000000"
pack = hiredis.pack_command  # what FeatureStore.mget packs with
USER_BYTES, ITEM_BYTES = 156, 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few rounds and items, output to a temp dir")
    p.add_argument("--users", type=int, default=None, help="users loaded (default 10,000; quick 1,000)")
    p.add_argument("--items", type=int, default=None, help="items loaded (default 100,000; quick 5,000)")
    p.add_argument("--sizes", default="500,2000", help="items per read (comma-separated)")
    p.add_argument("--rounds", type=int, default=None, help="timed reads per size and store (default 1,500; quick 60)")
    p.add_argument("--warmup", type=int, default=None, help="untimed reads per size and store first (default 100)")
    p.add_argument("--compare-groups", default="32,8",
                   help="what-if rows: the cluster read with other numbers of item groups than the contract's "
                        "ITEM_GROUPS (comma-separated; '' for none)")
    p.add_argument("--server-reads", type=int, default=None,
                   help="reads per size and store for the server-time pass (default 200; quick 20)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default bench/results)")
    a = p.parse_args(argv)
    defaults = dict(users=1000, items=5000, rounds=60, warmup=10, server_reads=20) if a.quick else \
        dict(users=10_000, items=100_000, rounds=1500, warmup=100, server_reads=200)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


# ---------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------

def _cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        port = random.randint(20_000, 50_000)
        try:
            for q in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class OwnedCluster:
    """Three cluster-enabled redis-servers (no persistence, loopback) joined into one cluster."""

    def __init__(self, workdir: Path, masters: int = 3):
        exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if exe is None or cli is None:
            raise RuntimeError("redis-server and redis-cli must be on PATH (apt-get install redis-server)")
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        try:
            for i in range(masters):
                d = workdir / f"node{i}"
                d.mkdir(parents=True, exist_ok=True)
                port = _cluster_port()
                self.procs.append(subprocess.Popen(
                    [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(d), "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                     "--cluster-node-timeout", "5000"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
                self.ports.append(port)
            import redis

            for port in self.ports:
                _wait_ping(redis.Redis(port=port))
            subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
            deadline = time.monotonic() + 30
            while not all(b"cluster_state:ok" in redis.Redis(port=p).execute_command("CLUSTER", "INFO")
                          for p in self.ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def mget_calls(self) -> list[int]:
        """MGET calls so far, per node (``INFO commandstats``)."""
        return [calls for calls, _ in mget_stats(self.ports)]

    def stop(self) -> None:
        for p in self.procs:
            stop_group(p)


def mget_stats(ports: list[int]) -> list[tuple[int, int]]:
    """(MGET calls, microseconds spent in MGET) so far, per server (``INFO commandstats``)."""
    import redis

    out = []
    for p in ports:
        with redis.Redis(port=p) as c:
            st = c.info("commandstats").get("cmdstat_mget", {})
            out.append((int(st.get("calls", 0)), int(st.get("usec", 0))))
    return out


def _wait_ping(client) -> None:
    import redis

    for _ in range(200):
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING")


# ---------------------------------------------------------------------------------------------
# data and reads
# ---------------------------------------------------------------------------------------------

def v1_item_keys(ns: str, item_ids: list[str]) -> list[str]:
    """The previous layout's item keys (KEY_LAYOUT_VERSION 1), for the reference row only."""
    return [f"{ns}:i:{i}" for i in item_ids]


def what_if_heads(ns: str, groups: int) -> tuple[str, ...]:
    """The item key heads ``service.contract`` would give ``ns`` with ``groups`` item groups."""
    saved, contract.ITEM_GROUPS = contract.ITEM_GROUPS, groups
    try:
        return contract._item_heads.__wrapped__(ns)  # uncached: the cache holds the real layout's heads
    finally:
        contract.ITEM_GROUPS = saved


def what_if_keys(heads: tuple[str, ...], item_ids: list[str]) -> list[str]:
    """``item_keys`` with the heads of :func:`what_if_heads` (what the contract's item_keys does)."""
    return [heads[zlib.crc32(i.encode()) % len(heads)] + i for i in item_ids]


def load(client, users: list[str], items: list[str], v1: bool, extra=()) -> None:
    """The users' and items' values under the contract's layout (and the v1 item keys: on the cluster;
    and ``extra`` item key lists, for the what-if rows)."""
    rnd = random.Random(1)
    values = {user_key(NS, u): rnd.randbytes(USER_BYTES) for u in users}
    item_values = [rnd.randbytes(ITEM_BYTES) for _ in items]
    values.update(zip(item_keys(NS, items), item_values, strict=True))
    if v1:
        values.update(zip(v1_item_keys(NS, items), item_values, strict=True))
    for keys in extra:
        values.update(zip(keys, item_values, strict=True))
    pairs = list(values.items())
    write = client.mset_nonatomic if isinstance(client, RedisCluster) else client.mset  # per slot on a cluster
    for i in range(0, len(pairs), 20_000):
        write(dict(pairs[i:i + 20_000]))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(xs: list[float]) -> dict:
    return {"p50_ms": pct(xs, 0.5) * 1e3, "p90_ms": pct(xs, 0.9) * 1e3, "p99_ms": pct(xs, 0.99) * 1e3,
            "mean_ms": statistics.fmean(xs) * 1e3, "n": len(xs)}


def run(a) -> dict:
    rng = random.Random(7)
    users = [f"u{i}" for i in range(a.users)]
    items = [f"item-{i}" for i in range(a.items)]
    sizes = [int(s) for s in a.sizes.split(",")]
    what_if = [int(g) for g in a.compare_groups.split(",") if g.strip()]
    work = Path(tempfile.mkdtemp(prefix="mtrank-bench-cluster-"))
    single = cluster = None
    stores = {}
    try:
        single = OwnedRedis(work / "single")
        cluster = OwnedCluster(work / "cluster")
        print(f"single redis on {single.url}; cluster on ports {cluster.ports}", flush=True)
        t0 = time.perf_counter()
        with single.client() as c:
            load(c, users, items, v1=False)
        heads = {g: what_if_heads(f"bench-cr-g{g}:000000000000", g) for g in what_if}
        cc = make_store(Settings(redis_url=cluster.url)).client
        load(cc, users, items, v1=True, extra=[what_if_keys(h, items) for h in heads.values()])
        cc.close()
        print(f"loaded {a.users:,} users and {a.items:,} items in {time.perf_counter() - t0:.1f}s", flush=True)
        settings = dict(redis_deadline_ms=2000, breaker_failures=1000)
        stores = {"single": make_store(Settings(redis_url=single.url, **settings)),
                  "cluster": make_store(Settings(redis_url=cluster.url, **settings))}
        stores["cluster, v1 keys"] = stores["cluster"]
        for g in what_if:
            stores[f"cluster, {g} groups"] = stores["cluster"]
        names = list(stores)
        results: dict = {"sizes": {}}
        for n in sizes:
            times: dict[str, list[float]] = {k: [] for k in names}
            cpu: dict[str, list[float]] = {k: [] for k in names}
            build: list[float] = []
            plan: dict[str, list[float]] = {"v2": [], "v1": []}
            packing: dict[str, list[float]] = {"single": [], "cluster": []}
            for r in range(a.warmup + a.rounds):
                user, chosen = rng.choice(users), rng.sample(items, n)
                t = time.perf_counter()
                keys = [user_key(NS, user), *item_keys(NS, chosen)]
                build_s = time.perf_counter() - t
                by_name = {"single": keys, "cluster": keys,
                           "cluster, v1 keys": [user_key(NS, user), *v1_item_keys(NS, chosen)]}
                for g, h in heads.items():
                    by_name[f"cluster, {g} groups"] = [user_key(NS, user), *what_if_keys(h, chosen)]
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    c, t = time.thread_time(), time.perf_counter()
                    got = stores[name].mget(by_name[name])
                    dt, dc = time.perf_counter() - t, time.thread_time() - c
                    if r >= a.warmup:
                        times[name].append(dt)
                        cpu[name].append(dc)
                    if r == a.warmup and any(v is None for v in got):
                        raise RuntimeError(f"{name}: a value is missing")
                if r >= a.warmup:
                    build.append(build_s)
                    if r % 10 == 0:  # client-side parts alone, for the breakdown
                        for layout, ks in (("v2", keys), ("v1", by_name["cluster, v1 keys"])):
                            t = time.perf_counter()
                            _positions_by_slot(ks)
                            plan[layout].append(time.perf_counter() - t)
                        groups = list(_positions_by_slot(keys).values())
                        t = time.perf_counter()
                        pack(("MGET", *keys))
                        packing["single"].append(time.perf_counter() - t)
                        t = time.perf_counter()
                        b"".join([pack(("MGET", *map(keys.__getitem__, g))) for g in groups])
                        packing["cluster"].append(time.perf_counter() - t)
            # MGETs per node for one read
            user, chosen = rng.choice(users), rng.sample(items, n)
            calls = {}
            for name, keys in (("cluster", [user_key(NS, user), *item_keys(NS, chosen)]),
                               ("cluster, v1 keys", [user_key(NS, user), *v1_item_keys(NS, chosen)]),
                               *[(f"cluster, {g} groups", [user_key(NS, user), *what_if_keys(h, chosen)])
                                 for g, h in heads.items()]):
                before = cluster.mget_calls()
                stores[name].mget(keys)
                calls[name] = [x - y for x, y in zip(cluster.mget_calls(), before, strict=True)]
            # server time per read: MGET microseconds (INFO commandstats) over reads of one store at a time
            server = {}
            for name, ports in (("single", [single.port]), ("cluster", cluster.ports)):
                before = mget_stats(ports)
                for _ in range(a.server_reads):
                    stores[name].mget([user_key(NS, rng.choice(users)), *item_keys(NS, rng.sample(items, n))])
                after = mget_stats(ports)
                server[name] = [(u - ub) / a.server_reads for (_, u), (_, ub) in zip(after, before, strict=True)]
            row = {name: {**summary(times[name]), "client_cpu_ms": statistics.fmean(cpu[name]) * 1e3} for name in names}
            res = {"reads": row, "key_build": summary(build), "slot_planning": {k: summary(v) for k, v in plan.items()},
                   "packing": {k: summary(v) for k, v in packing.items()}, "mgets_per_node": calls,
                   "server_us_per_read": {"single": server["single"][0], "cluster_nodes": server["cluster"],
                                          "cluster_busiest": max(server["cluster"]),
                                          "cluster_all": sum(server["cluster"])},
                   "ratio_p50": row["cluster"]["p50_ms"] / row["single"]["p50_ms"],
                   "ratio_p99": row["cluster"]["p99_ms"] / row["single"]["p99_ms"],
                   "cpu_ratio": row["cluster"]["client_cpu_ms"] / row["single"]["client_cpu_ms"],
                   "v1_ratio_p50": row["cluster, v1 keys"]["p50_ms"] / row["single"]["p50_ms"]}
            results["sizes"][str(n)] = res
            print(f"N={n}: single p50 {row['single']['p50_ms']:.3f} ms, cluster p50 {row['cluster']['p50_ms']:.3f} ms "
                  f"(x{res['ratio_p50']:.2f}), v1 keys p50 {row['cluster, v1 keys']['p50_ms']:.3f} ms", flush=True)
        return results
    finally:
        for s in {id(s): s for s in stores.values()}.values():
            s.close()
        if cluster is not None:
            cluster.stop()
        if single is not None:
            single.stop()
        shutil.rmtree(work, ignore_errors=True)


def render(report: dict) -> str:
    a, versions = report["args"], report["machine"]["versions"]
    lines = [
        "# Cluster read: 1 user + N items, 3-master Redis Cluster vs a single Redis",
        "",
        f"`bench/cluster_read.py`, one run ({report['finished']}), commit `{report['git']['commit'][:10]}`"
        f"{' (dirty)' if report['git']['dirty'] else ''}; {report['machine']['cores']} cores "
        f"({report['machine']['cpu']}), load average at start {report['loadavg_start']}; redis-server "
        f"{versions.get('redis-server', '?')}, redis-py {versions.get('redis')}, hiredis {versions.get('hiredis')}.",
        f"Key layout version {report['key_layout_version']}, {report['item_groups']} item groups (the "
        "`cluster, N groups` rows: the same read with N groups instead, for comparison); "
        f"{a['users']:,} users and {a['items']:,} items loaded; {a['rounds']} timed reads per size and store "
        f"(after {a['warmup']} warm-up), interleaved, order alternating. Times in ms, wall clock around "
        "`FeatureStore.mget` (all nodes on this machine: loopback, no network).",
        "",
    ]
    rows = []
    for n, res in report["results"]["sizes"].items():
        for name, r in res["reads"].items():
            ratio = r["p50_ms"] / res["reads"]["single"]["p50_ms"]
            ratio99 = r["p99_ms"] / res["reads"]["single"]["p99_ms"]
            mgets = res["mgets_per_node"].get(name)
            rows.append([f"1 + {int(n):,}", name, r["p50_ms"], r["p90_ms"], r["p99_ms"], ratio, ratio99,
                         r["client_cpu_ms"], "1" if name == "single" else " / ".join(str(x) for x in mgets)])
    lines.append(md_table(["read", "store", "p50", "p90", "p99", "p50 / single", "p99 / single",
                           "client CPU (mean)", "MGETs per node"], rows, digits=[0, 0, 3, 3, 3, 2, 2, 3, 0]))
    lines += ["", "Where the time goes, ms per read. Client side (p50, timed apart on the same keys): building the "
              "keys (the same for every store), grouping them by hash slot and packing the MGETs (hiredis), as "
              "`FeatureStore.mget` does. Server side: time inside MGET (`INFO commandstats` usec) over "
              f"{a['server_reads']} reads of one store at a time; on the cluster for its busiest node and for all "
              "three together.", ""]
    rows = [[f"1 + {int(n):,}", res["key_build"]["p50_ms"], res["slot_planning"]["v2"]["p50_ms"],
             res["slot_planning"]["v1"]["p50_ms"], res["packing"]["single"]["p50_ms"],
             res["packing"]["cluster"]["p50_ms"], res["server_us_per_read"]["single"] / 1e3,
             res["server_us_per_read"]["cluster_busiest"] / 1e3, res["server_us_per_read"]["cluster_all"] / 1e3]
            for n, res in report["results"]["sizes"].items()]
    lines.append(md_table(["read", "key build", "slot grouping (v2 keys)", "slot grouping (v1 keys)",
                           "packing, single", "packing, cluster", "server, single", "server, cluster busiest node",
                           "server, cluster all nodes"], rows, digits=[0] + [3] * 8))
    sizes = report["results"]["sizes"]
    target = ", ".join(f"1 + {int(n):,}: {res['ratio_p50']:.2f}x" for n, res in sizes.items())
    met = all(res["ratio_p50"] <= 1.5 for res in sizes.values())
    cpu = ", ".join(f"1 + {int(n):,}: {res['cpu_ratio']:.2f}x" for n, res in sizes.items())
    extra = ", ".join(f"1 + {int(n):,}: {_cpu_extra(res):.3f} ms, of which slot grouping "
                      f"{res['slot_planning']['v2']['p50_ms']:.3f}" for n, res in sizes.items())
    lines += ["", f"Target: cluster p50 within 1.5x of the single Redis. Measured (wall p50): {target} "
              f"({'met' if met else 'NOT met'}). Client CPU per read, cluster / single: {cpu}; the cluster's extra "
              f"client CPU per read: {extra} (the rest: two more connections to write to and read from, one "
              "reply per MGET, putting the values back in request order). On a loaded machine the wall times are "
              "mostly waiting to be scheduled (compare the load average above), and a cluster read needs four "
              "processes scheduled (client and three servers) where a single Redis needs two; the client CPU per "
              "read is the client's own work, which an idle machine's wall time exposes."]
    return "\n".join(lines) + "\n"


def _cpu_extra(res: dict) -> float:
    return res["reads"]["cluster"]["client_cpu_ms"] - res["reads"]["single"]["client_cpu_ms"]


def main(argv=None) -> None:
    a = parse_args(argv)
    out = a.out or (Path(tempfile.mkdtemp(prefix="mtrank-bench-")) if a.quick else ROOT / "bench" / "results")
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "machine": machine_info(), "git": git_info(),
              "key_layout_version": KEY_LAYOUT_VERSION, "item_groups": contract.ITEM_GROUPS}
    report["machine"]["versions"]["hiredis"] = hiredis.__version__
    report["results"] = run(a)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = render(report)
    write_json(out / "cluster_read.json", report)
    (out / "cluster_read.md").write_text(md)
    print(md)
    print(f"wrote {out / 'cluster_read.md'} and {out / 'cluster_read.json'}")


if __name__ == "__main__":
    main()
