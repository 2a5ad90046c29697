"""What a rebuild reads from outside the process, besides Redis: the routing config (explicit, or
the implicit one-variant config of the settings), the model store's listing, and the snapshot of
both that the watcher compares between ticks. Shared by the manager and ``mtrank features gc``
(:mod:`service.namespaces`), so both plan from the same inputs."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from service.routing import RoutingConfig, VersionPolicy, implicit_config, load_config, parse_policy
from service.serving import planner
from service.serving.state import ModelVersion
from service.settings import Settings
from service.store import list_versions


def default_policy(settings: Settings) -> VersionPolicy:
    return parse_policy(settings.version_policy)


def read_config(settings: Settings, policy: VersionPolicy | None = None) -> RoutingConfig:
    """MTRANK_ROUTING_CONFIG (:class:`~service.routing.RoutingConfigError` when invalid), else the
    implicit config of MTRANK_MODEL_NAME / _VERSION / MTRANK_FUSION / _WEIGHTS."""
    s = settings
    if not s.routing_config:
        return implicit_config(s.model_name, s.model_version, s.fusion, s.explicit_fusion_weights,
                               policy or default_policy(s))
    return load_config(s.routing_config)


def listing(root: Path, names: Collection[str]) -> dict[str, list[int]]:
    """The versions in the store of each model of ``names`` (ascending)."""
    return {n: list_versions(root, n) for n in names}


def models_in_store(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []


def snapshot(settings: Settings, root: Path, cfg: RoutingConfig | None,
             operator_loaded: Collection[ModelVersion]) -> tuple:
    """The config file's identity and the store listing of every model a rebuild looks at: equal
    snapshots mean nothing on disk changed for the service."""
    names = planner.model_names(cfg, operator_loaded, settings.model_name)
    stat = _stat(settings.routing_config) if settings.routing_config else None
    return (stat, tuple((n, tuple(list_versions(root, n))) for n in names))


def _stat(path: str | os.PathLike) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
