"""Shared fixtures: a real, test-owned redis-server on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis

# The service's default Redis budget (MTRANK_REDIS_DEADLINE_MS, 15 ms) is for production hosts; on a
# busy 2-core CI machine a healthy read can miss it and turn an answer degraded. Tests that are
# about the deadline set it explicitly; every other test (and every server it starts with this
# environment) gets a generous budget.
os.environ.setdefault("MTRANK_REDIS_DEADLINE_MS", "2000")
# `mtrank serve` defaults to one worker per core; servers started by tests run one unless they say
os.environ.setdefault("MTRANK_WORKERS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir, *args: str, password: str | None = None) -> tuple[str, subprocess.Popen]:
    """Start a redis-server of our own (no persistence) on a free loopback port; (url, process)
    once it answers PING. ``args`` are extra server options; ``password`` sets requirepass."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not on PATH: install Redis (apt-get install redis-server)")
    port = free_port()
    auth = ("--requirepass", password) if password else ()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), *auth, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return url, proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Our own redis-server for the whole session; yields its URL, stopped at the end."""
    url, proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server):
    return redis_server


@pytest.fixture
def key_prefix(redis_server):
    """A unique key prefix; its keys are deleted after the test."""
    prefix = f"mtrank-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(redis_server)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
