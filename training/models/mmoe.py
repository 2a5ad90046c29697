"""MMoE: shared experts, one softmax gate per task over them, one tower per task.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        self.experts = Experts(cfg.n_experts, d, cfg.expert_hidden, cfg.dropout)
        self.gates = nn.ModuleList(Gate(d, cfg.n_experts) for _ in self.tasks)
        self.build_towers(self.experts.output_dim)

    def task_inputs(self, x: Tensor) -> list[Tensor]:
        e = self.experts(x)  # [N, E, d]
        return [mix(gate(x), e) for gate in self.gates]
