"""Issue 15 item 4, the join of events to logged candidates (plain pandas, no Redis): by request id
and item; without a request id, to the user's latest request that returned the item within the
window; duplicates once; unsampled requests and events outside the window not at all."""

from __future__ import annotations

from service.events.record import EventRecord
from service.predlog import pseudonym
from service.readout.join import candidates, events_frame, label

KEY = b"join-test-key-0123456789"
P = pseudonym(KEY, "alice")


def rec(rid: str, ts_ms: int, items: list[str], top: list[int]) -> dict:
    return {"v": 2, "rid": rid, "ts": ts_ms, "user": P, "variant": "A", "forced": False, "items": items,
            "score": [0.5] * len(items), "scores": {"ctr": [0.5] * len(items)}, "top": top}


def ev(eid: str, item: str, type_: str, ts: float, rid: str | None = None, value: float | None = None, user="alice"):
    return EventRecord(event_id=eid, user_id=user, item_id=item, type=type_, ts=ts, value=value, request_id=rid)


def test_join_rules():
    cands = candidates([rec("r1", 1_000_000, ["a", "b", "c"], [0, 1]),  # c scored, not returned
                        rec("r2", 1_100_000, ["a", "d"], [1, 0])])
    events = events_frame([
        ev("e1", "a", "click", 1000.5, rid="r1"),            # by request id
        ev("e1", "a", "click", 1000.5, rid="r1"),            # the same event again: once
        ev("e2", "b", "click", 1001.0),                      # no rid: r1 returned b 1 s before
        ev("e3", "b", "watch", 1002.0, value=10.0),          # no rid, summed
        ev("e4", "b", "watch", 1003.0, value=5.5),
        ev("e5", "a", "click", 1100.5),                      # no rid: the latest request returning a is r2
        ev("e6", "c", "click", 1001.0),                      # c was never returned: no join without a rid
        ev("e7", "d", "click", 1100.0 + 7200),               # outside the window
        ev("e8", "d", "conversion", 1099.0),                 # before r2: not r2's
        ev("e9", "a", "click", 1000.0, rid="unsampled"),     # a request the log did not sample
        ev("e10", "d", "click", 1100.2, user="bob"),         # another user
        ev("e11", "a", "impression", 1000.1, rid="r1"),      # not an outcome
    ], KEY)
    assert "alice" not in events_frame([ev("x", "a", "click", 1.0)], KEY).to_string()
    j = label(cands, events, window_s=3600)
    got = {(r.rid, r.item): (r.click, r.conversion, r.watch) for r in j.frame.itertuples()}
    assert got == {("r1", "a"): (1, 0, 0), ("r1", "b"): (1, 0, 15.5), ("r1", "c"): (0, 0, 0),
                   ("r2", "a"): (1, 0, 0), ("r2", "d"): (0, 0, 0)}
    assert j.duplicates == 1 and j.joined == 5 and j.events == 10  # distinct outcome events
