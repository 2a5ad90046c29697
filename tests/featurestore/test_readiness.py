"""Readiness under Redis faults (issue 11), through a real uvicorn: /readyz means "this replica can
answer /rank usefully". In degrade mode (the default) a paused or killed Redis keeps it 200 with
``degraded: true`` and the reason, the ``mtrank_degraded`` gauge at 1, /rank answering degraded;
back to ``degraded: false`` (gauge 0) once Redis answers. In fail mode the same outage is 503."""

from __future__ import annotations

import httpx
import pytest

from tests.support.server import Server
from tests.support.wait import wait_until as wait_for
from tests.support.world import load_world, server_env


def ready(base: str) -> tuple[int, dict]:
    r = httpx.get(f"{base}/readyz", timeout=10)
    return r.status_code, r.json()


def degraded_gauge(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("mtrank_degraded "):
            return float(line.split()[1])
    raise AssertionError("mtrank_degraded not exposed")




@pytest.mark.slow
def test_degrade_mode_stays_ready_while_redis_is_paused_or_killed(own_redis, world, tmp_path):
    r = own_redis(args=("--enable-debug-command", "yes"))
    load_world(world, r.client(), "rdy")
    r.snapshot()
    srv = Server(server_env(r.url, "rdy", world), tmp_path / "ready.log").start()
    payload = {"user_id": world.users[1], "items": world.items[:50]}
    try:
        assert ready(srv.base) == (200, {"ready": True, "degraded": False})
        assert degraded_gauge(srv.base) == 0

        # paused: PING times out (the breaker is still closed: no /rank yet)
        r.client().execute_command("CLIENT", "PAUSE", "3000")
        status, body = ready(srv.base)
        assert status == 200 and body["ready"] is True and body["degraded"] is True, body
        assert any("Timeout" in x for x in body["reasons"]), body
        assert degraded_gauge(srv.base) == 1
        # /rank opens the breaker; readiness then says so without a PING
        for _ in range(4):
            assert httpx.post(f"{srv.base}/rank", json=payload, timeout=10).json()["degraded"] is True
        status, body = ready(srv.base)
        assert status == 200 and body["degraded"] is True and any("circuit breaker" in x for x in body["reasons"])
        # the pause ends: not degraded any more within a few seconds (breaker probe, then PING)
        assert wait_for(lambda: ready(srv.base) == (200, {"ready": True, "degraded": False}), 6.0)
        assert degraded_gauge(srv.base) == 0

        # killed: still ready, degraded, /rank still answers 200
        r.kill()
        status, body = ready(srv.base)
        assert status == 200 and body["degraded"] is True, body
        resp = httpx.post(f"{srv.base}/rank", json=payload, timeout=10)
        assert resp.status_code == 200 and resp.json()["degraded"] is True
        assert degraded_gauge(srv.base) == 1
        r.start()
        assert wait_for(lambda: ready(srv.base) == (200, {"ready": True, "degraded": False}), 6.0)
    finally:
        srv.stop()


@pytest.mark.slow
def test_fail_mode_is_not_ready_while_redis_is_down(own_redis, world, tmp_path):
    r = own_redis()
    load_world(world, r.client(), "rdyf")
    srv = Server(server_env(r.url, "rdyf", world, MTRANK_REDIS_FAILURE_MODE="fail"), tmp_path / "fail.log").start()
    try:
        assert ready(srv.base) == (200, {"ready": True, "degraded": False})
        r.kill()
        status, body = ready(srv.base)
        assert status == 503 and body["ready"] is False and any("redis" in x for x in body["reasons"]), body
        assert degraded_gauge(srv.base) == 0  # not degraded: not serving at all
        r.start()
        assert wait_for(lambda: ready(srv.base)[0] == 200, 6.0)
    finally:
        srv.stop()
