"""Provider decisions (issue 11), on a CPU-only machine: the pure functions of service.providers fed
provider lists (run gate, default workers, strictness), and real onnxruntime sessions: a CUDA
request on a build without CUDA falls back to the CPU *and takes the CPU run gate*, or, strict,
refuses to start naming the provider (in-process and through `mtrank serve`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service import providers
from service.app import create_app
from service.providers import CPU, CUDA, ProviderMismatch
from service.serving import WARMUP_SIZES, ServingManager
from service.settings import Settings
from service.store import ProviderError, load_bundle
from tests.support.wait import wait_until

MTRANK = str(Path(sys.executable).with_name("mtrank"))
needs_no_cuda = pytest.mark.skipif(CUDA in ort.get_available_providers(),
                                   reason="this onnxruntime has CUDA: the fallback cannot be provoked here")


# -- pure decisions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("got,gated", [
    ([CPU], True),
    ([CUDA, CPU], False),
    (["TensorrtExecutionProvider", CUDA, CPU], False),
    ([], True),
    (["OpenVINOExecutionProvider", CPU], True),  # runs on the host's cores
])
def test_run_gate_follows_the_providers_the_session_got(got, gated):
    assert providers.uses_run_gate(got) is gated


@pytest.mark.parametrize("requested,available,cores,gpus,want", [
    ([CPU], [CPU], 8, 0, 8),  # CPU: one per core
    ([CPU], [CUDA, CPU], 8, 2, 8),  # CUDA available but not asked for
    ([CUDA, CPU], [CUDA, CPU], 16, 1, 1),  # one per GPU
    ([CUDA, CPU], [CUDA, CPU], 16, 4, 4),
    ([CUDA, CPU], [CPU], 16, 1, 16),  # the build has no CUDA: it will run on CPU
    ([CUDA, CPU], [CUDA, CPU], 16, 0, 16),  # no visible GPU
    ([CPU], [CPU], 0, 0, 1),
])
def test_default_workers(requested, available, cores, gpus, want):
    assert providers.default_workers(requested, available, cores, gpus) == want


def test_strictness_of_a_fallback():
    assert providers.check_session_providers(CUDA, [CUDA, CPU], strict=True) is None
    assert providers.check_session_providers(CPU, [CPU], strict=False) is None
    msg = providers.check_session_providers(CUDA, [CPU], strict=False)
    assert CUDA in msg and CPU in msg
    with pytest.raises(ProviderMismatch, match=f"asked for {CUDA} but the session runs on {CPU}.*STRICT"):
        providers.check_session_providers(CUDA, [CPU], strict=True)


@pytest.mark.parametrize("env,want", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2), ({"CUDA_VISIBLE_DEVICES": ""}, 0), ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
    ({"CUDA_VISIBLE_DEVICES": "GPU-abc"}, 1),
])
def test_visible_gpus_from_the_environment(env, want):
    assert providers.visible_gpus(env) == want


def test_visible_gpus_from_the_driver(tmp_path):
    for i in range(3):
        (tmp_path / f"0000:0{i}:00.0").mkdir()
    assert providers.visible_gpus({}, proc_dir=str(tmp_path)) == 3
    assert providers.visible_gpus({}, proc_dir=str(tmp_path / "absent")) == 0


def test_preload_only_when_cuda_is_requested():
    assert providers.preload_cuda_dlls([CPU]) is False
    # asked for CUDA: called exactly when this onnxruntime has the function (onnxruntime-gpu >= 1.21)
    assert providers.preload_cuda_dlls([CUDA, CPU]) is hasattr(ort, "preload_dlls")


def test_settings_default_workers_and_strict_alias(monkeypatch):
    monkeypatch.delenv("MTRANK_WORKERS", raising=False)
    cores = providers.default_workers([CPU], [CPU], len(os.sched_getaffinity(0)), 0)
    assert Settings().workers == cores
    want = providers.default_workers([CUDA, CPU], ort.get_available_providers(), cores, providers.visible_gpus())
    assert Settings(providers="cuda,cpu").workers == want
    assert Settings(workers=3).workers == 3
    monkeypatch.setenv("MTRANK_PROVIDERS_STRICT", "1")
    assert Settings().providers_strict is True
    assert Settings(providers_strict=False).providers_strict is False


# -- real onnxruntime sessions ---------------------------------------------------------------------

def test_cpu_session_is_gated(tmp_path, bundle_factory):
    bundle_factory(tmp_path, version=1)
    b = load_bundle(tmp_path, "demo", providers="cpu", warmup=False)
    assert b.session.get_providers()[0] == CPU and b.gated


@needs_no_cuda
def test_cuda_request_that_falls_back_is_gated_and_warned(tmp_path, bundle_factory, caplog):
    bundle_factory(tmp_path, version=1)
    with caplog.at_level(logging.WARNING, logger="service.store"):
        b = load_bundle(tmp_path, "demo", providers="cuda,cpu", warmup=False)
    assert b.provider == CPU and b.requested_providers == [CUDA, CPU]
    assert b.gated  # decided by the session's providers, not by the configured ones
    assert any(CUDA in r.getMessage() for r in caplog.records)


@needs_no_cuda
def test_strict_cuda_request_refuses_to_load(tmp_path, bundle_factory):
    bundle_factory(tmp_path, version=1)
    with pytest.raises(ProviderError, match=f"{CUDA}.*MTRANK_PROVIDERS_STRICT"):
        load_bundle(tmp_path, "demo", providers="cuda", strict=True, warmup=False)


@needs_no_cuda
def pool_threads() -> int:
    return sum(t.name.startswith("mtrank-redis-pool-") for t in threading.enumerate())


def test_strict_cuda_request_refuses_to_start(make_settings, features):
    app = create_app(make_settings(providers="cuda", providers_strict=True))
    before = pool_threads()
    with pytest.raises(ProviderError, match=CUDA):
        with TestClient(app):
            pass
    # the failed start stopped what it had started: its Redis pool's thread ends (no reconnect
    # attempts, and their log lines, for the rest of the process's life)
    assert app.state.mtrank.redis_client is not None
    assert wait_until(lambda: pool_threads() <= before, timeout=5), (pool_threads(), before)
    # not strict: the same request starts on the CPU, ready, and says so in /models
    with TestClient(create_app(make_settings(providers="cuda,cpu"))) as c:
        assert c.get("/readyz").status_code == 200
        m = c.get("/models").json()
        assert m["provider"] == CPU and m["requested_providers"] == [CUDA, CPU]
        assert c.app.state.mtrank.bundle.gated


@needs_no_cuda
def test_mtrank_serve_strict_exits_naming_the_provider(redis_url, key_prefix, store_root, features):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env.update(MTRANK_REDIS_URL=redis_url, MTRANK_REDIS_PREFIX=key_prefix, MTRANK_MODEL_STORE=str(store_root),
               MTRANK_PROVIDERS="cuda", MTRANK_PROVIDERS_STRICT="true", MTRANK_WORKERS="1", MTRANK_STORE_POLL_S="0")
    p = subprocess.run([MTRANK, "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-2000:]
    assert CUDA in out and "MTRANK_PROVIDERS_STRICT" in out


def test_warm_up_covers_max_items(make_settings):
    assert ServingManager(make_settings(max_items=3000), None).warmup_sizes == (*WARMUP_SIZES, 3000)
    assert ServingManager(make_settings(max_items=100), None).warmup_sizes == (1, 16, 100)
