"""Fixtures of the feature-store tests: test-owned redis-server processes (killed, paused and
restarted by the tests, so never the session one), the synthetic world loaded through the real
loader and Ranker rigs over real FeatureStores (``tests.support.world``)."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.support.redis_server import RedisProc
from tests.support.world import RankerRig, World, build_world


@pytest.fixture
def own_redis(tmp_path):
    """A fresh redis-server this test owns (it may kill it); always killed afterwards."""
    procs: list[RedisProc] = []

    def make(args: tuple[str, ...] = ()) -> RedisProc:
        p = RedisProc(tmp_path / f"redis-{len(procs)}", args=args).start()
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("store-world"))


@pytest.fixture
def rig():
    """``rig(settings) -> RankerRig``; every rig's store is closed after the test."""
    made: list[RankerRig] = []

    def make(settings: Settings) -> RankerRig:
        r = RankerRig(settings)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
