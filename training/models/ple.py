"""PLE: stacked CGC extraction layers with task-specific and shared experts.

Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020.

Per level (a CGC layer), with T tasks: ``task_experts`` experts per task plus ``shared_experts``
shared ones, all of the same shape, so they are ONE :class:`Experts` group laid out as
``[task 0 experts, task 1 experts, ..., shared experts]``. Task k's experts read task k's input,
the shared experts read the shared input. Task k's gate (on task k's input) mixes its own experts
and the shared ones; in a non-final level a shared gate (on the shared input) mixes ALL experts
into the next level's shared input. The final level's task outputs feed the towers. At level 1
every input is the embedding output; DTRN instead gives each task its own level-1 input, and the
shared experts then read the mean of them (:class:`PLEBlock` serves both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from service.contract import FeatureSchema, TaskSpec
from training.models.blocks import Experts, Gate, ModelConfig, MultiTaskModel, Parts, mix


@dataclass
class PLEConfig(ModelConfig):
    levels: int = 2
    shared_experts: int = 2
    task_experts: int = 1
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])


class CGC(nn.Module):
    """One extraction level: ``(task_inputs [T x [N, in]], shared [N, in]) -> (task_outputs, shared_out)``."""

    def __init__(self, n_tasks: int, in_dim: int, cfg: PLEConfig, final: bool):
        super().__init__()
        te, se = cfg.task_experts, cfg.shared_experts
        n = n_tasks * te + se
        self.experts = Experts(n, in_dim, cfg.expert_hidden, cfg.dropout, cfg.batch_norm)
        # which of the T+1 inputs (tasks..., shared) each expert reads
        self.input_of_expert = [k for k in range(n_tasks) for _ in range(te)] + [n_tasks] * se
        # the experts task k's gate mixes: its own, then the shared ones
        shared = list(range(n_tasks * te, n))
        self.register_buffer("task_gate_experts", torch.tensor(
            [list(range(k * te, (k + 1) * te)) + shared for k in range(n_tasks)]), persistent=False)
        self.task_gates = nn.ModuleList(Gate(in_dim, te + se) for _ in range(n_tasks))
        self.shared_gate = None if final else Gate(in_dim, n)
        self.output_dim = self.experts.output_dim

    def forward(self, task_inputs: list[Tensor], shared: Tensor) -> tuple[list[Tensor], Tensor | None]:
        inputs = [*task_inputs, shared]  # at level 1 (PLE) one tensor for everyone: one GEMM
        e = self.experts([inputs[j] for j in self.input_of_expert])
        outs = [mix(gate(x), e[:, self.task_gate_experts[k]])
                for k, (gate, x) in enumerate(zip(self.task_gates, task_inputs, strict=True))]
        return outs, (None if self.shared_gate is None else mix(self.shared_gate(shared), e))


class PLEBlock(nn.Module):
    """``cfg.levels`` CGC layers: ``T x [N, in] -> T x [N, expert_hidden[-1]]`` (the final level's task outputs).

    The first level reads ``in_dim``, the others the experts' output size. The shared input of the
    first level is the tasks' one input when they all read the same (PLE), else the mean of the
    task inputs (DTRN's task-specific bottom representations)."""

    def __init__(self, n_tasks: int, in_dim: int, cfg: PLEConfig):
        super().__init__()
        if cfg.levels < 1:
            raise ValueError("PLE needs levels >= 1")
        dims = [in_dim] + [cfg.expert_hidden[-1]] * (cfg.levels - 1)
        self.levels = nn.ModuleList(CGC(n_tasks, d, cfg, final=i == cfg.levels - 1) for i, d in enumerate(dims))
        self.output_dim = cfg.expert_hidden[-1]

    def forward(self, task_inputs: list[Tensor | Parts]) -> list[Tensor]:
        x0 = task_inputs[0]
        shared = x0 if all(x is x0 for x in task_inputs) else torch.stack(task_inputs).mean(0)
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)
        return task_inputs


class PLE(MultiTaskModel):
    arch = "ple"

    def __init__(self, schema: FeatureSchema, tasks: list[TaskSpec], config: PLEConfig | None = None):
        super().__init__(schema, tasks, config or PLEConfig())
        self.backbone = PLEBlock(len(self.tasks), self.embedding.output_dim, self.config)
        self.build_towers(self.backbone.output_dim)

    def task_inputs(self, x: Tensor) -> list[Tensor]:
        return self.backbone([x] * len(self.tasks))
