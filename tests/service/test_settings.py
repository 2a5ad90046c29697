import os

import pytest
from pydantic import ValidationError

from service.settings import Settings, redact_url


def test_defaults(monkeypatch):
    for k in list(os.environ):
        if k.startswith("MTRANK_"):
            monkeypatch.delenv(k)
    s = Settings()
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.redis_prefix == "mtrank" and s.model_store == "model_store" and s.model_name == "demo"
    assert s.model_version is None and s.provider_list == ["CPUExecutionProvider"]
    assert s.fusion == "weighted_product"
    assert s.fusion_weights == {"ctr": 1.0, "cvr": 1.0, "watch_time": 0.2}
    assert s.max_items == 2000 and s.port == 8000 and s.host == "127.0.0.1"


def test_env_parsing(monkeypatch):
    monkeypatch.setenv("MTRANK_FUSION_WEIGHTS", '{"ctr": 2, "cvr": 0.5}')
    monkeypatch.setenv("MTRANK_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("MTRANK_MODEL_VERSION", "3")
    monkeypatch.setenv("MTRANK_LOG_LEVEL", "debug")
    monkeypatch.setenv("MTRANK_FUSION", "weighted_sum")
    s = Settings()
    assert s.fusion_weights == {"ctr": 2.0, "cvr": 0.5}
    assert s.provider_list == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s.model_version == 3 and s.log_level == "DEBUG" and s.fusion == "weighted_sum"


@pytest.mark.parametrize("field,value", [
    ("fusion", "max"), ("max_items", "0"), ("providers", "gpu9"), ("port", "70000"),
    ("redis_url", "http://x"), ("fusion_weights", '{"ctr": "a"}'), ("log_level", "LOUD"),
])
def test_validation_error_names_field(monkeypatch, field, value):
    monkeypatch.setenv(f"MTRANK_{field.upper()}", value)
    with pytest.raises(ValidationError) as e:
        Settings()
    assert field in str(e.value)


def test_password_never_shown(monkeypatch):
    url = "redis://user:s3cret@redis.example:6380/2"
    s = Settings(redis_url=url)
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)
    assert s.redis_url_redacted == "redis://user:***@redis.example:6380/2"
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://token@h/0") == "rediss://***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("redis://:pw@h:notaport/0") == "redis://:***@h:notaport/0"
    with pytest.raises(ValidationError) as e:
        Settings(redis_url="tcp://user:s3cret@x", port=0)
    assert "s3cret" not in str(e.value) and "redis_url" in str(e.value)


def test_experiment_settings(monkeypatch):
    for k in list(os.environ):
        if k.startswith("MTRANK_"):
            monkeypatch.delenv(k)
    s = Settings()
    assert s.routing_config is None and s.admin_token is None
    assert s.store_poll_s == 5.0 and s.version_policy == "latest"
    monkeypatch.setenv("MTRANK_ADMIN_TOKEN", "t0k3n-value")
    monkeypatch.setenv("MTRANK_ROUTING_CONFIG", "/etc/mtrank/routing.yaml")
    monkeypatch.setenv("MTRANK_STORE_POLL_S", "0.5")
    monkeypatch.setenv("MTRANK_VERSION_POLICY", "latest 2")
    s = Settings()
    assert s.admin_token.get_secret_value() == "t0k3n-value"
    assert "t0k3n-value" not in repr(s) and "t0k3n-value" not in str(s)
    assert s.routing_config == "/etc/mtrank/routing.yaml" and s.store_poll_s == 0.5 and s.version_policy == "latest 2"
    monkeypatch.setenv("MTRANK_ADMIN_TOKEN", "")
    monkeypatch.setenv("MTRANK_ROUTING_CONFIG", " ")
    s = Settings()
    assert s.admin_token is None and s.routing_config is None


@pytest.mark.parametrize("field,value", [("version_policy", "newest"), ("store_poll_s", "-1"),
                                         ("version_policy", "latest 0")])
def test_experiment_settings_validated(monkeypatch, field, value):
    monkeypatch.setenv(f"MTRANK_{field.upper()}", value)
    with pytest.raises(ValidationError) as e:
        Settings()
    assert field in str(e.value)


@pytest.mark.parametrize("url, secret", [
    ("redis://:s3cret@host:6379/0", "s3cret"),
    ("redis://user:p%40ss@host/0", "p%40ss"),
    ("redis://token@host/0", "token"),
    ("redis://host:6379/0", None),
    ("unix:///tmp/redis.sock", None),
])
def test_url_secret_is_the_one_rule(url, secret):
    from service.settings import url_secret

    assert url_secret(url) == secret
