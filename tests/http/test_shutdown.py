"""Issue 6, SIGTERM: ``mtrank serve`` stops accepting, finishes the requests in flight (bounded by
MTRANK_SHUTDOWN_DRAIN_S) and exits 0. The requests are held in flight by pausing the real Redis
(CLIENT PAUSE) while they wait for their features; the pause expires by itself."""

import json
import threading
import time

import httpx
import pytest
import redis

from tests.support.http import metric, scrape
from tests.support.loadgen import drive, post

N = 20
ITEMS = [f"i{k % 20}" for k in range(2000)]


def slow_env(env_for, drain_s: float) -> dict:
    # reads wait for Redis (no degraded answers): the pause is what keeps the requests in flight
    return env_for(MTRANK_SHUTDOWN_DRAIN_S=drain_s, MTRANK_MAX_INFLIGHT=64, MTRANK_REDIS_TIMEOUT_MS=20000,
                   MTRANK_REDIS_DEADLINE_MS=20000, MTRANK_BREAKER_FAILURES=1000)


def start_in_flight(srv, redis_url: str, pause_ms: int) -> tuple[threading.Thread, list]:
    """N concurrent /rank of 2000 items, all inside the server (counted by its in-flight gauge)."""
    body = json.dumps({"user_id": "u1", "items": ITEMS, "top_k": 5}).encode()
    out: list = []
    redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
    t = threading.Thread(target=lambda: out.extend(drive(srv.port, post(srv.port, "/rank", body), N, 60, N,
                                                         timeout=60, keep_body=True)))
    t.start()
    deadline = time.monotonic() + 10
    while metric(scrape(srv.base), "mtrank_rank_inflight") < N:
        assert time.monotonic() < deadline, "the requests did not all reach the server"
        time.sleep(0.05)
    return t, out


def refused(base: str) -> bool:
    try:
        httpx.get(f"{base}/healthz", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:
        return False
    return False


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(env_for, serve_factory, redis_url):
    srv = serve_factory(slow_env(env_for, drain_s=20))
    t0 = time.monotonic()
    t, out = start_in_flight(srv, redis_url, pause_ms=2500)
    srv.terminate()
    # new connections are refused while the old requests are still in flight
    deadline = time.monotonic() + 2
    while not refused(srv.base):
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    assert not out and srv.proc.poll() is None, "in-flight requests must still be running"
    t.join(60)
    assert len(out) == N and all(o.status == 200 for o in out), [(o.status, o.body[:200]) for o in out]
    assert all(len(json.loads(o.body)["items"]) == 5 for o in out)
    assert srv.proc.wait(timeout=30) == 0, srv.log()[-3000:]
    assert time.monotonic() - t0 >= 2.0  # they really waited for Redis, i.e. were drained
    assert "Traceback" not in srv.log()
    # their access lines (written through a queue) were all flushed before the exit
    access = [json.loads(x) for x in srv.log().splitlines() if x.startswith("{") and '"service.access"' in x]
    assert sum(1 for a in access if a["status"] == 200 and a["n_items"] == len(ITEMS)) == N


def test_drain_is_bounded(env_for, serve_factory, redis_url):
    srv = serve_factory(slow_env(env_for, drain_s=1))
    t, out = start_in_flight(srv, redis_url, pause_ms=4000)  # expires by itself (UNPAUSE would wait too)
    t0 = time.monotonic()
    srv.terminate()
    assert srv.proc.wait(timeout=20) == 0, srv.log()[-3000:]
    took = time.monotonic() - t0
    assert took < 3, f"exited {took:.1f} s after SIGTERM with a drain of 1 s"
    t.join(60)
    assert len(out) == N and all(o.status != 200 for o in out)  # cut off: the connection was closed
