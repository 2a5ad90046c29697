"""The operator's API: bearer-token check, request bodies and the answers (the routes are in
:mod:`service.routes.admin`).

The token comes from ``MTRANK_ADMIN_TOKEN`` only and is compared in constant time
(:func:`hmac.compare_digest`); it is never logged or echoed. Without a token the admin routes do
not exist (404). A missing or malformed ``Authorization`` header is 401, a wrong token 403.
Model names and versions are validated before any path is built from them, so they cannot leave
the store (no ``..``, no separators, no leading dot; versions are integers).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from service.routing import NAME_PATTERN, is_safe_name
from service.serving import LoadedBundle, ModelVersion, ServingManager

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mtrank-admin"'}


def check_bearer(authorization: str | None, token: SecretStr) -> None:
    """Raise 401 (no/malformed ``Authorization: Bearer <token>``) or 403 (wrong token)."""
    if authorization is None or not authorization.strip():
        raise HTTPException(401, "missing Authorization: Bearer <token> header", headers=_CHALLENGE)
    scheme, _, cred = authorization.strip().partition(" ")
    cred = cred.strip()
    if scheme.lower() != "bearer" or not cred or any(c.isspace() for c in cred):
        raise HTTPException(401, "malformed Authorization header: expected 'Bearer <token>'", headers=_CHALLENGE)
    if not hmac.compare_digest(cred.encode("utf-8"), token.get_secret_value().encode("utf-8")):
        raise HTTPException(403, "wrong admin token")


class ModelId(BaseModel):
    """One bundle version in the store: ``{"name": "demo", "version": 3}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"model name: {NAME_PATTERN}, no '..'")
    version: int = Field(ge=1, description="version number")

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not is_safe_name(v):
            raise ValueError(f"must be one plain name ({NAME_PATTERN}, no '..'): no path separators or dots first")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _int(cls, v):
        number = isinstance(v, int) or (isinstance(v, str) and v.isascii() and v.isdecimal())
        if isinstance(v, bool) or not number:
            raise ValueError("must be a version number")
        return v


def describe_bundle(manager: ServingManager, lb: LoadedBundle) -> dict[str, Any]:
    """One held bundle as ``GET /admin/models`` lists it."""
    b = lb.bundle
    st = manager.state
    return {"name": b.name, "version": b.version, "precision": b.precision,
            "architecture": b.manifest.architecture, "path": str(b.path),
            "sha256": b.manifest.model_file(b.precision)[1], "provider": b.provider,
            "tasks": b.tasks, "features_confirmed": lb.features_confirmed, "features_lost": lb.features_lost,
            "loaded_at": lb.loaded_at, "used_by": st.users_of(lb.key) if st is not None else [],
            "operator_loaded": lb.key.model_version in manager.operator_loaded and b.precision == "fp32"}


def describe(manager: ServingManager) -> dict[str, Any]:
    """``GET /admin/models``: generation, readiness, held and refused bundles, the routing, the last
    reload. Taken under the manager's lock (a consistent view: waits for a rebuild in progress)."""
    with manager.lock:
        st = manager.state
        out: dict[str, Any] = {
            "generation": manager.generation,
            "ready": st is not None,
            "not_ready": manager.not_ready,
            "routing_config": st.config.source if st is not None else manager.config_path,
            "bundles": [describe_bundle(manager, lb) for _, lb in sorted(manager.bundles.held.items())],
            "refused": [{"name": k.name, "version": k.version, "precision": k.precision, "reason": r.reason,
                         "retried_each_poll": r.transient}
                        for k, r in sorted(manager.bundles.refused.items())],
            "unloaded_by_operator": [{"name": n, "version": v} for n, v in sorted(manager.held_out)],
            "last_reload": manager.last_report.as_dict() if manager.last_report else None,
            "last_error": manager.last_error,
        }
        if st is not None:
            cfg = st.config
            out["routing"] = {
                "salt": cfg.salt, "buckets": cfg.buckets, "allow_force": cfg.allow_force,
                "ranking_layer": cfg.ranking_layer,
                "variants": [{"name": v.name, "buckets": [v.first, v.last], "model_spec": v.model_spec,
                              "model": v.ranker.model_ref, "precision": v.bundle.precision,
                              "fusion": {"name": v.ranker.fusion_name, "weights": v.ranker.weights}}
                             for v in st.variants],
            }
        return out


def load_model(manager: ServingManager, mv: ModelVersion) -> dict[str, Any]:
    """``POST /admin/models/load``'s answer (:class:`~service.serving.OperatorError` when refused)."""
    lb, report = manager.load_model(mv)
    if report is None:
        return {"loaded": False, "already": True, "bundle": describe_bundle(manager, lb)}
    return {"loaded": True, "already": False, "report": report.as_dict(), "bundle": describe_bundle(manager, lb)}


def unload_model(manager: ServingManager, mv: ModelVersion) -> dict[str, Any]:
    """``POST /admin/models/unload``'s answer (:class:`~service.serving.OperatorError` when refused)."""
    return {"unloaded": True, "report": manager.unload_model(mv).as_dict()}
