import json
import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from service.contract import MANIFEST_FILE, MODEL_FILE, FeatureSchema, sha256_file
from service.store import (
    BundleError,
    ProviderError,
    bundle_dir,
    default_inputs,
    list_versions,
    load_bundle,
    open_verified,
    read_manifest,
    read_model,
)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_newest_integer_version_is_picked(tmp_path, bundle_factory):
    for v in (1, 2, 10):
        bundle_factory(tmp_path, version=v)
    (tmp_path / "demo" / ".tmp-11").mkdir()
    (tmp_path / "demo" / "latest").mkdir()
    (tmp_path / "demo" / "12").write_text("a file, not a version dir")
    assert list_versions(tmp_path, "demo") == [1, 2, 10]
    assert bundle_dir(tmp_path, "demo") == tmp_path / "demo" / "10"
    assert bundle_dir(tmp_path, "demo", 2) == tmp_path / "demo" / "2"
    b = load_bundle(tmp_path, "demo")
    assert b.version == 10 and b.name == "demo" and b.path == tmp_path / "demo" / "10"
    assert b.provider == "CPUExecutionProvider"
    assert b.tasks == ["ctr", "cvr", "watch_time"]
    assert b.vocabs["hour"][:3] == ["0", "1", "2"]


def test_pinned_version(tmp_path, bundle_factory):
    for v in (1, 2, 3):
        bundle_factory(tmp_path, version=v)
    assert load_bundle(tmp_path, "demo", version=2).version == 2
    with pytest.raises(BundleError, match="version 7 not found"):
        load_bundle(tmp_path, "demo", version=7)
    with pytest.raises(BundleError, match="no bundle versions"):
        load_bundle(tmp_path, "other")


def test_sha256_mismatch_refused_before_session(tmp_path, bundle_factory, monkeypatch):
    d = bundle_factory(tmp_path, version=1)
    with open(d / MODEL_FILE, "ab") as f:
        f.write(b"\0")

    def no_session(*a, **kw):
        raise AssertionError("session created for a model that failed its checksum")

    monkeypatch.setattr("service.store.ort.InferenceSession", no_session)
    with pytest.raises(BundleError, match="sha256 mismatch") as e:
        load_bundle(tmp_path, "demo")
    assert "corrupt or partial" in str(e.value)


def test_session_is_built_from_the_verified_bytes(tmp_path, bundle_factory):
    """Issue 14 item 8: the bytes whose sha256 was checked are the bytes onnxruntime runs. A model
    file replaced on disk after the check (another valid model, as a swap or a write in place)
    changes nothing: the session is the verified model's; a fresh load refuses the new file."""
    d = bundle_factory(tmp_path, version=1, seed=1)
    original = (d / MODEL_FILE).read_bytes()
    other = (bundle_factory(tmp_path / "x", version=1, seed=2) / MODEL_FILE).read_bytes()
    path, manifest = read_manifest(tmp_path, "demo")
    model = read_model(path, manifest)
    assert model.data == original
    rng = np.random.default_rng(0)
    inputs = {k: (rng.integers(0, 3, v.shape) if v.dtype == np.int64 else rng.normal(size=v.shape)).astype(v.dtype)
              for k, v in default_inputs(manifest, n_items=6).items()}

    def scores(model_bytes: bytes) -> np.ndarray:
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        return np.concatenate([np.ravel(o) for o in sess.run(manifest.outputs, inputs)])

    want, swapped = scores(original), scores(other)
    assert not np.allclose(want, swapped)  # the two models tell apart
    for replace in ("rename", "in place"):
        if replace == "rename":  # a swap: a new file renamed over the old one
            (d / "new.onnx").write_bytes(other)
            (d / "new.onnx").replace(d / MODEL_FILE)
        else:
            (d / MODEL_FILE).write_bytes(other[::-1])
        b = open_verified(path, manifest, model, warmup=False)
        got = b.run(inputs)
        np.testing.assert_allclose(np.concatenate([got[t] for t in manifest.outputs]), want, rtol=1e-6)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(tmp_path, "demo")


def test_bad_manifest_and_name_mismatch(tmp_path, bundle_factory):
    d = bundle_factory(tmp_path, version=1)
    shutil.copytree(d, tmp_path / "demo" / "2")
    (tmp_path / "demo" / "2" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="invalid manifest"):
        load_bundle(tmp_path, "demo")
    # a copy whose manifest still says version 1
    shutil.copytree(d, tmp_path / "demo" / "3")
    with pytest.raises(BundleError, match="manifest says 'demo' v1"):
        load_bundle(tmp_path, "demo")
    (d / "vocab.json").unlink()
    with pytest.raises(BundleError, match="missing vocab.json"):
        load_bundle(tmp_path, "demo", version=1)


def test_model_inputs_must_match_manifest(tmp_path, bundle_factory, schema):
    d = bundle_factory(tmp_path, version=1)
    # a model exported for a schema without the context dense field, under the full manifest
    smaller = FeatureSchema(sparse=schema.sparse, dense=[f for f in schema.dense if f.entity != "context"],
                            sequence=schema.sequence, vocab_sha256=schema.vocab_sha256)
    other = bundle_factory(tmp_path / "x", version=1, schema=smaller)
    shutil.copy(other / MODEL_FILE, d / MODEL_FILE)
    m = json.loads((d / MANIFEST_FILE).read_text())
    m["sha256"] = sha256_file(d / MODEL_FILE)
    (d / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="model inputs"):
        load_bundle(tmp_path, "demo")


def test_run_outputs(tmp_path, bundle_factory):
    bundle_factory(tmp_path, version=1)
    b = load_bundle(tmp_path, "demo", intra_op_threads=1)
    out = b.run(default_inputs(b.manifest, n_items=5))
    assert set(out) == {"ctr", "cvr", "watch_time"}
    for v in out.values():
        assert v.shape == (5,) and v.dtype == np.float32
    assert np.all((out["ctr"] >= 0) & (out["ctr"] <= 1)) and np.all(out["watch_time"] >= 0)


def test_concurrent_runs_queue_at_the_gate(tmp_path, bundle_factory):
    """limit_concurrent_runs(1): a run waits while another holds the gate, then gives the same answer."""
    import threading

    from service import store

    bundle_factory(tmp_path, version=1)
    b = load_bundle(tmp_path, "demo", intra_op_threads=1)
    inputs = default_inputs(b.manifest, n_items=64)
    expected = b.run(inputs)
    store.limit_concurrent_runs(1)
    try:
        got, done = {}, threading.Event()
        store._run_gate.acquire()  # another run in progress
        t = threading.Thread(target=lambda: (got.update(b.run(inputs)), done.set()))
        t.start()
        assert not done.wait(0.3)  # queued behind the gate, not running beside it
        store._run_gate.release()
        assert done.wait(10)
        t.join()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    finally:
        store.limit_concurrent_runs(0)
    assert store._run_gate is None


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA: no fallback to test")
def test_cuda_falls_back_to_cpu_with_warning(tmp_path, bundle_factory, caplog):
    bundle_factory(tmp_path, version=1)
    with caplog.at_level(logging.WARNING, logger="service.store"):
        b = load_bundle(tmp_path, "demo", providers="cuda,cpu")
    assert b.provider == "CPUExecutionProvider"
    assert b.requested_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert any(r.levelno == logging.WARNING and "CUDAExecutionProvider" in r.getMessage() for r in caplog.records)
    # cuda alone, not strict: still CPU
    assert load_bundle(tmp_path, "demo", providers=["cuda"]).provider == "CPUExecutionProvider"


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA: no fallback to test")
def test_cuda_strict_raises(tmp_path, bundle_factory):
    bundle_factory(tmp_path, version=1)
    with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
        load_bundle(tmp_path, "demo", providers="cuda,cpu", strict=True)
    assert issubclass(ProviderError, BundleError)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_cuda_used_when_available(tmp_path, bundle_factory):
    bundle_factory(tmp_path, version=1)
    b = load_bundle(tmp_path, "demo", providers="cuda,cpu", strict=True)
    assert b.provider == "CUDAExecutionProvider"
    cpu = load_bundle(tmp_path, "demo", providers="cpu")
    inp = default_inputs(b.manifest, n_items=64)
    inp["item_sparse"][:, 0] = np.arange(64) % 20
    for k, v in b.run(inp).items():
        np.testing.assert_allclose(v, cpu.run(inp)[k], rtol=1e-4, atol=1e-5)


# --- precisions: the int8 model of a bundle ---------------------------------------------------

def add_int8(d, corrupt: bool = False):
    """Quantise the bundle's model.onnx into model.int8.onnx and list it in the manifest."""
    from service.contract import PRECISION_FILES, BundleManifest, PrecisionFile
    from training.quantize import quantize_model

    target = d / PRECISION_FILES["int8"]
    quantize_model(d / MODEL_FILE, target, "dynamic")
    m = BundleManifest.from_json((d / MANIFEST_FILE).read_text())
    entry = PrecisionFile(file=target.name, sha256=sha256_file(target), method="dynamic", auc_delta={"ctr": -0.0002})
    (d / MANIFEST_FILE).write_text(m.model_copy(update={"precisions": {"int8": entry}}).to_json())
    if corrupt:
        with open(target, "ab") as f:
            f.write(b"\0")
    return target


def test_int8_precision_loads_its_own_file(tmp_path, bundle_factory):
    d = bundle_factory(tmp_path, version=1)
    add_int8(d)
    b32, b8 = load_bundle(tmp_path, "demo"), load_bundle(tmp_path, "demo", precision="int8", warmup=[1, 16])
    assert (b32.precision, b8.precision) == ("fp32", "int8")
    assert b8.model_path == d / "model.int8.onnx" and b32.model_path == d / MODEL_FILE
    inputs = default_inputs(b32.manifest, 5)
    got, want = b8.run(inputs), b32.run(inputs)
    for t in want:
        assert got[t].shape == (5,)
        np.testing.assert_allclose(got[t], want[t], atol=0.05)  # int8: close, not equal
    assert any(not np.array_equal(got[t], want[t]) for t in want)


def test_int8_refused_when_missing_corrupt_or_unknown(tmp_path, bundle_factory):
    d = bundle_factory(tmp_path, version=1)
    with pytest.raises(BundleError, match=r"no int8 model in this bundle .*\['fp32'\]"):
        load_bundle(tmp_path, "demo", precision="int8")
    with pytest.raises(BundleError, match="unknown precision 'int4'"):
        load_bundle(tmp_path, "demo", precision="int4")
    target = add_int8(d, corrupt=True)
    with pytest.raises(BundleError, match="sha256 mismatch") as e:
        load_bundle(tmp_path, "demo", precision="int8")
    assert str(target) in str(e.value)
    load_bundle(tmp_path, "demo")  # fp32 is unaffected by a bad int8 file
    target.unlink()
    with pytest.raises(BundleError, match="missing model.int8.onnx"):
        load_bundle(tmp_path, "demo", precision="int8")


def test_manifest_without_precisions_still_loads(tmp_path, bundle_factory):
    d = bundle_factory(tmp_path, version=1)
    raw = json.loads((d / MANIFEST_FILE).read_text())
    raw.pop("precisions", None)  # a manifest written before precisions existed
    (d / MANIFEST_FILE).write_text(json.dumps(raw))
    b = load_bundle(tmp_path, "demo")
    assert b.manifest.precisions == {} and b.precision == "fp32"
