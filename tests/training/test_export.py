"""ONNX export into versioned bundles: files, manifest, serving parity (batch-1 user), the gate."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import training.export as export_mod
from service.contract import (
    MANIFEST_FILE,
    MODEL_FILE,
    VOCAB_FILE,
    BundleManifest,
    OutputCalibration,
    model_inputs,
    sha256_file,
)
from tests.support.contract import TASKS, tiny_schema
from tests.support.inputs import parity_rows
from training.export import ExportParityError, ServingModel, check_parity, export_bundle, latest_version, list_versions
from training.models import ARCHITECTURES, build_model


def make_model(arch: str):
    torch.manual_seed(0)
    return build_model(arch, tiny_schema(), TASKS)


def export(model, store, **kw):
    args = dict(name="ranker", store=store, train_config={"epochs": 1},
                metrics={"auc/ctr": 0.7, "rmse_log1p/watch_time": float("nan")},
                parity_inputs=parity_rows(model.schema), vocabs={"item_id": ["<oov>", "a", "b"]})
    return export_bundle(model, **{**args, **kw})


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_export_bundle(arch, tmp_path):
    model = make_model(arch).train()
    report = tmp_path / "report.json"
    report.write_text('{"ok": true}')
    path = export(model, tmp_path / "store", extra_files={"report.json": report})
    assert path == tmp_path / "store" / "ranker" / "1"
    assert model.training  # the caller's mode is restored
    assert {p.name for p in path.iterdir()} == {MODEL_FILE, MANIFEST_FILE, VOCAB_FILE, "report.json"}
    assert json.loads((path / VOCAB_FILE).read_text()) == {"item_id": ["<oov>", "a", "b"]}
    assert (path / "report.json").read_text() == '{"ok": true}'

    m = BundleManifest.from_json((path / MANIFEST_FILE).read_text())
    assert (m.name, m.version, m.architecture) == ("ranker", 1, arch)
    assert m.sha256 == sha256_file(path / MODEL_FILE)
    assert m.outputs == ["ctr", "cvr", "watch_time"] and m.tasks == TASKS
    assert m.inputs == model_inputs(model.schema) and m.feature_schema == model.schema
    assert m.metrics["auc/ctr"] == 0.7 and "rmse_log1p/watch_time" not in m.metrics  # NaN left out
    assert all(0 <= m.metrics[f"parity_max_abs_diff/{t.name}"] <= 1e-4 for t in TASKS)
    assert m.train_config == {"epochs": 1}
    assert set(m.library_versions) == {"torch", "onnx", "onnxruntime", "numpy", "python"}

    # serving: one user (batch 1), N candidate items
    rows = parity_rows(model.schema, 40, seed=1)
    entity = {mi.name: mi.entity for mi in m.inputs}
    feed = {k: v if entity[k] == "item" else v[:1] for k, v in rows.items()}
    sess = ort.InferenceSession(str(path / MODEL_FILE), providers=["CPUExecutionProvider"])
    got = sess.run(m.outputs, feed)
    model.eval()
    with torch.no_grad():
        want = ServingModel(model)(*(torch.from_numpy(feed[i.name]) for i in m.inputs))
    for g, w, t in zip(got, want, TASKS, strict=True):
        assert g.shape == (40,) and g.dtype == np.float32
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=0)
        if t.kind == "binary":
            assert np.all((g >= 0) & (g <= 1))
        else:
            assert np.all(g >= 0)

    # a second export is version 2; nothing temporary is left behind
    assert export(model, tmp_path / "store") == tmp_path / "store" / "ranker" / "2"
    assert list_versions(tmp_path / "store", "ranker") == [1, 2]
    assert latest_version(tmp_path / "store", "ranker") == 2
    assert not list((tmp_path / "store" / "ranker").glob(".tmp-*"))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_per_expert_graph_passes_the_parity_gate(arch, tmp_path):
    """The graph the int8 model is quantised from (one GEMM per expert) is the model as trained,
    through the same gate, and holds no stacked 3-D expert weight (every layer is 2-D)."""
    model = make_model(arch).eval()
    rows = parity_rows(model.schema)
    path = tmp_path / "per_expert.onnx"
    serving = ServingModel(model, per_expert=True)
    export_mod._export_onnx(serving, {k: v[:8] for k, v in rows.items()}, path)
    diffs = check_parity(serving, path, rows)
    assert all(d <= 1e-4 for d in diffs.values()), diffs
    ranks = {len(i.dims) for i in onnx.load(str(path)).graph.initializer if "experts.weights" in i.name}
    assert 3 not in ranks
    assert not any(getattr(m, "per_expert", False) for m in model.modules())  # the flag was restored


def test_parity_failure_publishes_nothing(tmp_path, monkeypatch):
    model = make_model("mmoe")
    original = export_mod._export_onnx

    def export_then_drift(serving, example, path):
        original(serving, example, path)
        with torch.no_grad():  # the torch model changes after the ONNX file was written
            serving.model.towers[1].out.bias += 0.5

    monkeypatch.setattr(export_mod, "_export_onnx", export_then_drift)
    with pytest.raises(ExportParityError, match="cvr"):
        export(model, tmp_path / "store")
    root = tmp_path / "store" / "ranker"
    assert list(root.iterdir()) == []
    assert latest_version(tmp_path / "store", "ranker") is None


def test_check_parity_with_a_different_model(tmp_path):
    path = export(make_model("shared_bottom"), tmp_path / "store")
    torch.manual_seed(1)
    other = build_model("shared_bottom", tiny_schema(), TASKS)
    with pytest.raises(ExportParityError, match="ctr"):
        check_parity(ServingModel(other), path / MODEL_FILE, parity_rows(other.schema, 50))


CALIB = {"ctr": OutputCalibration(method="platt", scale=1.7, shift=-0.6, rows=100),
         "cvr": OutputCalibration(method="platt", scale=0.6, shift=0.4, rows=30),
         "watch_time": OutputCalibration(method="smearing", scale=1.8, rows=30)}


def test_calibration_is_in_the_graph_the_manifest_and_the_parity_gate(tmp_path):
    model = make_model("ple").eval()
    path = export(model, tmp_path / "store", calibration=CALIB)
    m = BundleManifest.from_json((path / MANIFEST_FILE).read_text())
    assert m.calibration == CALIB
    rows = parity_rows(model.schema, 200, seed=3)
    got = dict(zip(m.outputs, ort.InferenceSession(str(path / MODEL_FILE)).run(m.outputs, rows), strict=True))
    with torch.no_grad():
        out = model({k: torch.from_numpy(v) for k, v in rows.items()})
        raw = {k: v.numpy().astype(np.float64) for k, v in out.items()}
    # the exported graph applies sigmoid(a z + b) and max(s exp(max(m, 0)) - 1, 0) to the model's raw outputs
    for t in ("ctr", "cvr"):
        c = CALIB[t]
        np.testing.assert_allclose(got[t], 1 / (1 + np.exp(-(c.scale * raw[t] + c.shift))), atol=1e-5, rtol=0)
        assert np.max(np.abs(got[t] - 1 / (1 + np.exp(-raw[t])))) > 0.01  # not the uncalibrated output
    want = np.maximum(1.8 * np.exp(np.maximum(raw["watch_time"], 0)) - 1, 0)
    np.testing.assert_allclose(np.log1p(got["watch_time"]), np.log1p(want), atol=1e-5, rtol=0)
    # the gate's reference carries the same calibration: without it the gate refuses the graph
    check_parity(ServingModel(model, calibration=CALIB), path / MODEL_FILE, rows)
    with pytest.raises(ExportParityError, match="ctr"):
        check_parity(ServingModel(model), path / MODEL_FILE, rows)
    # and a bundle exported without calibration records none
    plain = BundleManifest.from_json((export(model, tmp_path / "store") / MANIFEST_FILE).read_text())
    assert plain.calibration == {}


def test_calibration_must_fit_its_task(tmp_path):
    model = make_model("mmoe")
    with pytest.raises(ValueError, match="unknown tasks"):
        ServingModel(model, calibration={"dwell": CALIB["ctr"]})
    path = export(model, tmp_path / "store", calibration=CALIB)
    raw = json.loads((path / MANIFEST_FILE).read_text())
    raw["calibration"]["watch_time"] = raw["calibration"]["ctr"]  # platt on a regression task
    with pytest.raises(ValueError, match="platt is for binary tasks"):
        BundleManifest.model_validate(raw)
    raw["calibration"] = {"ctr": {**raw["calibration"]["ctr"], "scale": -1.0}}  # would reverse the ranking
    with pytest.raises(ValueError, match="scale"):
        BundleManifest.model_validate(raw)


def test_versions_ignore_non_integer_names(tmp_path):
    root = tmp_path / "ranker"
    for name in ("1", "3", ".tmp-abc", "latest", "10"):
        (root / name).mkdir(parents=True)
    assert list_versions(tmp_path, "ranker") == [1, 3, 10]
    assert latest_version(tmp_path, "ranker") == 10
    assert list_versions(tmp_path, "missing") == [] and latest_version(tmp_path, "missing") is None


def test_version_taken_meanwhile_goes_to_the_next(tmp_path, monkeypatch):
    model = make_model("shared_bottom")
    store = tmp_path / "store"
    real_latest = export_mod.latest_version
    calls = {"n": 0}

    def stale_latest(store_, name):  # the first look misses a bundle another writer just published
        calls["n"] += 1
        if calls["n"] == 1:
            (store / "ranker" / "1").mkdir()
            (store / "ranker" / "1" / MANIFEST_FILE).write_text("{}")
            return None
        return real_latest(store_, name)

    monkeypatch.setattr(export_mod, "latest_version", stale_latest)
    path = export(model, store)
    assert path.name == "2"
    assert BundleManifest.from_json((path / MANIFEST_FILE).read_text()).version == 2
    assert (store / "ranker" / "1" / MANIFEST_FILE).read_text() == "{}"


def test_bad_extra_file_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        export(make_model("mmoe"), tmp_path / "store", extra_files={MODEL_FILE: tmp_path})


# --- the request side once in the exported graph ---------------------------------------------

CONFIGS = {"shared_bottom": ("shared_bottom", {}), "mmoe": ("mmoe", {}), "ple": ("ple", {}),
           "dtrn-towers": ("dtrn", {"backbone": "towers"}), "dtrn-mmoe": ("dtrn", {"backbone": "mmoe"}),
           "dtrn-ple": ("dtrn", {"backbone": "ple"}), "ple-ml": ("ple", {"mutual_learning": True}),
           "dtrn-ple-ml": ("dtrn", {"backbone": "ple", "mutual_learning": True})}


def weight_matmuls(model_path, item_inputs: set[str]) -> list[tuple[str, bool, tuple[int, ...]]]:
    """Every MatMul/Gemm with an initializer weight: (output, reads an item input?, weight shape).

    "Reads an item input" is propagated through the graph: a tensor depends on the items when any
    input of the node that made it does; the others have the user/context batch (1 at serving)."""
    graph = onnx.load(str(model_path)).graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    per_item = set(item_inputs)
    out = []
    for node in graph.node:  # nodes are in topological order
        if any(i in per_item for i in node.input):
            per_item.update(node.output)
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            out.append((node.output[0], node.input[0] in per_item, inits[node.input[1]]))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_first_layers_compute_the_user_side_at_batch_one(name, tmp_path, capsys):
    """No first layer multiplies the full [N, D] bottom input any more: its user (and context)
    columns are multiplied at batch 1 (checked on the running graph at N = 500) and broadcast-added.
    DTRN's per-task bottom (TRM) mixes user and item fields per item before any linear map, so
    there only the embeddings and TIM's Transformer over the behaviour sequences run at batch 1."""
    arch, kw = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(arch, tiny_schema(), TASKS, **kw)
    path = export(model, tmp_path / "store")
    emb = model.base.embedding if hasattr(model, "base") else model.embedding
    items = {mi.name for mi in model_inputs(model.schema) if mi.entity == "item"}
    matmuls = weight_matmuls(path / MODEL_FILE, items)
    once = [(o, shape) for o, item, shape in matmuls if not item]
    if arch == "dtrn":
        assert any("tim/layers.0/qkv" in o for o, _ in once), once  # the Transformer: once per request
    else:
        assert not any(item and emb.output_dim in shape[-2:] for _, item, shape in matmuls), matmuls
        n_first = {"shared_bottom": 1, "mmoe": 1 + 3, "ple": 1 + 3 + 1}[arch]  # experts/bottom + gates
        user = [o for o, shape in once if shape[-2] == emb.entity_dims["user"]]
        assert len(user) == n_first, once
    # run the graph with the batch-1 products as extra outputs: they really have batch 1 at N = 500
    m = onnx.load(str(path / MODEL_FILE))
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o, _ in once)
    rows = parity_rows(model.schema, 500, seed=2)
    entity = {mi.name: mi.entity for mi in model_inputs(model.schema)}
    feed = {k: v if entity[k] == "item" else v[:1] for k, v in rows.items()}
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run([o for o, _ in once], feed)
    assert outs and all(500 not in o.shape for o in outs)
    if name == "ple":  # ORT time at N = 500 with and without the split, for the log (not asserted)
        plain = tmp_path / "plain.onnx"
        export_mod._export_onnx(ServingModel(model.eval(), request_once=False), rows, plain)
        times = {}
        for label, p in (("request once", path / MODEL_FILE), ("broadcast", plain)):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            s = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
            s.run(None, feed)
            t0 = time.perf_counter()
            for _ in range(20):
                s.run(None, feed)
            times[label] = (time.perf_counter() - t0) / 20 * 1e3
        with capsys.disabled():
            print("\n[tiny PLE, ORT 1 thread, N=500] " + ", ".join(f"{k}: {v:.2f} ms" for k, v in times.items()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_norm_folding_is_exact_and_leaves_no_batch_norm(name, tmp_path):
    """With non-trivial running statistics: the folded model equals the model as trained, the
    exported graph has no BatchNormalization node, and the parity gate (against the unfolded
    model) passes."""
    arch, kw = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(arch, tiny_schema(), TASKS, **kw)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    rows = {k: torch.from_numpy(v) for k, v in parity_rows(model.schema, 64).items()}
    folded = export_mod.fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    with torch.no_grad():
        want, got = model(rows), folded(rows)
    for t in TASKS:
        torch.testing.assert_close(got[t.name], want[t.name], atol=1e-5, rtol=1e-5)
    path = export(model, tmp_path / "store")
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path / MODEL_FILE)).graph.node}
    m = BundleManifest.from_json((path / MANIFEST_FILE).read_text())
    assert max(v for k, v in m.metrics.items() if k.startswith("parity_max_abs_diff")) <= 1e-4
