"""``mtrank simulate``: synthetic users of a running service, behaving as the synthetic data's own
ground truth says (:class:`training.data.synth.Truth`).

Each simulated request, top to bottom:

1. a user, drawn by activity (active users come back more often, as in the data), an hour of the
   day and a device from the user's mix;
2. candidates: ``candidates`` distinct items drawn by exposure weight (what a retrieval stage of
   this world would return);
3. ``POST /rank`` with them and the context; the top ``k`` of the answer are "shown";
4. outcomes for the shown items drawn from the true probabilities (click, then conversion and
   watch seconds given a click), posted to ``POST /events`` with the request id: an impression for
   every shown item, then click / conversion / watch events.

Because the simulator knows the truth, it also reports each variant's *expected* CTR at k (the
mean true click probability of the items it showed): what ``mtrank ab report`` should estimate.
Several threads drive the service, each with its own keep-alive connection and random stream.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson

from training.data.synth import DEVICES, HOUR_TRAFFIC, TRUTH_DIR, Truth


@dataclass
class SimConfig:
    url: str = "http://127.0.0.1:8000"
    data: Path = Path("data/synth")  # the synthetic data set the served model was trained on
    duration_s: float = 60.0
    requests: int | None = None  # stop after this many requests (whichever comes first)
    concurrency: int = 4
    candidates: int = 100
    k: int = 10
    seed: int = 0
    timeout_s: float = 10.0


@dataclass
class VariantStats:
    requests: int = 0
    shown: int = 0
    expected_clicks: float = 0.0  # sum of the true click probabilities of the shown items
    clicks: int = 0
    conversions: int = 0
    watch_s: float = 0.0


@dataclass
class SimReport:
    seconds: float = 0.0
    events: int = 0
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    variants: dict[str, VariantStats] = field(default_factory=lambda: defaultdict(VariantStats))

    def lines(self) -> list[str]:
        total = sum(v.requests for v in self.variants.values())
        out = [f"{total} requests, {self.events} events in {self.seconds:.1f} s "
               f"({total / max(self.seconds, 1e-9):.1f} req/s)"]
        out.append(f"{'variant':<16}{'requests':>10}{'true CTR@k':>12}{'CTR@k':>9}{'CVR':>8}{'watch s/click':>15}")
        for name, v in sorted(self.variants.items()):
            shown = max(v.shown, 1)
            out.append(f"{name:<16}{v.requests:>10}{v.expected_clicks / shown:>12.4f}{v.clicks / shown:>9.4f}"
                       f"{v.conversions / max(v.clicks, 1):>8.4f}{v.watch_s / max(v.clicks, 1):>15.1f}")
        if self.errors:
            out.append("errors: " + ", ".join(f"{k}: {n}" for k, n in sorted(self.errors.items())))
        return out


class _Client:
    """One keep-alive HTTP connection to the service."""

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout_s = timeout_s
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):  # one retry on a connection the server closed while idle
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                self.conn.request("POST", path, orjson.dumps(body),
                                  {"content-type": "application/json", **(headers or {})})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Simulator:
    def __init__(self, cfg: SimConfig, truth: Truth | None = None):
        self.cfg = cfg
        self.truth = truth if truth is not None else Truth(Path(cfg.data) / TRUTH_DIR)
        t = self.truth
        self.user_p = t.users["activity"] / t.users["activity"].sum()
        self.item_p = t.items["w"] / t.items["w"].sum()
        self.hour_p = HOUR_TRAFFIC / HOUR_TRAFFIC.sum()
        self.report = SimReport()
        self._lock = threading.Lock()
        self._sent = 0

    def _take_slot(self) -> bool:
        with self._lock:
            if self.cfg.requests is not None and self._sent >= self.cfg.requests:
                return False
            self._sent += 1
            return True

    def one(self, client: _Client, rng: np.random.Generator) -> None:
        """One request: rank, show the top k, draw and post the outcomes."""
        cfg, t = self.cfg, self.truth
        uid = int(rng.choice(t.n_users, p=self.user_p))
        hour = int(rng.choice(24, p=self.hour_p))
        dev = int((rng.random() > t.users["dev_cdf"][uid]).sum().clip(0, 2))
        cand = rng.choice(t.n_items, size=min(cfg.candidates, t.n_items), replace=False, p=self.item_p)
        request_id = uuid.uuid4().hex
        status, raw = client.post("/rank", {"user_id": str(uid + 1), "items": [str(i + 1) for i in cand],
                                            "context": {"hour": hour, "device": DEVICES[dev]}, "top_k": cfg.k},
                                  {"x-request-id": request_id})
        if status != 200:
            with self._lock:
                self.report.errors[f"rank {status}"] += 1
            return
        answer = orjson.loads(raw)
        shown = np.array([int(it["item_id"]) - 1 for it in answer["items"]], dtype=np.int64)
        p, click, conversion, watch = t.outcomes(rng, np.full(len(shown), uid), shown, hour, dev)
        now = time.time()
        events = []
        for j, item in enumerate(shown):
            base = {"user_id": str(uid + 1), "item_id": str(item + 1), "ts": now, "request_id": request_id}
            events.append({**base, "event_id": uuid.uuid4().hex, "type": "impression"})
            if click[j]:
                events.append({**base, "event_id": uuid.uuid4().hex, "type": "click"})
                events.append({**base, "event_id": uuid.uuid4().hex, "type": "watch", "value": float(watch[j])})
            if conversion[j]:
                events.append({**base, "event_id": uuid.uuid4().hex, "type": "conversion"})
        ev_status, _ = client.post("/events", {"events": events})
        with self._lock:
            v = self.report.variants[answer.get("variant") or "default"]
            v.requests += 1
            v.shown += len(shown)
            v.expected_clicks += float(p.sum())
            v.clicks += int(click.sum())
            v.conversions += int(conversion.sum())
            v.watch_s += float(watch.sum())
            if 200 <= ev_status < 300:
                self.report.events += len(events)
            else:
                self.report.errors[f"events {ev_status}"] += 1

    def _worker(self, index: int, until: float) -> None:
        rng = np.random.default_rng([self.cfg.seed, index])
        client = _Client(self.cfg.url, self.cfg.timeout_s)
        try:
            while time.monotonic() < until and self._take_slot():
                try:
                    self.one(client, rng)
                except OSError as e:
                    with self._lock:
                        self.report.errors[type(e).__name__] += 1
                    time.sleep(0.1)
        finally:
            client.close()

    def run(self) -> SimReport:
        start = time.monotonic()
        until = start + self.cfg.duration_s
        threads = [threading.Thread(target=self._worker, args=(i, until), daemon=True)
                   for i in range(self.cfg.concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.report.seconds = time.monotonic() - start
        return self.report
