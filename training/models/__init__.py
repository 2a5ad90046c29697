"""Multi-task ranking architectures: a registry and a builder.

``ARCHITECTURES[name] = (ModelClass, ConfigClass)``; :func:`build_model` makes one from a schema,
tasks and config overrides (``dataclasses.asdict(model.config)`` round-trips through it).
"""

from __future__ import annotations

import dataclasses

from service.contract import FeatureSchema, TaskSpec
from training.models.blocks import ModelConfig, MultiTaskModel
from training.models.mmoe import MMoE, MMoEConfig
from training.models.ple import PLE, PLEConfig
from training.models.shared_bottom import SharedBottom, SharedBottomConfig

ARCHITECTURES: dict[str, tuple[type[MultiTaskModel], type[ModelConfig]]] = {
    "shared_bottom": (SharedBottom, SharedBottomConfig),
    "mmoe": (MMoE, MMoEConfig),
    "ple": (PLE, PLEConfig),
}


def build_model(arch: str, schema: FeatureSchema, tasks: list[TaskSpec], **config_overrides) -> MultiTaskModel:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[arch]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(config_overrides) - known
    if unknown:
        raise ValueError(f"{arch}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    return model_cls(schema, tasks, config_cls(**config_overrides))


__all__ = ["ARCHITECTURES", "MultiTaskModel", "build_model", "MMoE", "MMoEConfig", "PLE", "PLEConfig",
           "SharedBottom", "SharedBottomConfig"]
