"""The watcher re-checks the held bundles' feature namespaces (issue 14): Redis restarted empty
(no persistence) under a running server turns it not ready within a few watcher ticks - /readyz
503 naming the vanished features, /rank 503 instead of ranking on defaults, ``mtrank_features_lost``
1 - with exactly one log line; loading the features again brings it back."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.support.server import Server
from tests.support.wait import wait_until as wait_for
from tests.support.world import load_world, server_env

POLL_S = 0.2




def gauge(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


def readyz(base: str) -> tuple[int, dict]:
    r = httpx.get(f"{base}/readyz", timeout=10)
    return r.status_code, r.json()


@pytest.mark.slow
def test_redis_restarted_empty_turns_not_ready_once_and_recovers_after_a_load(own_redis, world, tmp_path):
    r = own_redis()
    load_world(world, r.client(), "nsw")
    log_path = tmp_path / "nsw.log"
    srv = Server(server_env(r.url, "nsw", world, MTRANK_STORE_POLL_S=POLL_S, MTRANK_REDIS_DEADLINE_MS=500),
                 log_path).start()
    payload = {"user_id": world.users[1], "items": world.items[:20]}

    def lost_lines() -> list[str]:
        return [x for x in srv.log().splitlines() if "vanished from Redis" in x]

    try:
        assert readyz(srv.base) == (200, {"ready": True, "degraded": False})
        assert gauge(srv.base, "mtrank_features_lost") == 0
        r.kill()
        r.start()  # no persistence: empty
        assert wait_for(lambda: readyz(srv.base)[0] == 503, 20 * POLL_S + 5), readyz(srv.base)
        status, body = readyz(srv.base)
        assert body["ready"] is False and any("vanished from Redis" in x for x in body["reasons"]), body
        resp = httpx.post(f"{srv.base}/rank", json=payload, timeout=10)
        assert resp.status_code == 503 and "vanished" in resp.text, resp.text  # not ranked on defaults
        assert wait_for(lambda: gauge(srv.base, "mtrank_features_lost") == 1, 10 * POLL_S + 2)
        time.sleep(5 * POLL_S)  # more ticks: still one line
        lines = lost_lines()
        assert len(lines) == 1 and "demo v1" in lines[0] and "WARNING" in lines[0], lines

        load_world(world, r.client(), "nsw")  # what `mtrank features load` does
        assert wait_for(lambda: readyz(srv.base) == (200, {"ready": True, "degraded": False}), 20 * POLL_S + 5)
        resp = httpx.post(f"{srv.base}/rank", json=payload, timeout=10)
        assert resp.status_code == 200 and resp.json()["degraded"] is False
        assert wait_for(lambda: gauge(srv.base, "mtrank_features_lost") == 0, 10 * POLL_S + 2)
        assert len(lost_lines()) == 1
        # no user id in any line at WARNING or above: as a word of a message or a field's value (the
        # id is short, e.g. "10", so a plain substring test would match pids and timestamps)
        uid = world.users[1]
        for line in srv.log().splitlines():
            rec = json.loads(line) if line.startswith("{") else {"level": "WARNING", "message": line}
            if rec.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                assert not re.search(rf"(?<![\w.:-]){re.escape(uid)}(?![\w.:-])", rec.get("message", "")), line
                assert uid not in {str(v) for k, v in rec.items() if k not in ("timestamp", "pid")}, line
    finally:
        srv.stop()
