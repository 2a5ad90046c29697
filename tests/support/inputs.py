"""Random model inputs for a feature schema: torch tensors for the training models' own tests and
numpy rows for parity checks of an exported bundle against onnxruntime."""

from __future__ import annotations

import numpy as np
import torch

from service.contract import FeatureSchema, model_inputs

#: rows of a parity check
ROWS = 1000


def random_inputs(schema: FeatureSchema, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One row per exposure (Bu = Bc = n); sequences have some padding."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for mi in model_inputs(schema):
        if mi.kind == "dense":
            cols = [schema.field(f) for f in mi.fields]
            out[mi.name] = torch.stack([f.mean + f.std * torch.randn(n, generator=g) for f in cols], 1)
        elif mi.kind == "sparse":
            out[mi.name] = torch.stack([torch.randint(0, schema.field(f).vocab_size, (n,), generator=g)
                                        for f in mi.fields], 1)
        else:
            parts = []
            for f in (schema.field(name) for name in mi.fields):
                ids = torch.randint(1, schema.field(f.vocab_of).vocab_size, (n, f.max_len), generator=g)
                keep = torch.arange(f.max_len) < torch.randint(0, f.max_len + 1, (n, 1), generator=g)
                parts.append(ids * keep)
            out[mi.name] = torch.cat(parts, 1)
    return out


def one_user(schema: FeatureSchema, inputs: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(row-0 user/context at batch 1, the same repeated at batch N), items unchanged."""
    entity = {mi.name: mi.entity for mi in model_inputs(schema)}
    b1 = {k: v if entity[k] == "item" else v[:1] for k, v in inputs.items()}
    bn = {k: v if entity[k] == "item" else v[:1].expand(len(inputs["item_sparse"]), -1).clone()
          for k, v in inputs.items()}
    return b1, bn


def parity_rows(schema: FeatureSchema, n: int = ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for mi in model_inputs(schema):
        fields = [schema.field(f) for f in mi.fields]
        if mi.kind == "dense":
            out[mi.name] = np.stack([f.mean + f.std * rng.standard_normal(n) for f in fields], 1).astype(np.float32)
        elif mi.kind == "sparse":
            out[mi.name] = np.stack([rng.integers(0, f.vocab_size, n) for f in fields], 1)
        else:
            parts = []
            for f in fields:
                ids = rng.integers(1, schema.field(f.vocab_of).vocab_size, (n, f.max_len))
                parts.append(ids * (np.arange(f.max_len) < rng.integers(0, f.max_len + 1, (n, 1))))
            out[mi.name] = np.concatenate(parts, 1).astype(np.int64)
    return out
