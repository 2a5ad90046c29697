"""DTRN: task-specific bottom representations, then a multi-task backbone.

Liu, Zhou, Jiang, Ge, Lian, "Deep Task-specific Bottom Representation Network for Multi-Task
Recommendation", CIKM 2023 (arXiv:2308.05996). Instead of one shared embedding output, every task
gets its own bottom representation, built by two modules, and the representations feed an
existing multi-task backbone (the paper combines DTRN with MMoE/PLE-style methods):

* TIM, Task-specific Interest Module - the user's interest in the candidate item is extracted
  from each behaviour sequence (the schema's *user* sequence fields, e.g. ``clicked_items`` and
  ``converted_items``) separately for each task. Per the paper, a hypernetwork takes a task
  embedding and a behaviour-type embedding and *generates the conditional parameters* of the
  sequence encoder: the scale and shift (gamma, beta) of every LayerNorm of a Transformer layer
  ("conditional Transformer"). So one Transformer and one small hypernetwork serve all T x B
  (task, behaviour) pairs: a new task adds one ``tim_emb_dim`` vector, not a network.
  The encoded sequence is then pooled by target attention against the candidate item
  (query: the item's embedding in the sequence's ``vocab_of`` table, keys: the encoded
  sequence, scaled dot product), so the interest is target-aware.
* TRM, Task-specific Representation Refinement Module - per task a SENet over the F field
  vectors (sparse, dense, item/context sequences mean-pooled, and the task's own TIM interests):
  squeeze each field to its mean, excite with ``Linear(F, F/r) -> ReLU -> Linear(F/r, F) ->
  sigmoid``, and multiply each field's vector by its weight. The concatenation is the task's
  bottom representation.

Sources: the paper's equations could not be retrieved here (the search tool returns the abstract
and summaries). That TIM's hypernetwork generates the LayerNorm gamma/beta of a shared
Transformer from (task type, behaviour-sequence type) embeddings, and that TRM weights each
feature embedding per task with an MLP, is stated in a detailed secondary write-up
(cloud.tencent.com/developer/article/2327574); the sizes and the pooling below are our choices.

Choices where the paper leaves room or this code base differs (all in :class:`DTRNConfig`):

* the Transformer is post-LN (Vaswani et al.) with ``tim_layers`` layers, ``tim_heads`` heads, a
  ReLU FFN of ``tim_ffn_hidden``, learned position embeddings (sequences are most-recent-first),
  and padding (id 0) masked as keys; the hypernetwork is ``Linear -> ReLU -> Linear`` on the
  concatenated (task, behaviour) embeddings and outputs ``gamma - 1`` and ``beta`` (initialised
  near zero, so every pair starts as a plain LayerNorm); the self-attention, FFN and target-attention
  projections are shared by all pairs - only the generated LayerNorms make them task- and
  behaviour-specific;
* target attention is a scaled dot product of ``W_q item`` and ``W_k h_i`` over the encoded
  ``h_i`` (values: ``h_i``); an all-padding sequence gives a zero interest (never NaN); a user
  sequence whose ``vocab_of`` is not an item field has no candidate embedding to attend with and
  pools uniformly over its real positions;
* behaviour types whose embedding size differs from ``tim_dim`` get a bias-free projection
  (shared by their keys and the candidate query, which live in the same table);
* backbones (``backbone``): ``towers`` - each task's representation goes straight to its tower;
  ``mmoe`` - :class:`~training.models.mmoe.MMoEBlock`: the same experts run on each task's
  representation and task k's gate (on task k's representation) mixes them; ``ple`` -
  :class:`~training.models.ple.PLEBlock`: CGC levels with task k's experts on task k's
  representation and the shared experts on the mean of the task representations. The backbones
  are MMoE's and PLE's own blocks, and :class:`DTRNConfig` extends their configs, so every
  backbone setting (``n_experts``, ``levels``, ``expert_hidden``, ``dropout``, ``batch_norm``...)
  has one definition and reaches the backbone as it would reach MMoE or PLE.

Serving (the request side once, see :mod:`training.models.blocks`): the user's embeddings and
TIM's Transformer over each behaviour sequence (and its key projection) run at the user batch (1
at serving) and are broadcast to the N items inside the target attention, which needs the item
and so runs at N. From there on everything necessarily runs per item: TRM squeezes *all* fields
(user and item) into one SENet input and multiplies every field vector, the user's too, by a
per-item weight, before any linear map - so the backbone's first layers read per-item columns
only and are not split into user and item parts as in PLE/MMoE/Shared-Bottom. (A possible further
step, not taken: the first layer of ``s * x`` is ``sum_f s_f (x_f @ W_f)``, so the user fields'
``x_f @ W_f`` could be computed once and mixed per item with the ``s_f`` weights.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.contract import FeatureSchema, TaskSpec
from training.models.blocks import EmbeddingLayer, MultiTaskModel
from training.models.mmoe import MMoEBlock, MMoEConfig
from training.models.ple import PLEBlock, PLEConfig

#: DTRN's backbones by name: the block that reads the task representations (``towers``: none)
BACKBONES: dict[str, type[MMoEBlock] | type[PLEBlock] | None] = {"towers": None, "mmoe": MMoEBlock, "ple": PLEBlock}
NEG = -1e9  # additive attention bias of padding: its weight is exactly 0 and an all-padding row stays finite


@dataclass
class DTRNConfig(PLEConfig, MMoEConfig):
    """DTRN's own sizes; the backbone's (``n_experts``; ``levels``, ``shared_experts``,
    ``task_experts``; ``expert_hidden``) and the common ones (``dropout``, ``batch_norm``...) are
    the fields of the MMoE and PLE configs it extends."""

    backbone: str = "ple"  # towers | mmoe | ple
    # TIM: conditional Transformer over each user behaviour sequence, LayerNorms from the hypernetwork
    tim_dim: int = 0  # width of the Transformer; 0 = the embedding size of the first behaviour sequence
    tim_layers: int = 1
    tim_heads: int = 2
    tim_ffn_hidden: int = 64
    tim_emb_dim: int = 8  # size of the task and behaviour-type embeddings (hypernetwork input: both)
    tim_hyper_hidden: int = 32
    # TRM: per-task SENet over the fields, bottleneck F // trm_reduction
    trm_reduction: int = 2
    # ablations: False leaves a module out (tim: the user sequences stay mean-pooled as in PLE; trm:
    # no re-weighting, each task's representation is its plain concatenation of fields)
    tim: bool = True
    trm: bool = True


def masked_softmax(scores: Tensor, key_mask: Tensor) -> Tensor:
    """Softmax over the last axis with the positions where ``key_mask`` is False left out (weight 0)."""
    return torch.softmax(scores + (~key_mask).to(scores.dtype) * NEG, dim=-1)


class ConditionalTransformerLayer(nn.Module):
    """Post-LN Transformer layer whose two LayerNorms take their gamma/beta from outside.

    ``x [T or 1, B, L, d]``, ``mask [B, L]`` (True = real id), ``ln [T, 4, d]`` = (gamma1, beta1,
    gamma2, beta2) per task -> ``[T, B, L, d]``.
    """

    def __init__(self, d: int, heads: int, ffn_hidden: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"tim_dim {d} is not divisible by tim_heads {heads}")
        self.d, self.heads, self.scale = d, heads, 1.0 / math.sqrt(d // heads)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_hidden), nn.ReLU(), nn.Linear(ffn_hidden, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, ln: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-2, -3) for t in self.qkv(x).chunk(3, dim=-1))
        w = masked_softmax(q @ k.transpose(-1, -2) * self.scale, mask[:, None, None, :])  # [., B, H, L, L]
        a = (w @ v).transpose(-2, -3).flatten(-2)  # [., B, L, d]
        g1, b1, g2, b2 = (p[:, None, None, :] for p in ln.unbind(1))  # [T, 1, 1, d]
        h = F.layer_norm(x + self.dropout(self.proj(a)), (self.d,)) * g1 + b1
        return F.layer_norm(h + self.dropout(self.ffn(h)), (self.d,)) * g2 + b2


class TIM(nn.Module):
    """Task-specific Interest Module: one interest per (task, user behaviour sequence).

    ``forward(sequences, fields, n)`` -> one ``[T, N, tim_dim]`` tensor per user sequence field, in
    schema order. ``sequences``: :meth:`EmbeddingLayer.sequences` of the user (batch Bu = 1 or N);
    ``fields``: the embedding layer's field vectors at N (the candidate queries come from them).
    """

    def __init__(self, embedding: EmbeddingLayer, n_tasks: int, cfg: DTRNConfig):
        super().__init__()
        if cfg.tim_layers < 1:
            raise ValueError("DTRN needs tim_layers >= 1 (the generated LayerNorms are what makes TIM task-specific)")
        schema = embedding.schema
        seqs = schema.sequence_of("user")
        dims = [schema.field(f.vocab_of).embedding_dim for f in seqs]
        self.d = d = cfg.tim_dim or dims[0]
        self.n_tasks, self.n_layers = n_tasks, cfg.tim_layers
        self.proj = nn.ModuleList(nn.Identity() if db == d else nn.Linear(db, d, bias=False) for db in dims)
        # the candidate query: the item's vector of the sequence's vocab_of field, if that is an item field
        self.query_field = [embedding.field_names.index(f.vocab_of) if schema.field(f.vocab_of).entity == "item"
                            else None for f in seqs]
        self.pos = nn.Parameter(torch.randn(max(f.max_len for f in seqs), d) * 0.02)
        # hypernetwork: (task embedding, behaviour-type embedding) -> the LayerNorms of every layer
        self.task_emb = nn.Parameter(torch.randn(n_tasks, cfg.tim_emb_dim) * 0.5)
        self.behaviour_emb = nn.Parameter(torch.randn(len(seqs), cfg.tim_emb_dim) * 0.5)
        self.hyper = nn.Sequential(nn.Linear(2 * cfg.tim_emb_dim, cfg.tim_hyper_hidden), nn.ReLU(),
                                   nn.Linear(cfg.tim_hyper_hidden, cfg.tim_layers * 4 * d))
        nn.init.normal_(self.hyper[-1].weight, std=0.02)
        nn.init.zeros_(self.hyper[-1].bias)
        self.register_buffer("ln_offset", torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None], persistent=False)
        self.layers = nn.ModuleList(ConditionalTransformerLayer(d, cfg.tim_heads, cfg.tim_ffn_hidden, cfg.dropout)
                                    for _ in range(cfg.tim_layers))
        self.w_query = nn.Linear(d, d, bias=False)
        self.w_key = nn.Linear(d, d, bias=False)

    def generate(self) -> Tensor:
        """The generated LayerNorm parameters ``[T, B, layers, 4, d]``: (gamma1, beta1, gamma2, beta2)."""
        T, B = self.task_emb.shape[0], self.behaviour_emb.shape[0]
        pairs = torch.cat([self.task_emb[:, None].expand(T, B, -1), self.behaviour_emb[None].expand(T, B, -1)], -1)
        out = self.hyper(pairs).unflatten(-1, (self.n_layers, 4, self.d))
        return out + self.ln_offset  # gammas start at 1, betas at 0

    def forward(self, sequences: list[tuple[Tensor, Tensor]], fields: list[Tensor], n: int) -> list[Tensor]:
        params = self.generate()
        out = []
        for b, (emb, ids) in enumerate(sequences):
            mask = ids != 0  # [Bu, L]
            x = (self.proj[b](emb) + self.pos[: ids.shape[1]]).unsqueeze(0)  # [1, Bu, L, d]: same for all tasks
            for i, layer in enumerate(self.layers):
                x = layer(x, mask, params[:, b, i])  # [T, Bu, L, d]
            # target attention: the candidate (N) against the user's encoded sequence (Bu = 1 or N)
            if self.query_field[b] is None:  # no candidate embedding: uniform over the real positions
                scores = torch.zeros_like(x[..., 0]).expand(self.n_tasks, n, -1)  # [T, N, L]
            else:
                q = self.w_query(self.proj[b](fields[self.query_field[b]]))  # [N, d]
                scores = (self.w_key(x) @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.d)  # [T, N, L]
            pooled = (masked_softmax(scores, mask).unsqueeze(-2) @ x).squeeze(-2)  # [T, N, d]
            out.append(pooled * mask.to(pooled.dtype).amax(-1, keepdim=True))  # all padding -> zeros
        return out


class TRM(nn.Module):
    """Task-specific Representation Refinement: per task a SENet re-weighting each field's vector.

    ``forward(x)`` takes each task's concatenated fields ``T x [N, D]`` (field sizes ``dims``) and
    returns them with field f of task k multiplied by ``weights(x)[k][:, f]``.
    """

    def __init__(self, n_tasks: int, dims: list[int], reduction: int):
        super().__init__()
        n, hidden = len(dims), max(1, len(dims) // max(1, reduction))
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n), nn.Sigmoid())
                                  for _ in range(n_tasks))
        field_of = torch.repeat_interleave(torch.arange(n), torch.tensor(dims))  # column -> its field
        self.register_buffer("field_of_column", field_of, persistent=False)
        # squeeze as one matmul: [N, D] @ [D, F] = each field's mean
        self.register_buffer("squeeze", F.one_hot(field_of, n).float() / torch.tensor(dims, dtype=torch.float32),
                             persistent=False)

    def weights(self, x: list[Tensor]) -> list[Tensor]:
        return [net(xk @ self.squeeze) for net, xk in zip(self.nets, x, strict=True)]  # T x [N, F]

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        return [xk * w[:, self.field_of_column] for xk, w in zip(x, self.weights(x), strict=True)]


class DTRN(MultiTaskModel):
    arch = "dtrn"

    def __init__(self, schema: FeatureSchema, tasks: list[TaskSpec], config: DTRNConfig | None = None):
        super().__init__(schema, tasks, config or DTRNConfig())
        cfg, emb, T = self.config, self.embedding, len(self.tasks)
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"unknown DTRN backbone {cfg.backbone!r}; choose from {list(BACKBONES)}")
        self.seq_slots = [emb.field_names.index(f.name) for f in schema.sequence_of("user")]
        self.tim = TIM(emb, T, cfg) if self.seq_slots and cfg.tim else None
        dims = list(emb.field_dims)
        if self.tim is not None:
            for slot in self.seq_slots:
                dims[slot] = self.tim.d
        self.trm = TRM(T, dims, cfg.trm_reduction) if cfg.trm else None
        d = sum(dims)
        block = BACKBONES[cfg.backbone]
        self.backbone = None if block is None else block(T, d, cfg)
        self.build_towers(d if self.backbone is None else self.backbone.output_dim)

    def bottom(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        """The task-specific bottom representations ``T x [N, D]``: TIM interests in place of the
        mean-pooled user sequences, then TRM."""
        fields = self.embedding.fields(inputs)
        per_task = [list(fields) for _ in self.tasks]
        if self.tim is not None:
            n = inputs[self.embedding.item_input].shape[0]
            sequences = self.embedding.sequences(inputs, "user")
            for slot, interest in zip(self.seq_slots, self.tim(sequences, fields, n), strict=True):
                for k in range(len(self.tasks)):
                    per_task[k][slot] = interest[k]
        reps = [torch.cat(f, dim=1) for f in per_task]
        return reps if self.trm is None else self.trm(reps)

    def tower_inputs(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        reps = self.bottom(inputs)
        return reps if self.backbone is None else self.backbone(reps)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        reps = self.tower_inputs(inputs)
        return {t.name: tower(r) for t, tower, r in zip(self.tasks, self.towers, reps, strict=True)}
