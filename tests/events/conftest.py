"""Fixtures of the events tests: the test bundle with its sequence fed by clicks (``clicked``,
``event: click``), its features in the session Redis, and real ``mtrank events consume`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from service.contract import FeatureSchema
from service.settings import Settings
from tests.support.bundles import FeatureData, default_vocabs, make_schema, seed_features, write_bundle
from tests.support.server import MTRANK, ROOT, base_env


def events_schema() -> FeatureSchema:
    """The test schema whose user sequence ``clicked`` (max_len 5, items) follows click events."""
    base = make_schema()
    seq = [f.model_copy(update={"event": "click"}) for f in base.sequence]
    return base.model_copy(update={"sequence": seq})


@pytest.fixture
def ev_schema() -> FeatureSchema:
    return events_schema()


@pytest.fixture
def ev_store(tmp_path, ev_schema) -> Path:
    root = tmp_path / "store"
    write_bundle(root, version=1, schema=ev_schema, vocabs=default_vocabs())
    return root


@pytest.fixture
def ev_features(redis_url, key_prefix, ev_schema) -> FeatureData:
    return seed_features(redis_url, key_prefix, ev_schema)


@pytest.fixture
def ev_env(redis_url, key_prefix, ev_store, ev_features):
    """``ev_env(**MTRANK_overrides) -> env`` of a server or consumer on the events bundle."""
    def make(**extra) -> dict[str, str]:
        return base_env(redis_url, key_prefix, ev_store, **{"MTRANK_LOG_FORMAT": "text", **extra})
    return make


@pytest.fixture
def ev_settings(redis_url, key_prefix, ev_store, ev_features):
    def make(**overrides) -> Settings:
        kw = dict(redis_url=redis_url, redis_prefix=key_prefix, model_store=str(ev_store), model_name="demo",
                  providers="cpu", redis_timeout_ms=2000, redis_deadline_ms=2000, store_poll_s=0)
        kw.update(overrides)
        return Settings(**kw)
    return make


class ConsumerProc:
    """``mtrank events consume --name NAME`` in a subprocess (its output in ``log_path``)."""

    def __init__(self, env: dict[str, str], name: str, log_path: Path):
        self.name, self.log_path = name, log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith(("MTRANK_", "PROMETHEUS_"))}
        full.update(env)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([MTRANK, "events", "consume", "--name", name, "--block-ms", "200"], cwd=ROOT,
                                     env=full, stdout=self._log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no cleanup, whatever it was doing."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def consumer_factory(tmp_path):
    """``consumer_factory(env, name) -> ConsumerProc`` (started); all stopped after the test."""
    procs: list[ConsumerProc] = []

    def make(env: dict[str, str], name: str) -> ConsumerProc:
        p = ConsumerProc(env, name, tmp_path / f"consumer-{name}-{len(procs)}.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()
