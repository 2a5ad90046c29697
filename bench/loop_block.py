"""Issue 14 item 7: how long does parsing a /rank body block the event loop, and does moving it to
the threadpool help? One process, one event loop (anyio on asyncio, as uvicorn runs it), in one run:

* a **heartbeat** task sleeps 0.5 ms again and again and records how late it wakes up: the time
  other connections of the worker would wait (accepting, reading, answering, admitting);
* a **parser** parses and validates the same body back to back (:func:`service.limits.parse_body`
  with the request model of the default limits), for a fixed time, in one of three ways:
  **inline** on the loop (what ``rank_body`` did), all **in the threadpool**
  (``anyio.to_thread.run_sync``), or as **rank_body** does now
  (:func:`service.limits.parse_body_off_loop`: inline below ``OFF_LOOP_BYTES``, else in the
  threadpool; a list of more than MAX_ERRORS errors is built in the threadpool whatever the size).

Bodies: 50 items of 8-character ids (~1 KB), 2,000 items of 8 characters (~22 KB), 2,000 items of
128 characters (~256 KB, the largest valid body at the default limits), 2,000 floats as ids (~8 KB,
2,000 errors: small but hostile) and a ~1 MB body (2,000 ids of 500 characters: parsed, then
refused by validation, as an attacker's body would be).

    python bench/loop_block.py            # ~1 min; writes bench/results/loop_block.{md,json}
    python bench/loop_block.py --quick    # seconds; writes to a temp dir

orjson and pydantic-core hold the GIL for the whole of one call, so a parser thread still stops the
loop for the length of its longest single call (parse, or validate) instead of the sum; the
heartbeat's lateness is what the table compares, as ratios threadpool / inline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread
import orjson
from fastapi.exceptions import RequestValidationError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_info, machine_info, md_table, write_json  # noqa: E402
from service.limits import OFF_LOOP_BYTES, field_errors, parse_body, parse_body_off_loop  # noqa: E402
from service.schemas import rank_request_model  # noqa: E402

BEAT_S = 0.0005
CTYPE = "application/json"


def bodies() -> dict[str, bytes]:
    def body(n: int, width: int) -> bytes:
        return orjson.dumps({"user_id": "u" * 8, "items": [f"{i:0{width}d}" for i in range(n)],
                             "context": {"hour": 20, "device": "ios"}, "top_k": 50})

    floats = orjson.dumps({"user_id": "u" * 8, "items": [1.5] * 2000})
    return {"50 x 8 chars": body(50, 8), "2000 x 8 chars": body(2000, 8), "2000 x 128 chars": body(2000, 128),
            "2000 floats (422)": floats, "2000 x 500 chars (422)": body(2000, 500)}


def answer_422(e: RequestValidationError) -> None:
    """What the 422 handler does with the error (on the loop): list the errors for the answer."""
    field_errors(list(e.errors()))


def parse(raw: bytes, model) -> None:
    """The whole work of one body, the 422's error list included (as the service did it, inline)."""
    try:
        parse_body(raw, CTYPE, model)
    except RequestValidationError as e:
        answer_422(e)


async def run(raw: bytes, model, mode: str, seconds: float) -> dict:
    lateness: list[float] = []
    parsed = 0
    done = anyio.Event()

    async def heartbeat() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await anyio.sleep(BEAT_S)
            lateness.append(time.perf_counter() - t - BEAT_S)

    async def parser() -> None:
        nonlocal parsed
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if mode == "inline":
                parse(raw, model)
                await anyio.sleep(0)  # the next request is another task
            elif mode == "threadpool":
                await anyio.to_thread.run_sync(parse, raw, model)
            else:
                try:
                    await parse_body_off_loop(raw, CTYPE, model)
                except RequestValidationError as e:
                    answer_422(e)
                await anyio.sleep(0)
            parsed += 1
        done.set()

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        tg.start_soon(parser)
    wall = time.perf_counter() - t0
    lat = sorted(lateness)
    return {"parses_per_s": parsed / wall, "beats": len(lat), "lag_mean_ms": 1e3 * statistics.fmean(lat),
            "lag_p50_ms": 1e3 * lat[len(lat) // 2],
            "lag_p99_ms": 1e3 * lat[int(len(lat) * 0.99)], "lag_max_ms": 1e3 * lat[-1],
            "blocked_share": sum(lat) / wall}


def parse_ms(raw: bytes, model, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        parse(raw, model)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per body and mode")
    ap.add_argument("--rounds", type=int, default=2, help="inline / threadpool alternations per body")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.rounds, a.out = 0.5, 1, Path(tempfile.mkdtemp())
    model = rank_request_model()
    rows, results = [], []
    for name, raw in bodies().items():
        per_mode: dict[str, list[dict]] = {"inline": [], "threadpool": [], "rank_body": []}
        for _ in range(a.rounds):
            for mode in per_mode:
                per_mode[mode].append(anyio.run(run, raw, model, mode, a.seconds))
        med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in per_mode.items()}
        ms = parse_ms(raw, model, 20)
        il, tp, rb = med["inline"], med["threadpool"], med["rank_body"]
        results.append({"body": name, "bytes": len(raw), "parse_ms": ms, **med, "rounds": per_mode})
        rows.append([name, len(raw) / 1024, ms, il["lag_mean_ms"], tp["lag_mean_ms"], rb["lag_mean_ms"],
                     il["lag_p99_ms"], tp["lag_p99_ms"], rb["lag_p99_ms"], rb["lag_mean_ms"] / il["lag_mean_ms"],
                     rb["parses_per_s"] / il["parses_per_s"]])
    headers = ["body", "KiB", "parse+validate ms", "lag mean: inline", "all in pool", "rank_body",
               "lag p99: inline", "all in pool", "rank_body", "lag mean rank_body/inline",
               "parses/s rank_body/inline"]
    table = md_table(headers, rows, digits=[0, 1, 3, 3, 3, 3, 1, 1, 1, 2, 2])
    print(table)
    md = ["# Event-loop blocking of /rank body parsing (issue 14 item 7)", "",
          "`python bench/loop_block.py`: a heartbeat task (0.5 ms sleeps) measures how late the loop "
          "wakes up while a parser parses+validates the same body back to back: inline on the loop, all in "
          f"the threadpool, or as rank_body does (threadpool from {OFF_LOOP_BYTES // 1024} KiB, and for long "
          f"error lists); {a.seconds:g} s per body and mode, median of {a.rounds} alternating rounds. "
          "Lag = heartbeat lateness (what other connections of the worker wait); the machine's own "
          "scheduling noise is in every column.", "", table, ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "loop_block.md").write_text("\n".join(md))
    write_json(a.out / "loop_block.json", {"machine": machine_info(), "git": git_info(), "seconds": a.seconds,
                                           "rounds": a.rounds, "beat_s": BEAT_S, "results": results})
    print(f"wrote {a.out / 'loop_block.md'}")


if __name__ == "__main__":
    main()
