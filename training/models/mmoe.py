"""MMoE: shared experts, one softmax gate per task over them, one tower per task.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from service.contract import FeatureSchema, TaskSpec
from training.models.blocks import Experts, Gate, ModelConfig, MultiTaskModel, mix


@dataclass
class MMoEConfig(ModelConfig):
    n_experts: int = 4
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])


class MMoE(MultiTaskModel):
    arch = "mmoe"

    def __init__(self, schema: FeatureSchema, tasks: list[TaskSpec], config: MMoEConfig | None = None):
        super().__init__(schema, tasks, config or MMoEConfig())
        cfg, d = self.config, self.embedding.output_dim
        self.experts = Experts(cfg.n_experts, d, cfg.expert_hidden, cfg.dropout, cfg.batch_norm)
        self.gates = nn.ModuleList(Gate(d, cfg.n_experts) for _ in self.tasks)
        self.build_towers(self.experts.output_dim)

    def task_inputs(self, x: Tensor) -> list[Tensor]:
        return mix_per_task(self.experts, self.gates, [x] * len(self.tasks))


def mix_per_task(experts: Experts, gates: nn.ModuleList, task_inputs: list[Tensor]) -> list[Tensor]:
    """Task k's gate, on task k's input, mixes the experts' outputs on task k's input.

    With one input for every task (plain MMoE) the experts run once. With task-specific inputs
    (DTRN's bottom representations) the same experts run on each task's input, in one batched call.
    """
    x0 = task_inputs[0]
    if all(x is x0 for x in task_inputs):
        e = experts(x0)  # [N, E, d]
        return [mix(gate(x0), e) for gate in gates]
    e = experts(torch.stack(task_inputs).flatten(0, 1)).unflatten(0, (len(task_inputs), -1))  # [T, N, E, d]
    return [mix(gate(x), e[k]) for k, (gate, x) in enumerate(zip(gates, task_inputs))]
