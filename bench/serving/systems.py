"""The systems of the serving benchmark and the client that drives them.

* ``floor``: the service's own ranker (built by its ServingManager), in-process, no HTTP, 1
  onnxruntime thread, no item cache; ``floor-int8`` the same on a variant with ``precision:
  int8``; ``floor-unsplit`` on the model exported without the user-side split.
* ``naive``: ``bench/naive_peer`` under uvicorn (FastAPI + torch eager + one Redis hash per entity).
* ``ours``: ``mtrank serve`` with its defaults; ``ours-nocache`` with ``MTRANK_ITEM_CACHE_SIZE=0``;
  ``ours-int8`` with a routing config whose one variant says ``precision: int8``; ``ours-int8-col``
  the same, its client asking for the columnar response (``Accept``, see ``service.columnar``).
* wrk (``bench/wrk/rank.lua``): closed loop on loopback, one JSON summary line per run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, free_port, parse_prometheus, stop_group, worker_pids
from bench.serving.assets import MODEL_NAME, unsplit_bundle

ALL_SYSTEMS = ("floor", "floor-unsplit", "floor-int8", "naive", "ours", "ours-nocache", "ours-int8", "ours-int8-col")
LUA = Path(__file__).resolve().parents[1] / "wrk" / "rank.lua"
WRK_TIMEOUT = "30s"  # a slower answer counts as a timeout (a socket error) and is left out of wrk's latencies


def int8_routing_config(run_dir: Path) -> Path:
    """A routing config with one variant (100%) that serves the bundle's int8 model."""
    p = run_dir / "routing-int8.yaml"
    p.write_text("salt: bench\nvariants:\n  - name: int8\n    percent: 100\n"
                 f"    model: {{name: {MODEL_NAME}, version: latest}}\n    precision: int8\n")
    return p


# ---------------------------------------------------------------------------------------------
# the floor: in-process
# ---------------------------------------------------------------------------------------------

@dataclass
class Floor:
    ranker: object  # service.ranking.Ranker
    client: object  # service.redis_client.FeatureStore, closed by close()
    info: dict  # the system's entry in the report

    def close(self) -> None:
        self.client.close()


def start_floor(system: str, store: Path, redis_url: str, run_dir: Path, bundle: Path,
                unsplit_file: Path | None) -> Floor:
    """The service's own ranker for ``system``'s one variant, built the way the service builds it
    (its ServingManager), with 1 onnxruntime thread, no item cache and no effective deadline."""
    from service.redis_client import make_store
    from service.serving import ServingManager
    from service.settings import Settings

    desc = "in-process Ranker (built by the service's ServingManager), 1 ORT thread, no item cache, one process"
    model_name, routing = MODEL_NAME, None
    if system == "floor-int8":
        routing = str(int8_routing_config(run_dir))
    elif system == "floor-unsplit":
        model_name = unsplit_bundle(store, bundle, unsplit_file).parent.name
        desc += (f"; bundle {model_name}: the same trained model exported with ServingModel(request_once=False), "
                 f"i.e. without computing the user side once")
    s = Settings(redis_url=redis_url, model_store=str(store), model_name=model_name, ort_intra_op_threads=1,
                 workers=1, item_cache_size=0, redis_deadline_ms=60_000, redis_timeout_ms=10_000,
                 store_poll_s=0, log_level="WARNING", routing_config=routing, predlog_rate=0.0)
    client = make_store(s)
    manager = ServingManager(s, client)
    manager.start()
    if manager.state is None:
        client.close()
        raise RuntimeError(f"the floor's serving state did not load: {manager.not_ready}")
    variant = manager.state.primary
    b = variant.bundle
    info = {"ran": True, "description": f"{desc}; bundle precision {b.precision}", "variant": variant.name,
            "provider": b.provider, "precision": b.precision, "bundle": str(b.path)}
    return Floor(variant.ranker, client, info)


# ---------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------

class Server:
    """A server process the benchmark started (in its own process group), its log in ``logdir``."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, ready_path: str, metrics: bool):
        self.name, self.port = name, int(cmd[cmd.index("--port") + 1])
        self.log_path = logdir / f"{name}.log"
        self.log_f = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log_f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.metrics = metrics  # whether it serves the service's /metrics
        self.headers: list[str] = []  # extra request headers its client sends ("Name: value")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, timeout: float = 5.0):
        import httpx

        return httpx.get(self.base + path, timeout=timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.get(self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.2)

    def scrape(self) -> list | None:
        """The samples of its /metrics (None for a server without them)."""
        if not self.metrics:
            return None
        r = self.get("/metrics")
        r.raise_for_status()
        return parse_prometheus(r.text)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self.proc)
        self.log_f.close()


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTRANK_", "NAIVE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_ours(name: str, store: Path, redis_url: str, logdir: Path, extra_env: dict, workers: int | None) -> Server:
    env = clean_env()
    env.update({"MTRANK_REDIS_URL": redis_url, "MTRANK_MODEL_STORE": str(store), "MTRANK_MODEL_NAME": MODEL_NAME})
    if workers:
        env["MTRANK_WORKERS"] = str(workers)
    env.update(extra_env)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port())]
    return Server(name, cmd, env, logdir, "/readyz", metrics=True)


def start_naive(model_pt: Path, redis_url: str, logdir: Path, workers: int, threads: int) -> Server:
    env = clean_env()
    env.update({"NAIVE_MODEL": str(model_pt), "NAIVE_REDIS_URL": redis_url, "NAIVE_PREFIX": "naive",
                "NAIVE_TORCH_THREADS": str(threads)})
    cmd = [sys.executable, "-m", "uvicorn", "bench.naive_peer.app:app", "--host", "127.0.0.1",
           "--port", str(free_port()), "--workers", str(workers)]
    return Server("naive", cmd, env, logdir, "/healthz", metrics=False)


def wait_workers(server: Server, want: int, timeout: float = 120.0) -> int:
    """Poll the naive peer's /healthz (it answers its pid) until ``want`` workers answered."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        try:
            seen.add(server.get("/healthz", timeout=2).json().get("pid"))
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    return len(seen)


def start_server(system: str, a, store: Path, redis_url: str, run_dir: Path, model_dir: Path) -> tuple[Server, str]:
    """Start an HTTP system, wait until it is ready; (the server, its description)."""
    if system == "naive":
        server = start_naive(model_dir / "model.pt", redis_url, run_dir, a.naive_workers, a.naive_threads)
        server.wait_ready()
        got = wait_workers(server, a.naive_workers)
        return server, (f"bench/naive_peer: FastAPI + torch eager, uvicorn {a.naive_workers} workers x "
                        f"{a.naive_threads} torch thread(s), HGETALL per entity pipelined, response_model JSON "
                        f"({got} workers answered before the load)")
    extra, desc = {}, "mtrank serve, service defaults"
    if system == "ours-nocache":
        extra["MTRANK_ITEM_CACHE_SIZE"] = "0"
        desc += ", MTRANK_ITEM_CACHE_SIZE=0"
    if system.startswith("ours-int8"):
        extra["MTRANK_ROUTING_CONFIG"] = str(int8_routing_config(run_dir))
        desc += ", MTRANK_ROUTING_CONFIG: one variant (100%) with `precision: int8` on the variant"
    if a.workers:
        desc += f", MTRANK_WORKERS={a.workers}"
    server = start_ours(system, store, redis_url, run_dir, extra, a.workers)
    if system == "ours-int8-col":
        from service.columnar import MEDIA_TYPE

        server.headers.append(f"Accept: {MEDIA_TYPE}")
        desc += f"; the client sends `Accept: {MEDIA_TYPE}` (the columnar response)"
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server, desc + f" (workers: {len(worker_pids(server.pid))})"


# ---------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------

def wrk_cmd(base: str, bodies: Path, c: int, seconds: float, offset: int = 0, headers: list[str] | None = None,
            mode: str = "plain") -> list[str]:
    """wrk's command line; ``mode`` "retry"/"honour" (the overload run) runs one thread per
    connection and records accepted latencies (see rank.lua)."""
    threads = 1 if mode == "plain" else c
    head = [x for h in headers or () for x in ("-H", h)]
    return ["wrk", f"-t{threads}", f"-c{c}", f"-d{max(1, int(round(seconds)))}s", "--timeout", WRK_TIMEOUT, *head,
            "-s", str(LUA), base, "--", str(bodies), str(offset), mode]


def wrk_summary(stdout: str) -> dict | None:
    """The ``MTRANK_WRK_JSON`` line that rank.lua's done() prints, parsed."""
    for line in stdout.splitlines():
        if line.startswith("MTRANK_WRK_JSON "):
            return json.loads(line.split(" ", 1)[1])
    return None


def run_wrk(base: str, bodies: Path, c: int, seconds: float, offset: int = 0, headers: list[str] | None = None,
            mode: str = "plain") -> tuple[dict, float]:
    """One closed-loop wrk run; (its JSON summary, wrk's CPU seconds)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(wrk_cmd(base, bodies, c, seconds, offset, headers, mode), capture_output=True, text=True,
                       timeout=seconds + 120)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res = wrk_summary(r.stdout)
    if res is None:
        raise RuntimeError(f"wrk gave no summary (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return res, cpu
