"""Inputs of the naive peer: the torch checkpoint and one Redis hash per entity.

* :func:`save_checkpoint` - ``torch.save`` of the trained model's state dict with what is needed to
  rebuild it (architecture, config, feature schema, tasks) and the context vocabularies.
* :func:`load_hashes` - ``HSET <prefix>:u:<user_id> field value ...`` per user and
  ``<prefix>:i:<item_id>`` per item: sparse fields as their vocabulary index, dense fields as
  decimal strings, sequences as comma-joined ids. Encoded with the bundle's own schema and
  vocabularies (the same code path as ``mtrank features load``), so both services see the same
  feature values and only the storage layout differs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from service.contract import MANIFEST_FILE, VOCAB_FILE, BundleManifest


def save_checkpoint(model, path: str | Path, vocabs: dict[str, list[str]]) -> Path:
    import torch

    schema = model.schema
    ctx_vocabs = {f.name: vocabs[f.name] for f in schema.sparse_of("context")}
    torch.save({
        "arch": model.arch,
        "config": dataclasses.asdict(model.config),
        "schema": schema.model_dump(mode="json"),
        "tasks": [t.model_dump(mode="json") for t in model.tasks],
        "context_vocabs": ctx_vocabs,
        "state_dict": model.state_dict(),
    }, str(path))
    return Path(path)


def load_hashes(data: str | Path, bundle_dir: str | Path, client, prefix: str = "naive",
                chunk: int = 1000) -> dict:
    """Write every user and item of ``data`` as a hash; returns counts and seconds."""
    from training.data.dataset import encode_entities, read_raw

    t0 = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    manifest = BundleManifest.from_json((bundle_dir / MANIFEST_FILE).read_text())
    vocabs = json.loads((bundle_dir / VOCAB_FILE).read_text())
    schema = manifest.feature_schema
    raw = read_raw(data)
    counts = {}
    for entity, tag in (("user", "u"), ("item", "i")):
        table = encode_entities(raw, schema, vocabs, entity)
        sp = [f.name for f in schema.sparse_of(entity)]
        de = [f.name for f in schema.dense_of(entity)]
        sq = schema.sequence_of(entity)
        sparse = table.sparse.tolist()
        dense = table.dense.tolist()
        seq = table.seq.tolist()
        ids = [str(i) for i in table.ids]
        pipe = client.pipeline(transaction=False)
        for r, eid in enumerate(ids):
            mapping = {name: str(v) for name, v in zip(sp, sparse[r], strict=True)}
            mapping.update({name: repr(float(v)) for name, v in zip(de, dense[r], strict=True)})
            start = 0
            for f in sq:
                mapping[f.name] = ",".join(str(x) for x in seq[r][start:start + f.max_len])
                start += f.max_len
            pipe.hset(f"{prefix}:{tag}:{eid}", mapping=mapping)
            if (r + 1) % chunk == 0:
                pipe.execute()
        pipe.execute()
        counts[entity] = len(ids)
    return {"users": counts["user"], "items": counts["item"], "seconds": round(time.perf_counter() - t0, 2)}
