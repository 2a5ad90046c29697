"""Smoke test of the serving benchmark: `bench/serve.py --quick` end to end on tiny data, every system.

It trains a tiny model (cached under the benchmark's workdir, so a rerun skips that), starts its
own redis-server, the naive peer and `mtrank serve` (plain, without item cache, on an int8
variant), runs the floors in-process, drives the servers with wrk for 1 s per cell and checks the
JSON it writes (into a temp dir: never bench/results). About 1.5 min on 2 cores once the model is
cached.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.serving.systems import ALL_SYSTEMS
from service.ranking import STAGES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_serve_benchmark_quick(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "bench/serve.py", "--quick", "--duration", "1", "--out-dir", str(out),
                        "--systems", ",".join(ALL_SYSTEMS), "--cluster-read"],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert (out / "serve.md").read_text().startswith("# Serving benchmark (quick)")
    rep = json.loads((out / "serve.json").read_text())

    for key in ("machine", "git", "export", "data", "model", "systems", "cells", "memory", "targets", "args"):
        assert key in rep, key
    assert rep["mode"] == "quick" and not rep["errors"], rep["errors"]
    assert rep["machine"]["cores"] >= 1 and rep["git"]["commit"]
    assert rep["data"]["schema"]["fields"] == {"sparse": 24, "dense": 8, "sequence": 2}
    quality = rep["model"]["quality"]
    assert set(quality["delta"]) == set(quality["fp32"]) == set(quality["int8"]) and quality["fp32"]

    for system in ALL_SYSTEMS:
        assert rep["systems"][system]["ran"], rep["systems"][system]
        cells = [c for c in rep["cells"] if c["system"] == system]
        want_c = [1] if system.startswith("floor") else [1, 4]
        assert sorted(c["c"] for c in cells) == want_c, system
        for c in cells:
            assert c["n"] == 100 and c["requests"] > 0 and c["rps"] > 0, c
            for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms"):
                assert c[k] is not None and c[k] > 0, (k, c)
            assert c["p50_ms"] <= c["p99_ms"] <= c["p999_ms"]
            assert c["non2xx"] == 0 and c["shed"] == 0 and c["socket_errors"] == 0, c
            assert c["cpu_ms_per_req"]["server"] > 0, c
            if system != "naive":  # the service's own stage timers: in-process, or from its /metrics
                assert set(c["stages_ms"]) == set(STAGES), c
                assert c["stage_source"] == ("in-process" if system.startswith("floor") else "metrics")
            if system in ("ours", "ours-int8"):
                assert 0 <= c["cache_hit_rate"] <= 1, c
    floor = next(c for c in rep["cells"] if c["system"] == "floor")
    assert floor["rps_x2"] == pytest.approx(2 * floor["rps"])
    assert rep["systems"]["floor-int8"]["precision"] == "int8"
    assert "/bench_unsplit/" in rep["systems"]["floor-unsplit"]["bundle"]
    assert rep["systems"]["ours-int8"]["models"]["variants"][0]["name"] == "int8"

    ov = rep["overload"]  # the goodput-under-overload run: both client kinds at c = 2 and 4
    assert {(c["c"], c["kind"]) for c in ov["cells"]} == {(2, "retry"), (2, "honour"), (4, "retry"), (4, "honour")}
    for c in ov["cells"]:
        assert c["useful_rps"] > 0 and c["accepted"] > 0 and c["p50_ms"] <= c["p99_ms"], c

    cr = rep["cluster_read"]  # bench/cluster_read.py --quick in the same run, its headline in serve.md
    assert cr["key_layout_version"] >= 2 and set(cr["results"]["sizes"]) == {"500", "2000"}
    assert (out / "cluster_read.md").is_file()
    assert "## Cluster read" in (out / "serve.md").read_text()

    names = [t["target"] for t in rep["targets"]]
    assert any(n.startswith("fp32 throughput") for n in names) and any("naive" in n for n in names)
    assert any(n.startswith("int8 + user side once throughput") for n in names)
    assert any(n.startswith("overload goodput, honour client") for n in names)
    for t in rep["targets"]:
        assert t["pass"] in (True, False, None)
    assert rep["memory"]["ours"]["after"]["rss_mb_per_worker"][0] > 0
    assert rep["memory"]["naive"]["workers"] == 2
    assert rep["memory"]["ours-nocache"]["cache_budget_mb"] == 0
    assert rep["memory"]["ours-int8"]["model_mb"] < rep["memory"]["ours"]["model_mb"]
