"""Calibration: ECE and log loss against hand-computed values, Platt scaling and the watch-time
corrections on data with a known answer, and a trained bundle - metrics in report.json and the
manifest, calibration fitted on validation (not test), the served ONNX outputs calibrated and the
served watch time's mean within 5% of the observed one, and manifests without the field still
loading in the service."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from service.contract import MANIFEST_FILE, MODEL_FILE, BundleManifest
from service.store import BundleError, load_bundle
from tests.support.contract import TASKS
from training import calibration as cal
from training.data.dataset import prepare
from training.data.synth import SynthConfig, generate
from training.export import ExportParityError, ServingModel, check_parity
from training.metrics import ece, log_loss, metrics_of, reliability
from training.quantize import run_onnx
from training.train import TrainConfig, fit, predictions, train


def test_ece_and_log_loss_by_hand():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.10, 0.12, 0.70, 0.90, 1.0])
    # 15 bins of width 1/15: 0.10 and 0.12 -> bin 1 (mean label 0.5, mean p 0.11); 0.70 -> bin 10;
    # 0.90 -> bin 13; 1.0 -> the last bin (14)
    assert ece(y, p) == pytest.approx((2 * 0.39 + 0.30 + 0.90 + 0.0) / 5, abs=1e-12)
    r = reliability(y, p)
    assert r["count"] == [2, 1, 1, 1] and r["mean_label"] == [0.5, 1.0, 0.0, 1.0]
    assert r["mean_pred"] == pytest.approx([0.11, 0.70, 0.90, 1.0])
    want = -(math.log(0.9) + math.log(0.12) + math.log(0.7) + math.log(0.1) + 0.0) / 5
    assert log_loss(y, p) == pytest.approx(want, rel=1e-9)
    assert ece(y, y.astype(float)) == 0.0  # a certain, correct forecast
    assert ece(np.zeros(0), np.zeros(0)) != ece(np.zeros(0), np.zeros(0))  # NaN without rows


def sig(x):
    return 1 / (1 + np.exp(-x))


def test_metrics_judge_each_probability_on_its_own_rows():
    rng = np.random.default_rng(0)
    n = 4000
    raw = {"ctr": rng.normal(-1, 1, n), "cvr": rng.normal(0, 1, n), "watch_time": rng.normal(3, 1, n)}
    click = (rng.random(n) < 0.3).astype(np.float32)
    conv = click * (rng.random(n) < 0.5)
    wt = click * np.exp(rng.normal(3, 1, n))
    labels = {"click": click, "conversion": conv.astype(np.float32), "watch_time": wt.astype(np.float32)}
    m = metrics_of(raw, labels, TASKS)
    c = click > 0
    assert m["ece/ctr"] == pytest.approx(ece(click, sig(raw["ctr"])))
    assert m["ece/cvr"] == pytest.approx(ece(conv[c], sig(raw["cvr"][c])))  # CVR on clicks
    assert m["logloss/ctcvr"] == pytest.approx(log_loss(conv, sig(raw["ctr"]) * sig(raw["cvr"])))
    assert m["mean_label/watch_time"] == pytest.approx(wt[c].mean(), rel=1e-6)
    assert m["mean_pred/watch_time"] == pytest.approx(np.expm1(np.maximum(raw["watch_time"][c], 0)).mean())
    assert m["mean_bias/watch_time"] == pytest.approx(m["mean_pred/watch_time"] / m["mean_label/watch_time"] - 1)


def test_platt_recovers_a_known_miscalibration():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 200_000)  # an over-confident, shifted logit: the truth is sigmoid(0.5 z - 1)
    y = rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 1)))
    a, b = cal.fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.02) and b == pytest.approx(-1, abs=0.03)
    raw, labels = {"ctr": z}, {"click": y.astype(np.float32)}
    tasks = TASKS[:1]
    calib = cal.fit(raw, labels, tasks, "platt", "none")
    m = cal.served_metrics(raw, labels, tasks, calib)
    assert m["ece_uncalibrated/ctr"] > 0.1 and m["ece/ctr"] < 0.01
    assert m["logloss/ctr"] < m["logloss_uncalibrated/ctr"]
    assert m["auc/ctr"] == pytest.approx(m["auc_uncalibrated/ctr"], abs=1e-12)  # monotone: same ranking
    # too few rows of a class: left uncalibrated rather than fitted on noise
    assert cal.fit_platt(z[:50], np.arange(50) < 5) is None
    assert cal.fit({"ctr": z[:50]}, {"click": (np.arange(50) < 5).astype(np.float32)}, tasks, "platt", "none") == {}
    assert cal.fit_platt(-z, y) is None  # a negative slope would reverse the ranking


@pytest.mark.parametrize("method", ["smearing", "ratio"])
def test_watch_time_correction_unbiases_a_lognormal_mean(method):
    rng = np.random.default_rng(2)
    tasks = [TASKS[0], TASKS[2]]

    def draw(n):
        m = rng.normal(3.5, 0.8, n)  # the model's E[log1p y]; the residual has sd 0.9
        y = np.expm1(np.maximum(m + rng.normal(0, 0.9, n), 0))
        return {"ctr": np.zeros(n), "watch_time": m}, {"click": np.ones(n, np.float32), "watch_time": y}

    val, test = draw(50_000), draw(50_000)
    calib = cal.fit(*val, tasks, calibration="none", watch_time_correction=method)
    assert set(calib) == {"watch_time"} and calib["watch_time"].method == method
    m = cal.served_metrics(*test, tasks, calib)
    assert m["mean_bias_uncalibrated/watch_time"] < -0.25  # exp(-0.9^2 / 2) - 1 = -33%
    assert abs(m["mean_bias/watch_time"]) < 0.02
    assert m["rmse_log1p/watch_time"] == metrics_of(*test, tasks)["rmse_log1p/watch_time"]  # the model's own


def test_options_are_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="calibration must be one of"):
        TrainConfig(calibration="isotonic")
    with pytest.raises(ValueError, match="watch_time_correction must be one of"):
        TrainConfig(watch_time_correction="median")


# --- a trained bundle ----------------------------------------------------------------------------

CFG = {"arch": "mmoe", "epochs": 3, "batch_size": 512, "lr": 5e-3, "threads": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small MMoE trained by ``train`` with the default calibration; (store, bundle, dataset)."""
    root = tmp_path_factory.mktemp("calib")
    generate(root / "data", SynthConfig(n_users=600, n_items=1200, n_exposures=30_000, seed=9, target_ctr=0.3,
                                        target_cvr=0.4), progress=False)
    bundle, _ = train(root / "data", name="c", store=root / "store", cfg=TrainConfig(**CFG), progress=False)
    return root / "store", bundle, prepare(root / "data")


@pytest.mark.slow
def test_report_and_manifest_hold_calibration_for_every_task(trained):
    _, bundle, _ = trained
    report = json.loads((bundle / "report.json").read_text())
    manifest = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    names = ["ctr", "cvr", "ctcvr"]
    for where in (report["test_metrics"], manifest.metrics):
        for n in names:
            for k in (f"ece/{n}", f"ece_uncalibrated/{n}", f"logloss/{n}", f"logloss_uncalibrated/{n}"):
                assert 0 <= where[k] < 1, k
        for k in ("mean_pred", "mean_pred_uncalibrated", "mean_label"):
            assert where[f"{k}/watch_time"] > 0
        assert "mean_bias/watch_time" in where and "mean_bias_uncalibrated/watch_time" in where
    assert set(report["reliability"]) == {*names, "watch_time"}
    assert report["calibration"] == {k: v.model_dump(mode="json") for k, v in manifest.calibration.items()}
    assert {k: v.method for k, v in manifest.calibration.items()} == \
        {"ctr": "platt", "cvr": "platt", "watch_time": "ratio"}
    assert "15 equal-width bins" in report["definitions"]["ece"]
    assert (bundle / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest.train_config["train"]["calibration"] == "platt"
    # Platt never hurts the validation log loss it is fitted on; on test, ECE must not blow up
    assert report["test_metrics"]["ece/ctr"] < max(0.02, report["test_metrics"]["ece_uncalibrated/ctr"])


@pytest.mark.slow
def test_served_watch_time_is_unbiased_on_clicked_test_rows(trained):
    """The served (ONNX) watch time's mean on the clicked test rows is within 5% of the observed
    mean; the uncorrected expm1(E[log1p y]) is more than 20% low."""
    _, bundle, ds = trained
    cfg = TrainConfig(**CFG)
    _, _, test = ds.split(cfg.split, cfg.fractions, cfg.seed)
    clicked = test[ds.label("click", test) > 0]
    served = run_onnx(bundle / MODEL_FILE, ds.inputs(clicked), ds.tasks)["watch_time"].astype(np.float64)
    observed = ds.label("watch_time", clicked).astype(np.float64).mean()
    s = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text()).calibration["watch_time"].scale
    uncorrected = (served + 1) / s - 1  # the graph's map inverted (served > 0 on these rows)
    assert served.min() > 0
    assert uncorrected.mean() / observed - 1 < -0.2
    assert abs(served.mean() / observed - 1) < 0.05
    m = json.loads((bundle / "report.json").read_text())["test_metrics"]
    assert m["mean_pred/watch_time"] == pytest.approx(served.mean(), rel=1e-4)
    assert m["mean_label/watch_time"] == pytest.approx(observed, rel=1e-6)


@pytest.mark.slow
def test_calibration_is_fitted_on_validation_and_applied_by_the_graph(trained):
    _, bundle, ds = trained
    manifest = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    cfg = TrainConfig(**CFG)
    model, _, (_, val, test) = fit(ds, cfg, progress=False)  # fit seeds itself: the bundle's model again
    options = cfg.calibration, cfg.watch_time_correction
    on_val = cal.fit(*predictions(model, ds, val), ds.tasks, *options)
    on_test = cal.fit(*predictions(model, ds, test), ds.tasks, *options)
    for k, c in manifest.calibration.items():
        assert c.rows == on_val[k].rows
        assert c.scale == pytest.approx(on_val[k].scale, rel=1e-4)
        assert c.shift == pytest.approx(on_val[k].shift, abs=1e-4)
        assert abs(c.scale - on_test[k].scale) > 1e-3  # not the test split's fit
    # the bundle's graph is the model with that calibration: the gate passes with it, fails without
    rows = ds.inputs(test[:500])
    check_parity(ServingModel(model, calibration=manifest.calibration), bundle / MODEL_FILE, rows)
    with pytest.raises(ExportParityError):
        check_parity(ServingModel(model), bundle / MODEL_FILE, rows)


def test_manifest_without_calibration_still_loads_in_the_service(trained, tmp_path):
    _, bundle, _ = trained
    old = tmp_path / "store" / "c" / bundle.name
    shutil.copytree(bundle, old)
    raw = json.loads((old / MANIFEST_FILE).read_text())
    raw.pop("calibration")  # a manifest written before the field existed
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    b = load_bundle(tmp_path / "store", "c")
    assert b.manifest.calibration == {} and b.manifest.version == int(bundle.name)
    raw["calibration"] = {"dwell": {"method": "platt", "scale": 1.0, "rows": 5}}  # not a task: refused clearly
    (old / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="dwell"):
        load_bundle(tmp_path / "store", "c")


def test_report_records_best_epoch_and_epochs_run(trained):
    info = json.loads((trained[1] / "report.json").read_text())["info"]
    assert info["epoch_cap"] == CFG["epochs"] and 1 <= info["best_epoch"] <= info["epochs_run"] <= CFG["epochs"]
