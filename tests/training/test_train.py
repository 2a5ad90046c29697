"""Training losses (ESMM), metrics and the loop's early stopping."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support.contract import TASKS
from training.data.dataset import prepare
from training.data.synth import SynthConfig, generate
from training.losses import task_losses
from training.train import TrainConfig, evaluate, fit


def test_esmm_loss_supervises_the_product_over_all_exposures():
    g = torch.Generator().manual_seed(0)
    out = {k: torch.randn(64, generator=g) for k in ("ctr", "cvr", "watch_time")}
    click = (torch.rand(64, generator=g) < 0.4).float()
    conv = click * (torch.rand(64, generator=g) < 0.5).float()
    wt = click * torch.rand(64, generator=g) * 100
    losses = task_losses(out, {"click": click, "conversion": conv, "watch_time": wt}, TASKS)
    pctcvr = torch.sigmoid(out["ctr"]) * torch.sigmoid(out["cvr"])
    assert torch.allclose(losses["cvr"], F.binary_cross_entropy(pctcvr, click * conv), atol=1e-6)
    assert torch.allclose(losses["ctr"], F.binary_cross_entropy_with_logits(out["ctr"], click))
    m = click > 0  # watch time: log1p MSE on clicked rows only
    assert torch.allclose(losses["watch_time"], F.mse_loss(out["watch_time"][m], torch.log1p(wt[m])))
    # a conversion label on a non-clicked row cannot move the ESMM target (click & conversion)
    conv2 = conv.clone()
    conv2[click == 0] = 1
    again = task_losses(out, {"click": click, "conversion": conv2, "watch_time": wt}, TASKS)
    assert torch.allclose(again["cvr"], losses["cvr"])
    # the CVR tower gets gradient from non-clicked rows too (entire space), unlike a clicked-only loss
    logit = out["cvr"].clone().requires_grad_(True)
    task_losses({**out, "cvr": logit}, {"click": click, "conversion": conv, "watch_time": wt}, TASKS)["cvr"].backward()
    assert (logit.grad[click == 0].abs() > 0).all()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    generate(d, SynthConfig(n_users=400, n_items=800, n_exposures=20_000, seed=5), progress=False)
    return prepare(d)


@pytest.mark.slow
def test_fit_early_stops_restores_best_and_reports_metrics(small):
    cfg = TrainConfig(arch="mmoe", epochs=6, batch_size=512, lr=5e-3, patience=1)
    model, history, (tr, va, te) = fit(small, cfg, progress=False)
    assert len(tr) + len(va) + len(te) == len(small) and len(set(tr) & set(te)) == 0
    best = min(h["val_total"] for h in history)
    if len(history) < cfg.epochs:  # stopped early: the last epoch was no better than the best
        assert history[-1]["val_total"] >= best
    m = evaluate(model, small, va)
    total = sum(m[f"loss/{t.name}"] for t in small.tasks)
    assert total == pytest.approx(best, rel=1e-5)  # the best epoch's weights were restored
    assert set(m) >= {"auc/ctr", "auc/cvr", "auc/ctcvr", "rmse_log1p/watch_time", "mae_log1p/watch_time"}
    assert all(np.isfinite(v) for v in m.values())


def test_same_seed_same_model(small):
    cfg = TrainConfig(arch="shared_bottom", epochs=1, batch_size=1024)
    a, _, _ = fit(small, cfg, progress=False)
    b, _, _ = fit(small, cfg, progress=False)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_split_seed_is_separate_from_the_initialisation_seed(small):
    from training.train import best_epoch

    def split_of(**kw):
        _, history, rows = fit(small, TrainConfig(arch="shared_bottom", epochs=1, batch_size=4096, **kw),
                               progress=False)
        return history, rows

    h, (tr_a, _, te_a) = split_of(seed=1, split_seed=0)
    _, (tr_b, _, te_b) = split_of(seed=2, split_seed=0)
    _, (_, _, te_c) = split_of(seed=0)  # split_seed None: the seed draws the split, as before
    assert np.array_equal(te_a, te_b) and np.array_equal(te_a, te_c) and np.array_equal(tr_a, tr_b)
    assert best_epoch(h) == 1
    hist = [{"epoch": i + 1, "val_total": v} for i, v in enumerate([0.5, 0.4, 0.4 - 1e-6, 0.39, 0.41])]
    assert best_epoch(hist) == 4  # an improvement below MIN_DELTA does not count
