"""``GET /healthz`` (alive), ``/readyz`` (:meth:`service.runtime.Runtime.readiness`), ``/metrics``
(Prometheus) and ``/models`` (the first variant's model plus every variant; no secrets)."""

# no `from __future__ import annotations`: FastAPI must see the real types of the route signatures
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.routes.errors import answer
from service.runtime import Runtime
from service.schemas import ErrorCode, NotReadyResponse, Readiness, error_responses
from service.serving import NotReady

_500 = {500: "unexpected error (logged with the request id)"}


def router(rt: Runtime) -> APIRouter:
    r = APIRouter(responses=error_responses(_500))

    @r.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @r.get("/readyz", response_model=Readiness,
           description="200 when this replica can answer /rank usefully; ``degraded: true`` (still 200) "
                       "while the feature store is unavailable in degrade mode; 503 otherwise",
           responses=error_responses({503: "not ready: the reasons say why (the readiness report and the error "
                                           "shape in one body, with Retry-After)"}, NotReadyResponse))
    def readyz(request: Request) -> Response:
        reasons, degraded = rt.readiness()
        metrics.set_breaker(rt.breaker_state())
        metrics.set_degraded(bool(degraded) and not reasons)
        if reasons:
            return answer(request, ErrorCode.not_ready, "; ".join(reasons + degraded),
                          extra={"ready": False, "degraded": bool(degraded), "reasons": reasons + degraded})
        if degraded:
            return JSONResponse({"ready": True, "degraded": True, "reasons": degraded})
        return JSONResponse({"ready": True, "degraded": False})

    @r.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.set_breaker(rt.breaker_state())
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @r.get("/models", responses=error_responses({503: "no model loaded (with Retry-After)"}))
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
