"""Freshness benchmark: how soon does a posted event reach the next /rank, and what does the event
load cost /rank?

Setup (all owned by the benchmark): a redis-server on a free port, a model store with one bundle
whose user sequence ``clicked`` (max_len 20) follows click events (the test suite's ONNX model,
built with onnx.helper: embeddings, the mean of the sequence embeddings, an MLP; ``--users`` users
and ``--items`` items written into Redis), ``uvicorn --factory service.app:create_app`` (one
worker) and one ``mtrank events consume`` process (``python -m service.cli``).

Phases alternate, ``--rounds`` times: **rank only** (``--rank-rps`` /rank requests per second of
``--rank-items`` items, open loop) and **rank + events** (the same /rank load plus ``--events-rps``
click events per second for random users, in POST /events batches of ``--batch``, and probes).
A probe posts one click of a dedicated probe user for an item other than the head of its sequence
and watches that user's packed value in Redis (a keyspace notification on its key, then a read)
until the item is at the head: freshness = visible - sent. The value in Redis is exactly what the
next /rank reads (user values are never cached), so that is when the next /rank sees the new
sequence. The rank-only phases
carry no probes, so the /rank latencies of the two phases differ only by the event load.

Writes ``bench/results/freshness.{json,md}`` (or ``--out``) and prints the table. Run it with
``nice -n 5`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    OwnedRedis,
    cpu_seconds,
    free_port,
    git_info,
    machine_info,
    process_tree,
    stop_group,
)
from service.codec import EntityCodec  # noqa: E402
from service.contract import FeatureSchema, SequenceField, meta_key, namespace, user_key  # noqa: E402
from service.events.sequences import seq_offset  # noqa: E402
from tests.support.bundles import make_schema, put_entities, write_bundle  # noqa: E402

PREFIX = "fresh"
JSON = {"content-type": "application/json"}
SEQ = 20


def build(root: Path, url: str, n_users: int, n_items: int) -> tuple[FeatureSchema, dict[str, list[str]]]:
    vocabs = {"user_id": [f"u{i}" for i in range(n_users)], "gender": ["m", "f", "x"],
              "item_id": [f"i{i}" for i in range(n_items)], "category": [f"c{i}" for i in range(50)],
              "hour": [str(h) for h in range(24)]}
    base = make_schema(vocabs)
    schema = base.model_copy(update={"sequence": [SequenceField(name="clicked", entity="user", max_len=SEQ,
                                                                vocab_of="item_id", event="click")]})
    write_bundle(root, version=1, schema=schema, vocabs=vocabs)
    rng = np.random.default_rng(0)
    users = {f"u{u}": (np.array([u + 1, rng.integers(1, 4)]), np.array([rng.uniform(18, 60)], np.float32),
                       rng.integers(1, n_items + 1, SEQ)) for u in range(n_users)}
    items = {f"i{i}": (np.array([i + 1, rng.integers(1, 51)]), np.array([rng.uniform(1, 30), rng.uniform(0, 1)],
                                                                           np.float32), np.zeros(0, np.int64))
             for i in range(n_items)}
    c = redis.Redis.from_url(url)
    put_entities(c, PREFIX, schema, "user", users)
    put_entities(c, PREFIX, schema, "item", items)
    c.set(meta_key(namespace(PREFIX, schema)), json.dumps({"schema_fingerprint": schema.fingerprint(),
                                                           "model": "demo", "version": 1, "loaded_at": time.time()}))
    return schema, vocabs


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


class Load:
    """The /rank load (open loop), and during event phases the event load and the probes."""

    def __init__(self, base: str, url: str, schema: FeatureSchema, n_users: int, n_items: int, args):
        self.base, self.args = base, args
        self.n_users, self.n_items = n_users, n_items
        self.url = url
        self.probe_key = user_key(namespace(PREFIX, schema), "probe")
        self.seq_at = seq_offset(EntityCodec.for_schema(schema, "user"))
        self.seq_id = 0
        self.lock = threading.Lock()

    def rank(self, stop: threading.Event, out: list[float], errors: list[int], degraded: list[int]) -> None:
        rng = random.Random(1)
        period = 1.0 / self.args.rank_rps
        with httpx.Client(timeout=10) as http:
            nxt = time.perf_counter()
            while not stop.is_set():
                nxt += period
                body = {"user_id": f"u{rng.randrange(self.n_users)}",
                        "items": [f"i{rng.randrange(self.n_items)}" for _ in range(self.args.rank_items)]}
                data = orjson.dumps(body)
                t0 = time.perf_counter()
                r = http.post(f"{self.base}/rank", content=data, headers=JSON)
                dt = time.perf_counter() - t0
                if r.status_code == 200:
                    out.append(dt * 1000)
                    if orjson.loads(r.content)["degraded"]:
                        degraded.append(1)
                else:
                    errors.append(r.status_code)
                time.sleep(max(0.0, nxt - time.perf_counter()))

    def _post(self, http: httpx.Client, events: list[dict]) -> None:
        r = http.post(f"{self.base}/events", content=orjson.dumps({"events": events}), headers=JSON)
        if r.status_code != 202:
            raise RuntimeError(f"POST /events: {r.status_code} {r.text[:200]}")

    def events(self, stop: threading.Event, sent: list[int], k: int) -> None:
        """Sender ``k`` of ``--senders``: its share of ``--events-rps`` in batches of ``--batch``."""
        rng = random.Random(100 + k)
        b = self.args.batch
        period = b * self.args.senders / self.args.events_rps
        with httpx.Client(timeout=10) as http:
            nxt = time.perf_counter() + period * k / self.args.senders
            time.sleep(max(0.0, nxt - time.perf_counter()))
            while not stop.is_set():
                nxt += period
                batch = []
                for _ in range(b):
                    with self.lock:
                        self.seq_id += 1
                        n = self.seq_id
                    batch.append({"event_id": f"bg-{os.getpid()}-{n}", "user_id": f"u{rng.randrange(self.n_users)}",
                                  "item_id": f"i{rng.randrange(self.n_items)}", "type": "click", "ts": time.time()})
                self._post(http, batch)
                with self.lock:
                    sent[0] += b
                time.sleep(max(0.0, nxt - time.perf_counter()))

    def probes(self, stop: threading.Event, out: list[float], split: list[tuple[float, float]],
               sent: list[int]) -> None:
        """``out``: sent -> visible, ms; ``split``: (sent -> 202 answered, 202 -> visible), ms."""
        period = 1.0 / self.args.probe_rps
        n = 0
        client = redis.Redis.from_url(self.url)
        # told by Redis when the probe user's value changes (keyspace notifications of our own Redis):
        # no polling delay, no polling load
        client.config_set("notify-keyspace-events", "K$")
        sub = client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(f"__keyspace@0__:{self.probe_key}")
        with httpx.Client(timeout=10) as http:
            nxt = time.perf_counter()
            while not stop.is_set():
                nxt += period
                n += 1
                item = n % (self.n_items - 1)  # never the head: the previous probe's item is n - 1
                want = (item + 1).to_bytes(4, "little")
                ev = {"event_id": f"probe-{os.getpid()}-{time.time_ns()}", "user_id": "probe",
                      "item_id": f"i{item}", "type": "click", "ts": time.time()}
                while sub.get_message(timeout=0) is not None:  # notifications of earlier probes
                    pass
                t0 = time.perf_counter()
                self._post(http, [ev])
                t1 = time.perf_counter()
                with self.lock:
                    sent[0] += 1
                give_up = t0 + 5
                while True:
                    if client.getrange(self.probe_key, self.seq_at, self.seq_at + 3) == want:
                        t2 = time.perf_counter()
                        out.append((t2 - t0) * 1000)
                        split.append(((t1 - t0) * 1000, (t2 - t1) * 1000))
                        break
                    if time.perf_counter() > give_up:
                        out.append(float("inf"))
                        break
                    sub.get_message(timeout=0.05)  # wakes at the next change of the value
                time.sleep(max(0.0, nxt - time.perf_counter()))
        sub.close()


def _role(load: Load, role: str, seconds: float, conn) -> None:
    """One load in its own process (no GIL shared with the others, so a probe's clock is its own)."""
    stop = threading.Event()
    res: dict = {"rank_ms": [], "rank_errors": [], "degraded": [], "fresh": [], "split": [], "sent": [0]}
    if role == "rank":
        threads = [threading.Thread(target=load.rank, args=(stop, res["rank_ms"], res["rank_errors"],
                                                            res["degraded"]))]
    elif role == "events":
        threads = [threading.Thread(target=load.events, args=(stop, res["sent"], k)) for k in range(load.args.senders)]
    else:
        threads = [threading.Thread(target=load.probes, args=(stop, res["fresh"], res["split"], res["sent"]))]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    conn.send(res)
    conn.close()


def run_phase(load: Load, seconds: float, with_events: bool, watched: dict[str, int] | None = None) -> dict:
    """One phase; ``watched``: name -> pid of the processes whose CPU seconds are counted (server,
    consumer, redis)."""
    watched = watched or {}
    cpu0 = {k: cpu_seconds(process_tree(pid)) for k, pid in watched.items()}
    ctx = mp.get_context("fork")
    roles = ["rank", "events", "probes"] if with_events else ["rank"]
    pipes, procs = [], []
    t0 = time.perf_counter()
    for role in roles:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_role, args=(load, role, seconds, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    res = {role: pipe.recv() for role, pipe in zip(roles, pipes, strict=True)}
    for proc in procs:
        proc.join()
    wall = time.perf_counter() - t0
    cores = {k: (cpu_seconds(process_tree(pid)) - cpu0[k]) / wall for k, pid in watched.items()}
    rank = res["rank"]
    sent = sum(r["sent"][0] for role, r in res.items() if role != "rank")
    probes = res.get("probes", {"fresh": [], "split": []})
    return {"with_events": with_events, "seconds": wall, "rank_ms": rank["rank_ms"], "rank_errors": rank["rank_errors"],
            "rank_degraded": len(rank["degraded"]), "freshness_ms": probes["fresh"], "split_ms": probes["split"],
            "events_sent": sent, "events_per_s": sent / wall, "cores": cores}


def summary(phases: list[dict], with_events: bool) -> dict:
    ps = [p for p in phases if p["with_events"] == with_events]
    lat = [x for p in ps for x in p["rank_ms"]]
    fresh = [x for p in ps for x in p["freshness_ms"]]
    out = {"rank_requests": len(lat), "rank_errors": sum(len(p["rank_errors"]) for p in ps),
           "rank_degraded": sum(p["rank_degraded"] for p in ps),
           "rank_p50_ms": pct(lat, 50), "rank_p90_ms": pct(lat, 90), "rank_p99_ms": pct(lat, 99),
           "cores": {k: statistics.fmean(p["cores"][k] for p in ps) for k in ps[0]["cores"]} if ps else {},
           "rank_p50_ms_by_round": [pct(p["rank_ms"], 50) for p in ps],
           "rank_p99_ms_by_round": [pct(p["rank_ms"], 99) for p in ps]}
    if with_events:
        secs = sum(p["seconds"] for p in ps)
        out.update({"events_sent": sum(p["events_sent"] for p in ps),
                    "events_per_s": sum(p["events_sent"] for p in ps) / secs,
                    "probes": len(fresh), "probes_not_seen_in_5s": sum(1 for x in fresh if x == float("inf")),
                    "freshness_p50_ms": pct(fresh, 50), "freshness_p90_ms": pct(fresh, 90),
                    "freshness_p99_ms": pct(fresh, 99), "freshness_max_ms": max(fresh) if fresh else float("nan"),
                    "freshness_p99_ms_by_round": [pct(p["freshness_ms"], 99) for p in ps],
                    "post_p50_ms": pct([x[0] for p in ps for x in p["split_ms"]], 50),
                    "post_p99_ms": pct([x[0] for p in ps for x in p["split_ms"]], 99),
                    "applied_p50_ms": pct([x[1] for p in ps for x in p["split_ms"]], 50),
                    "applied_p99_ms": pct([x[1] for p in ps for x in p["split_ms"]], 99)})
    return out


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def markdown(res: dict) -> str:
    a, b = res["rank_only"], res["rank_and_events"]
    cfg = res["config"]
    f = lambda x: f"{x:.1f}"  # noqa: E731
    lines = [
        "# Freshness: POST /events -> the next /rank", "",
        f"- machine: {res['machine'].get('cpu', '?')}, {res['machine'].get('cores', '?')} cores, load average at "
        f"start {res['load_at_start']}; commit {res['git'].get('commit', '?')[:12]}",
        f"- {cfg['rounds']} rounds of {cfg['seconds']:.0f} s rank only / {cfg['seconds']:.0f} s rank + events, "
        f"interleaved; /rank {cfg['rank_rps']}/s of {cfg['rank_items']} items (open loop); events "
        f"{cfg['events_rps']}/s in batches of {cfg['batch']} from {cfg['senders']} threads + {cfg['probe_rps']} "
        f"probes/s; {cfg['users']} users, "
        f"{cfg['items']} items, sequence max_len {SEQ}; {cfg['workers']} server worker(s), one consumer process",
        "- freshness: from sending a probe's POST /events to its item at the head of the user's packed value in "
        "Redis (what the next /rank reads; user values are not cached), seen through a keyspace notification of "
        "the probe user's key", "",
        "| | events/s sent | freshness p50 | p90 | p99 | max | /rank p50 | /rank p90 | /rank p99 | /rank requests |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| rank only | - | - | - | - | - | {f(a['rank_p50_ms'])} ms | {f(a['rank_p90_ms'])} ms | "
        f"{f(a['rank_p99_ms'])} ms | {a['rank_requests']} |",
        f"| rank + events | {b['events_per_s']:.0f} | {f(b['freshness_p50_ms'])} ms | {f(b['freshness_p90_ms'])} ms | "
        f"**{f(b['freshness_p99_ms'])} ms** | {f(b['freshness_max_ms'])} ms | {f(b['rank_p50_ms'])} ms | "
        f"{f(b['rank_p90_ms'])} ms | {f(b['rank_p99_ms'])} ms | {b['rank_requests']} |", "",
        f"- /rank with / without events: p50 **{res['ratio_p50']:.2f}x**, p99 {res['ratio_p99']:.2f}x; per round "
        f"p50 without {[round(x, 1) for x in a['rank_p50_ms_by_round']]}, with "
        f"{[round(x, 1) for x in b['rank_p50_ms_by_round']]}",
        f"- freshness p99 per round: {[round(x, 1) for x in b['freshness_p99_ms_by_round']]} ms; probes "
        f"{b['probes']}, not seen within 5 s: {b['probes_not_seen_in_5s']}; /rank errors {a['rank_errors']} / "
        f"{b['rank_errors']}, degraded answers (feature read past MTRANK_REDIS_DEADLINE_MS, counted in the "
        f"latencies) {a['rank_degraded']} / {b['rank_degraded']}",
        f"- freshness split: sent -> 202 answered p50 {f(b['post_p50_ms'])} ms, p99 {f(b['post_p99_ms'])} ms; "
        f"202 -> visible p50 {f(b['applied_p50_ms'])} ms, p99 {f(b['applied_p99_ms'])} ms",
        "- CPU cores used (CPU seconds per second, mean of the rounds), rank only -> rank + events: " + ", ".join(
            f"{k} {a['cores'][k]:.2f} -> {b['cores'][k]:.2f}" for k in a["cores"]),
        f"- target: freshness p99 < 50 ms: **{'PASS' if b['freshness_p99_ms'] < 50 else 'FAIL'}**",
        f"- consumer: {res['consumer']}", "",
        "The machine is shared: compare the rows of one run, not across runs.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    ap.add_argument("--events-rps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50, help="events per POST /events")
    ap.add_argument("--senders", type=int, default=1, help="threads sending the event batches")
    ap.add_argument("--probe-rps", type=float, default=10.0)
    ap.add_argument("--rank-rps", type=float, default=25.0)
    ap.add_argument("--rank-items", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the server")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mtrank-fresh-"))
    rds = OwnedRedis(work / "redis")
    procs: list[subprocess.Popen] = []
    try:
        schema, _ = build(work / "store", rds.url, args.users, args.items)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
        env.update({"MTRANK_REDIS_URL": rds.url, "MTRANK_REDIS_PREFIX": PREFIX,
                    "MTRANK_MODEL_STORE": str(work / "store"), "MTRANK_MODEL_NAME": "demo",
                    "MTRANK_PROVIDERS": "cpu", "MTRANK_WORKERS": str(args.workers),
                    "MTRANK_STORE_POLL_S": "5", "MTRANK_LOG_LEVEL": "WARNING", "MTRANK_LOG_FORMAT": "text"})
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(work / "server.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                                       "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                                       "--workers", str(args.workers)], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_ready(base, procs[0])
        clog = open(work / "consumer.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", "events", "consume", "--name", "bench"],
                                      cwd=ROOT, env={**env, "MTRANK_LOG_LEVEL": "INFO"}, stdout=clog,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        load = Load(base, rds.url, schema, args.users, args.items, args)
        watched = {"server": procs[0].pid, "consumer": procs[1].pid, "redis": rds.proc.pid}
        run_phase(load, 3.0, True)  # warm-up: connections, the consumer's group and targets
        load_at_start = os.getloadavg()
        phases = []
        for _ in range(args.rounds):
            for with_events in (False, True):
                phases.append(run_phase(load, args.seconds, with_events, watched))
                print(f"  {'rank + events' if with_events else 'rank only    '}: "
                      f"rank p50 {pct(phases[-1]['rank_ms'], 50):.1f} ms"
                      + (f", freshness p50 {pct(phases[-1]['freshness_ms'], 50):.1f} p99 "
                         f"{pct(phases[-1]['freshness_ms'], 99):.1f} ms (202 after p50 "
                         f"{pct([x[0] for x in phases[-1]['split_ms']], 50):.1f} ms), "
                         f"{phases[-1]['events_per_s']:.0f} events/s" if with_events else ""), flush=True)
        stop_group(procs[1])
        consumer_lines = [ln for ln in (work / "consumer.log").read_text(errors="replace").splitlines()
                          if "stopped; events" in ln]
        a, b = summary(phases, False), summary(phases, True)
        res = {"config": {**vars(args), "out": str(args.out)}, "machine": machine_info(), "git": git_info(),
               "load_at_start": [round(x, 2) for x in load_at_start], "rank_only": a, "rank_and_events": b,
               "ratio_p50": b["rank_p50_ms"] / a["rank_p50_ms"], "ratio_p99": b["rank_p99_ms"] / a["rank_p99_ms"],
               "consumer": consumer_lines[-1].split("events: ", 1)[-1] if consumer_lines else "?"}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "freshness.json").write_text(json.dumps(res, indent=2, default=str))
        md = markdown(res)
        (args.out / "freshness.md").write_text(md)
        print(md)
    finally:
        for p in reversed(procs):
            stop_group(p)
        rds.stop()


if __name__ == "__main__":
    main()
