"""int8 bundles: the quantised model beside fp32 (own sha256, AUC deltas in the manifest), its
parity with fp32 within the documented tolerance, the method ladder, and a routing variant with
``precision: int8`` served through the real app on Redis features.

Parity tolerance of int8 (documented here, asserted below): dynamic int8 is an approximation, so
the int8 outputs are compared with fp32 statistically, not to 1e-4: mean absolute difference of
the probabilities <= 0.01 and max <= 0.1 on the test rows (measured: max 0.04 on the 100k test
rows of the demo PLE, 1M synthetic exposures); what must hold is the ranking quality, every AUC
within 0.001 (demo PLE: -0.0003 at worst).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import pandas as pd
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.contract import MANIFEST_FILE, MODEL_FILE, PRECISION_FILES, BundleManifest, sha256_file
from service.settings import Settings
from service.store import load_bundle
from tests.support.reference import expected_outputs
from training.data.dataset import prepare
from training.data.synth import SynthConfig, generate
from training.materialize import load_features
from training.quantize import METHODS, QuantizeConfig, make_int8, quantize_model, run_onnx
from training.train import TrainConfig, train

INT8 = PRECISION_FILES["int8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small PLE trained one epoch with ``int8=True``: (data dir, store, bundle dir, dataset)."""
    root = tmp_path_factory.mktemp("int8")
    generate(root / "data", SynthConfig(n_users=600, n_items=1200, n_exposures=20_000, seed=9, target_ctr=0.3,
                                        target_cvr=0.4), progress=False)
    bundle, _ = train(root / "data", name="q", store=root / "store",
                      cfg=TrainConfig(epochs=1, batch_size=1024, int8=True, threads=1), progress=False)
    return root / "data", root / "store", bundle, prepare(root / "data")


def test_int8_model_is_in_the_bundle_with_its_checksum_and_auc_deltas(trained):
    data, _, bundle, ds = trained
    m = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    q = m.precisions["int8"]
    assert q.file == INT8 and (bundle / INT8).is_file()
    assert q.sha256 == sha256_file(bundle / INT8) != m.sha256
    assert q.method in METHODS
    assert set(q.auc_delta) == {"ctr", "cvr", "ctcvr"}
    assert all(abs(d) < 0.05 for d in q.auc_delta.values())
    assert q.auc_delta["ctr"] == q.metric_delta["auc/ctr"]
    assert "rmse_log1p/watch_time" in q.metric_delta
    assert q.rows == m.train_config["rows"]["test"]
    assert q.within_tolerance == all(-d <= q.tolerance for d in q.auc_delta.values())
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no scratch files left
    assert m.train_config["train"]["int8"] is True
    # the quantised graph really is integer: quantised matmuls replaced the float ones
    ops = {n.op_type for n in onnx.load(str(bundle / INT8)).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul",
                  "DequantizeLinear"}, ops
    assert (bundle / INT8).stat().st_size < 0.6 * (bundle / MODEL_FILE).stat().st_size


def test_int8_parity_with_fp32_within_the_documented_tolerance(trained):
    data, _, bundle, ds = trained
    _, _, test_rows = ds.split("random", (0.8, 0.1, 0.1), 42)
    inputs = ds.inputs(test_rows)
    fp32 = run_onnx(bundle / MODEL_FILE, inputs, ds.tasks)
    int8 = run_onnx(bundle / INT8, inputs, ds.tasks)
    m = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    for t in ds.tasks:
        a, b = fp32[t.name].astype(np.float64), int8[t.name].astype(np.float64)
        if t.kind == "regression":
            a, b = np.log1p(a), np.log1p(b)
        diff = np.abs(a - b)
        if t.kind == "binary":
            assert diff.mean() <= 0.01 and diff.max() <= 0.1, (t.name, diff.mean(), diff.max())
        assert diff.max() == pytest.approx(m.precisions["int8"].max_abs_diff[t.name], rel=1e-6, abs=1e-7)


def test_method_ladder_keeps_the_best_when_none_holds_the_bound(trained, tmp_path, caplog):
    data, _, bundle, ds = trained
    _, val_rows, test_rows = ds.split("random", (0.8, 0.1, 0.1), 42)
    work = tmp_path / "b"
    work.mkdir()
    (work / MODEL_FILE).write_bytes((bundle / MODEL_FILE).read_bytes())
    labels = {t.label: ds.label(t.label, test_rows) for t in ds.tasks}
    with caplog.at_level(logging.INFO, logger="training.quantize"):
        q = make_int8(work, ds.tasks, ds.inputs(test_rows), labels, calibration=ds.inputs(val_rows),
                      cfg=QuantizeConfig(tolerance=-1.0))  # impossible: every method is tried
    tried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("int8 ")]
    assert len(tried) == len(METHODS)
    assert not q.within_tolerance and "within_tolerance=false" in caplog.text
    drops = {line.split()[1].rstrip(":"): float(line.split("worst AUC drop ")[1].split()[0]) for line in tried}
    assert drops[q.method] == min(drops.values())
    assert sha256_file(work / INT8) == q.sha256


def float_weight_layers(path) -> list[str]:
    """MatMul/Gemm nodes of an ONNX graph that still multiply by a float32 initializer."""
    graph = onnx.load(str(path)).graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in floats]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_makes_a_runnable_model(trained, tmp_path, method):
    """Each method runs, stays close to fp32, and quantises every weight layer it claims: the
    dynamic quantiser renames a Gemm as it rewrites it into MatMul, which once left every Gemm
    (towers, gates, the experts' first layers) in float32."""
    _, _, bundle, ds = trained
    out = tmp_path / "m.onnx"
    rows = ds.inputs(np.arange(256))
    assert float_weight_layers(bundle / MODEL_FILE)  # the check below has something to find
    quantize_model(bundle / MODEL_FILE, out, method, calibration=rows)
    got, want = run_onnx(out, rows, ds.tasks), run_onnx(bundle / MODEL_FILE, rows, ds.tasks)
    assert np.abs(got["ctr"] - want["ctr"]).mean() < 0.02
    left = float_weight_layers(out)
    if "fp32-heads" in method:
        assert left and all("gate" in n or "/out/" in n for n in left), left
    else:
        assert left == [], left


def test_bundle_int8_is_quantised_from_the_per_expert_graph(trained):
    """The bundle's int8 model has one integer GEMM per expert in the experts' later layers, and
    no weight layer left in float32 (unless the chosen method keeps the heads)."""
    _, _, bundle, _ = trained
    m = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    fp32, int8 = (onnx.load(str(bundle / f)).graph for f in (MODEL_FILE, INT8))
    rank3 = [i.name for i in fp32.initializer if len(i.dims) == 3 and "experts.weights" in i.name]
    assert rank3  # the float32 graph keeps the batched matmul over stacked [E, in, out] weights
    assert not [i.name for i in int8.initializer if len(i.dims) == 3 and i.data_type == onnx.TensorProto.FLOAT]
    left = float_weight_layers(bundle / INT8)
    assert left == [] or "fp32-heads" in m.precisions["int8"].method, left


def test_store_loads_the_int8_model_checked_against_its_own_sha256(trained):
    _, store, bundle, _ = trained
    b8 = load_bundle(store, "q", precision="int8", warmup=[1, 64])
    b32 = load_bundle(store, "q")
    assert (b8.precision, b32.precision) == ("int8", "fp32")
    assert b8.model_path.name == INT8 and b32.model_path.name == MODEL_FILE


def test_int8_variant_serves_through_the_app(trained, tmp_path, redis_server):
    """Two variants of one bundle: control in fp32, treatment in int8; each /rank answer equals
    onnxruntime run directly on that variant's model file with the features in Redis."""
    data, store, bundle, _ = trained
    prefix = f"mtrank-int8-{os.getpid()}"
    client = redis.Redis.from_url(redis_server)
    load_features(data, bundle, client, prefix=prefix, progress=False)
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("salt: q8\nallow_force: true\nvariants:\n"
                   "  - {name: control, percent: 50, model: {name: q, version: 1}}\n"
                   "  - {name: int8, percent: 50, model: {name: q, version: latest}, precision: int8}\n")
    settings = Settings(redis_url=redis_server, redis_prefix=prefix, model_store=str(store), model_name="q",
                        routing_config=str(cfg), store_poll_s=0,
                        fusion_weights={"ctr": 1.0, "cvr": 1.0, "watch_time": 0.2})
    ex = pd.read_parquet(data / "exposures.parquet", columns=["user_id", "item_id"])
    user = str(ex.user_id.iloc[5])
    items = [str(i) for i in ex.item_id.drop_duplicates().iloc[:200]]
    context = {"hour": 20, "device": "ios"}
    world = {"bundle": bundle, "prefix": prefix, "redis": client}
    try:
        with TestClient(create_app(settings)) as c:
            answers = {v: c.post("/rank", json={"user_id": user, "items": items, "context": context},
                                 headers={"X-Mtrank-Variant": v}) for v in ("control", "int8")}
            models = c.get("/models").json()
        expected = {"control": expected_outputs(world, user, items, context)}
        # the same features through the int8 file: _expected reads model.onnx, so point it at a copy
        int8_only = tmp_path / "int8-bundle"
        int8_only.mkdir()
        for f in ("manifest.json", "vocab.json"):
            (int8_only / f).write_bytes((bundle / f).read_bytes())
        (int8_only / MODEL_FILE).write_bytes((bundle / INT8).read_bytes())
        expected["int8"] = expected_outputs({**world, "bundle": int8_only}, user, items, context)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
        if keys:
            client.delete(*keys)
    pos = {item: i for i, item in enumerate(items)}
    for variant, r in answers.items():
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["variant"] == variant and body["model"] == {"name": "q", "version": 1}
        for row in body["items"]:
            for task, value in row["scores"].items():
                assert value == pytest.approx(float(expected[variant][task][pos[row["item_id"]]]), rel=1e-5, abs=1e-6)
    # the two precisions really differ (the int8 answers are not the fp32 ones)
    c_scores = {row["item_id"]: row["scores"]["ctr"] for row in answers["control"].json()["items"]}
    i_scores = {row["item_id"]: row["scores"]["ctr"] for row in answers["int8"].json()["items"]}
    assert any(abs(c_scores[k] - i_scores[k]) > 1e-6 for k in c_scores)
    assert {v["name"]: v.get("model") for v in models["variants"]}["int8"] == {"name": "q", "version": 1}
