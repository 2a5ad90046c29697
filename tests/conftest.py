"""Fixtures every test directory shares: a real, test-owned redis-server on a free loopback port,
the small ONNX bundle and its features in that Redis, settings over them and real servers. The
material lives in ``tests/support``; this file only defines fixtures (and the markers)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis

from service.contract import FeatureSchema
from service.settings import Settings
from tests.support.bundles import FeatureData, make_schema, reference_inputs, seed_features, write_bundle
from tests.support.redis_server import RedisProc
from tests.support.server import Server

# The service's default Redis budget (MTRANK_REDIS_DEADLINE_MS, 15 ms) is for production hosts; on a
# busy 2-core CI machine a healthy read can miss it and turn an answer degraded. Tests that are
# about the deadline set it explicitly; every other test (and every server it starts with this
# environment) gets a generous budget.
os.environ.setdefault("MTRANK_REDIS_DEADLINE_MS", "2000")
# `mtrank serve` defaults to one worker per core; servers started by tests run one unless they say
os.environ.setdefault("MTRANK_WORKERS", "1")

MARKERS = {
    "slow": "takes more than ~15 s on a 2-core machine (training runs, torchrun, a fresh venv, clusters, "
            "benchmarks, fault soaks); deselect with -m 'not slow'",
    "docker": "brings the compose stack up on a Docker engine (.ci/compose-test starts one); skipped where "
              "no engine answers",
    "gpu": "needs a CUDA GPU (and onnxruntime-gpu / CUDA torch)",
}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


# -- Redis ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Our own redis-server for the whole session; yields its URL, stopped at the end."""
    proc = RedisProc(tmp_path_factory.mktemp("redis")).start()
    yield proc.url
    proc.stop()


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


# -- a bundle, its features, settings and servers over them -------------------------------------------

@pytest.fixture(scope="session")
def schema() -> FeatureSchema:
    return make_schema()


@pytest.fixture
def bundle_factory():
    """``write_bundle(store_root, name="demo", version=1, seed=None, ...) -> Path``."""
    return write_bundle


@pytest.fixture
def store_root(tmp_path) -> Path:
    root = tmp_path / "store"
    write_bundle(root, version=1)
    return root


@pytest.fixture
def features(redis_url, key_prefix, schema) -> FeatureData:
    return seed_features(redis_url, key_prefix, schema)


@pytest.fixture
def reference():
    """``reference_inputs(data, user_id, item_ids, hour_index=0, distance=None)``."""
    return reference_inputs


@pytest.fixture
def server_factory(tmp_path):
    """``server_factory(env) -> Server`` (``uvicorn --factory``, started); all stopped after the test."""
    servers: list[Server] = []

    def make(env: dict[str, str], start: bool = True) -> Server:
        srv = Server(env, tmp_path / f"server-{len(servers)}.log")
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def make_settings(redis_url, key_prefix, store_root):
    def make(**overrides) -> Settings:
        kw = dict(redis_url=redis_url, redis_prefix=key_prefix, model_store=str(store_root), model_name="demo",
                  providers="cpu", redis_timeout_ms=2000, redis_deadline_ms=2000)
        kw.update(overrides)
        return Settings(**kw)
    return make
