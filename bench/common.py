"""Helpers shared by the benchmarks (bench/serve.py and bench/serving/, bench/train_speed.py): a benchmark-owned
redis-server, process-tree CPU and memory from /proc, machine and git descriptions, Prometheus
text parsing, Markdown tables. Standard library only (plus redis-py), no torch.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# ports and owned processes
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group we started (``start_new_session=True``), then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


class OwnedRedis:
    """A redis-server started by the benchmark on a free loopback port (no persistence); only this
    instance is ever flushed or stopped."""

    def __init__(self, workdir: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--protected-mode", "yes"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited at start") from None
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("redis-server did not answer PING")
        client.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=30)

    def used_memory(self) -> int:
        with self.client() as c:
            return int(c.info("memory")["used_memory"])

    def stop(self) -> None:
        stop_group(self.proc)


# ---------------------------------------------------------------------------------------------
# /proc: process trees, CPU seconds, resident memory
# ---------------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return kids
    for t in tasks:
        try:
            kids += [int(x) for x in (t / "children").read_text().split()]
        except OSError:
            pass
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (alive now)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if _stat_fields(p) is None:
            continue
        out.append(p)
        todo += children_of(p)
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the given processes (all their threads), seconds."""
    total = 0
    for p in pids:
        f = _stat_fields(p)
        if f is not None:
            total += int(f[11]) + int(f[12])  # fields 14 and 15 of /proc/<pid>/stat
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def worker_pids(root_pid: int) -> list[int]:
    """The serving processes of a uvicorn tree: its multiprocessing-spawned workers, or the root
    itself when it serves alone (``--workers 1``). Helper processes (resource tracker) are left out."""
    tree = process_tree(root_pid)
    workers = [p for p in tree if p != root_pid and "spawn_main" in cmdline(p)]
    return workers or [root_pid]


def machine_busy() -> tuple[float, float]:
    """(busy seconds, total seconds) summed over all CPUs since boot, from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


# ---------------------------------------------------------------------------------------------
# descriptions
# ---------------------------------------------------------------------------------------------

def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info() -> dict:
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "dirty": bool(dirty), "dirty_files": dirty.splitlines()[:20]}


def path_commit(*paths: str) -> dict:
    """The last commit touching ``paths`` (e.g. the export code a bundle was built with)."""
    line = git("log", "-1", "--format=%H %cI %s", "--", *paths)
    h, _, rest = line.partition(" ")
    date, _, subject = rest.partition(" ")
    return {"paths": list(paths), "commit": h, "date": date, "subject": subject}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in ("onnxruntime", "numpy", "fastapi", "uvicorn", "redis", "torch", "torch_rechub"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - an absent optional module is just not listed
            pass
    wrk = shutil.which("wrk")
    if wrk:
        try:
            r = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=5)
            versions["wrk"] = (r.stdout or r.stderr).splitlines()[0].split(" Copyright")[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    redis_exe = shutil.which("redis-server")
    if redis_exe:
        try:
            versions["redis-server"] = subprocess.run([redis_exe, "--version"], capture_output=True, text=True,
                                                      timeout=5).stdout.split()[2]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": cores,
            "memory_gib": round(mem / 2 ** 30, 1), "loadavg": list(os.getloadavg()), "versions": versions,
            "hostname": platform.node()}


# ---------------------------------------------------------------------------------------------
# Prometheus text format (the service's /metrics)
# ---------------------------------------------------------------------------------------------

def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """``[(sample name, labels, value)]`` of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value)) for fam in text_string_to_metric_families(text)
            for s in fam.samples]


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Sequence[Sequence], digits: int | Sequence[int] = 1) -> str:
    ds = [digits] * len(headers) if isinstance(digits, int) else list(digits)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v, ds[i] if i < len(ds) else 1) for i, v in enumerate(r)) + " |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)



def build_once(out: Path, build: Callable[[Path], object]) -> Path:
    """``out``, built by ``build(tmp)`` into a temp sibling and renamed into place unless it already
    holds a ``dataset.yaml``; a concurrent process that renamed its own first wins (ours is dropped)."""
    if not (out / "dataset.yaml").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
