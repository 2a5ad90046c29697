"""Multi-task ranking architectures: a registry and a builder.

``ARCHITECTURES[name] = (ModelClass, ConfigClass)``; :func:`build_model` makes one from a schema,
tasks and config overrides (``dataclasses.asdict(model.config)`` round-trips through it).

Every architecture also takes ``mutual_learning=True`` (plus the :class:`MutualConfig` sizes): the
model is then wrapped in :class:`MutualLearning` (Deep Mutual Learning across task towers) and its
config is the architecture's config with the mutual-learning fields added.
"""

from __future__ import annotations

import dataclasses

from service.contract import FeatureSchema, TaskSpec
from training.models.blocks import ModelConfig, MultiTaskModel
from training.models.dtrn import DTRN, DTRNConfig
from training.models.mmoe import MMoE, MMoEConfig
from training.models.mutual import MUTUAL_KEYS, MutualConfig, MutualLearning, with_mutual
from training.models.ple import PLE, PLEConfig
from training.models.shared_bottom import SharedBottom, SharedBottomConfig

ARCHITECTURES: dict[str, tuple[type[MultiTaskModel], type[ModelConfig]]] = {
    "shared_bottom": (SharedBottom, SharedBottomConfig),
    "mmoe": (MMoE, MMoEConfig),
    "ple": (PLE, PLEConfig),
    "dtrn": (DTRN, DTRNConfig),
}


def build_model(arch: str, schema: FeatureSchema, tasks: list[TaskSpec], **config_overrides) -> MultiTaskModel:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[arch]
    known = {f.name for f in dataclasses.fields(with_mutual(config_cls))}
    unknown = set(config_overrides) - known
    if unknown:
        raise ValueError(f"{arch}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    mutual = bool(config_overrides.pop("mutual_learning", False))
    mutual_args = {k: config_overrides.pop(k) for k in MUTUAL_KEYS & set(config_overrides)}
    if mutual_args and not mutual:
        raise ValueError(f"{arch}: {sorted(mutual_args)} need mutual_learning=True")
    model = model_cls(schema, tasks, config_cls(**config_overrides))
    if not mutual:
        return model
    return MutualLearning(model, with_mutual(config_cls)(**config_overrides, **mutual_args, mutual_learning=True))


__all__ = ["ARCHITECTURES", "MultiTaskModel", "build_model", "DTRN", "DTRNConfig", "MMoE", "MMoEConfig",
           "MutualConfig", "MutualLearning", "PLE", "PLEConfig", "SharedBottom", "SharedBottomConfig"]
