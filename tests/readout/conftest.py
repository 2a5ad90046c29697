"""Fixtures of the readout tests: servers with the prediction log on (a pseudonym key, the test
bundle and its features in the test Redis) and the servers themselves."""

from __future__ import annotations

import pytest

from tests.support.readout import KEY
from tests.support.server import Server, base_env


@pytest.fixture
def readout_env(redis_url, key_prefix, store_root, features):
    """``readout_env(**MTRANK_overrides) -> env`` of a server logging every request."""
    def make(**extra) -> dict[str, str]:
        return base_env(redis_url, key_prefix, store_root, **{
            "MTRANK_PREDLOG_RATE": "1", "MTRANK_PREDLOG_STREAM": f"{key_prefix}:predictions",
            "MTRANK_PSEUDONYM_KEY": KEY, **extra})
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
