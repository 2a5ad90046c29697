"""Fixtures of the HTTP-layer tests: the service tests' real ONNX bundles and Redis features (imported
from tests/service/conftest.py), an in-process app, real ``uvicorn`` / ``mtrank serve`` processes
and a raw-socket HTTP/1.1 client (for what httpx will not send: chunked uploads, lying
Content-Length, bytes that are not UTF-8)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.helpers import wait_ready
from tests.service.conftest import (  # noqa: F401  (fixtures, re-exported for tests/http)
    ROOT,
    FeatureData,
    Server,
    bundle_factory,
    features,
    free_port,
    make_settings,
    reference,
    schema,
    seed_features,
    server_factory,
    store_root,
    write_bundle,
)

MTRANK = str(Path(sys.executable).with_name("mtrank"))


@pytest.fixture
def app_client(make_settings, features):
    """``app_client(**settings) -> TestClient`` (a context manager running the app's lifespan)."""

    @contextmanager
    def make(**overrides):
        overrides.setdefault("redis_deadline_ms", 2000)  # a busy test machine must not make answers degraded
        with TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False) as c:
            yield c

    return make


def base_env(redis_url: str, key_prefix: str, store_root: Path, **extra: str) -> dict[str, str]:
    env = {"MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": key_prefix, "MTRANK_MODEL_STORE": str(store_root),
           "MTRANK_MODEL_NAME": "demo", "MTRANK_PROVIDERS": "cpu", "MTRANK_ORT_INTRA_OP_THREADS": "1",
           "MTRANK_STORE_POLL_S": "0", "MTRANK_REDIS_TIMEOUT_MS": "2000", "MTRANK_REDIS_DEADLINE_MS": "2000"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def env_for(redis_url, key_prefix, store_root, features):
    """``env_for(**MTRANK_overrides) -> env`` of a server on the test bundle and features."""
    return lambda **extra: base_env(redis_url, key_prefix, store_root, **extra)


class Serve:
    """``mtrank serve`` (the CLI, as deployed) in a subprocess on a free loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()):
        self.env = env
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "Serve":
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MTRANK_", "PROMETHEUS_"))}
        env["MTRANK_WORKERS"] = "1"  # the default is one per core; tests that want more say so
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([MTRANK, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        return wait_ready(self, timeout, "mtrank serve")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc is not None else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def serve_factory(tmp_path):
    """``serve_factory(env, *args) -> Serve`` (started); all are stopped after the test."""
    procs: list[Serve] = []

    def make(env: dict[str, str], *args: str, start: bool = True) -> Serve:
        srv = Serve(env, tmp_path / f"serve-{len(procs)}.log", args)
        procs.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in procs:
        srv.stop()


# -- a raw HTTP/1.1 exchange ------------------------------------------------------------------------

def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One response from ``sock``: (status, lower-cased headers, body by Content-Length)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:n]


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line + headers, without the blank line) and ``body``; read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        return read_response(s, timeout)


# -- Prometheus scrapes ----------------------------------------------------------------------------

def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """``GET /metrics`` parsed: (sample name, sorted label items) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:500]
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = {k: str(v) for k, v in labels.items()}
    return sum(v for (n, lab), v in samples.items() if n == name and want.items() <= dict(lab).items())
