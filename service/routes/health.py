"""``GET /healthz`` (alive), ``/readyz`` (:meth:`service.runtime.Runtime.readiness`), ``/metrics``
(Prometheus) and ``/models`` (the first variant's model plus every variant; no secrets)."""

# no `from __future__ import annotations`: FastAPI must see the real types of the route signatures
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.runtime import Runtime
from service.schemas import ErrorResponse, Readiness
from service.serving import NotReady


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @r.get("/readyz", response_model=Readiness,
           description="200 when this replica can answer /rank usefully; ``degraded: true`` (still 200) "
                       "while the feature store is unavailable in degrade mode; 503 otherwise",
           responses={503: {"model": Readiness, "description": "not ready: the reasons say why"}})
    def readyz() -> JSONResponse:
        reasons, degraded = rt.readiness()
        metrics.set_breaker(rt.breaker_state())
        metrics.set_degraded(bool(degraded) and not reasons)
        if reasons:
            return JSONResponse({"ready": False, "degraded": bool(degraded), "reasons": reasons + degraded},
                                status_code=503)
        if degraded:
            return JSONResponse({"ready": True, "degraded": True, "reasons": degraded})
        return JSONResponse({"ready": True, "degraded": False})

    @r.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.set_breaker(rt.breaker_state())
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @r.get("/models", responses={503: {"model": ErrorResponse, "description": "no model loaded"}})
    def models() -> JSONResponse:
        st = rt.serving
        if st is None:
            raise NotReady(f"model not loaded: {rt.not_ready}")
        v = st.primary
        b, m = v.bundle, v.bundle.manifest
        return JSONResponse({
            "name": m.name, "version": m.version, "architecture": m.architecture,
            "tasks": [t.model_dump() for t in m.tasks],
            "provider": b.provider, "session_providers": b.session_providers,
            "requested_providers": b.requested_providers,
            "inputs": [i.name for i in m.inputs], "outputs": list(m.outputs),
            "metrics": m.metrics, "created_at": m.created_at.isoformat(), "sha256": m.sha256,
            "fusion": {"name": v.ranker.fusion_name, "weights": v.ranker.weights},
            "variants": [{"name": x.name, "buckets": [x.first, x.last], "model": x.ranker.model_ref,
                          "fusion": {"name": x.ranker.fusion_name, "weights": x.ranker.weights}}
                         for x in st.variants],
        })

    return r
