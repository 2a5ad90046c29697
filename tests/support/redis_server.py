"""The one launcher of a test-owned redis-server (no persistence, loopback only, a free port).

Every test Redis comes from here: the session one (``tests/conftest.py``), the ones a test kills,
pauses and restarts, a password-protected one, a TLS-only one and the nodes of a cluster. Never the
Redis on 127.0.0.1:6379."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.ports import free_port


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate, key and the CA that signed it: the server then listens on TLS only."""

    cert: Path
    key: Path
    ca: Path


class RedisProc:
    """One redis-server on a fixed loopback port that a test may kill, pause and restart.

    ``args`` are extra server options; ``password`` sets ``requirepass``; ``tls`` makes the port
    TLS-only. ``SAVE`` (see :meth:`snapshot`) writes ``dump.rdb`` into its directory, which a
    restart on the same port loads: the data survives a ``kill -9``."""

    def __init__(self, workdir: Path, port: int | None = None, args: tuple[str, ...] = (),
                 password: str | None = None, tls: TlsFiles | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args = tuple(args) + (("--requirepass", password) if password else ())
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def password(self) -> str | None:
        a = list(self.args)
        return a[a.index("--requirepass") + 1] if "--requirepass" in a else None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kw) -> redis.Redis:
        """A plain redis-py client of it (over TLS, with the password, when it has them)."""
        kw.setdefault("socket_timeout", 5)
        if self.tls is not None:
            kw.setdefault("ssl", True)
            kw.setdefault("ssl_ca_certs", str(self.tls.ca))
            kw.setdefault("password", self.password)
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not on PATH: install Redis (apt-get install redis-server)")
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        return [exe, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                *self.args]

    def start(self, timeout: float = 10.0) -> RedisProc:
        """Start it; return once it answers PING (RuntimeError when it exits or does not answer)."""
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ping():
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on {self.port} did not start")
            time.sleep(0.02)

    def ping(self) -> bool:
        """Does it answer (a refused password counts: the server is up)?"""
        c = self.client(socket_timeout=0.5, socket_connect_timeout=0.5, password=self.password)
        try:
            return bool(c.ping())
        except redis.AuthenticationError:
            return True
        finally:
            c.close()

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
        self.client(password=self.password).save()

    def kill(self) -> None:
        """SIGKILL (no shutdown: clients see the connection reset)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
