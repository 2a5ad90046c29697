"""Fixtures of the feature-store tests: test-owned redis-server processes (killed, paused and
restarted by the tests, so never the session one), a small synthetic dataset with a real ONNX
bundle for its schema (built with ``onnx.helper``, no torch) loaded through the real loader,
and helpers to rank through :class:`~service.ranking.Ranker` directly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.features import FeatureFetcher
from service.fusion import default_weights
from service.ranking import Ranker
from service.redis_client import make_store
from service.schemas import RankRequest
from service.settings import Settings
from service.store import load_bundle
from tests.conftest import free_port
from tests.service.conftest import write_bundle
from training.data.dataset import prepare
from training.data.synth import SynthConfig, generate
from training.materialize import load_features


class RedisProc:
    """One redis-server on a fixed loopback port that a test may kill, pause and restart.

    ``SAVE`` (see :meth:`snapshot`) writes ``dump.rdb`` into its directory, which a restart on the
    same port loads: the data survives a ``kill -9``."""

    def __init__(self, workdir: Path, port: int | None = None, args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kw)

    def start(self, timeout: float = 10.0) -> RedisProc:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not on PATH")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ping():
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start")
            time.sleep(0.02)

    def ping(self) -> bool:
        c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                        password=self._password())
        try:
            return bool(c.ping())
        except redis.AuthenticationError:
            return True
        finally:
            c.close()

    def _password(self) -> str | None:
        a = list(self.args)
        return a[a.index("--requirepass") + 1] if "--requirepass" in a else None

    def debug_sleep(self, seconds: float) -> threading.Thread:
        """``DEBUG SLEEP seconds`` from a thread (needs ``--enable-debug-command yes``); returns once
        the server has stopped answering (a 50 ms PING goes unanswered). Join the thread to wait
        for it to wake up."""
        sleeper = threading.Thread(target=lambda: self.client().execute_command("DEBUG", "SLEEP", seconds))
        sleeper.start()
        pinger = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
        give_up = time.monotonic() + seconds * 0.8
        try:
            while time.monotonic() < give_up:
                try:
                    pinger.ping()
                    time.sleep(0.005)
                except redis.TimeoutError:
                    return sleeper
        finally:
            pinger.close()
        raise AssertionError("DEBUG SLEEP did not stall the server")

    def snapshot(self) -> None:
        self.client(password=self._password()).save()

    def kill(self) -> None:
        """SIGKILL (no shutdown: clients see the connection reset)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()


@pytest.fixture
def own_redis(tmp_path):
    """A fresh redis-server this test owns (it may kill it); always stopped afterwards."""
    procs: list[RedisProc] = []

    def make(args: tuple[str, ...] = ()) -> RedisProc:
        p = RedisProc(tmp_path / f"redis-{len(procs)}", args=args).start()
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


# -- a synthetic dataset, a bundle of its schema, loaded with the real loader ----------------------

@dataclass
class World:
    data: Path  # dataset.yaml directory
    store: Path  # model store root (bundle demo v1)
    bundle_dir: Path
    users: list[str]
    items: list[str]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("store-world")
    data = root / "data"
    generate(data, SynthConfig(n_users=40, n_items=300, n_exposures=3000, seed=3), progress=False)
    ds = prepare(data)
    store = root / "models"
    bdir = write_bundle(store, name="demo", version=1, schema=ds.schema, vocabs=ds.vocabs)
    users = [str(u) for u in ds.vocabs["user_id"][:20]]
    items = [str(i) for i in ds.vocabs["item_id"][:200]]
    return World(data=data, store=store, bundle_dir=bdir, users=users, items=items)


def load_world(world: World, client, prefix: str) -> None:
    load_features(world.data, world.bundle_dir, client, prefix=prefix, chunk=64, progress=False)


#: latency slack over the deadline on this shared 2-core machine (other test runs and a benchmark
#: compete for the CPU; healthy answers alone show 50-150 ms hiccups there): p99 within deadline +
#: 50 ms; every single answer within deadline + 200 ms, which still fails any read that waits for
#: a stalled Redis (1-2 s here)
P99_SLACK_S = 0.050
MAX_SLACK_S = 0.200


def assert_latencies(latencies, deadline_s: float) -> None:
    lat = sorted(latencies)
    assert lat, "no samples"
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if len(lat) >= 100 else lat[-1]
    assert lat[-1] <= deadline_s + MAX_SLACK_S, f"max {lat[-1] * 1e3:.1f} ms"
    assert p99 <= deadline_s + P99_SLACK_S, f"p99 {p99 * 1e3:.1f} ms (max {lat[-1] * 1e3:.1f} ms)"


#: the read budget of tests that need every healthy read to succeed: on this shared 2-core machine
#: redis-server itself is sometimes not scheduled for more than the default 15 ms
RELAXED_DEADLINE_MS = 500


def store_settings(url: str, prefix: str, world: World, **kw) -> Settings:
    base = dict(redis_url=url, redis_prefix=prefix, model_store=str(world.store), model_name="demo",
                providers="cpu", redis_timeout_ms=1000, ort_intra_op_threads=1, store_poll_s=0,
                redis_deadline_ms=RELAXED_DEADLINE_MS)
    base.update(kw)
    return Settings(**base)


class RankerRig:
    """A Ranker over a real FeatureStore (closed by the fixture)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = make_store(settings)
        bundle = load_bundle(settings.model_store, settings.model_name, providers="cpu", intra_op_threads=1)
        fetcher = FeatureFetcher(self.store, bundle.manifest.feature_schema, settings, bundle.vocabs,
                                 inputs=bundle.manifest.inputs)
        self.ranker = Ranker(bundle, fetcher, settings.fusion, default_weights(bundle.manifest.tasks))

    def rank(self, user: str, items: list[str], **kw):
        return self.ranker.rank_result(RankRequest(user_id=user, items=items, **kw))

    def close(self) -> None:
        self.store.close()


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
