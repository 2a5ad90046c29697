"""Deep Mutual Learning across task towers: CTFM (stop-gradient attention), GKD, wiring, export, servability."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

import training.models.mutual
from service.contract import MANIFEST_FILE, BundleManifest, TaskSpec, model_inputs
from tests.support.contract import TASKS, tiny_schema
from tests.support.inputs import one_user, parity_rows, random_inputs
from training.export import export_bundle
from training.models import ARCHITECTURES, build_model
from training.models.mutual import MutualLearning

N = 6


def mutual(arch: str, **kw) -> MutualLearning:
    torch.manual_seed(0)
    return build_model(arch, tiny_schema(), TASKS, mutual_learning=True, **kw)


def labels(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    click = (torch.rand(n, generator=g) < 0.5).float()
    return {"click": click, "conversion": click * (torch.rand(n, generator=g) < 0.5).float(),
            "watch_time": click * torch.rand(n, generator=g) * 100}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_any_architecture_shapes_broadcast_and_config_round_trip(arch):
    m = mutual(arch).eval()
    assert isinstance(m, MutualLearning) and m.arch == arch and m.tasks == TASKS
    with torch.no_grad():
        out = m(random_inputs(tiny_schema(), N))
        b1, bn = one_user(tiny_schema(), random_inputs(tiny_schema(), N, seed=1))
        o1, on = m(b1), m(bn)
    assert list(out) == ["ctr", "cvr", "watch_time"] and all(v.shape == (N,) for v in out.values())
    for t in TASKS:
        torch.testing.assert_close(o1[t.name], on[t.name])
    cfg = json.loads(json.dumps(dataclasses.asdict(m.config)))
    assert cfg["mutual_learning"] is True and {"ctfm_dim", "gkd_hidden", "gkd_weight"} <= set(cfg)
    again = build_model(arch, tiny_schema(), TASKS, **cfg)
    assert isinstance(again, MutualLearning)
    assert [p.shape for p in again.parameters()] == [p.shape for p in m.parameters()]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mutual_config_pickles_by_name(arch):
    cfg = mutual(arch, ctfm_dim=8).config
    assert type(cfg).__module__ == "training.models.mutual"
    again = pickle.loads(pickle.dumps(cfg))
    assert type(again) is type(cfg) and again == cfg
    with pytest.raises(AttributeError):
        training.models.mutual.MutualNoSuchConfig  # noqa: B018


def test_options_are_validated():
    plain = build_model("ple", tiny_schema(), TASKS, mutual_learning=False)
    assert not isinstance(plain, MutualLearning) and "mutual_learning" not in dataclasses.asdict(plain.config)
    with pytest.raises(ValueError, match="mutual_learning=True"):
        build_model("ple", tiny_schema(), TASKS, gkd_weight=1.0)
    with pytest.raises(ValueError, match="two tasks"):
        build_model("ple", tiny_schema(), TASKS[:1], mutual_learning=True)


def test_ctfm_attends_only_over_the_other_towers():
    m = mutual("mmoe")
    h = torch.randn(N, len(TASKS), m.ctfm.key.in_features)
    w = m.ctfm.weights(h)
    assert w.shape == (N, 3, 3)
    assert torch.equal(torch.diagonal(w, dim1=1, dim2=2), torch.zeros(N, 3))
    torch.testing.assert_close(w.sum(-1), torch.ones(N, 3))


@pytest.mark.parametrize("arch, producer", [
    ("mmoe", lambda m, k: m.base.backbone.gates[k]),  # gate k only makes task k's tower input
    ("dtrn", lambda m, k: m.base.backbone.levels[-1].task_gates[k]),  # and the last CGC's task gate k
])
def test_stop_gradient_target_loss_leaves_other_towers_inputs_alone(arch, producer):
    m = mutual(arch).train()
    inputs = random_inputs(tiny_schema(), 32)
    m(inputs)["ctr"].sum().backward()  # task 0's loss only
    for k in (1, 2):
        for p in producer(m, k).parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in producer(m, 0).parameters())
    assert m.ctfm.query.grad[0].abs().sum() > 0  # CTFM itself is trained by the target task
    # ... although task 0's prediction does read those inputs (through CTFM): the path exists in the forward
    m.eval()
    with torch.no_grad():
        before = m(inputs)["ctr"]
        producer(m, 1).linear.weight.add_(torch.randn_like(producer(m, 1).linear.weight))
        after = m(inputs)["ctr"]
    assert (before - after).abs().max() > 1e-6  # without the path the outputs would be bit-identical


def test_gkd_losses_are_finite_and_train_the_right_parts():
    m = mutual("ple").train()
    out, aux = m.forward_with_aux(random_inputs(tiny_schema(), 64))
    assert set(aux) == {"ctr", "cvr", "watch_time"} and all(v.shape == (64,) for v in aux.values())
    terms = m.aux_losses(out, aux, labels(64))
    assert set(terms) == {"gkd_global", "gkd_distill"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())

    terms["gkd_global"].backward(retain_graph=True)  # the global networks learn from the labels ...
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.gkd.parameters())
    assert all(p.grad is None for p in m.towers.parameters())  # ... on detached tower features
    m.zero_grad(set_to_none=True)
    terms["gkd_distill"].backward()  # the towers are pulled towards their (detached) global teacher
    assert all(p.grad is None for p in m.gkd.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.towers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.base.parameters())


def test_distillation_term_is_the_documented_formula():
    m = mutual("shared_bottom", gkd_weight=2.0)
    out = {"ctr": torch.zeros(4), "cvr": torch.zeros(4), "watch_time": torch.ones(4)}
    aux = {"ctr": torch.full((4,), 3.0), "cvr": torch.zeros(4), "watch_time": torch.ones(4)}
    y = labels(4)
    kd = m.aux_losses(out, aux, y)["gkd_distill"].item()
    # soft-label BCE per binary task, MSE on the clicked rows for watch time (0 here), times the weight
    p, q = torch.tensor(0.5), torch.sigmoid(torch.tensor(3.0))
    bce = lambda a, b: -(b * a.log() + (1 - b) * (1 - a).log())  # noqa: E731
    want = 2.0 * (bce(p, q) + bce(p, torch.tensor(0.5)) + 0.0)
    assert kd == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["ple", "dtrn"])
def test_export_parity(arch, tmp_path):
    m = mutual(arch)
    path = export_bundle(m, name="ml", store=tmp_path, train_config={}, metrics={},
                         parity_inputs=parity_rows(tiny_schema(), 300), vocabs={})
    manifest = BundleManifest.from_json((path / MANIFEST_FILE).read_text())
    assert manifest.architecture == arch and manifest.outputs == ["ctr", "cvr", "watch_time"]
    assert all(0 <= manifest.metrics[f"parity_max_abs_diff/{t.name}"] <= 1e-4 for t in TASKS)


def test_cli_train_maps_backbone_and_mutual_learning(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import training.train
    from service.cli import app

    seen = {}

    def fake_train(data, name, store, cfg, progress):
        seen["cfg"] = cfg
        return tmp_path / "b", {}

    monkeypatch.setattr(training.train, "train", fake_train)
    args = ["train", "--data", str(tmp_path), "--arch", "dtrn", "--backbone", "mmoe", "--mutual-learning",
            "--model-config", '{"tim_layers": 2}', "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["cfg"].arch == "dtrn"
    assert seen["cfg"].model == {"tim_layers": 2, "backbone": "mmoe", "mutual_learning": True}
    CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--quiet"])
    assert seen["cfg"].model == {}


@pytest.mark.slow
def test_train_dtrn_ple_with_mutual_learning_end_to_end_and_serve_batch1(tmp_path):
    from service.store import load_bundle
    from training.data.synth import SynthConfig, generate
    from training.train import TrainConfig, train

    data = tmp_path / "data"
    generate(data, SynthConfig(n_users=300, n_items=600, n_exposures=10_000, seed=3), progress=False)
    cfg = TrainConfig(arch="dtrn", epochs=1, batch_size=1024, threads=1,
                      model={"backbone": "ple", "mutual_learning": True, "expert_hidden": [32, 16]})
    threads = torch.get_num_threads()
    try:
        path, metrics = train(data, name="dml", store=tmp_path / "store", cfg=cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert 0.0 < metrics["auc/ctr"] < 1.0

    bundle = load_bundle(tmp_path / "store", "dml")
    m = bundle.manifest
    assert (m.architecture, bundle.version) == ("dtrn", 1)
    assert m.train_config["model"]["mutual_learning"] is True and m.train_config["model"]["backbone"] == "ple"
    # one user (batch 1) and 50 candidate items, as the service sends them
    rows = parity_rows(m.feature_schema, 50, seed=7)
    entity = {mi.name: mi.entity for mi in model_inputs(m.feature_schema)}
    one = {k: v if entity[k] == "item" else v[:1] for k, v in rows.items()}
    many = {k: v if entity[k] == "item" else np.repeat(v[:1], 50, axis=0) for k, v in rows.items()}
    got, same = bundle.run(one), bundle.run(many)
    for t in m.tasks:
        assert got[t.name].shape == (50,) and np.isfinite(got[t.name]).all()
        np.testing.assert_allclose(got[t.name], same[t.name], atol=1e-6)
        if t.kind == "binary":
            assert ((got[t.name] >= 0) & (got[t.name] <= 1)).all()
        else:
            assert (got[t.name] >= 0).all()


def test_gkd_with_unconditional_tasks():
    tasks = [TaskSpec(name="click", kind="binary", label="click"),
             TaskSpec(name="time", kind="regression", label="watch_time")]
    m = build_model("shared_bottom", tiny_schema(), tasks, mutual_learning=True).train()
    out, aux = m.forward_with_aux(random_inputs(tiny_schema(), 16))
    terms = m.aux_losses(out, aux, labels(16))
    assert all(torch.isfinite(v) for v in terms.values())


def test_ablation_switches_ctfm_only_and_gkd_only():
    inputs = random_inputs(tiny_schema(), N)
    ctfm_only = mutual("ple", gkd=False).train()
    assert ctfm_only.gkd is None and ctfm_only.ctfm is not None
    out, aux = ctfm_only.forward_with_aux(inputs)
    assert aux == {} and ctfm_only.aux_losses(out, aux, labels(N)) == {}
    gkd_only = mutual("ple", ctfm=False).train()
    assert gkd_only.ctfm is None and gkd_only.gkd is not None
    out, aux = gkd_only.forward_with_aux(inputs)
    assert set(gkd_only.aux_losses(out, aux, labels(N))) == {"gkd_global", "gkd_distill"}
    # each tower reads its own input only: the first layer is as wide as the backbone's output
    assert gkd_only.towers[0].mlp[0].in_features == ctfm_only.towers[0].mlp[0].in_features - 32
