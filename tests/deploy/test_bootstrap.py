"""The compose job (``python -m training.bootstrap``) without Docker: a test-owned Redis, a model
store in a temporary directory, a tiny synthetic data set. It trains only when the store has no
bundle (or JOB_RETRAIN=1), and loads features only when Redis lacks the bundle's."""

from __future__ import annotations

import json

import pytest
import redis

from service.contract import MANIFEST_FILE, BundleManifest, meta_key, namespace
from service.store import bundle_dir, list_versions
from tests.support.redis_server import RedisProc
from training import bootstrap

PASSWORD = "job-test-password-4f1c"


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    (tmp_path / "redis").mkdir()
    server = RedisProc(tmp_path / "redis", password=PASSWORD).start()  # the job's own, password-protected
    url = server.url
    env = {"MTRANK_MODEL_STORE": str(tmp_path / "store"), "MTRANK_MODEL_NAME": "boot",
           "MTRANK_REDIS_URL": url, "MTRANK_REDIS_PREFIX": "jobtest",
           "JOB_DATA": str(tmp_path / "data"), "JOB_EPOCHS": "1", "JOB_SYNTH_USERS": "200",
           "JOB_SYNTH_ITEMS": "400", "JOB_SYNTH_EXPOSURES": "4000"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("JOB_RETRAIN", raising=False)
    yield env
    server.stop()


def run(capsys) -> str:
    assert bootstrap.main() == 0
    return capsys.readouterr().out


def meta(env) -> dict | None:
    bundle = bundle_dir(env["MTRANK_MODEL_STORE"], "boot")
    schema = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text()).feature_schema
    raw = redis.Redis.from_url(env["MTRANK_REDIS_URL"]).get(meta_key(namespace(env["MTRANK_REDIS_PREFIX"], schema)))
    return None if raw is None else json.loads(raw)


@pytest.mark.slow
def test_the_job_does_only_what_is_missing(job_env, capsys, monkeypatch):
    store = job_env["MTRANK_MODEL_STORE"]
    out = run(capsys)
    assert "mtrank synth" in out and "mtrank train" in out and "mtrank features load" in out
    assert list_versions(store, "boot") == [1]
    assert meta(job_env)["version"] == 1
    assert PASSWORD not in out, "the Redis password is never printed"

    # a second run: nothing to do
    out = run(capsys)
    assert "mtrank train" not in out and "mtrank features load" not in out and "mtrank synth" not in out
    assert "not training" in out and "not loading" in out
    assert list_versions(store, "boot") == [1]

    # Redis lost the features (restart without persistence): loaded again, no retraining
    client = redis.Redis.from_url(job_env["MTRANK_REDIS_URL"])
    keys = list(client.scan_iter(match=f"{job_env['MTRANK_REDIS_PREFIX']}:*", count=1000))
    assert len(keys) > 600  # users + items + meta
    client.delete(*keys)
    out = run(capsys)
    assert "mtrank train" not in out and "mtrank features load" in out
    assert list_versions(store, "boot") == [1] and meta(job_env)["version"] == 1

    # asked to retrain: a new version, its features loaded, the data set reused
    monkeypatch.setenv("JOB_RETRAIN", "1")
    out = run(capsys)
    assert "mtrank synth" not in out and "mtrank train" in out and "mtrank features load" in out
    assert list_versions(store, "boot") == [1, 2] and meta(job_env)["version"] == 2


@pytest.mark.parametrize("name,value", [("JOB_EPOCHS", "zero"), ("JOB_EPOCHS", "0"), ("JOB_RETRAIN", "maybe")])
def test_bad_job_settings_name_the_variable(name, value):
    with pytest.raises(SystemExit, match=name):
        bootstrap.options({name: value})
