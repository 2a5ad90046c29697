"""MMoE: shared experts, one softmax gate per task over them, one tower per task.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018.

The experts and gates are :class:`MMoEBlock`, a backbone DTRN reuses on its task-specific inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from service.contract import FeatureSchema, TaskSpec
from training.models.blocks import Experts, Gate, ModelConfig, MultiTaskModel, Parts, mix


@dataclass
class MMoEConfig(ModelConfig):
    n_experts: int = 4
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])


class MMoEBlock(nn.Module):
    """``n_experts`` shared experts and one gate per task: ``T x [N, in] -> T x [N, expert_hidden[-1]]``.

    Task k's gate, on task k's input, mixes the experts' outputs on task k's input. With one input
    for every task (plain MMoE) the experts run once; with task-specific inputs (DTRN's bottom
    representations) the same experts run on each task's input, in one batched call.
    """

    def __init__(self, n_tasks: int, in_dim: int, cfg: MMoEConfig):
        super().__init__()
        self.experts = Experts(cfg.n_experts, in_dim, cfg.expert_hidden, cfg.dropout, cfg.batch_norm)
        self.gates = nn.ModuleList(Gate(in_dim, cfg.n_experts) for _ in range(n_tasks))
        self.output_dim = self.experts.output_dim

    def forward(self, task_inputs: list[Tensor | Parts]) -> list[Tensor]:
        x0 = task_inputs[0]
        if all(x is x0 for x in task_inputs):
            e = self.experts(x0)  # [N, E, d]
            return [mix(gate(x0), e) for gate in self.gates]
        e = self.experts(torch.stack(task_inputs).flatten(0, 1)).unflatten(0, (len(task_inputs), -1))  # [T, N, E, d]
        return [mix(gate(x), e[k]) for k, (gate, x) in enumerate(zip(self.gates, task_inputs, strict=True))]


class MMoE(MultiTaskModel):
    arch = "mmoe"

    def __init__(self, schema: FeatureSchema, tasks: list[TaskSpec], config: MMoEConfig | None = None):
        super().__init__(schema, tasks, config or MMoEConfig())
        self.backbone = MMoEBlock(len(self.tasks), self.embedding.output_dim, self.config)
        self.build_towers(self.backbone.output_dim)

    def task_inputs(self, x: Tensor) -> list[Tensor]:
        return self.backbone([x] * len(self.tasks))
