"""Issue 15 item 6: ``mtrank simulate`` drives a real server with synthetic users who follow the
synthetic data's ground truth, and ``mtrank ab report`` sees what they did: a deliberately weaker
variant (fusion that ranks the least clickable items first) loses CTR with an interval that
excludes zero; an A/A split shows no difference and no sample-ratio mismatch."""

from __future__ import annotations

import json

import pytest
import redis

from tests.support.readout import KEY, mtrank
from tests.support.server import Server
from training.data.synth import SynthConfig, generate
from training.materialize import load_features
from training.train import TrainConfig, train

AB = """salt: simulate-ab
variants:
  - {name: control, percent: 50, model: {name: sim}}
  - {name: weaker, percent: 50, model: {name: sim}, fusion: {name: weighted_product, weights: {ctr: -1.0}}}
"""
AA = """salt: simulate-aa
variants:
  - {name: a1, percent: 50, model: {name: sim}}
  - {name: a2, percent: 50, model: {name: sim}}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data with its ground truth and a small model trained on it."""
    root = tmp_path_factory.mktemp("simulate")
    data = root / "data"
    generate(data, SynthConfig(n_users=400, n_items=600, n_exposures=40_000, seed=3), progress=False)
    bundle, _ = train(data, name="sim", store=root / "store",
                      cfg=TrainConfig(arch="mmoe", epochs=2, batch_size=1024, threads=1), progress=False)
    return data, root / "store", bundle


def _run(world, redis_url, key_prefix, tmp_path, name: str, config: str) -> dict:
    data, store, bundle = world
    client = redis.Redis.from_url(redis_url)
    load_features(data, bundle, client, prefix=key_prefix, progress=False)
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(config)
    stream = f"{key_prefix}:{name}:predictions"
    env = {"MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": key_prefix, "MTRANK_MODEL_STORE": str(store),
           "MTRANK_ROUTING_CONFIG": str(cfg), "MTRANK_PROVIDERS": "cpu", "MTRANK_ORT_INTRA_OP_THREADS": "1",
           "MTRANK_STORE_POLL_S": "0", "MTRANK_REDIS_DEADLINE_MS": "2000", "MTRANK_REDIS_TIMEOUT_MS": "2000",
           "MTRANK_PREDLOG_RATE": "1", "MTRANK_PREDLOG_STREAM": stream, "MTRANK_PSEUDONYM_KEY": KEY}
    srv = Server(env, tmp_path / f"{name}.log", (), cli=True).start()
    try:
        sim = mtrank("simulate", "--url", srv.base, "--data", str(data), "--requests", "600", "--duration", "600",
                     "--concurrency", "1", "--candidates", "40", "--k", "5", "--seed", "11")
        assert sim.returncode == 0, sim.stderr
        print(sim.stdout)
        assert "errors" not in sim.stdout
    finally:
        srv.stop()
    out = tmp_path / f"{name}.json"
    rep = mtrank("ab", "report", "--redis-url", redis_url, "--prefix", key_prefix, "--stream", stream,
                 "--config", str(cfg), "--k", "5", "--bootstrap", "100", "--json", str(out),
                 env={"MTRANK_PSEUDONYM_KEY": KEY})
    assert rep.returncode == 0, rep.stderr
    print(rep.stdout)
    return {"report": json.loads(out.read_text()), "stdout": rep.stdout, "simulate": sim.stdout}


@pytest.mark.slow
def test_simulated_ab_shows_the_true_difference_and_aa_shows_none(world, redis_url, key_prefix, tmp_path):
    ab = _run(world, redis_url, key_prefix, tmp_path, "ab", AB)["report"]
    variants = {v["name"]: v for v in ab["variants"]}
    assert set(variants) == {"control", "weaker"} and ab["control"] == "control"
    assert sum(v["requests"] for v in variants.values()) == 600
    lift = variants["weaker"]["lifts"]["ctr@5"]
    assert lift["hi"] < 0, lift  # the weaker ranking loses clicks, and the interval says so
    assert ab["srm"]["p"] > 1e-3

    aa = _run(world, redis_url, key_prefix, tmp_path, "aa", AA)["report"]
    variants = {v["name"]: v for v in aa["variants"]}
    assert set(variants) == {"a1", "a2"}
    lift = variants["a2"]["lifts"]["ctr@5"]
    assert lift["lo"] < 0 < lift["hi"], lift
    assert aa["srm"]["p"] > 1e-3


def test_simulate_without_ground_truth_says_so(tmp_path):
    r = mtrank("simulate", "--data", str(tmp_path), "--requests", "1", timeout=120)
    assert r.returncode == 2 and "holds no ground truth" in r.stderr and "Traceback" not in r.stderr
