"""The operator's routes (only with MTRANK_ADMIN_TOKEN; see :mod:`service.admin`): ``POST
/admin/reload``, ``GET /admin/models``, ``POST /admin/models/load`` and ``/admin/models/unload``."""

# no `from __future__ import annotations`: FastAPI must see the real types of the route signatures
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from service import admin
from service.admin import ModelId, check_bearer
from service.runtime import Runtime
from service.serving import ModelVersion, NotReady, ServingManager


def router(rt: Runtime, token: SecretStr) -> APIRouter:
    def require_admin(authorization: str | None = Header(default=None)) -> ServingManager:
        check_bearer(authorization, token)
        if rt.manager is None:
            raise NotReady("starting")
        return rt.manager

    Admin = Annotated[ServingManager, Depends(require_admin)]
    r = APIRouter(prefix="/admin", tags=["admin"])

    @r.post("/reload")
    def admin_reload(manager: Admin) -> JSONResponse:
        report = manager.reload("admin")
        return JSONResponse(report.as_dict(), status_code=200 if report.ok else 422)

    @r.get("/models")
    def admin_models(manager: Admin) -> JSONResponse:
        return JSONResponse(admin.describe(manager))

    @r.post("/models/load")
    def admin_load(body: ModelId, manager: Admin) -> JSONResponse:
        return JSONResponse(admin.load_model(manager, ModelVersion(body.name, body.version)))

    @r.post("/models/unload")
    def admin_unload(body: ModelId, manager: Admin) -> JSONResponse:
        return JSONResponse(admin.unload_model(manager, ModelVersion(body.name, body.version)))

    return r
