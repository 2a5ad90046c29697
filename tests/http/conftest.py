"""Fixtures of the HTTP-layer tests: an in-process app over the shared test bundle and Redis
features (``tests/conftest.py``), the environment of a server on them and real ``mtrank serve``
processes (``tests.support.server``)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.server import Server, base_env


@pytest.fixture
def app_client(make_settings, features):
    """``app_client(**settings) -> TestClient`` (a context manager running the app's lifespan)."""

    @contextmanager
    def make(**overrides):
        overrides.setdefault("redis_deadline_ms", 2000)  # a busy test machine must not make answers degraded
        with TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False) as c:
            yield c

    return make


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
