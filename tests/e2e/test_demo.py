"""`mtrank demo` as a new user runs it (issue 11): with `--no-serve` a failed self-check exits
non-zero with a one-line reason and no traceback; and from a fresh virtualenv holding only the
README's install (`pip install '.[train,readout]'`, no dev extras: no httpx, no pytest) the demo's
self-check path exits 0 without a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--users", "300", "--items", "600", "--exposures", "5000", "--epochs", "1", "--batch-size", "1024",
         "--check-items", "50"]


def _cleanup(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i:i + 5000])


def _demo_cmd(exe: str, tmp_path: Path) -> list[str]:
    return [exe, "demo", "--no-serve", "--port", str(free_port()), "--data", str(tmp_path / "data"),
            "--store", str(tmp_path / "store"), *SMALL]


@pytest.mark.slow
def test_failed_self_check_exits_nonzero_in_one_line(tmp_path, redis_server):
    """Fusion weights naming tasks the model lacks: the service never becomes ready."""
    prefix = f"mtrank-demofail-{os.getpid()}"
    exe = str(Path(sys.executable).with_name("mtrank"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env.update(MTRANK_REDIS_URL=redis_server, MTRANK_REDIS_PREFIX=prefix, MTRANK_FUSION_WEIGHTS='{"dwell": 1}',
               MTRANK_STORE_POLL_S="0")
    try:
        out = subprocess.run([*_demo_cmd(exe, tmp_path), "--ready-timeout", "3"], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
    finally:
        _cleanup(redis_server, prefix)
    log = out.stdout + out.stderr
    assert out.returncode == 1, log[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.startswith("self-check failed:")]
    assert len(lines) == 1 and "not ready within 3 s" in lines[0] and "dwell" in lines[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_demo_from_a_train_only_install(tmp_path, redis_server):
    """A fresh venv with `pip install '<repo>[train,readout]'` (torch from the machine's find-links) and
    nothing else; `mtrank demo --no-serve`, shrunk, must exit 0 after a 200 self-check."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    src = tmp_path / "src"  # a copy, so the build does not write into the checkout
    anywhere = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache")

    def ignore(directory, names):  # the checkout's own venv, data and models stay behind (top level only)
        top = {".venv", "data", "model_store", "build"} if Path(directory) == ROOT else set()
        return set(anywhere(directory, names)) | (top & set(names))

    shutil.copytree(ROOT, src, ignore=ignore)
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{src}[train,readout]"], capture_output=True, text=True,
                       timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    for dev_only in ("httpx", "pytest"):
        r = subprocess.run([str(py), "-c", f"import {dev_only}"], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, f"{dev_only} is installed: the test would not show the demo works without it"
    prefix = f"mtrank-demovenv-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTRANK_", "PYTHONPATH"))}
    env.update(MTRANK_REDIS_URL=redis_server, MTRANK_REDIS_PREFIX=prefix)
    work = tmp_path / "work"
    work.mkdir()
    try:
        out = subprocess.run(_demo_cmd(str(venv / "bin" / "mtrank"), work), capture_output=True, text=True,
                             timeout=900, env=env, cwd=work)
    finally:
        _cleanup(redis_server, prefix)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "POST /rank with 50 candidates -> HTTP 200" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
