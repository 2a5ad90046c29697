"""Deep Mutual Learning across task towers, as an option on any architecture.

Ren, Du, Wang, Zhang, "Deep Mutual Learning across Task Towers for Effective Multi-Task
Recommender Learning", ORSUM @ RecSys 2023 (arXiv:2309.10357). The backbone (shared bottom,
MMoE, PLE, DTRN...) is left as it is; what changes is its task towers:

* Cross Task Feature Mining (CTFM), a component shared by all tasks at the entry of the towers.
  With ``h_1..h_T`` the towers' inputs (what the backbone gives each task), task t attends
  with a learned task embedding ``q_t`` as query over the *other* towers' inputs::

      k_j = W_k sg(h_j),  v_j = W_v sg(h_j),  a_tj = softmax_{j != t}(q_t . k_j / sqrt(d)),
      c_t = sum_{j != t} a_tj v_j,              tower_t reads concat(h_t, c_t)

  ``sg`` is stop-gradient (``detach``): task t's loss trains CTFM and its own tower and
  backbone path, but never changes what the other towers read.
* Global Knowledge Distillation (GKD): the towers' predictions should stay consistent with the
  *joint* distribution of the labels. For each task t a dedicated global network reads the
  upper-layer results of *all* towers (their last hidden layers ``z_1..z_T``, concatenated) and
  predicts task t; it is fitted to task t's label with the task's own loss, and its prediction,
  which has seen every tower, is distilled into tower t::

      L_gkd = sum_t [ L_t(g_t(sg(z_1..z_T)), y) + gkd_weight * KD(tower_t || sg(g_t)) ]

  KD is the soft-label binary cross-entropy ``BCE(sigmoid(s_t), sigmoid(sg(g_t)))`` for a
  binary task and ``MSE(s_t, sg(g_t))`` for a regression (on the rows of its condition, where the
  task is defined). ``L_t`` is exactly the trainer's task loss (:func:`training.losses.task_losses`,
  ESMM for conditional binary tasks), applied to the global predictions.

Sources: the method section's text (CTFM attends with task embeddings over the other towers'
inputs with gradients stopped; GKD distils "the global results of the upper layer task towers"
so that predictions obey the joint label distribution) was read from copies of the paper; its
equations were images that could not be retrieved, so the formulas above are our reading.

Choices the method section leaves open (stated here, all in :class:`MutualConfig`): the CTFM
query/key/value size ``ctfm_dim`` (a single head); CTFM attends over the other towers only (a
tower already reads its own input directly); the global networks read the towers' last hidden
layers detached, so the label loss of global network t cannot change tower j's features (the
same isolation as CTFM) and GKD reaches the towers only through the distillation term; every
task is distilled from its own global network (no pairwise tower-to-tower terms); temperature 1
(outputs are single sigmoids, not softmaxes); the teacher side of KD is detached (a student is
pulled towards its teacher, never the reverse); ``gkd_weight`` weighs the KD term, the global
networks' own label losses have weight 1, and the GKD loss is added to the weighted task losses.

Serving is unchanged: ``forward`` returns the towers' outputs only; the global networks exist
for training (:meth:`MutualLearning.forward_with_aux` and :meth:`MutualLearning.aux_losses`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.losses import task_losses
from training.models.blocks import ModelConfig, MultiTaskModel, Tower

NEG = -1e9


@dataclass
class MutualConfig:
    mutual_learning: bool = False
    ctfm_dim: int = 32  # CTFM query/key/value size: what each tower reads in addition to its own input
    gkd_hidden: list[int] = field(default_factory=lambda: [32])  # each task's global network
    gkd_weight: float = 0.5  # weight of the distillation term of every task
    # ablations: False leaves a component out (ctfm: each tower reads its own input only; gkd: no
    # global networks, no auxiliary losses)
    ctfm: bool = True
    gkd: bool = True


MUTUAL_KEYS = frozenset(f.name for f in dataclasses.fields(MutualConfig))


#: the classes :func:`with_mutual` made, by name (see :func:`__getattr__`)
_MUTUAL_CONFIGS: dict[str, type] = {}


@functools.cache
def with_mutual(config_cls: type[ModelConfig]) -> type:
    """``config_cls`` plus the :class:`MutualConfig` fields, as one JSON-serialisable dataclass."""
    name = f"Mutual{config_cls.__name__}"
    cls = dataclasses.make_dataclass(name, [], bases=(config_cls, MutualConfig))
    cls.__module__ = __name__
    _MUTUAL_CONFIGS[name] = cls
    return cls


def __getattr__(name: str) -> type:
    """``training.models.mutual.Mutual<Config>`` for a class :func:`with_mutual` made (pickle finds
    a class by module and name)."""
    try:
        return _MUTUAL_CONFIGS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def tower_inputs(model: MultiTaskModel, inputs: dict[str, Tensor]) -> list[Tensor]:
    """What each task tower of ``model`` reads (``model.tower_inputs`` if it has its own, like DTRN)."""
    own = getattr(model, "tower_inputs", None)
    return own(inputs) if own is not None else model.task_inputs(model.embedding(inputs))


class CTFM(nn.Module):
    """Cross Task Feature Mining: ``T x [N, in]`` -> ``T x [N, dim]``, task t attending over the
    other tasks' (detached) inputs with its learned embedding as the query."""

    def __init__(self, n_tasks: int, in_dim: int, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_tasks, dim) / math.sqrt(dim))  # learned task embeddings
        self.key = nn.Linear(in_dim, dim)
        self.value = nn.Linear(in_dim, dim)
        self.scale = 1.0 / math.sqrt(dim)
        self.register_buffer("self_bias", torch.eye(n_tasks) * NEG, persistent=False)  # a task skips itself

    def weights(self, h: Tensor) -> Tensor:
        """Attention weights ``[N, T (query task), T (key task)]`` for the stacked inputs ``h [N, T, in]``."""
        scores = (self.query @ self.key(h.detach()).transpose(1, 2)) * self.scale  # [N, T, T]
        return torch.softmax(scores + self.self_bias, dim=-1)

    def forward(self, reps: list[Tensor]) -> list[Tensor]:
        h = torch.stack(reps, dim=1)  # [N, T, in]
        return list((self.weights(h) @ self.value(h.detach())).unbind(1))  # T x [N, dim]


def _tower_in_dim(tower: Tower) -> int:
    return next(m.in_features for m in tower.modules() if isinstance(m, nn.Linear))


class MutualLearning(MultiTaskModel):
    """Any :class:`MultiTaskModel` with CTFM at its towers' entry and GKD for training.

    The base model keeps its embedding and backbone; its towers are replaced by towers reading
    ``concat(h_t, CTFM_t)``. ``arch`` is the base architecture's name (the config says
    ``mutual_learning=True``), so ``build_model(arch, ..., **asdict(config))`` rebuilds it.
    """

    def __init__(self, base: MultiTaskModel, config):
        nn.Module.__init__(self)  # not MultiTaskModel.__init__: the base model owns the embedding layer
        if len(base.tasks) < 2:
            raise ValueError("mutual learning across task towers needs at least two tasks")
        self.schema, self.tasks, self.config, self.arch = base.schema, base.tasks, config, base.arch
        in_dim = _tower_in_dim(base.towers[0])
        del base.towers  # replaced below
        self.base = base
        self.ctfm = CTFM(len(self.tasks), in_dim, config.ctfm_dim) if config.ctfm else None
        self.build_towers(in_dim + (config.ctfm_dim if config.ctfm else 0))
        z = self.towers[0].mlp.output_dim
        self.gkd = (nn.ModuleList(Tower(len(self.tasks) * z, config.gkd_hidden, config.dropout) for _ in self.tasks)
                    if config.gkd else None)

    def _towers(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Tower outputs ``{task: [N]}`` and the towers' last hidden layers."""
        reps = tower_inputs(self.base, inputs)
        if self.ctfm is None:
            hidden = [tower.mlp(h) for tower, h in zip(self.towers, reps, strict=True)]
        else:
            hidden = [tower.mlp(torch.cat([h, c], dim=1))
                      for tower, h, c in zip(self.towers, reps, self.ctfm(reps), strict=True)]
        out = {t.name: tower.out(z).squeeze(-1) for t, tower, z in zip(self.tasks, self.towers, hidden, strict=True)}
        return out, hidden

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._towers(inputs)[0]

    def forward_with_aux(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(tower outputs, global network outputs)``, both ``{task: [N]}`` (for :meth:`aux_losses`)."""
        out, hidden = self._towers(inputs)
        if self.gkd is None:
            return out, {}
        z_all = torch.cat([z.detach() for z in hidden], dim=1)
        return out, {t.name: net(z_all) for t, net in zip(self.tasks, self.gkd, strict=True)}

    def aux_losses(self, out: dict[str, Tensor], aux: dict[str, Tensor],
                   labels: dict[str, Tensor]) -> dict[str, Tensor]:
        """The GKD terms: ``gkd_global`` (the global networks' task losses) and ``gkd_distill``
        (``gkd_weight`` times the sum of the towers' distillation losses)."""
        if self.gkd is None:
            return {}
        by_name = {t.name: t for t in self.tasks}
        distill = []
        for t in self.tasks:
            s, g = out[t.name], aux[t.name].detach()
            if t.kind == "binary":
                distill.append(F.binary_cross_entropy_with_logits(s, torch.sigmoid(g)))
                continue
            if t.condition is None:
                distill.append(F.mse_loss(s, g))
                continue
            rows = labels[by_name[t.condition].label] > 0
            distill.append(F.mse_loss(s[rows], g[rows]) if rows.any() else s.sum() * 0.0)
        return {"gkd_global": sum(task_losses(aux, labels, self.tasks).values()),
                "gkd_distill": self.config.gkd_weight * sum(distill)}
