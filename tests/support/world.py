"""The feature-store tests' world: a small synthetic dataset with a real ONNX bundle for its schema
(built with ``onnx.helper``, no torch) loaded through the real loader, settings and server
environments over it, and a rig to rank through :class:`~service.ranking.Ranker` directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.features import FeatureFetcher
from service.fusion import default_weights
from service.ranking import Ranker
from service.redis_client import make_store
from service.schemas import RankRequest
from service.settings import Settings
from service.store import load_bundle
from tests.support.bundles import write_bundle
from training.data.dataset import prepare
from training.data.synth import SynthConfig, generate
from training.materialize import load_features

# -- a synthetic dataset, a bundle of its schema, loaded with the real loader ----------------------

@dataclass
class World:
    data: Path  # dataset.yaml directory
    store: Path  # model store root (bundle demo v1)
    bundle_dir: Path
    users: list[str]
    items: list[str]


def build_world(root: Path) -> World:
    """A small synthetic dataset under ``root/data`` and bundle demo v1 of its schema under ``root/models``."""
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


#: the Redis read budget of the servers of the fault tests (the production default)
DEADLINE_MS = 15


def server_env(url: str, prefix: str, world, **extra) -> dict[str, str]:
    """The environment of a server (``tests.support.server.Server``) on ``world``'s bundle and the
    features under ``prefix`` in the Redis at ``url``: breaker after 3 failures, probe every 0.2 s."""
    env = {"MTRANK_REDIS_URL": url, "MTRANK_REDIS_PREFIX": prefix, "MTRANK_MODEL_STORE": str(world.store),
           "MTRANK_MODEL_NAME": "demo", "MTRANK_ORT_INTRA_OP_THREADS": "1", "MTRANK_STORE_POLL_S": "0",
           "MTRANK_REDIS_DEADLINE_MS": str(DEADLINE_MS), "MTRANK_BREAKER_FAILURES": "3",
           "MTRANK_BREAKER_PROBE_S": "0.2", "MTRANK_LOG_LEVEL": "WARNING"}
    env.update({k: str(v) for k, v in extra.items()})
    return env
