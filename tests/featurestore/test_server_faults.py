"""Redis faults under a real server (``uvicorn --factory service.app:create_app`` in a subprocess)
and a steady stream of /rank calls: Redis killed and restarted on the same port -> no 5xx, every
response within the deadline plus slack, degraded while Redis is away, full service again within
a second of Redis answering; in fail mode the answer is 503, never 500."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest

from tests.support.server import Server
from tests.support.world import DEADLINE_MS, assert_latencies, load_world, server_env


class Load:
    """``threads`` clients posting the same /rank request in a loop; every answer is recorded."""

    def __init__(self, base: str, payload: dict, threads: int = 2):
        self.base = base
        self.payload = payload
        self._raw: list[tuple] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/rank", json=self.payload)
                    status, body = r.status_code, r.content
                except httpx.HTTPError as e:
                    status, body = 0, repr(e).encode()
                t1 = time.monotonic()
                with self._lock:  # raw bytes: parsed bodies piling up would make our GC pause the clock
                    self._raw.append((t0, t1, status, body))
                time.sleep(0.003)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    @property
    def records(self) -> list[dict]:
        out = []
        for t0, t1, status, body in self._raw:
            rec = {"t0": t0, "t1": t1, "status": status}
            if status == 200:
                j = orjson.loads(body)
                rec.update(degraded=j["degraded"], reason=j["degraded_reason"],
                           items=[(x["item_id"], x["score"]) for x in j["items"]])
            else:
                rec["body"] = body[:300]
            out.append(rec)
        return out


@pytest.mark.slow
def test_server_rides_out_a_redis_kill_and_restart(own_redis, world, tmp_path):
    r = own_redis()
    load_world(world, r.client(), "srv")
    r.snapshot()  # the restart loads it: same features after the outage
    srv = Server(server_env(r.url, "srv", world), tmp_path / "server.log").start()
    payload = {"user_id": world.users[2], "items": world.items[:100], "context": {"hour": 9}}
    try:
        warm = httpx.post(f"{srv.base}/rank", json=payload, timeout=10).json()
        assert warm["degraded"] is False and warm["degraded_reason"] is None
        with Load(srv.base, payload) as load:
            time.sleep(0.6)
            t_kill = time.monotonic()
            r.kill()
            time.sleep(1.2)
            t_restart = time.monotonic()
            r.start()
            t_back = time.monotonic()  # Redis answers PING (and holds the snapshot's data)
            time.sleep(1.5)
        log = srv.log()
    finally:
        srv.stop()
    recs = load.records
    statuses = {x["status"] for x in recs}
    assert statuses == {200}, [x for x in recs if x["status"] != 200][:3]
    lat = sorted(x["t1"] - x["t0"] for x in recs)
    print(f"\n{len(recs)} responses; latency p50 {lat[len(lat) // 2] * 1e3:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms")
    assert_latencies(lat, DEADLINE_MS / 1000)
    down = [x for x in recs if x["t0"] > t_kill + 0.02 and x["t1"] < t_restart]
    assert len(down) >= 10 and all(x["degraded"] for x in down), [x for x in down if not x["degraded"]][:3]
    assert {x["reason"] for x in down} <= {"down", "circuit_open", "timeout"} and "circuit_open" in {
        x["reason"] for x in down}
    # a healthy Redis can miss the 15 ms budget when this shared 2-core box is overloaded: allow a
    # few such answers (reason "timeout", or "circuit_open" after three), never a wrong one
    healthy_before = [x for x in recs if x["t1"] < t_kill]
    assert healthy_before and rare_misses(healthy_before)
    first_ok = min((x["t1"] for x in recs if x["t0"] >= t_back and not x["degraded"]), default=None)
    assert first_ok is not None and first_ok - t_back <= 1.0, log[-2000:]
    tail = [x for x in recs if x["t0"] > t_back + 1.0]
    assert tail and rare_misses(tail), ([(round(x["t0"] - t_back, 3), x["reason"]) for x in tail if x["degraded"]],
                                        log[-3000:])
    assert all(x["items"] == warm_items(warm) for x in tail + healthy_before if not x["degraded"])
    assert "circuit open" in log and "circuit closed" in log


def rare_misses(recs: list[dict]) -> bool:
    late = [x for x in recs if x["degraded"]]
    return len(late) <= 0.05 * len(recs) and {x["reason"] for x in late} <= {"timeout", "circuit_open"}


def warm_items(body: dict) -> list:
    return [(x["item_id"], x["score"]) for x in body["items"]]


@pytest.mark.slow
def test_fail_mode_answers_503_not_500(own_redis, world, tmp_path):
    r = own_redis()
    load_world(world, r.client(), "srvf")
    srv = Server(server_env(r.url, "srvf", world, MTRANK_REDIS_FAILURE_MODE="fail"), tmp_path / "fail.log").start()
    payload = {"user_id": world.users[0], "items": world.items[:20], "request_id": "rq-fail"}
    try:
        ok = httpx.post(f"{srv.base}/rank", json=payload, timeout=10)
        assert ok.status_code == 200 and ok.json()["degraded"] is False
        r.kill()
        answers = []
        with httpx.Client(base_url=srv.base, timeout=10) as c:
            c.get("/healthz")  # a warm connection: the timings below are the service's
            for _ in range(8):  # before and after the breaker opens
                t = time.monotonic()
                resp = c.post("/rank", json=payload)
                answers.append((resp.status_code, resp.json(), time.monotonic() - t))
    finally:
        srv.stop()
    assert {a[0] for a in answers} == {503}, answers
    assert all(a[1] == {"error": {"code": "feature_store_unavailable", "message": "feature store unavailable"},
                        "request_id": "rq-fail"} for a in answers)
    assert_latencies([a[2] for a in answers], DEADLINE_MS / 1000)


@pytest.mark.slow
def test_server_under_client_pause_and_debug_sleep(own_redis, world, tmp_path):
    """A stalled Redis (``CLIENT PAUSE 2000``, then ``DEBUG SLEEP 1``): every answer still comes
    within the deadline plus slack, degraded during the stall, normal again within 1 s after it."""
    r = own_redis(args=("--enable-debug-command", "yes"))
    load_world(world, r.client(), "stall")
    srv = Server(server_env(r.url, "stall", world), tmp_path / "stall.log").start()
    payload = {"user_id": world.users[3], "items": world.items[:100]}
    windows = []
    try:
        assert httpx.post(f"{srv.base}/rank", json=payload, timeout=10).json()["degraded"] is False
        with Load(srv.base, payload) as load:
            time.sleep(0.3)
            sent = time.monotonic()
            r.client().execute_command("CLIENT", "PAUSE", "2000")
            windows.append((time.monotonic(), sent + 2.0))  # paused from the reply on, until sent + 2 s
            time.sleep(3.0)
            sleeper = r.debug_sleep(1)
            asleep = time.monotonic() - 0.05
            sleeper.join()  # returns when the server wakes up
            windows.append((asleep, time.monotonic()))
            time.sleep(1.5)
    finally:
        srv.stop()
    recs = load.records
    assert {x["status"] for x in recs} == {200}
    for start, end in windows:
        during = [x for x in recs if x["t0"] > start + 0.02 and x["t1"] < end - 0.02]
        assert len(during) >= 10 and all(x["degraded"] for x in during)
        lat = max(x["t1"] - x["t0"] for x in during)
        print(f"\nstall of {end - start:.2f}s: {len(during)} responses, all degraded, max latency {lat * 1e3:.1f} ms")
        first_ok = min(x["t1"] for x in recs if x["t0"] >= end and not x["degraded"])
        assert first_ok - end <= 1.0
    assert_latencies([x["t1"] - x["t0"] for x in recs], DEADLINE_MS / 1000)
    after = [x for x in recs if x["t0"] > windows[-1][1] + 1.0]
    assert after and rare_misses(after)
