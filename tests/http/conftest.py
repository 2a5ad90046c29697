"""Fixtures of the HTTP-layer tests: an in-process app over the shared test bundle and Redis
features (``tests/conftest.py``), the environment of a server on them and real ``mtrank serve``
processes (``tests.support.server``)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.server import Server


@pytest.fixture
def app_client(make_settings, features):
    """``app_client(**settings) -> TestClient`` (a context manager running the app's lifespan)."""

    @contextmanager
    def make(**overrides):
        overrides.setdefault("redis_deadline_ms", 2000)  # a busy test machine must not make answers degraded
        with TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False) as c:
            yield c

    return make


def base_env(redis_url: str, key_prefix: str, store_root: Path, **extra: str) -> dict[str, str]:
    env = {"MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": key_prefix, "MTRANK_MODEL_STORE": str(store_root),
           "MTRANK_MODEL_NAME": "demo", "MTRANK_PROVIDERS": "cpu", "MTRANK_ORT_INTRA_OP_THREADS": "1",
           "MTRANK_STORE_POLL_S": "0", "MTRANK_REDIS_TIMEOUT_MS": "2000", "MTRANK_REDIS_DEADLINE_MS": "2000"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def env_for(redis_url, key_prefix, store_root, features):
    """``env_for(**MTRANK_overrides) -> env`` of a server on the test bundle and features."""
    return lambda **extra: base_env(redis_url, key_prefix, store_root, **extra)


@pytest.fixture
def serve_factory(tmp_path):
    """``serve_factory(env, *args) -> Server`` (``mtrank serve``, started); all stopped after the test."""
    procs: list[Server] = []

    def make(env: dict[str, str], *args: str, start: bool = True) -> Server:
        srv = Server(env, tmp_path / f"serve-{len(procs)}.log", args, cli=True)
        procs.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in procs:
        srv.stop()
