"""DTRN: TIM (hypernetwork-generated conditional Transformer + target attention), TRM, backbones, export."""

from __future__ import annotations

import pytest
import torch

from service.contract import MANIFEST_FILE, BundleManifest, DenseField, FeatureSchema, SequenceField, SparseField
from tests.support.contract import TASKS
from tests.support.inputs import one_user, parity_rows, random_inputs
from training.export import export_bundle
from training.models import build_model
from training.models.blocks import Experts
from training.models.dtrn import BACKBONES, DTRN, TIM, DTRNConfig
from training.models.mmoe import MMoEBlock
from training.models.ple import PLEBlock

N = 6


def schema() -> FeatureSchema:
    """Two item-id behaviour sequences, one over a user-side vocabulary of another size (no candidate
    query, projected to the TIM width) and an item-side sequence (not a behaviour: mean-pooled)."""
    return FeatureSchema(
        sparse=[SparseField(name="user_id", entity="user", vocab_size=30),
                SparseField(name="genre", entity="user", vocab_size=9, embedding_dim=8),
                SparseField(name="item_id", entity="item", vocab_size=40),
                SparseField(name="category", entity="item", vocab_size=7, embedding_dim=4),
                SparseField(name="hour", entity="context", vocab_size=24, embedding_dim=4)],
        dense=[DenseField(name="price", entity="item", mean=10.0, std=5.0)],
        sequence=[SequenceField(name="clicked", entity="user", max_len=5, vocab_of="item_id"),
                  SequenceField(name="converted", entity="user", max_len=3, vocab_of="item_id"),
                  SequenceField(name="liked_genres", entity="user", max_len=4, vocab_of="genre"),
                  SequenceField(name="tags", entity="item", max_len=3, vocab_of="category")],
    )


def model(backbone="ple", tasks=TASKS, **kw) -> DTRN:
    torch.manual_seed(0)
    return build_model("dtrn", schema(), tasks, backbone=backbone, tim_dim=16, **kw)


def tim_outputs(m: DTRN, inputs) -> list[torch.Tensor]:
    fields = m.embedding.fields(inputs)
    return m.tim(m.embedding.sequences(inputs, "user"), fields, inputs["item_sparse"].shape[0])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_gradients_and_user_broadcast(backbone):
    m = model(backbone).train()
    out = m(random_inputs(schema(), 16))
    assert list(out) == ["ctr", "cvr", "watch_time"] and all(v.shape == (16,) for v in out.values())
    sum(v.pow(2).mean() for v in out.values()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    m.eval()
    with torch.no_grad():
        b1, bn = one_user(schema(), random_inputs(schema(), N, seed=1))
        o1, on = m(b1), m(bn)
    for t in TASKS:
        assert o1[t.name].shape == (N,)
        torch.testing.assert_close(o1[t.name], on[t.name])


def test_tim_runs_per_task_and_behaviour_and_trm_sees_it():
    m = model().eval()
    assert isinstance(m.tim, TIM) and len(m.tim.proj) == 3  # the three user sequences, not the item's tags
    assert isinstance(m.tim.proj[2], torch.nn.Linear)  # genre vectors (8) projected to tim_dim (16)
    with torch.no_grad():
        interests = tim_outputs(m, random_inputs(schema(), N))
    assert [tuple(x.shape) for x in interests] == [(3, N, 16)] * 3
    # the bottom representation: every field, with the user sequences replaced by 16-wide interests
    dims = [16 if n in ("clicked", "converted", "liked_genres") else d
            for n, d in zip(m.embedding.field_names, m.embedding.field_dims, strict=True)]
    with torch.no_grad():
        reps = m.bottom(random_inputs(schema(), N))
    assert len(reps) == 3 and all(r.shape == (N, sum(dims)) for r in reps)


def test_padding_is_masked_and_all_padding_is_finite_zero():
    m = model().eval()
    inputs = random_inputs(schema(), N, seed=2)
    inputs["item_sparse"][:, 0] = torch.arange(1, N + 1)  # candidates never use row 0 (padding/OOV)
    inputs["user_sparse"][:, 1] = 3  # nor does the user's genre field
    with torch.no_grad():
        before = m(inputs)
        for table in ("item_id", "genre"):  # padding positions look up row 0 of these tables
            m.embedding.sparse[m.embedding.table_of[table]].weight[0] += 100.0
        after = m(inputs)
    for t in TASKS:
        torch.testing.assert_close(before[t.name], after[t.name], rtol=0, atol=0)

    inputs["user_seq"][:2] = 0  # two users with no behaviour at all
    m.train()
    out = m(inputs)
    sum(v.sum() for v in out.values()).backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with torch.no_grad():
        interests = tim_outputs(m.eval(), inputs)
    for x in interests:
        assert torch.equal(x[:, :2], torch.zeros_like(x[:, :2]))
        assert x[:, 2:].abs().sum() > 0


def test_hypernetwork_generates_the_layernorms_of_every_task_behaviour_pair():
    m3 = model()
    tim = m3.tim
    params = tim.generate()
    assert params.shape == (3, 3, 1, 4, 16)  # tasks x behaviours x layers x (gamma1, beta1, gamma2, beta2) x d
    # one shared Transformer; a task adds only its embedding (no T x B networks)
    two = model(tasks=TASKS[:2]).tim
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(tim) - count(two) == DTRNConfig.tim_emb_dim
    one_layer = count(tim.layers[0]) + count(tim.w_query) + count(tim.w_key)
    assert count(tim) < 3 * 3 * one_layer  # far less than a full encoder per (task, behaviour)

    inputs = random_inputs(schema(), N, seed=3)
    with torch.no_grad():
        interests = tim_outputs(m3.eval(), inputs)
        for x in interests:  # different task embeddings -> different interests
            assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[1], x[2])
        tim.task_emb[1] = tim.task_emb[0]  # the same embedding -> the same generated parameters
        same = tim_outputs(m3, inputs)
        for x in same:
            torch.testing.assert_close(x[0], x[1])
        tim.hyper[-1].bias += 0.3  # what the hypernetwork outputs is what the encoder uses
        moved = tim_outputs(m3, inputs)
    assert all(not torch.allclose(a, b) for a, b in zip(same, moved, strict=True))


def test_trm_reweights_every_field_per_task():
    m = model().eval()
    dims = [16 if n in ("clicked", "converted", "liked_genres") else d  # TIM interests are tim_dim wide
            for n, d in zip(m.embedding.field_names, m.embedding.field_dims, strict=True)]
    assert torch.bincount(m.trm.field_of_column).tolist() == dims
    x = [torch.randn(N, sum(dims)) for _ in TASKS]
    with torch.no_grad():
        w = m.trm.weights(x)
        refined = m.trm(x)
    F = m.embedding.num_fields
    assert len(w) == 3 and all(wk.shape == (N, F) for wk in w)
    assert all(((wk > 0) & (wk < 1)).all() for wk in w)
    with torch.no_grad():
        assert not torch.allclose(m.trm.weights([x[0]] * 3)[0], m.trm.weights([x[0]] * 3)[1])  # a SENet per task
    for k in range(3):
        start, means = 0, []
        for f, d in enumerate(dims):
            part = x[k][:, start:start + d]
            torch.testing.assert_close(refined[k][:, start:start + d], part * w[k][:, f:f + 1])
            means.append(part.mean(1))
            start += d
        torch.testing.assert_close(x[k] @ m.trm.squeeze, torch.stack(means, 1))  # squeeze: each field's mean


def test_config_errors():
    with pytest.raises(ValueError, match="backbone"):
        model("nope")
    with pytest.raises(ValueError, match="unknown config"):
        build_model("ple", schema(), TASKS, backbone="ple")
    with pytest.raises(ValueError, match="tim_layers"):
        model(tim_layers=0)


def test_without_behaviour_sequences_dtrn_is_trm_plus_backbone():
    s = FeatureSchema(sparse=[SparseField(name="user_id", entity="user", vocab_size=5),
                              SparseField(name="item_id", entity="item", vocab_size=5)])
    m = build_model("dtrn", s, TASKS).eval()
    assert m.tim is None
    assert m(random_inputs(s, N))["ctr"].shape == (N,)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_export_parity(backbone, tmp_path):
    m = model(backbone)
    path = export_bundle(m, name="dtrn", store=tmp_path, train_config={}, metrics={},
                         parity_inputs=parity_rows(schema(), 300), vocabs={})
    metrics = BundleManifest.from_json((path / MANIFEST_FILE).read_text()).metrics
    assert all(0 <= metrics[f"parity_max_abs_diff/{t.name}"] <= 1e-4 for t in TASKS)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_batch_norm_reaches_the_towers_and_every_backbone(backbone, batch_norm):
    """``batch_norm`` is the backbone's own setting (MMoE's / PLE's config): DTRN used to build its
    PLE backbone without it, so ``batch_norm=False`` kept BatchNorm in the experts."""
    m = model(backbone, batch_norm=batch_norm)
    bns = [name for name, mod in m.named_modules() if isinstance(mod, torch.nn.BatchNorm1d)]
    if not batch_norm:
        assert bns == []
        return
    assert all(any(n.startswith(f"towers.{k}.") for n in bns) for k in range(len(TASKS)))
    if backbone == "towers":
        assert m.backbone is None and all(n.startswith("towers.") for n in bns)
    else:
        expert_groups = [mod for mod in m.backbone.modules() if isinstance(mod, Experts)]
        assert expert_groups and all(e.norms is not None and len(e.norms) == 2 for e in expert_groups)


@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_dtrn_backbone_is_the_architectures_own_block(arch):
    """Same sizes, same block: DTRN's backbone has the parameters of MMoE's / PLE's on its input width."""
    cfg = dict(n_experts=3, levels=2, shared_experts=1, task_experts=2, expert_hidden=[12, 6], dropout=0.0)
    m = model(arch, **cfg)
    d = m.trm.field_of_column.numel()
    own = {"mmoe": MMoEBlock, "ple": PLEBlock}[arch](len(TASKS), d, m.config)
    assert type(m.backbone) is type(own)
    assert [(n, p.shape) for n, p in m.backbone.named_parameters()] == [(n, p.shape) for n, p in own.named_parameters()]


@pytest.mark.parametrize(("tim", "trm"), [(True, False), (False, True)])
def test_ablation_switches_leave_a_module_out(tim, trm):
    """``tim=False``: the user sequences stay mean-pooled; ``trm=False``: no re-weighting."""
    m = model(tim=tim, trm=trm)
    assert (m.tim is not None) == tim and (m.trm is not None) == trm
    inputs = random_inputs(schema(), N)
    out = m.eval()(inputs)
    assert all(v.shape == (N,) and torch.isfinite(v).all() for v in out.values())
    if not tim:  # the mean-pooled user sequences keep their own width (no TIM projection)
        fields = torch.cat(m.embedding.fields(inputs), dim=1)
        assert m.bottom(inputs)[0].shape == fields.shape
