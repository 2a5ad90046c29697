"""In-process floor of one /rank: Redis MGET + decode + onnxruntime + fusion + sort + serialise,
no HTTP. Prints a table (latency percentiles and per-stage means) and writes JSON to
bench/results/.

    python bench/floor.py --data data/synth --store model_store --model-name demo

Needs the features loaded (`mtrank features load`) in the Redis of MTRANK_REDIS_URL.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import redis

from service.ranking import STAGES, Ranker
from service.schemas import RankRequest
from service.settings import Settings
from service.store import load_bundle
from training.data.spec import load_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synth")
    p.add_argument("--sizes", default="100,500,1000")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--out", default="bench/results/floor.json")
    args, _ = p.parse_known_args()
    settings = Settings()
    bundle = load_bundle(settings.model_store, settings.model_name, settings.model_version,
                         providers=settings.provider_list, intra_op_threads=settings.ort_intra_op_threads)
    ranker = Ranker(settings, bundle, redis.Redis.from_url(settings.redis_url))
    spec = load_spec(args.data)
    ex = pd.read_parquet(spec.path(spec.exposures.path), columns=[spec.exposures.user_key, spec.exposures.item_key])
    users = ex[spec.exposures.user_key].astype(str).unique()
    items = ex[spec.exposures.item_key].astype(str).unique()
    rng = np.random.default_rng(0)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        reqs = [RankRequest(user_id=str(rng.choice(users)), items=list(rng.choice(items, n, replace=False)))
                for _ in range(args.requests)]
        for r in reqs[:10]:  # warm-up
            ranker.rank_result(r)
        totals, stages = [], {s: [] for s in STAGES}
        for r in reqs:
            t0 = time.perf_counter()
            res = ranker.rank_result(r)
            totals.append(time.perf_counter() - t0)
            for s in STAGES:
                stages[s].append(res.timings.get(s, 0.0))
        ms = np.array(totals) * 1e3
        row = {"n": n, "requests": len(reqs), "p50_ms": float(np.percentile(ms, 50)),
               "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
               "rank_per_s": float(1e3 / ms.mean()),
               **{f"{s}_ms": float(np.mean(v) * 1e3) for s, v in stages.items()}}
        rows.append(row)
    cols = list(rows[0])
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "model": {"name": bundle.name, "version": bundle.version},
                               "provider": bundle.provider, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
