"""Issue 14 item 5, metrics hygiene on real servers: the series of ``/metrics`` stay bounded however
many versions are published under ``latest`` (the version is an info metric of the serving state,
not a label of the counters); a killed worker's live gauges leave the merged multi-process view;
the gauges are refreshed in the background, without requests."""

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.mmap_dict import MmapedDict

from service.app import create_app
from service.metrics import GAUGE_REFRESH_S
from tests.support.bundles import publish_bundle
from tests.support.http import metric, scrape
from tests.support.ports import free_port
from tests.support.wait import wait_for

BODY = {"user_id": "u1", "items": ["i1", "i2", "i3"]}




def series(samples: dict) -> set:
    return {key for key in samples if key[0].startswith("mtrank_")}


@pytest.mark.slow
def test_fifty_versions_under_latest_keep_the_series_bounded(env_for, server_factory, store_root):
    srv = server_factory(env_for(MTRANK_STORE_POLL_S=0.05))
    stop = threading.Event()
    failed: list = []

    def load():  # traffic during every swap
        with httpx.Client(base_url=srv.base, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/rank", json=BODY)
                if r.status_code != 200:
                    failed.append(r.text)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    counts = {}
    try:
        with httpx.Client(base_url=srv.base, timeout=30) as c:
            for v in range(2, 52):
                publish_bundle(store_root, version=v)
                wait_for(lambda v=v: c.post("/rank", json=BODY).json()["model"]["version"] == v, 60,
                         f"version {v} serving")
                if v in (2, 51):
                    m = scrape(srv.base)
                    counts[v] = series(m)
                    info = [dict(lab) for (n, lab) in m if n == "mtrank_model_info"]
                    assert info == [{"model": "demo", "precision": "fp32", "variant": "default", "version": str(v)}]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failed, failed[:3]

    def names(keys):  # the same series but for the version the info metric names
        return {(n, tuple(kv for kv in lab if kv[0] != "version")) for n, lab in keys}

    assert len(counts[51]) == len(counts[2]) and names(counts[51]) == names(counts[2]), (
        sorted(counts[51] - counts[2])[:10])


def live_gauges(mp_dir: Path, pid: int) -> float:
    """The in-flight gauge value written by worker ``pid`` (its live-sum file), 0 when it has none."""
    f = mp_dir / f"gauge_livesum_{pid}.db"
    if not f.exists():
        return 0.0
    return sum(value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(f))
               if json.loads(key)[0] == "mtrank_rank_inflight")


@pytest.mark.slow
def test_killed_worker_leaves_the_merged_live_gauges(env_for, serve_factory, redis_url):
    env = env_for(MTRANK_MAX_INFLIGHT=64, MTRANK_REDIS_TIMEOUT_MS=20000, MTRANK_REDIS_DEADLINE_MS=20000,
                  MTRANK_BREAKER_FAILURES=1000)  # reads wait for the paused Redis: requests stay in flight
    srv = serve_factory(env, "--workers", "2")

    def workers() -> set[int]:
        return {json.loads(x)["pid"] for x in srv.log().splitlines() if x.startswith("{") and '"limits: ' in x}

    pids = wait_for(lambda: workers() if len(workers()) == 2 else None, 60, "two workers")
    mp_dir = Path(next(json.loads(x)["message"].split("PROMETHEUS_MULTIPROC_DIR=")[1]
                       for x in srv.log().splitlines() if "PROMETHEUS_MULTIPROC_DIR=" in x))
    n = 12
    redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", 4000, "ALL")  # expires by itself

    def one():
        try:  # a fresh connection each: the kernel spreads them over the workers
            httpx.post(f"{srv.base}/rank", json=BODY, timeout=30, headers={"connection": "close"})
        except httpx.TransportError:
            pass  # the killed worker's requests

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(scrape(srv.base), "mtrank_rank_inflight") == n, 10, "all requests in flight")
    victim = max(pids, key=lambda p: live_gauges(mp_dir, p))
    assert live_gauges(mp_dir, victim) > 0
    os.kill(victim, signal.SIGKILL)  # no exit code runs: its gauge files stay behind
    for t in threads:
        t.join(30)
    # the survivor's requests are done; the victim's in-flight count must not linger in the sum
    wait_for(lambda: metric(scrape(srv.base), "mtrank_rank_inflight") == 0, 20, "in-flight back to 0")
    assert not list(mp_dir.glob(f"gauge_live*_{victim}.db"))
    assert metric(scrape(srv.base), "mtrank_redis_breaker_state") == 0
    assert srv.stop() == 0


def gauge(name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    from service import metrics

    fams = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    return fams[name].samples[0].value


def test_gauges_are_refreshed_without_requests(make_settings, features):
    """Redis is unreachable: the worker's degraded gauge says so within a refresh or two, with no
    /rank and no /readyz ever called (before, only those set it)."""
    with TestClient(create_app(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                             redis_timeout_ms=200))):
        wait_for(lambda: gauge("mtrank_degraded") == 1, 10 * GAUGE_REFRESH_S + 5, "the degraded gauge")
    with TestClient(create_app(make_settings())):
        wait_for(lambda: gauge("mtrank_degraded") == 0, 10 * GAUGE_REFRESH_S + 5, "the degraded gauge back")
