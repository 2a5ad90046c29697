"""Smoke test of the cluster-read benchmark: `bench/cluster_read.py --quick` end to end (its own
3-master cluster and single redis-server, a few reads per size), output into a temp dir (never
bench/results). No timing is asserted: only that it runs, reads every value and that the tagged
layout costs a bounded number of MGETs per node where the untagged one costs about one per item."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.contract import ITEM_GROUPS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def test_cluster_read_benchmark_quick(tmp_path):
    r = subprocess.run([sys.executable, "bench/cluster_read.py", "--quick", "--rounds", "20", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert (tmp_path / "cluster_read.md").read_text().startswith("# Cluster read")
    rep = json.loads((tmp_path / "cluster_read.json").read_text())
    assert rep["item_groups"] == ITEM_GROUPS
    for n, res in rep["results"]["sizes"].items():
        assert set(res["reads"]) == {"single", "cluster", "cluster, v1 keys", "cluster, 32 groups", "cluster, 8 groups"}
        assert all(r["n"] == 20 and r["p50_ms"] > 0 for r in res["reads"].values())
        tagged, untagged = sum(res["mgets_per_node"]["cluster"]), sum(res["mgets_per_node"]["cluster, v1 keys"])
        assert tagged <= ITEM_GROUPS + 1 < untagged, (n, tagged, untagged)
        for g in (32, 8):  # the what-if rows: at most g item groups + the user key
            assert sum(res["mgets_per_node"][f"cluster, {g} groups"]) <= g + 1
        assert res["ratio_p50"] > 0
