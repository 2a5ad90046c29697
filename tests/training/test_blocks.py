"""Blocks and architectures on a tiny schema: shapes, broadcasting, the expert/gate maths, gradients."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from service.contract import FeatureSchema, SparseField
from tests.support.contract import TASKS, tiny_schema
from tests.support.inputs import one_user, random_inputs
from training.models import ARCHITECTURES, build_model
from training.models.blocks import MLP, Dropout, EmbeddingLayer, Experts, Gate, Parts, Tower, masked_mean, mix
from training.models.ple import PLE, PLEConfig

N = 7


# --- blocks -----------------------------------------------------------------------------------

def test_gate_is_a_distribution():
    w = Gate(12, 5)(torch.randn(N, 12) * 10)
    assert w.shape == (N, 5)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(N))


def test_block_shapes():
    x = torch.randn(N, 12)
    assert MLP(12, [16, 8], 0.1)(x).shape == (N, 8)
    assert MLP(12, [], 0.1)(x).shape == (N, 12) and MLP(12, []).output_dim == 12
    assert Tower(12, [16], 0.1)(x).shape == (N,)
    assert Tower(12, [])(x).shape == (N,)
    ex = Experts(3, 12, [16, 8], 0.1)
    assert ex(x).shape == (N, 3, 8) and ex.output_dim == 8
    assert ex(torch.randn(N, 3, 12)).shape == (N, 3, 8)
    assert mix(Gate(12, 3)(x), ex(x)).shape == (N, 8)


@pytest.mark.parametrize("per_expert", [False, True])
def test_experts_batched_equals_per_expert_loop(per_expert):
    """Both layouts of the later layers (one batched matmul; one GEMM per expert, the int8 export's
    graph) compute each expert's own MLP."""
    ex = Experts(4, 6, [5, 3, 2]).eval()
    ex.per_expert = per_expert
    a, b = torch.randn(N, 6), torch.randn(N, 6)
    for x in (torch.randn(N, 6), torch.randn(N, 4, 6), [a, a, b, a]):
        got = ex(x)
        assert got.shape == (N, 4, 2)
        for e in range(4):
            h = x[e] if isinstance(x, list) else x if x.dim() == 2 else x[:, e]
            for w, b in zip(ex.weights, ex.biases, strict=True):
                h = torch.relu(h @ w[e] + b[e])
            torch.testing.assert_close(got[:, e], h)


def test_per_expert_refuses_unfolded_batch_norm():
    ex = Experts(3, 6, [5, 3], batch_norm=True).eval()
    ex.per_expert = True
    with pytest.raises(ValueError, match="folded"):
        ex(torch.randn(N, 6))


def test_experts_list_input_equals_the_stacked_input():
    """A list of per-expert inputs (runs of one tensor share a GEMM) gives what [N, E, in] gives,
    in training mode too (BatchNorm with batch statistics), and the gradients agree."""
    torch.manual_seed(0)
    ex = Experts(5, 6, [5, 3], batch_norm=True)
    a, b, c = (torch.randn(N, 6, requires_grad=True) for _ in range(3))
    listed = [a, a, b, c, c]
    stacked = torch.stack(listed, dim=1)
    got, want = ex(listed), ex(stacked)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got.square().sum(), [a, b, c, *ex.parameters()])
    g2 = torch.autograd.grad(want.square().sum(), [a, b, c, *ex.parameters()])
    for x, y in zip(g1, g2, strict=True):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="4 inputs for 5 experts"):
        ex([a, a, b, c])


def test_dropout_is_nn_dropout_in_distribution():
    """Training: each element kept with probability 1 - p and scaled by 1 / (1 - p), the gradient
    is the same mask; torch.manual_seed reproduces the mask; eval and p = 0: the identity."""
    d = Dropout(0.25)
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    kept = y != 0
    assert y.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 200,000 draws: sd ~0.001
    assert kept.float().mean(0).std() > 0  # not one mask per column or row
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())
    torch.manual_seed(3)
    torch.testing.assert_close(d(x), y)
    assert not torch.equal(d(x), y)  # the next draw differs
    d.eval()
    assert d(x) is x
    assert Dropout(0.0).train()(x) is x


def test_mix_is_the_weighted_sum():
    w, e = torch.softmax(torch.randn(N, 3), -1), torch.randn(N, 3, 4)
    torch.testing.assert_close(mix(w, e), (w.unsqueeze(-1) * e).sum(1))


def test_masked_mean_ignores_padding_and_empty_is_zero():
    emb = torch.randn(2, 4, 3)
    ids = torch.tensor([[5, 7, 0, 0], [0, 0, 0, 0]])
    out = masked_mean(emb, ids)
    torch.testing.assert_close(out[0], emb[0, :2].mean(0))
    assert torch.equal(out[1], torch.zeros(3))
    assert not torch.isnan(out).any()


def test_embedding_layer_fields_order_and_shapes():
    schema = tiny_schema()
    layer = EmbeddingLayer(schema, dense_dim=6)
    assert layer.field_names == ["user_id", "gender", "activity", "clicked",
                                 "item_id", "category", "price", "age_days", "hour"]
    assert layer.field_dims == [16, 4, 6, 16, 16, 8, 6, 6, 4]
    assert layer.num_fields == 9 and layer.output_dim == sum(layer.field_dims)
    inputs = random_inputs(schema, N)
    fields = layer.fields(inputs)
    assert [tuple(f.shape) for f in fields] == [(N, d) for d in layer.field_dims]
    assert layer(inputs).shape == (N, layer.output_dim)
    # user work at batch 1 broadcasts to the N items
    b1, bn = one_user(schema, inputs)
    torch.testing.assert_close(layer(b1), layer(bn))


def test_sequence_shares_the_vocab_of_table_and_ignores_padding():
    schema = tiny_schema()
    layer = EmbeddingLayer(schema, dense_dim=4)
    inputs = random_inputs(schema, 2)
    inputs["user_seq"] = torch.tensor([[3, 9, 0, 0, 0], [0, 0, 0, 0, 0]])
    clicked = layer.fields(inputs)[layer.field_names.index("clicked")]
    table = layer.sparse[layer.table_of["item_id"]].weight
    torch.testing.assert_close(clicked[0], table[[3, 9]].mean(0))
    assert torch.equal(clicked[1], torch.zeros(16))


def test_dense_normalisation_uses_schema_stats():
    schema = tiny_schema()
    layer = EmbeddingLayer(schema, dense_dim=4)
    dense = layer.dense["item"]
    torch.testing.assert_close(dense.mean, torch.tensor([10.0, 30.0]))
    torch.testing.assert_close(dense.std, torch.tensor([5.0, 10.0]))
    inputs = random_inputs(schema, 3)
    inputs["item_dense"] = torch.tensor([[10.0, 30.0], [15.0, 10.0], [0.0, 50.0]])
    fields = layer.fields(inputs)
    price, age = fields[layer.field_names.index("price")], fields[layer.field_names.index("age_days")]
    z = torch.tensor([[0.0, 0.0], [1.0, -2.0], [-2.0, 2.0]])
    torch.testing.assert_close(price, z[:, :1] * dense.weight[0] + dense.bias[0])
    torch.testing.assert_close(age, z[:, 1:] * dense.weight[1] + dense.bias[1])


def test_schema_without_item_fields_is_refused():
    schema = FeatureSchema(sparse=[SparseField(name="user_id", entity="user", vocab_size=5)])
    with pytest.raises(ValueError, match="item"):
        EmbeddingLayer(schema, 4)


# --- architectures ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_shapes_and_user_broadcast(arch):
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(arch, schema, TASKS).eval()
    assert model.arch == arch and model.schema == schema and model.tasks == TASKS
    inputs = random_inputs(schema, N)
    with torch.no_grad():
        out = model(inputs)
        assert list(out) == ["ctr", "cvr", "watch_time"]
        assert all(v.shape == (N,) and v.dtype == torch.float32 for v in out.values())
        b1, bn = one_user(schema, inputs)
        o1, on = model(b1), model(bn)
    for t in TASKS:
        assert o1[t.name].shape == (N,)
        torch.testing.assert_close(o1[t.name], on[t.name])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_gradient_reaches_every_parameter(arch):
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(arch, schema, TASKS).train()
    out = model(random_inputs(schema, 32))
    sum(v.pow(2).mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_config_is_json_and_rebuilds(arch):
    model = build_model(arch, tiny_schema(), TASKS, dropout=0.2, tower_hidden=[8])
    cfg = json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert cfg["dropout"] == 0.2 and cfg["tower_hidden"] == [8] and "dense_dim" in cfg
    again = build_model(arch, tiny_schema(), TASKS, **cfg)
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("mutual", [False, True])
def test_batch_norm_setting_reaches_every_layer(arch, mutual):
    """``batch_norm=False``: no BatchNorm anywhere (bottom, experts, towers); True: in each of them."""
    def norms(**kw):
        m = build_model(arch, tiny_schema(), TASKS, mutual_learning=mutual, **kw)
        return m, [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.BatchNorm1d)]

    assert norms(batch_norm=False)[1] == []
    model, names = norms(batch_norm=True)
    assert all(any(n.startswith(f"towers.{k}.") for n in names) for k in range(len(TASKS)))
    if arch == "shared_bottom":
        assert any(".bottom." in f".{n}" for n in names)
    else:
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and all(e.norms is not None for e in experts)


def test_build_model_rejects_unknowns():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("nope", tiny_schema(), TASKS)
    with pytest.raises(ValueError, match="unknown config"):
        build_model("mmoe", tiny_schema(), TASKS, n_experts=2, levels=3)


@pytest.mark.parametrize("levels", [1, 3])
def test_ple_levels(levels):
    schema = tiny_schema()
    model = PLE(schema, TASKS, PLEConfig(levels=levels, shared_experts=2, task_experts=2,
                                         expert_hidden=[16, 8], tower_hidden=[8])).eval()
    assert len(model.backbone.levels) == levels
    assert [lvl.shared_gate is None for lvl in model.backbone.levels] == [False] * (levels - 1) + [True]
    out = model(random_inputs(schema, N))
    assert all(v.shape == (N,) for v in out.values())


def test_ple_task_gate_mixes_own_and_shared_experts():
    te, se, T = 2, 3, len(TASKS)
    model = PLE(tiny_schema(), TASKS, PLEConfig(levels=2, shared_experts=se, task_experts=te))
    first = model.backbone.levels[0]
    assert first.experts.n_experts == T * te + se
    shared = list(range(T * te, T * te + se))
    for k, gate in enumerate(first.task_gates):
        assert gate.n_experts == te + se
        assert first.task_gate_experts[k].tolist() == list(range(k * te, (k + 1) * te)) + shared
    assert first.shared_gate.n_experts == T * te + se
    # task k's experts read task k's input, the shared experts the shared input
    assert first.input_of_expert == [0, 0, 1, 1, 2, 2, 3, 3, 3]


# --- the request side once (Parts) -----------------------------------------------------------

def test_parts_first_layers_equal_the_full_input():
    """MLP, Experts and Gate on Parts (user/context blocks at batch 1) give what they give on the
    broadcast [N, D] tensor; Parts.full() is that tensor."""
    torch.manual_seed(0)
    n, dims = 9, [5, 7, 3]
    blocks = [torch.randn(1, 5), torch.randn(n, 7), torch.randn(1, 3)]
    parts = Parts(blocks, dims, [False, True, False])
    full = torch.cat([blocks[0].expand(n, -1), blocks[1], blocks[2].expand(n, -1)], 1)
    torch.testing.assert_close(parts.full(), full)
    for block in (MLP(15, [8, 4], batch_norm=True), Experts(3, 15, [8, 4], batch_norm=True), Gate(15, 3)):
        block.eval()
        for m in block.modules():  # non-trivial running statistics
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        with torch.no_grad():
            torch.testing.assert_close(block(parts), block(full), atol=1e-5, rtol=1e-5)
    assert MLP(15, [])(parts).shape == (n, 15)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_request_once_embedding_gives_the_same_model_outputs(arch):
    schema = tiny_schema()
    torch.manual_seed(0)
    model = build_model(arch, schema, TASKS).eval()
    b1, bn = one_user(schema, random_inputs(schema, N))
    with torch.no_grad():
        want = model(bn)
        model.embedding.request_once = True
        parts = model.embedding(b1)
        got = model(b1)
        model.embedding.request_once = False
    assert isinstance(parts, Parts) and parts.per_item == [False, True, False]
    assert [b.shape[0] for b in parts.blocks] == [1, N, 1]
    assert parts.dims == [model.embedding.entity_dims[e] for e in ("user", "item", "context")]
    for t in TASKS:
        torch.testing.assert_close(got[t.name], want[t.name], atol=1e-5, rtol=1e-5)
