"""Overload (issues 6 and 11): at most MTRANK_MAX_INFLIGHT ranks execute per worker, more wait in a
queue; a request that waited MTRANK_SHED_QUEUE_MS without a slot, or finds MTRANK_MAX_QUEUED
others waiting, is answered 429 with Retry-After (never a 5xx: a proxy must not count shedding as
a failure). A loopback benchmark (bounded in time and count) drives 64 connections against a small
bound and compares with the same load on a server whose queue is out of reach. Goodput under
overload is measured, not asserted here (see the README's Failure behaviour)."""

import json

import httpx
import pytest

from tests.support.http import error_of, metric, scrape
from tests.support.loadgen import drive, post, quantile

CONCURRENCY = 64
BOUND = 2
QUEUED = 8
QUEUE_MS = 20
SECONDS = 3.0
MAX_REQUESTS = 3000
BACKOFF = 0.05  # a shed client waits 50 ms (well under Retry-After: 1 s) before trying again


def rank_request(port: int) -> bytes:
    body = json.dumps({"user_id": "u1", "items": [f"i{i % 20}" for i in range(200)], "top_k": 10}).encode()
    return post(port, "/rank", body)


def unloaded_p50(port: int) -> float:
    out = drive(port, rank_request(port), concurrency=1, seconds=10, max_requests=60)
    assert all(o.status == 200 for o in out), out[:3]
    return quantile([o.seconds for o in out], 0.5)


@pytest.mark.slow
def test_overload_is_shed_with_429_and_accepted_latency_stays_bounded(env_for, serve_factory):
    srv = serve_factory(env_for(MTRANK_MAX_INFLIGHT=BOUND, MTRANK_MAX_QUEUED=QUEUED, MTRANK_SHED_QUEUE_MS=QUEUE_MS,
                                MTRANK_LOG_LEVEL="WARNING"))
    base_p50 = unloaded_p50(srv.port)
    before = scrape(srv.base)
    out = drive(srv.port, rank_request(srv.port), CONCURRENCY, SECONDS, MAX_REQUESTS, backoff_shed=BACKOFF)
    after = scrape(srv.base)

    # every request answered: 200, or 429 with Retry-After; no 5xx, no timeout, no reset, nothing else
    statuses = {o.status for o in out}
    assert statuses <= {200, 429}, sorted(map(str, statuses))
    ok = [o.seconds for o in out if o.status == 200]
    shed = [o for o in out if o.status == 429]
    assert len(shed) > 0 and len(ok) >= 50, (len(ok), len(shed))
    assert all(o.headers.get("retry-after") == "1" and o.headers.get("x-request-id") for o in shed)
    details = [error_of((o.status, o.headers, o.body), 429)["message"] for o in shed]
    assert all(d.startswith("overloaded") for d in details)
    # this server sheds both ways: the queue is full (at once), or a request waited out the target;
    # which of the two a run sees depends on how fast ranks drain, so each way is forced separately
    # in test_each_way_of_shedding_is_taken_and_named
    assert all("already wait for a slot" in d or f"no slot within {QUEUE_MS} ms" in d for d in details), details[:3]
    # the server counted exactly what the clients saw
    assert metric(after, "mtrank_rank_shed_total") - metric(before, "mtrank_rank_shed_total") == len(shed)
    assert (metric(after, "mtrank_rank_requests_total", status=200)
            - metric(before, "mtrank_rank_requests_total", status=200)) == len(ok)
    assert (metric(after, "mtrank_rank_requests_total", status=429)
            - metric(before, "mtrank_rank_requests_total", status=429)) == len(shed)
    assert metric(after, "mtrank_rank_inflight") == 0  # nothing stuck in flight

    # the same load with a queue out of reach: everything waits, nothing is shed
    ctl = serve_factory(env_for(MTRANK_MAX_INFLIGHT=BOUND, MTRANK_MAX_QUEUED=100_000, MTRANK_SHED_QUEUE_MS=600_000,
                                MTRANK_LOG_LEVEL="WARNING"))
    unloaded_p50(ctl.port)  # warm it the same way
    ctl_out = drive(ctl.port, rank_request(ctl.port), CONCURRENCY, SECONDS, MAX_REQUESTS, backoff_shed=BACKOFF)
    assert {o.status for o in ctl_out} == {200}
    ctl_p50 = quantile([o.seconds for o in ctl_out], 0.5)

    p50, p90, p99 = (quantile(ok, q) for q in (0.5, 0.9, 0.99))
    report = (f"unloaded p50 {base_p50 * 1e3:.1f} ms; bound {BOUND}+{QUEUED} queued, {QUEUE_MS} ms: {len(ok)} "
              f"accepted p50/p90/p99 {p50 * 1e3:.1f}/{p90 * 1e3:.1f}/{p99 * 1e3:.1f} ms, {len(shed)} shed; "
              f"unbounded queue: {len(ctl_out)} accepted p50 {ctl_p50 * 1e3:.1f} ms")
    print(report)
    # accepted requests keep their latency: about the queue-time target plus their own run, well
    # below the queueing of the unbounded server (64 connections on 2 slots). Compared with the
    # unbounded server in the same run, not with a fixed bound, and not at p99: the 64 clients share
    # the machine's cores with the server, and on a loaded CI machine a few accepted requests wait
    # out a scheduler stall (p99 442 ms once, with p50 19 ms), which says nothing about the policy
    assert p50 < ctl_p50 / 2 and p90 < ctl_p50, report
    assert httpx.get(f"{srv.base}/healthz", timeout=2).status_code == 200


def shed_details(srv) -> list[str]:
    out = drive(srv.port, rank_request(srv.port), CONCURRENCY, 2.0, MAX_REQUESTS, backoff_shed=BACKOFF)
    assert {o.status for o in out} <= {200, 429}, sorted({o.status for o in out})
    assert sum(o.status == 200 for o in out) > 0
    return [error_of((o.status, o.headers, o.body), 429)["message"] for o in out if o.status == 429]


@pytest.mark.slow
def test_each_way_of_shedding_is_taken_and_named(env_for, serve_factory):
    # queue time only: the queue has room for every connection, so only the wait can shed (64
    # connections on 2 slots: a queued request waits for ~31 ranks, far beyond 20 ms)
    by_time = serve_factory(env_for(MTRANK_MAX_INFLIGHT=BOUND, MTRANK_MAX_QUEUED=100_000, MTRANK_SHED_QUEUE_MS=QUEUE_MS,
                                    MTRANK_LOG_LEVEL="WARNING"))
    details = shed_details(by_time)
    assert details and all(d.startswith(f"overloaded: no slot within {QUEUE_MS} ms") for d in details), details[:3]
    # queue length only: the target is out of reach, so only a full queue can shed
    by_length = serve_factory(env_for(MTRANK_MAX_INFLIGHT=BOUND, MTRANK_MAX_QUEUED=QUEUED, MTRANK_SHED_QUEUE_MS=600_000,
                                      MTRANK_LOG_LEVEL="WARNING"))
    details = shed_details(by_length)
    assert details and all(d.startswith("overloaded: ") and "requests already wait for a slot" in d
                               for d in details), details[:3]
