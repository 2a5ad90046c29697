"""torch-rechub's PLE and MMoE (from PyPI, the `bench` extra) behind our model interface, so the
quality benchmark trains them with exactly the same data, split, features, losses (ESMM included)
and loop as our models. A reference peer: not part of the product.

What the adapter does, and nothing more:
* builds torch-rechub feature objects from our schema: a SparseFeature per sparse field (same
  vocabulary and embedding dim), a mean-pooled SequenceFeature per sequence field sharing its
  `vocab_of` table with padding index 0, a DenseFeature per dense field;
* feeds our inputs as its dict: user/context columns broadcast to the N items, dense values
  normalised with the schema stats (our models normalise inside; torch-rechub does not);
* replaces the final sigmoid of the binary heads by identity, so its outputs are logits for our
  BCE-with-logits / ESMM losses (the same function, only the activation moved into the loss);
* ``batch_norm=False`` (an ablation; default True, torch-rechub's own architecture): torch-rechub's
  ``MLP`` is always Linear -> BatchNorm1d -> activation -> Dropout, in experts, towers and gates,
  with no switch; this replaces every BatchNorm1d of the built model by an identity;
* ``embedding_init_std`` (default 1e-4, torch-rechub's own ``RandomNormal(0, 0.0001)``): the std of
  its embedding tables' normal init (ours defaults to 0.05), for the init ablation and the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
from torch_rechub.basic.initializers import RandomNormal
from torch_rechub.models.multi_task import MMOE, PLE

from service.contract import FeatureSchema, TaskSpec, model_inputs


@dataclass
class RechubConfig:
    model: str = "ple"  # ple | mmoe
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])
    tower_hidden: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.1
    levels: int = 2
    shared_experts: int = 2
    task_experts: int = 1
    n_experts: int = 4
    batch_norm: bool = True  # False: its BatchNorm1d layers (experts, towers, gates) become identities
    embedding_init_std: float = 1e-4  # its embeddings' N(0, std^2) init (torch-rechub's default: 1e-4)


class RechubModel(nn.Module):
    def __init__(self, schema: FeatureSchema, tasks: list[TaskSpec], config: RechubConfig | None = None):
        super().__init__()
        self.schema, self.tasks, self.config = schema, tasks, config or RechubConfig()
        self.arch = f"torch-rechub-{self.config.model}"
        c = self.config
        feats = []
        for f in schema.sparse:
            feats.append(SparseFeature(f.name, vocab_size=f.vocab_size, embed_dim=f.embedding_dim,
                                       initializer=RandomNormal(0, c.embedding_init_std)))
        for f in schema.sequence:
            src = schema.field(f.vocab_of)
            feats.append(SequenceFeature(f.name, vocab_size=src.vocab_size, embed_dim=src.embedding_dim,
                                         pooling="mean", shared_with=f.vocab_of, padding_idx=0))
        for f in schema.dense:
            feats.append(DenseFeature(f.name))
        self.features = feats
        task_types = ["classification" if t.kind == "binary" else "regression" for t in tasks]
        expert = {"dims": list(c.expert_hidden), "dropout": c.dropout}
        towers = [{"dims": list(c.tower_hidden), "dropout": c.dropout} for _ in tasks]
        if c.model == "ple":
            self.net = PLE(feats, task_types, n_level=c.levels, n_expert_specific=c.task_experts,
                           n_expert_shared=c.shared_experts, expert_params=expert, tower_params_list=towers)
        elif c.model == "mmoe":
            self.net = MMOE(feats, task_types, n_expert=c.n_experts, expert_params=expert, tower_params_list=towers)
        else:
            raise ValueError(f"unknown torch-rechub model {c.model!r}")
        self.net.predict_layers = nn.ModuleList(nn.Identity() for _ in tasks)  # logits out
        if not c.batch_norm:
            for mlp in [m for m in self.net.modules() if isinstance(m, nn.Sequential)]:
                for i, layer in enumerate(mlp):
                    if isinstance(layer, nn.BatchNorm1d):
                        mlp[i] = nn.Identity()
        self.inputs = model_inputs(schema)
        self.register_buffer("mean", torch.tensor([f.mean for f in schema.dense] or [0.0]))
        self.register_buffer("std", torch.tensor([f.std for f in schema.dense] or [1.0]))
        self.dense_pos = {f.name: i for i, f in enumerate(schema.dense)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = next(inputs[i.name] for i in self.inputs if i.entity == "item").shape[0]
        x = {}
        for spec in self.inputs:
            t = inputs[spec.name]
            if t.shape[0] != n:
                t = t.expand(n, *t.shape[1:])
            if spec.kind == "sparse":
                for j, name in enumerate(spec.fields):
                    x[name] = t[:, j]
            elif spec.kind == "dense":
                for j, name in enumerate(spec.fields):
                    k = self.dense_pos[name]
                    x[name] = (t[:, j] - self.mean[k]) / self.std[k]
            else:
                start = 0
                for name in spec.fields:
                    length = self.schema.field(name).max_len
                    x[name] = t[:, start:start + length]
                    start += length
        out = self.net(x)  # [N, T]
        return {t.name: out[:, i] for i, t in enumerate(self.tasks)}

