"""``POST /rank``: parse the body (:mod:`service.limits`), route the user, rank, answer the bytes."""

# no `from __future__ import annotations`: FastAPI must see the real types of the route signatures
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from service import columnar, limits, metrics
from service.middleware import RequestInfo
from service.runtime import Runtime
from service.schemas import DUPLICATES_DOC, RankRequest, RankResponse, error_responses, rank_request_model
from service.serving import NotReady

FORCE_HEADER = "X-Mtrank-Variant"
RANK_DESCRIPTION = f"""Score the candidate items for one user and return them sorted by the fused score.

Limits: at most MTRANK_MAX_ITEMS items, ids of at most MTRANK_MAX_ID_LENGTH characters, top_k at
most MTRANK_MAX_ITEMS, a body of at most MTRANK_MAX_BODY_BYTES (413), context keys of the model's
feature schema only (422). {DUPLICATES_DOC} The request id (X-Request-Id header, else the body's
request_id, else generated) is echoed in the X-Request-Id response header. Beyond the worker's
queue-time target (MTRANK_SHED_QUEUE_MS) or queue bound the answer is 429 with Retry-After."""
RESPONSES: dict[int | str, dict[str, Any]] = error_responses({
    413: "body larger than MTRANK_MAX_BODY_BYTES", 415: "body is not JSON",
    422: "invalid request: error.field names the first bad field, error.details all of them",
    429: "overloaded: no slot within MTRANK_SHED_QUEUE_MS (with Retry-After)",
    500: "unexpected error (logged with the request id)",
    503: "model not loaded, or feature store unavailable in fail mode (with Retry-After)"})
RESPONSES[200] = columnar.openapi_200()  # the columnar shape beside the default application/json one


def router(rt: Runtime) -> APIRouter:
    s = rt.settings
    RankRequestModel = rank_request_model(s.max_items, s.max_id_length)
    request_schema = RankRequestModel.model_json_schema()
    assert "$defs" not in request_schema  # inlined below: no references to resolve
    r = APIRouter()

    async def rank_body(request: Request) -> RankRequest:
        """The body, parsed here (strict JSON, the configured limits) rather than by FastAPI; large
        bodies and long error lists off the event loop (:func:`service.limits.parse_body_off_loop`)."""
        info: RequestInfo = request.state.info
        try:
            body = await limits.parse_body_off_loop(await request.body(), request.headers.get("content-type"),
                                                    RankRequestModel)
        except (HTTPException, RequestValidationError) as e:
            info.error = type(e).__name__ if isinstance(e, RequestValidationError) else "UnsupportedMediaType"
            raise
        info.adopt_body_id(body)
        info.n_items = len(body.items)
        return body

    @r.post("/rank", response_model=RankResponse, description=RANK_DESCRIPTION, responses=RESPONSES,
            openapi_extra={"requestBody": {"required": True,
                                           "content": {"application/json": {"schema": request_schema}}}})
    def rank(request: Request, body: Annotated[RankRequest, Depends(rank_body)],
             x_mtrank_variant: str | None = Header(default=None, alias=FORCE_HEADER,
                                                   description="force a variant (QA; only when the config "
                                                               "allows it)")) -> Response:
        info: RequestInfo = request.state.info
        request.state.request_id = body.request_id
        st = rt.serving  # the one read of the serving state: this request's whole world
        try:
            if st is None:
                raise NotReady(f"model not loaded: {rt.not_ready}")
            route = st.route(body.user_id, x_mtrank_variant)
            info.routed(route)
            as_columns = columnar.wants_columnar(request.headers.get("accept"))
            result = route.variant.ranker.rank_result(body, route.bucket, columnar=as_columns)
        except Exception as e:
            info.error = type(e).__name__
            raise
        finally:
            metrics.set_breaker(rt.breaker_state())
        info.result = result
        metrics.set_degraded(result.degraded is not None)  # also set by /readyz: the latest finding wins
        if route.forced:
            metrics.count_forced(route.variant.name)
        if rt.predlog is not None:
            rt.predlog.offer(body, route, result)
        return Response(content=result.body, media_type=columnar.MEDIA_TYPE if as_columns else "application/json")

    return r
