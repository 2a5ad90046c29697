"""The prediction log as frames, and the outcome events joined to its candidates.

:func:`candidates` turns prediction-log records (:mod:`service.predlog`) into one row per scored
candidate: ``rid``, ``ts`` (ms), ``user`` (the pseudonym), ``variant``, ``forced``, ``pos`` (its
place among the returned items, -1 when it was not returned), ``item``, ``score`` (fused) and one
``s:<task>`` column per task.

:func:`label` adds the outcomes of every candidate from the events (:mod:`service.events.record`):
``click`` and ``conversion`` (0/1: any such event), ``watch`` (seconds, summed). An event with a
``request_id`` of a logged request is joined by (request, item); an event without one is joined
to the latest logged request of the same user (pseudonymised with the same key) that *returned*
the item at most ``window_s`` before the event. Events are deduplicated by ``event_id`` (the
stream is at-least-once); events of requests that were not sampled are not joined (counted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from service.predlog import pseudonym

#: outcome columns and the event type each one counts
OUTCOMES = {"click": "click", "conversion": "conversion", "watch": "watch"}
#: which outcome labels a task, by task name (``--task-event task=outcome`` adds or changes one)
DEFAULT_TASK_EVENTS = {"ctr": "click", "cvr": "conversion", "watch_time": "watch"}


def task_events(overrides: Iterable[str] = ()) -> dict[str, str]:
    """The task -> outcome map: the defaults plus ``task=outcome`` overrides (ValueError naming a bad one)."""
    out = dict(DEFAULT_TASK_EVENTS)
    for item in overrides:
        task, eq, outcome = item.partition("=")
        if not eq or not task or outcome not in OUTCOMES:
            raise ValueError(f"--task-event {item!r}: expected TASK=OUTCOME with OUTCOME one of {list(OUTCOMES)}")
        out[task] = outcome
    return out


def candidates(records: Iterable[Mapping], returned_only: bool = False) -> pd.DataFrame:
    """One row per candidate of every record (see the module doc); ``returned_only``: only the
    returned ones (what the readout uses: a fraction of the memory with large candidate lists)."""
    cols: dict[str, list] = {"rid": [], "ts": [], "user": [], "variant": [], "forced": [], "pos": [], "item": [],
                             "score": []}
    task_cols: dict[str, list] = {}
    n_rows = 0
    for r in records:
        items = r.get("items") or []
        n = len(items)
        if not n:
            continue
        pos = np.full(n, -1, dtype=np.int64)
        top = np.asarray(r.get("top") or [], dtype=np.int64)
        pos[top] = np.arange(len(top))
        score = r.get("score") or [None] * n
        scores = r.get("scores") or {}
        if returned_only:
            items, pos, n = [items[i] for i in top.tolist()], pos[top], len(top)
            score = [score[i] for i in top.tolist()]
            scores = {t: [v[i] for i in top.tolist()] for t, v in scores.items()}
        cols["rid"].extend([r.get("rid")] * n)
        cols["ts"].extend([r.get("ts")] * n)
        cols["user"].extend([r.get("user")] * n)
        cols["variant"].extend([r.get("variant")] * n)
        cols["forced"].extend([bool(r.get("forced"))] * n)
        cols["pos"].extend(pos.tolist())
        cols["item"].extend(items)
        cols["score"].extend(score)
        for task, values in scores.items():
            task_cols.setdefault(task, [None] * n_rows).extend(values)
        n_rows += n
        for values in task_cols.values():
            values.extend([None] * (n_rows - len(values)))
    df = pd.DataFrame(cols)
    for task, values in task_cols.items():
        df[f"s:{task}"] = pd.array(values, dtype="float64")
    df["score"] = pd.to_numeric(df["score"], errors="coerce").astype("float64")
    return df


@dataclass
class Joined:
    """Candidates with outcome columns, and what could not be joined."""

    frame: pd.DataFrame
    events: int  # distinct outcome events (click, conversion, watch) read
    joined: int  # of them, attributed to a logged candidate
    duplicates: int  # events seen again (same event_id)


def events_frame(events: Iterable, key: bytes) -> pd.DataFrame:
    """Events (:class:`~service.events.record.EventRecord`) as a frame; the raw user id is replaced by
    its pseudonym here and kept nowhere."""
    rows = [(e.event_id, pseudonym(key, e.user_id), e.item_id, e.type, e.ts, e.value, e.request_id) for e in events]
    return pd.DataFrame(rows, columns=["event_id", "user", "item", "type", "ts", "value", "rid"])


def label(cands: pd.DataFrame, events: pd.DataFrame, window_s: float = 3600.0) -> Joined:
    """``cands`` (from :func:`candidates`) with ``click``, ``conversion`` and ``watch`` columns."""
    n_all = len(events)
    ev = events.drop_duplicates("event_id")
    ev = ev[ev["type"].isin(list(OUTCOMES.values()))]
    keys = cands[["rid", "item"]].drop_duplicates()
    by_rid = ev[ev["rid"].notna()].merge(keys, on=["rid", "item"], how="inner")
    # no request id: the latest logged request of the user that returned the item, within the window
    loose = ev[ev["rid"].isna()].drop(columns="rid")
    if len(loose):
        shown = cands.loc[cands["pos"] >= 0, ["rid", "user", "item", "ts"]].drop_duplicates(["rid", "item"])
        shown = shown.assign(t=shown["ts"].astype("int64")).drop(columns="ts").sort_values("t")
        loose = loose.assign(t=(loose["ts"] * 1000).round().astype("int64")).sort_values("t")
        matched = pd.merge_asof(loose, shown, on="t", by=["user", "item"], direction="backward",
                                tolerance=int(window_s * 1000))
        by_user = matched[matched["rid"].notna()].drop(columns="t")
    else:
        by_user = by_rid.iloc[:0]
    joined = pd.concat([by_rid, by_user], ignore_index=True)
    out = cands.copy()
    for col, etype in OUTCOMES.items():
        part = joined[joined["type"] == etype]
        if col == "watch":
            agg = part.groupby(["rid", "item"])["value"].sum(min_count=1).fillna(0.0)
        else:
            agg = part.groupby(["rid", "item"]).size().clip(upper=1).astype("float64")
        out = out.merge(agg.rename(col).reset_index(), on=["rid", "item"], how="left")
        out[col] = out[col].fillna(0.0)
    return Joined(frame=out, events=len(ev), joined=len(joined), duplicates=n_all - len(events.drop_duplicates(
        "event_id")))
