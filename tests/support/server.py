"""The one runner of the service in a subprocess on a free loopback port: ``uvicorn --factory
service.app:create_app`` (the default) or ``mtrank serve`` (the CLI, as deployed), started and
waited for until ``/readyz`` answers 200."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
MTRANK = str(Path(sys.executable).with_name("mtrank"))


def wait_ready(server, timeout: float, what: str):
    """Poll ``server.base``/readyz until 200; ``server`` has ``proc``, ``base``, ``log()`` and
    ``stop()``. Raises with the server's log when it exits or is not ready within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{what} not ready:\n" + server.log())
        time.sleep(0.1)


class Server:
    """The service in a subprocess: ``env`` are its ``MTRANK_*`` settings (the test process's own
    ``MTRANK_*`` and ``PROMETHEUS_*`` variables are not inherited; one worker unless ``env`` says
    otherwise); ``cli=True`` runs ``mtrank serve *args``, else ``uvicorn --factory ... *args``;
    stdout and stderr go to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = (), cli: bool = False):
        self.env = env
        self.log_path = log_path
        self.args = tuple(args)
        self.cli = cli
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = None

    @property
    def what(self) -> str:
        return "mtrank serve" if self.cli else "server"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        where = ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.cli:
            return [MTRANK, "serve", *where, *self.args]
        return [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", *where, "--no-access-log",
                *self.args]

    def start(self, timeout: float = 90) -> Server:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MTRANK_", "PROMETHEUS_"))}
        env["MTRANK_WORKERS"] = "1"  # the default is one per core; tests that want more say so
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        return wait_ready(self, timeout, self.what)

    def terminate(self) -> None:
        """SIGTERM without waiting (a graceful shutdown the test watches)."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after 30 s; the exit code (None if it never started)."""
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


def base_env(redis_url: str, key_prefix: str, store_root: Path, **extra: str) -> dict[str, str]:
    """The environment of a server (or consumer) on a test bundle: one onnxruntime thread, no
    store polling, relaxed Redis timeouts; ``extra`` MTRANK_* overrides on top."""
    env = {"MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": key_prefix, "MTRANK_MODEL_STORE": str(store_root),
           "MTRANK_MODEL_NAME": "demo", "MTRANK_PROVIDERS": "cpu", "MTRANK_ORT_INTRA_OP_THREADS": "1",
           "MTRANK_STORE_POLL_S": "0", "MTRANK_REDIS_TIMEOUT_MS": "2000", "MTRANK_REDIS_DEADLINE_MS": "2000"}
    env.update({k: str(v) for k, v in extra.items()})
    return env
