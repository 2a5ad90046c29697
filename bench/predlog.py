"""Prediction-log cost per record: what ``offer`` costs on the request path and what the writer
thread spends encoding one record (pseudonym, every candidate's scores, the feature bytes as read),
and the record's size, by number of candidates, with and without features. In process, no Redis:
the writer's CPU per second is rate x requests/s x the encode time below.

    .venv/bin/python bench/predlog.py            # writes bench/results/predlog.{json,md}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_info, machine_info, md_table, write_json  # noqa: E402
from service.predlog import PredictionLog, encode  # noqa: E402
from service.ranking import RankResult  # noqa: E402
from service.schemas import RankRequest  # noqa: E402
from service.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEY = b"bench-key-0123456789abcdef"
TASKS = ("ctr", "cvr", "watch_time")
ITEM_BYTES, USER_BYTES = 4 + 4 * 2 + 4 * 2, 4 + 4 * 2 + 4 + 4 * 5  # the test schema's packed sizes


def ranked(n: int, top_k: int = 20):
    rng = np.random.default_rng(0)
    request = RankRequest(user_id="user-12345", items=[f"item-{i}" for i in range(n)], top_k=top_k,
                          context={"hour": 20, "device": "ios"})
    scores = {t: rng.random(n).astype(np.float32) for t in TASKS}
    fused = scores["ctr"] + scores["cvr"]
    raw = ([bytes(USER_BYTES)], [bytes(ITEM_BYTES)] * n)
    result = RankResult(body=b"x" * (120 * top_k), request_id="r" * 32, n_items=n, n_returned=top_k,
                        user_missing=False, items_missing=0, items_corrupt=0, scored=(scores, fused, raw))
    bundle = SimpleNamespace(name="demo", version=3, precision="fp32")
    route = SimpleNamespace(variant=SimpleNamespace(name="A", ranker=SimpleNamespace(bundle=bundle)), bucket=1,
                            forced=False)
    return request, route, result


def timed(fn, reps: int, rounds: int = 7) -> float:
    """Seconds per call: the best of ``rounds`` means of ``reps`` calls (a shared machine adds noise)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    settings = Settings(predlog_rate=1.0, pseudonym_key=KEY.decode(), predlog_queue_bytes=1 << 40)
    rows, out = [], []
    for n in (100, 500, 2000):
        request, route, result = ranked(n)
        plog = PredictionLog(settings, queue_records=10**7)  # not started: offer only queues
        offer_s = timed(lambda: plog.offer(request, route, result), 1000)  # noqa: B023 (called here)
        for features in (False, True):
            reps = max(20, 20000 // n)
            def enc(request=request, route=route, result=result, features=features) -> bytes:
                return encode(time.time(), request, "A", 1, False, route.variant.ranker.bundle, result, features,
                              key=KEY)

            enc_s = timed(enc, reps)
            size = len(enc())
            rec = {"candidates": n, "features": features, "offer_us": offer_s * 1e6, "encode_ms": enc_s * 1e3,
                   "record_bytes": size}
            out.append(rec)
            rows.append([n, "yes" if features else "no", rec["offer_us"], rec["encode_ms"], size])
    table = md_table(["candidates", "features", "offer (request path), us", "encode (writer), ms", "record bytes"],
                     rows, digits=[0, 0, 2, 3, 0])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "predlog.json", {"results": out, "machine": machine_info(), "git": git_info()})
    (RESULTS / "predlog.md").write_text("# Prediction-log cost per record\n\n`bench/predlog.py` (in process, one core, "
                                        "best of 7 rounds; the test schema's packed sizes).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
