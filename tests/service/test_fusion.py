import numpy as np
import pytest

from service.contract import TaskSpec
from service.fusion import FusionConfigError, fuse, order, validate_weights

TASKS = [TaskSpec(name="ctr", kind="binary", label="c"), TaskSpec(name="cvr", kind="binary", label="v"),
         TaskSpec(name="watch_time", kind="regression", label="w")]
W = {"ctr": 1.0, "cvr": 0.5, "watch_time": 0.2}


def scores():
    return {"ctr": np.array([0.1, 0.5, 0.0, 0.9], np.float32),
            "cvr": np.array([0.2, 0.05, 0.5, 1.0], np.float32),
            "watch_time": np.array([0.0, 30.0, 10.0, 2.0], np.float32)}


def test_weighted_product_formula():
    s = scores()
    got = fuse("weighted_product", W, s)
    ctr = np.clip(s["ctr"].astype(np.float64), 1e-7, 1)
    cvr = np.clip(s["cvr"].astype(np.float64), 1e-7, 1)
    want = ctr ** 1.0 * cvr ** 0.5 * (1 + s["watch_time"].astype(np.float64)) ** 0.2
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[2] > 0  # ctr 0 is clipped, not log(0)
    assert got.dtype == np.float64 and got.shape == (4,)


def test_weighted_sum_formula():
    s = scores()
    got = fuse("weighted_sum", W, s)
    want = 1.0 * s["ctr"] + 0.5 * s["cvr"] + 0.2 * np.log1p(s["watch_time"].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_zero_and_missing_weights_ignore_task():
    s = scores()
    a = fuse("weighted_sum", {"ctr": 1.0}, s)
    b = fuse("weighted_sum", {"ctr": 1.0, "cvr": 0.0}, s)
    np.testing.assert_allclose(a, s["ctr"], rtol=1e-7)
    np.testing.assert_array_equal(a, b)


def test_kinds_from_tasks():
    kinds = validate_weights("weighted_sum", {"ctr": 1.0, "watch_time": 1.0}, TASKS)
    assert kinds == {"ctr": "binary", "watch_time": "regression"}
    s = {"ctr": np.array([0.5]), "watch_time": np.array([np.e - 1])}
    np.testing.assert_allclose(fuse("weighted_sum", {"ctr": 1.0, "watch_time": 1.0}, s, kinds), [1.5])


def test_unknown_task_weight_is_config_error():
    with pytest.raises(FusionConfigError, match="dwell"):
        validate_weights("weighted_product", {"ctr": 1.0, "dwell": 1.0}, TASKS)
    with pytest.raises(FusionConfigError, match="unknown fusion"):
        validate_weights("max", W, TASKS)
    with pytest.raises(FusionConfigError):
        fuse("weighted_sum", {"ctr": 1.0}, {"cvr": np.zeros(2)})


def test_order_desc_stable_ties_nan_last_and_top_k():
    s = np.array([0.3, 0.9, 0.3, np.nan, 0.9, 0.1])
    assert order(s).tolist() == [1, 4, 0, 2, 5, 3]
    assert order(s, 3).tolist() == [1, 4, 0]
    assert order(s, 100).tolist() == [1, 4, 0, 2, 5, 3]


def test_product_ordering_matches_formula_ordering():
    rng = np.random.default_rng(0)
    s = {"ctr": rng.uniform(size=500), "cvr": rng.uniform(size=500), "watch_time": rng.uniform(0, 100, 500)}
    fused = fuse("weighted_product", W, s)
    idx = order(fused)
    assert np.all(np.diff(fused[idx]) <= 0)
