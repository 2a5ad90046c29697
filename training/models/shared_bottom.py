"""Shared-Bottom: one MLP shared by all tasks, then one tower per task (Caruana 1997)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from service.contract import FeatureSchema, TaskSpec
from training.models.blocks import MLP, ModelConfig, MultiTaskModel


@dataclass
class SharedBottomConfig(ModelConfig):
    bottom_hidden: list[int] = field(default_factory=lambda: [128, 64])


class SharedBottom(MultiTaskModel):
    arch = "shared_bottom"

    def __init__(self, schema: FeatureSchema, tasks: list[TaskSpec], config: SharedBottomConfig | None = None):
        super().__init__(schema, tasks, config or SharedBottomConfig())
        self.bottom = MLP(self.embedding.output_dim, self.config.bottom_hidden, self.config.dropout,
                          batch_norm=self.config.batch_norm)
        self.build_towers(self.bottom.output_dim)

    def task_inputs(self, x: Tensor) -> list[Tensor]:
        h = self.bottom(x)
        return [h] * len(self.tasks)
