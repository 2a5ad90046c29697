"""The operator's routes (only with MTRANK_ADMIN_TOKEN; see :mod:`service.admin`): ``POST
/admin/reload``, ``GET /admin/models``, ``POST /admin/models/load`` and ``/admin/models/unload``."""

# no `from __future__ import annotations`: FastAPI must see the real types of the route signatures
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr

from service import admin
from service.admin import ModelId, check_bearer
from service.routes.errors import answer
from service.runtime import Runtime
from service.schemas import ErrorCode, error_responses
from service.serving import ModelVersion, NotReady, ServingManager

_AUTH = {401: "no or malformed Authorization: Bearer <token> header", 403: "wrong admin token",
         422: "invalid request (error.field names the first bad field)",
         500: "unexpected error (logged with the request id)", 503: "starting (with Retry-After)"}
_MODEL = {404: "no such version in the store (load) or not loaded (unload)",
          422: "invalid name/version (error.field), or the bundle cannot be loaded (the message says why)"}


def router(rt: Runtime, token: SecretStr) -> APIRouter:
    def require_admin(authorization: str | None = Header(default=None)) -> ServingManager:
        check_bearer(authorization, token)
        if rt.manager is None:
            raise NotReady("starting")
        return rt.manager

    Admin = Annotated[ServingManager, Depends(require_admin)]
    r = APIRouter(prefix="/admin", tags=["admin"], responses=error_responses(_AUTH))

    @r.post("/reload", responses=error_responses({422: "the rebuild failed, the old state serves (error.details: "
                                                       "the report)"}))
    def admin_reload(request: Request, manager: Admin) -> Response:
        report = manager.reload("admin")
        if not report.ok:
            return answer(request, ErrorCode.reload_failed, f"reload failed: {report.error}", details=report.as_dict())
        return JSONResponse(report.as_dict())

    @r.get("/models")
    def admin_models(manager: Admin) -> JSONResponse:
        return JSONResponse(admin.describe(manager))

    @r.post("/models/load", responses=error_responses(_MODEL))
    def admin_load(body: ModelId, manager: Admin) -> JSONResponse:
        return JSONResponse(admin.load_model(manager, ModelVersion(body.name, body.version)))

    @r.post("/models/unload", responses=error_responses({**_MODEL, 409: "the version serves a variant, or the "
                                                                        "config still needs it"}))
    def admin_unload(body: ModelId, manager: Admin) -> JSONResponse:
        return JSONResponse(admin.unload_model(manager, ModelVersion(body.name, body.version)))

    return r
