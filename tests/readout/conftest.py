"""Fixtures of the readout tests: servers with the prediction log on (a pseudonym key, the test
bundle and its features in the test Redis), events written to the stream in the stream's own format."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
import redis

from service.events.record import FIELD, EventRecord, encode, stream_key
from tests.support.server import MTRANK, Server

KEY = "readout-test-pseudonym-key-0123456789"


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_events(redis_url: str, prefix: str, events: list[EventRecord]) -> None:
    """XADD each event to ``<prefix>:events`` exactly as the endpoint does (service.events.record)."""
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for ev in events:
        pipe.xadd(stream_key(prefix), {FIELD: encode(ev)})
    pipe.execute()
    client.close()


def event(user: str, item: str, type_: str, ts: float, rid: str | None = None, value: float | None = None,
          event_id: str | None = None) -> EventRecord:
    return EventRecord(event_id=event_id or uuid.uuid4().hex, user_id=user, item_id=item, type=type_, ts=ts,
                       value=value, request_id=rid)


def mtrank(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    full.update(env or {})
    return subprocess.run([MTRANK, *args], capture_output=True, text=True, timeout=timeout, env=full)


@pytest.fixture
def readout_env(redis_url, key_prefix, store_root, features):
    """``readout_env(**MTRANK_overrides) -> env`` of a server logging every request."""
    def make(**extra) -> dict[str, str]:
        env = {"MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": key_prefix, "MTRANK_MODEL_STORE": str(store_root),
               "MTRANK_MODEL_NAME": "demo", "MTRANK_PROVIDERS": "cpu", "MTRANK_ORT_INTRA_OP_THREADS": "1",
               "MTRANK_STORE_POLL_S": "0", "MTRANK_REDIS_TIMEOUT_MS": "2000", "MTRANK_REDIS_DEADLINE_MS": "2000",
               "MTRANK_PREDLOG_RATE": "1", "MTRANK_PREDLOG_STREAM": f"{key_prefix}:predictions",
               "MTRANK_PSEUDONYM_KEY": KEY}
        env.update({k: str(v) for k, v in extra.items()})
        return env
    return make


@pytest.fixture
def serve(tmp_path):
    """``serve(env) -> Server`` (``mtrank serve``, as deployed); stopped after the test."""
    procs: list[Server] = []

    def make(env: dict[str, str]) -> Server:
        srv = Server(env, tmp_path / f"serve-{len(procs)}.log", (), cli=True)
        procs.append(srv)
        return srv.start()

    yield make
    for srv in procs:
        srv.stop()
