"""Issue 15 item 4, end to end: a real server logs its requests to a real Redis stream, events are
written to the events stream, and ``mtrank ab report`` joins them (by request id, and by
pseudonymised user + item for events without one), leaves forced traffic out and prints the
per-variant table, Markdown, a PNG and the numbers."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis

from tests.support.readout import KEY, event, mtrank, write_events
from tests.support.wait import wait_for

CONFIG = """salt: readout-e2e
allow_force: true
variants:
  - {name: A, percent: 50, model: {name: demo}}
  - {name: B, percent: 50, model: {name: demo}, fusion: {weights: {ctr: 1.0, cvr: 5.0, watch_time: 0.0}}}
"""


@pytest.mark.slow
def test_ab_report_joins_events_and_leaves_forced_traffic_out(readout_env, serve, redis_url, key_prefix, tmp_path):
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(CONFIG)
    stream = f"{key_prefix}:predictions"
    srv = serve(readout_env(MTRANK_ROUTING_CONFIG=str(cfg)))
    events, shown = [], {"A": [0, 0], "B": [0, 0]}  # variant -> [shown items, clicked shown items]
    with httpx.Client(base_url=srv.base, timeout=30) as c:
        for k in range(80):
            user = f"person-{k % 40}"
            body = {"user_id": user, "items": [f"i{j}" for j in range(10)], "top_k": 5, "request_id": f"rq-{k}"}
            r = c.post("/rank", json=body)
            assert r.status_code == 200, r.text
            resp = r.json()
            t = time.time()  # the client's clock, just after it showed the items
            top = [it["item_id"] for it in resp["items"]]
            shown[resp["variant"]][0] += 5
            if k % 3:  # a click on the first item; every other one carries no request id
                rid = resp["request_id"] if k % 2 else None
                events.append(event(user, top[0], "click", t, rid=rid))
                shown[resp["variant"]][1] += 1
                if k % 5 == 0:
                    events.append(event(user, top[0], "conversion", t + 0.5, rid=rid))
                events.append(event(user, top[0], "watch", t + 1, rid=rid, value=12.5))
            events.append(event(user, "i-not-ranked", "click", t))  # joins nothing
        for k in range(6):  # forced QA traffic: logged, flagged, left out
            r = c.post("/rank", json={"user_id": "qa-user", "items": ["i1", "i2"], "request_id": f"qa-{k}"},
                       headers={"X-Mtrank-Variant": "B"})
            assert r.status_code == 200
            events.append(event("qa-user", r.json()["items"][0]["item_id"], "click", time.time(), rid=f"qa-{k}"))
    events.append(events[0].model_copy())  # at-least-once: the same event twice counts once
    write_events(redis_url, key_prefix, events)
    rdb = redis.Redis.from_url(redis_url)
    wait_for(lambda: rdb.xlen(stream) == 86, what="86 records")
    md, png, js = tmp_path / "r.md", tmp_path / "r.png", tmp_path / "r.json"
    r = mtrank("ab", "report", "--redis-url", redis_url, "--prefix", key_prefix, "--stream", stream, "--config",
               str(cfg), "--k", "5", "--bootstrap", "100", "--markdown", str(md), "--plot", str(png), "--json", str(js),
               env={"MTRANK_PSEUDONYM_KEY": KEY})
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "forced-variant requests left out: 6" in r.stdout
    assert "lift B vs A" in r.stdout and "chi-square" in r.stdout
    rep = json.loads(js.read_text())
    by_name = {v["name"]: v for v in rep["variants"]}
    assert set(by_name) == {"A", "B"} and rep["control"] == "A"
    assert sum(v["requests"] for v in by_name.values()) == 80
    assert sum(v["users"] for v in by_name.values()) == 40
    for name, (n_shown, clicks) in shown.items():
        ctr = by_name[name]["metrics"]["ctr@5"]
        assert abs(ctr["value"] - clicks / n_shown) < 1e-9, (name, ctr, clicks, n_shown)
        assert ctr["lo"] <= ctr["value"] <= ctr["hi"]
        assert abs(by_name[name]["metrics"]["watch_s"]["value"] - clicks * 12.5 / n_shown) < 1e-9
    assert {"auc:ctr", "auc:cvr", "auc:watch_time"} <= set(by_name["B"]["lifts"])
    assert rep["srm"] is not None and rep["srm"]["p"] > 1e-3
    text = md.read_text()
    assert text.startswith("# A/B readout") and "| variant | users | requests |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without the key the report refuses, naming the setting
    r = mtrank("ab", "report", "--redis-url", redis_url, "--prefix", key_prefix, "--stream", stream)
    assert r.returncode == 2 and "MTRANK_PSEUDONYM_KEY" in r.stderr
