"""Smoke test of the training-speed benchmark: `bench/train_speed.py --quick` end to end (tiny
synthetic data, our PLE and torch-rechub's, with and without BatchNorm), output into a temp dir.
No timing is asserted: only that every model ran its steps, the phases and the operator profile
add up, and the like-for-like ratio is recorded against the target."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

# the peer is installed by the bench extra (pip install -e '.[train,bench]'), not by make install-dev
pytest.importorskip("torch_rechub", reason="torch-rechub is not installed (the bench extra)")


def test_train_speed_benchmark_quick(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "bench/train_speed.py", "--quick", "--threads", "1", "--workdir",
                        str(tmp_path / "work"), "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=380)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    rep = json.loads((out / "train_speed.json").read_text())
    assert set(rep["models"]) == {"ours, with BatchNorm", "torch-rechub, with BatchNorm",
                                  "ours, without BatchNorm", "torch-rechub, without BatchNorm"}
    for name, m in rep["models"].items():
        run = m["runs"][0]
        assert run["steps"] == 5 and run["samples_per_s"] > 0, name
        assert sum(run["ms_per_step_by_phase"].values()) == pytest.approx(run["ms_per_step"], rel=0.05), name
        fam = m["profile"]["ms_per_step_by_family"]
        assert fam["GEMM"] > 0 and fam["embeddings (lookup, backward)"] > 0, (name, fam)
        assert (fam.get("BatchNorm", 0) > 0) == ("with BatchNorm" in name), (name, fam)
    assert rep["target"]["threshold"] == 1.5 and rep["target"]["value"] > 0
    assert "Where the operators' time goes" in (out / "train_speed.md").read_text()
