"""Issue 7, observability: GET /metrics scraped from a real server, one worker and two (prometheus-
client multi-process mode, set up by ``mtrank serve``); ``--workers`` reaches the workers and sizes
their onnxruntime threads."""

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.support.http import metric, scrape

STAGES = ("fetch", "assemble", "inference", "fusion", "serialise", "total")


def rank(client: httpx.Client, **body):
    return client.post("/rank", json={"user_id": "u0", "items": ["i1"], **body})


def test_metrics_of_one_worker(env_for, serve_factory):
    srv = serve_factory(env_for(MTRANK_MAX_BODY_BYTES=2048))
    m0 = scrape(srv.base)
    with httpx.Client(base_url=srv.base, timeout=10) as c:
        assert rank(c, items=["i1", "i2", "i3", "nope"]).json()["missing"] == {"user": False, "items": 1}
        assert rank(c, items=["i1", "i2", "i3", "nope"]).status_code == 200  # i1-i3 from the item cache now
        assert rank(c, user_id="stranger", items=["i4"] * 3).json()["missing"]["user"] is True
        assert rank(c, items=[]).status_code == 422
        assert c.post("/rank", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
        assert rank(c, items=["i1"] * 600).status_code == 413
        assert rank(c, context={"planet": 1}).status_code == 422  # routed, then refused
    m = scrape(srv.base)

    def d(name, **labels):
        return metric(m, name, **labels) - metric(m0, name, **labels)

    routed = dict(variant="default", model="demo")
    assert d("mtrank_rank_requests_total", status=200, **routed) == 3
    assert d("mtrank_rank_requests_total", status=422, **routed) == 1  # the context error
    assert d("mtrank_rank_requests_total", status=422, variant="") == 1  # not routed: invalid body
    assert d("mtrank_rank_requests_total", status=415, variant="") == 1
    assert d("mtrank_rank_requests_total", status=413, variant="") == 1
    assert d("mtrank_rank_duration_seconds_count", status=200) == 3
    assert d("mtrank_rank_duration_seconds_count") == 7
    for stage in STAGES:
        assert d("mtrank_rank_stage_seconds_count", stage=stage) == 3, stage
        assert d("mtrank_rank_stage_seconds_sum", stage=stage) > 0, stage
    assert d("mtrank_rank_stage_seconds_bucket", stage="total", le="+Inf") == 3
    assert d("mtrank_rank_candidates_count") == 3 and d("mtrank_rank_candidates_sum") == 11
    assert d("mtrank_rank_candidates_bucket", le="1.0") == 0 and d("mtrank_rank_candidates_bucket", le="10.0") == 3
    assert d("mtrank_missing_features_total", entity="user") == 1
    assert d("mtrank_missing_features_total", entity="item") == 2
    assert d("mtrank_item_cache_hits_total") >= 3  # the second request's i1-i3 at least
    assert d("mtrank_item_cache_hits_total") + d("mtrank_item_cache_misses_total") == 11
    assert d("mtrank_rank_shed_total") == 0 and d("mtrank_rank_degraded_total") == 0
    assert metric(m, "mtrank_redis_breaker_state") == 0 and metric(m, "mtrank_rank_inflight") == 0
    # the version serving each variant: an info metric, not a label of the counters
    assert {lab for (n, lab) in m if n == "mtrank_model_info"} == {
        (("model", "demo"), ("precision", "fp32"), ("variant", "default"), ("version", "1"))}
    assert not any("version" in dict(lab) for (n, lab) in m if n.startswith("mtrank_") and n != "mtrank_model_info")
    text = httpx.get(f"{srv.base}/metrics").text
    for name, kind in [("mtrank_model_loads_total", "counter"), ("mtrank_predlog_dropped_total", "counter"),
                       ("mtrank_rank_degraded_total", "counter"), ("mtrank_rank_duration_seconds", "histogram")]:
        assert f"# TYPE {name.removesuffix('_total')} {kind}" in text or f"# TYPE {name} {kind}" in text, name
    assert "/metrics" not in httpx.get(f"{srv.base}/openapi.json").text


def pids_of_access_lines(log: str) -> set[int]:
    pids = set()
    for line in log.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("logger") == "service.access":
                pids.add(rec["pid"])
    return pids


@pytest.mark.slow
def test_two_workers_merge_metrics_and_size_threads(env_for, serve_factory):
    env = env_for()
    del env["MTRANK_ORT_INTRA_OP_THREADS"]  # automatic: cores / workers
    srv = serve_factory(env, "--workers", "2")
    n = 60
    deadline = time.monotonic() + 30
    sent = 0
    # fresh connections until both workers have answered (the kernel spreads the accepts)
    while sent < n or len(pids_of_access_lines(srv.log())) < 2:
        assert time.monotonic() < deadline, "one worker never answered"
        r = httpx.post(f"{srv.base}/rank", json={"user_id": "u1", "items": ["i1", "i2"]}, timeout=10,
                       headers={"connection": "close"})
        assert r.status_code == 200
        sent += 1
        if sent >= n:
            time.sleep(0.2)
    # any worker answers the scrape, and every scrape sees the sum of both
    for _ in range(6):
        m = scrape(srv.base)
        assert metric(m, "mtrank_rank_requests_total", status=200) == sent
        assert metric(m, "mtrank_rank_stage_seconds_count", stage="total") == sent
        assert metric(m, "mtrank_rank_inflight") == 0
    log = srv.log()
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)
    starts = [json.loads(x) for x in log.splitlines() if x.startswith("{") and '"limits: ' in x]
    assert len(starts) == 2 and len({s["pid"] for s in starts}) == 2
    assert all(f"{threads} onnxruntime threads, 2 workers" in s["message"] for s in starts), starts
    mp_dir = next(json.loads(x)["message"].split("PROMETHEUS_MULTIPROC_DIR=")[1] for x in log.splitlines()
                  if "PROMETHEUS_MULTIPROC_DIR=" in x)
    assert Path(mp_dir).is_dir() and any(Path(mp_dir).glob("*.db"))
    assert srv.stop() == 0
    assert not Path(mp_dir).exists()  # a fresh directory per run, removed at exit
