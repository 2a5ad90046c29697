"""The naive peer: FastAPI + the PyTorch model in eager mode + one Redis hash per entity.

    NAIVE_MODEL=model.pt NAIVE_REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn bench.naive_peer.app:app --workers 2

What a competent team writes in an afternoon, with no profiling: nothing is deliberately slowed
down, and the obvious things are done right (the model is loaded once per worker, in eval mode,
under ``torch.no_grad``; Redis reads are pipelined; the user's features are sent once and the
model broadcasts them to the items, as the model class does on its own). What it does not do is
the work our service does to be fast: packed values read with one MGET and decoded as whole
arrays, onnxruntime, orjson bytes straight out. Per request:

1. ``HGETALL`` of the user hash and of each item hash, in one pipeline (``decode_responses``);
2. Python lists -> ``torch.tensor`` inputs (missing entities get index 0 and the dense means);
3. the model's forward pass (eager, ``torch.no_grad``), probabilities / seconds per task;
4. fusion ``ctr * cvr * (1 + watch_time) ** 0.2`` (the service's default weights), Python sort;
5. a list of dicts returned through ``response_model`` (FastAPI validates and serialises it).

Environment: ``NAIVE_MODEL`` (checkpoint from :func:`bench.naive_peer.load.save_checkpoint`),
``NAIVE_REDIS_URL``, ``NAIVE_PREFIX`` (default ``naive``), ``NAIVE_TORCH_THREADS`` (intra-op
threads per worker, default 1: 2 workers x 1 thread on 2 cores, as our service's ORT threads).
"""

from __future__ import annotations

import os
from typing import Any

import redis
import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field

from service.contract import FeatureSchema, TaskSpec
from service.settings import Settings
from training.models import build_model

torch.set_num_threads(int(os.environ.get("NAIVE_TORCH_THREADS", "1")))

_ckpt = torch.load(os.environ["NAIVE_MODEL"], map_location="cpu", weights_only=False)
SCHEMA = FeatureSchema.model_validate(_ckpt["schema"])
TASKS = [TaskSpec.model_validate(t) for t in _ckpt["tasks"]]
MODEL = build_model(_ckpt["arch"], SCHEMA, TASKS, **_ckpt["config"])
MODEL.load_state_dict(_ckpt["state_dict"])
MODEL.eval()
CONTEXT_INDEX = {name: {v: i + 1 for i, v in enumerate(vals)} for name, vals in _ckpt["context_vocabs"].items()}
del _ckpt

PREFIX = os.environ.get("NAIVE_PREFIX", "naive")
r = redis.Redis.from_url(os.environ.get("NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0"), decode_responses=True)
WEIGHTS = Settings.model_fields["fusion_weights"].default_factory()  # the service's default weights


class RankRequest(BaseModel):
    user_id: str
    items: list[str] = Field(min_length=1)
    context: dict[str, Any] = {}
    top_k: int | None = None


class Item(BaseModel):
    item_id: str
    score: float
    scores: dict[str, float]


class RankResponse(BaseModel):
    user_id: str
    items: list[Item]


app = FastAPI(title="naive ranker")


def entity_inputs(entity: str, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    sparse = SCHEMA.sparse_of(entity)
    dense = SCHEMA.dense_of(entity)
    seqs = SCHEMA.sequence_of(entity)
    if sparse:
        out[f"{entity}_sparse"] = torch.tensor([[int(row.get(f.name, 0)) for f in sparse] for row in rows],
                                               dtype=torch.long)
    if dense:
        out[f"{entity}_dense"] = torch.tensor([[float(row.get(f.name, f.mean)) for f in dense] for row in rows],
                                              dtype=torch.float32)
    if seqs:
        seq_rows = []
        for row in rows:
            ids = []
            for f in seqs:
                vals = [int(x) for x in row[f.name].split(",")] if row.get(f.name) else []
                ids += (vals + [0] * f.max_len)[:f.max_len]
            seq_rows.append(ids)
        out[f"{entity}_seq"] = torch.tensor(seq_rows, dtype=torch.long)
    return out


def context_inputs(context: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    sparse = SCHEMA.sparse_of("context")
    dense = SCHEMA.dense_of("context")
    if sparse:
        out["context_sparse"] = torch.tensor(
            [[CONTEXT_INDEX[f.name].get(str(context.get(f.name)), 0) for f in sparse]], dtype=torch.long)
    if dense:
        out["context_dense"] = torch.tensor([[float(context.get(f.name, f.mean)) for f in dense]],
                                            dtype=torch.float32)
    return out


@app.get("/healthz")
def healthz():
    return {"ok": True, "pid": os.getpid()}


@app.post("/rank", response_model=RankResponse)
def rank(req: RankRequest):
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(f"{PREFIX}:u:{req.user_id}")
    for item_id in req.items:
        pipe.hgetall(f"{PREFIX}:i:{item_id}")
    found = pipe.execute()
    inputs = {**entity_inputs("user", found[:1]), **entity_inputs("item", found[1:]),
              **context_inputs(req.context)}
    with torch.no_grad():
        out = MODEL(inputs)
    scores = {}
    for t in TASKS:
        x = out[t.name]
        scores[t.name] = (torch.sigmoid(x) if t.kind == "binary" else torch.exp(x.clamp(min=0)) - 1).tolist()
    results = []
    for i, item_id in enumerate(req.items):
        s = {t: scores[t][i] for t in scores}
        fused = s["ctr"] ** WEIGHTS["ctr"] * s["cvr"] ** WEIGHTS["cvr"] * (1 + s["watch_time"]) ** WEIGHTS["watch_time"]
        results.append({"item_id": item_id, "score": fused, "scores": s})
    results.sort(key=lambda x: x["score"], reverse=True)
    if req.top_k:
        results = results[:req.top_k]
    return {"user_id": req.user_id, "items": results}
