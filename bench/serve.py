"""Serving benchmark (issue 5): our service against its in-process floor and a naive peer.

    python bench/serve.py                  # full run: N = 100, 500, 1000; c = 1, 8, 32; 15 s a cell
    python bench/serve.py --soak 600       # ... plus a 10-minute memory soak of our service
    python bench/serve.py --quick          # smoke run on tiny data (about a minute), output to a temp dir

One run, on one trained PLE and one Redis with the same features loaded:

1. **Assets** (cached under ``--workdir``, default ``$TMPDIR/mtrank-bench-serve``, keyed by the
   settings and by the sources they depend on): synthetic data from ``training.data.synth`` (100k
   users, 200k items) widened to the issue's schema (24 sparse fields of dim 16, 8 dense fields,
   2 sequences: see :func:`widen`); a PLE (2 levels, 2 shared + 1 specific expert per task,
   experts [256, 128]) trained 1 epoch on a prefix of the log through ``training.train.train``
   (the ``mtrank train`` code path, which also exports the bundle and runs its parity gate); the
   trained torch model saved for the naive peer; fp32 (and int8, when the bundle has
   ``model.int8.onnx``) AUC on the test split with onnxruntime.
2. **Redis**: a redis-server the benchmark starts on a free port (and stops); features loaded
   with ``mtrank features load`` (packed bytes, ours) and as one hash per entity (the naive peer).
3. **Requests**: per N, ``--bodies`` JSON bodies: a uniform random user, N distinct items drawn
   with Zipf popularity (exponent ``--zipf`` over the items ranked by exposures in the log), a
   random context. The floor and every server get the same bodies.
4. **Systems**
   * ``floor``: in-process, no HTTP: the service's own ranker (built by its ServingManager) with
     1 onnxruntime thread and no item cache, called in a loop over the bodies: one Redis MGET,
     decode, onnxruntime, fusion, sort, response bytes. Single process; "x2" = scaled to 2 cores.
   * ``naive``: ``bench/naive_peer`` under uvicorn, 2 workers x 1 torch thread.
   * ``ours``: ``mtrank serve`` with its defaults (workers, threads, cache, logs), fp32 bundle
     (which is the user-side-once graph once the export does that: see ``export`` in the JSON).
   * ``ours-nocache``: the same with ``MTRANK_ITEM_CACHE_SIZE=0`` (n/a while the service has no cache).
   * ``ours-int8``: a routing config whose one variant says ``precision: int8``. Without an int8
     file in the bundle: n/a. If the service refuses the key: a copy of the bundle with
     ``model.int8.onnx`` as its model (``bench_int8``), and the description says so.
   * ``floor-int8``: the floor on the int8 variant (same fallbacks).
   * ``floor-unsplit``: the floor on the same trained model exported without the user-side split
     (``ServingModel(request_once=False)``): the fp32 baseline of the "int8 + user side once"
     target. n/a when the export has no such switch.
5. **Load**: wrk (``bench/wrk/rank.lua``) on loopback, 1 thread, closed loop at each concurrency
   for ``--duration`` seconds after a ``--warmup`` per server and N. Per cell: req/s (2xx answers
   that were not degraded; the JSON also has all 2xx and all answers), latency
   p50/p90/p99/p99.9 (wrk's histogram), non-2xx and socket errors, "degraded" answers; CPU seconds
   per request of the server's process tree, of redis-server and of wrk (``/proc/<pid>/stat``
   utime+stime before/after; wrk by ``getrusage(RUSAGE_CHILDREN)``) per useful answer (2xx, not
   degraded), and the CPU the rest of the
   machine used meanwhile (``/proc/stat``: a busy machine shows up there); the per-stage means
   from the service's own timers (``/metrics`` ``mtrank_rank_stage_seconds`` when it exists, else
   the JSON access log); item-cache hit rate when the service exposes one.
6. **Memory**: resident set per worker after warm-up and after the cells, against the model file
   plus the cache budget (also above the RSS of a bare interpreter that imported the service);
   ``--soak S`` runs our service at concurrency 8, N = ``--target-n``, for S seconds, sampling RSS.
7. **Output**: a Markdown table (printed, and ``serve.md``) and ``serve.json`` in ``--out-dir``
   (default ``bench/results/``; a ``--quick`` run writes to a temp dir unless told), with the
   machine, the commit and the issue's target ratios with pass/fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (ROOT, OwnedRedis, cpu_seconds, free_port, git_info, machine_busy,  # noqa: E402
                          machine_info, md_table, parse_prometheus, path_commit, process_tree, rss_bytes,
                          stop_group, worker_pids, write_json)

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "wrk" / "rank.lua"
WRK_TIMEOUT = "30s"  # a slower answer counts as a timeout (a socket error) and is left out of wrk's latencies
STAGES = ("fetch", "assemble", "inference", "fusion", "serialise")
MODEL_NAME = "bench"
INT8_NAME = "bench_int8"  # fallback copy of the bundle with the int8 file as its model (see int8_bundle)
UNSPLIT_NAME = "bench_unsplit"  # the fp32 model exported without the user-side split (see export_unsplit)
MODEL_CFG = {"levels": 2, "shared_experts": 2, "task_experts": 1, "expert_hidden": [256, 128]}
ALL_SYSTEMS = ("floor", "floor-unsplit", "floor-int8", "naive", "ours", "ours-nocache", "ours-int8")
WIDEN_VERSION = 1
BUILD_VERSION = 2  # bump when build_model() changes what it writes: the model cache key holds it
#: rows per onnxruntime run when scoring the test split: about a serving batch. Dynamic int8
#: quantises activations with one scale per batch, so its outputs depend on the batch they are in
EVAL_BATCH = 512  # bump when widen() changes: the data cache key holds it

FULL = dict(users=100_000, items=200_000, exposures=1_000_000, train_rows=600_000, train_threads=0,
            sizes="100,500,1000",
            concurrency="1,8,32", duration=15.0, warmup=3.0, bodies=500, systems=",".join(ALL_SYSTEMS))
QUICK = dict(users=1_000, items=2_000, exposures=20_000, train_rows=20_000, train_threads=1, sizes="100",
             concurrency="1,4",
             duration=2.0, warmup=1.0, bodies=40, systems="floor,naive,ours")


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# =============================================================================================
# assets: data, model, bundle, quality
# =============================================================================================

def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sources_hash(patterns: list[str]) -> str:
    """Hash of the code in the files (Python: its syntax tree without docstrings, so comment and
    docstring edits keep the cache)."""
    import ast

    h = hashlib.sha256()
    for pat in patterns:
        for p in sorted(ROOT.glob(pat)):
            if not p.is_file():
                continue
            h.update(p.relative_to(ROOT).as_posix().encode())
            data = p.read_bytes()
            if p.suffix == ".py":
                try:
                    tree = ast.parse(data)
                    for node in ast.walk(tree):
                        body = getattr(node, "body", None)
                        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                            node.body = body[1:] or [ast.Pass()]
                    data = ast.dump(tree).encode()
                except SyntaxError:
                    pass
            h.update(data)
    return h.hexdigest()[:16]


def widen(data_dir: Path) -> dict:
    """Add derived columns to the synthetic user and item tables and to the spec, so the schema is
    the issue's: 24 sparse fields (emb 16), 8 dense fields, plus the two behaviour sequences.

    ``training.data.synth`` writes 9 sparse (4 user, 3 item, 2 context) and 6 dense (2 user, 4 item)
    fields and its config has no knob for more. The extra fields are derived from the generated
    columns (crosses, quantile buckets, id cohorts; history length; price per minute): real,
    somewhat informative features that give the model the issue's shape and serving cost."""
    import pandas as pd

    from training.data.spec import FeatureSpec, dump_spec, load_spec

    spec = load_spec(data_dir)
    users = pd.read_parquet(data_dir / "users.parquet")
    items = pd.read_parquet(data_dir / "items.parquet")

    def qbucket(x, k=20):
        return pd.qcut(x.rank(method="first"), k, labels=False).astype("int32")

    hist_len = users["clicked_items"].map(len).astype("int32")
    users["age_gender"] = users["age_bucket"].astype(str) + "_" + users["gender"].astype(str)
    users["age_region"] = users["age_bucket"].astype(str) + "_" + users["region"].astype(str)
    users["gender_region"] = users["gender"].astype(str) + "_" + users["region"].astype(str)
    users["activity_bucket"] = qbucket(users["activity"])
    users["tenure_bucket"] = qbucket(users["tenure_days"])
    users["history_len_bucket"] = hist_len
    users["user_cohort"] = (users["user_id"] % 997).astype("int32")
    users["history_len"] = hist_len.astype("float32")
    pb, db = qbucket(items["price"]), qbucket(items["duration_s"])
    items["price_bucket"] = pb
    items["duration_bucket"] = db
    items["popularity_bucket"] = qbucket(items["popularity"])
    items["item_age_bucket"] = qbucket(items["item_age_days"])
    items["category_price"] = items["category"].astype(str) + "_" + pb.astype(str)
    items["category_duration"] = items["category"].astype(str) + "_" + db.astype(str)
    items["creator_cohort"] = (items["creator"] % 101).astype("int32")
    items["item_cohort"] = (items["item_id"] % 997).astype("int32")
    items["price_per_minute"] = (items["price"] / (items["duration_s"] / 60.0)).astype("float32")
    users.to_parquet(data_dir / "users.parquet", index=False)
    items.to_parquet(data_dir / "items.parquet", index=False)

    extra_user_sparse = ["age_gender", "age_region", "gender_region", "activity_bucket", "tenure_bucket",
                         "history_len_bucket", "user_cohort"]
    extra_item_sparse = ["price_bucket", "duration_bucket", "popularity_bucket", "item_age_bucket",
                         "category_price", "category_duration", "creator_cohort", "item_cohort"]
    feats = list(spec.features)
    feats += [FeatureSpec(name=n, entity="user", kind="sparse") for n in extra_user_sparse]
    feats += [FeatureSpec(name="history_len", entity="user", kind="dense")]
    feats += [FeatureSpec(name=n, entity="item", kind="sparse") for n in extra_item_sparse]
    feats += [FeatureSpec(name="price_per_minute", entity="item", kind="dense")]
    spec.features = feats
    dump_spec(spec, data_dir / "dataset.yaml")
    kinds = {k: sum(f.kind == k for f in feats) for k in ("sparse", "dense", "sequence")}
    return {"fields": kinds, "embedding_dim": sorted({f.embedding_dim for f in feats if f.kind == "sparse"}),
            "derived": extra_user_sparse + ["history_len"] + extra_item_sparse + ["price_per_minute"]}


def _synth_cfg(a) -> dict:
    return {"n_users": a.users, "n_items": a.items, "n_exposures": a.exposures, "seed": a.seed}


def data_dir_of(workdir: Path, a) -> Path:
    key = _hash({"cfg": _synth_cfg(a), "widen": WIDEN_VERSION, "src": _sources_hash(["training/data/synth.py"])})
    return workdir / f"data-{key}"


def model_dir_of(workdir: Path, a) -> Path:
    """Keyed by the data, the training settings and every source the bundle depends on (a change to
    the export or the models retrains)."""
    src = _sources_hash(["training/**/*.py", "service/contract.py", "service/codec.py"])
    key = _hash({"data": data_dir_of(workdir, a).name, "rows": a.train_rows, "model": MODEL_CFG, "src": src,
                 "seed": a.seed, "build": BUILD_VERSION})
    return workdir / f"model-{key}"


def build_data(workdir: Path, a) -> tuple[Path, dict]:
    final = data_dir_of(workdir, a)
    if (final / "bench-data.json").exists() and not a.rebuild:
        os.utime(final)  # in use: keep it from prune_cache
        return final, json.loads((final / "bench-data.json").read_text())
    from training.data import synth

    cfg = _synth_cfg(a)
    key = final.name.split("-", 1)[1]
    out = workdir / f".tmp-data-{key}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    log(f"synthesising data: {a.users:,} users, {a.items:,} items, {a.exposures:,} exposures -> {out}")
    synth.generate(out, synth.SynthConfig(**cfg), progress=False)
    info = {"synth_config": cfg, "schema": widen(out), "seconds": round(time.perf_counter() - t0, 1),
            "note": "synth writes 9 sparse + 6 dense fields and has no config for more; the benchmark adds "
                    "derived columns (crosses, buckets, cohorts) to reach 24 sparse + 8 dense (bench/serve.py widen)"}
    (out / "bench-data.json").write_text(json.dumps(info, indent=2))
    return _publish(out, final, "bench-data.json", a.rebuild)


def _publish(tmp: Path, final: Path, marker: str, replace: bool) -> tuple[Path, dict]:
    """Move a finished cache entry into place in one rename; when a concurrent run published the
    same entry first, use that one (unless ``replace``: --rebuild)."""
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists() and (replace or not (final / marker).exists()):
        os.rename(final, old)
    elif final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return final, json.loads((final / marker).read_text())
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return final, json.loads((final / marker).read_text())


def prune_cache(workdir: Path, days: float = 3.0) -> None:
    """Drop cache entries (and scratch dirs of killed runs) untouched for ``days``: every change to
    the training code makes a new model entry."""
    cutoff = time.time() - days * 86400
    for p in workdir.iterdir():
        if p.is_dir() and p.name.startswith(("data-", "model-", "run-", ".tmp-")):
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _flag_fields(names) -> list[str]:
    """Names of switches that look like "make an int8 / quantised bundle too"."""
    return [n for n in names if re.search(r"int8|quant", n, re.I)]


def build_model(workdir: Path, data_dir: Path, a) -> tuple[Path, dict]:
    """Train (1 epoch on a prefix) and export through training.train.train; save the torch model
    for the naive peer; measure fp32 / int8 AUC with onnxruntime on the test split."""
    final = model_dir_of(workdir, a)
    if (final / "bench-model.json").exists() and not a.rebuild:
        os.utime(final)
        return final, json.loads((final / "bench-model.json").read_text())
    import torch

    import training.train as tt
    from bench.naive_peer.load import save_checkpoint

    key = final.name.split("-", 1)[1]
    out = workdir / f".tmp-model-{key}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    store = out / "store"
    store.mkdir(parents=True)

    cfg_fields = {f.name: f for f in dataclasses.fields(tt.TrainConfig)}
    int8_flags = {n: True for n in _flag_fields(cfg_fields)
                  if cfg_fields[n].default in (False, None)}
    cfg = tt.TrainConfig(arch="ple", epochs=1, patience=1, batch_size=2048, max_rows=a.train_rows,
                         seed=a.seed, threads=a.train_threads, model=dict(MODEL_CFG), **int8_flags)
    captured: dict = {}
    real_fit = tt.fit

    def fit_and_keep(ds, c, progress=True, model=None):  # the trained model, for the naive peer
        res = real_fit(ds, c, progress, model=model)
        captured.update(model=res[0], ds=ds, rows=res[2])
        return res

    log(f"training PLE {MODEL_CFG} 1 epoch on {a.train_rows:,} rows (training.train.train), exporting")
    t0 = time.perf_counter()
    tt.fit = fit_and_keep
    try:
        bundle, metrics = tt.train(data_dir, name=MODEL_NAME, store=store, cfg=cfg, progress=not a.quick)
    finally:
        tt.fit = real_fit
    seconds = time.perf_counter() - t0
    model, ds, (_, _, test_rows) = captured["model"], captured["ds"], captured["rows"]
    save_checkpoint(model, out / "model.pt", ds.vocabs)
    params = sum(p.numel() for p in model.parameters())
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    quality = onnx_quality(Path(bundle), ds, test_rows)
    unsplit = export_unsplit(model, ds, test_rows, Path(bundle), out / "model.unsplit.onnx")
    info = {"bundle": str(Path(bundle).relative_to(out)), "version": int(Path(bundle).name),
            "train_seconds": round(seconds, 1), "unsplit": unsplit,
            "precisions": manifest.get("precisions") or {},
            "train_rows": a.train_rows, "parameters": params, "config": dataclasses.asdict(model.config),
            "int8_flags_set": int8_flags, "torch_metrics": metrics, "quality": quality,
            "manifest_metrics": manifest.get("metrics", {}),
            "files": {p.name: p.stat().st_size for p in Path(bundle).iterdir() if p.is_file()},
            "torch_threads": torch.get_num_threads()}
    (out / "bench-model.json").write_text(json.dumps(info, indent=2, default=str))
    return _publish(out, final, "bench-model.json", a.rebuild)


def export_unsplit(model, ds, rows: np.ndarray, bundle: Path, path: Path) -> dict:
    """The fp32 model exported as it was before the export split the user side off
    (``ServingModel(model, request_once=False)``), for the floor's baseline; checked against the
    bundle's model.onnx on one user x 500 items. ``{"file": None, ...}`` when the export has no
    such switch (then the bundle itself is the baseline)."""
    try:
        import onnxruntime as ort

        from training.export import EXAMPLE_ROWS, ServingModel, _export_onnx

        if "request_once" not in inspect.signature(ServingModel).parameters:
            return {"file": None, "reason": "training.export.ServingModel has no request_once switch"}
        feed = ds.inputs(rows[:EXAMPLE_ROWS])
        _export_onnx(ServingModel(model, request_once=False).eval(), feed, path)
        probe = ds.inputs(rows[:500])
        probe = {k: (v[:1] if k.startswith(("user_", "context_")) else v) for k, v in probe.items()}
        outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, probe)
                for p in (bundle / "model.onnx", path)]
        diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(*outs))
        return {"file": path.name, "bytes": path.stat().st_size, "max_abs_diff_vs_bundle": diff}
    except Exception as e:  # noqa: BLE001 - an optional baseline
        return {"file": None, "reason": f"{type(e).__name__}: {e}"}


def _aucs(ds, rows, out: dict[str, np.ndarray]) -> dict[str, float]:
    """AUCs as training.train.evaluate names them: each unconditional binary task; a conditional
    one on its condition's positive rows, and the joint probability on all rows (ctcvr)."""
    from sklearn.metrics import roc_auc_score

    from training.train import joint_name

    def auc(y, p):
        return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")

    by = {t.name: t for t in ds.tasks}
    m = {}
    for t in ds.tasks:
        y = ds.label(t.label, rows)
        if t.kind != "binary":
            continue
        if t.condition is None:
            m[f"auc/{t.name}"] = auc(y, out[t.name])
        else:
            c = by[t.condition]
            yc = ds.label(c.label, rows) > 0
            m[f"auc/{t.name}"] = auc(y[yc], out[t.name][yc])
            m[f"auc/{joint_name(t, c)}"] = auc(yc * y, out[c.name] * out[t.name])
    return m


def onnx_quality(bundle: Path, ds, rows: np.ndarray) -> dict:
    """Per-task AUC of model.onnx and (if present) model.int8.onnx on the test rows (onnxruntime)."""
    import onnxruntime as ort

    res: dict = {"rows": int(len(rows)), "batch_rows": EVAL_BATCH, "fp32": None, "int8": None, "delta": None, "int8_file": None}
    files = {"fp32": bundle / "model.onnx"}
    int8 = bundle / "model.int8.onnx"
    if int8.exists():
        files["int8"] = int8
        res["int8_file"] = int8.name
    for tag, path in files.items():
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            parts = {n: [] for n in names}
            for i in range(0, len(rows), EVAL_BATCH):
                feed = ds.inputs(rows[i:i + EVAL_BATCH])
                for n, v in zip(names, sess.run(names, feed)):
                    parts[n].append(np.asarray(v).reshape(-1))
            res[tag] = _aucs(ds, rows, {n: np.concatenate(v) for n, v in parts.items()})
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            res[f"{tag}_error"] = f"{type(e).__name__}: {e}"
    if res["fp32"] and res["int8"]:
        res["delta"] = {k: res["int8"][k] - res["fp32"][k] for k in res["fp32"]}
    return res


# =============================================================================================
# requests
# =============================================================================================

def make_bodies(data_dir: Path, sizes: list[int], count: int, zipf: float, seed: int, out: Path) -> dict[int, Path]:
    import pandas as pd

    users = pd.read_parquet(data_dir / "users.parquet", columns=["user_id"])["user_id"].astype(str).to_numpy()
    items = pd.read_parquet(data_dir / "items.parquet", columns=["item_id"])["item_id"].to_numpy()
    exposed = pd.read_parquet(data_dir / "exposures.parquet", columns=["item_id"])["item_id"].value_counts()
    rng = np.random.default_rng(seed)
    counts = exposed.reindex(items, fill_value=0).to_numpy()
    order = np.lexsort((rng.random(len(items)), -counts))  # most exposed first, ties at random
    ranked = items[order].astype(str)
    logp = -zipf * np.log(np.arange(1, len(ranked) + 1, dtype=np.float64))
    devices = ["ios", "android", "web"]
    paths = {}
    for n in sizes:
        n_eff = min(n, len(ranked))
        path = out / f"bodies-{n}.jsonl"
        with path.open("w") as f:
            for _ in range(count):
                # n distinct items, Zipf-weighted: Gumbel top-k over log-weights
                keys = logp + rng.gumbel(size=len(ranked))
                pick = np.argpartition(-keys, n_eff - 1)[:n_eff]
                rng.shuffle(pick)
                body = {"user_id": str(rng.choice(users)), "items": ranked[pick].tolist(),
                        "context": {"hour": int(rng.integers(24)), "device": devices[int(rng.integers(3))]}}
                f.write(json.dumps(body, separators=(",", ":")) + "\n")
        paths[n] = path
    return paths


def read_bodies(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# =============================================================================================
# the floor: in-process
# =============================================================================================

def _settings(**kw):
    from service.settings import Settings

    known = set(Settings.model_fields)
    return Settings(**{k: v for k, v in kw.items() if k in known})


def floor_ranker(store: Path, redis_url: str, routing_config: str | None = None, model_name: str = MODEL_NAME):
    """The service's own ranker for the first variant, built the way the service builds it (its
    ServingManager), with 1 onnxruntime thread, no item cache and no effective deadline."""
    from service.serving import ServingManager

    s = _settings(redis_url=redis_url, model_store=str(store), model_name=model_name, ort_intra_op_threads=1,
                  workers=1, item_cache_size=0, redis_deadline_ms=60_000, redis_timeout_ms=10_000,
                  store_poll_s=0, log_level="WARNING", routing_config=routing_config, predlog_rate=0.0)
    try:
        from service.redis_client import make_store
        client = make_store(s)
    except ImportError:
        import redis
        client = redis.Redis.from_url(redis_url)
    _OPEN.append(client)
    manager = ServingManager(s, client)
    manager.start()
    st = manager.state
    if st is None:
        raise RuntimeError(f"the floor's serving state did not load: {manager.not_ready}")
    return st.primary.ranker, st.primary


_OPEN: list = []  # feature-store clients of the floors, closed once the floors are done


def close_floors() -> None:
    while _OPEN:
        try:
            _OPEN.pop().close()
        except Exception:  # noqa: BLE001 - best effort
            pass


def short_reason(e: BaseException | str | None) -> str:
    """One line out of an exception (or a server's log): a routing config's "line N (...): why" if
    there is one, else the first line."""
    text = str(e) if e is not None else "unknown"
    m = re.findall(r"line \d+ \([^)]*\): [^\n\\\"]+", text)
    if m:
        return "routing config refused: " + "; ".join(dict.fromkeys(m))
    first = text.strip().splitlines()[0] if text.strip() else text
    name = type(e).__name__ if isinstance(e, BaseException) else ""
    return (f"{name}: " if name else "") + first[:300]


def floor_cell(system: str, ranker, bodies: list[dict], n: int, duration: float, warmup: float,
               redis_pid: int) -> dict:
    from service.schemas import RankRequest

    reqs = [RankRequest(**b) for b in bodies]
    t_end = time.perf_counter() + warmup
    i = 0
    while time.perf_counter() < t_end or i < 3:
        ranker.rank_result(reqs[i % len(reqs)])
        i += 1
    lat, stages, degraded = [], {s: [] for s in STAGES}, 0
    cpu0, r0, busy0 = time.process_time(), cpu_seconds([redis_pid]), machine_busy()
    t0 = time.perf_counter()
    i = 0
    while True:
        a = time.perf_counter()
        if a - t0 >= duration and i >= 3:
            break
        res = ranker.rank_result(reqs[i % len(reqs)])
        lat.append(time.perf_counter() - a)
        for s in STAGES:
            stages[s].append(res.timings.get(s, 0.0))
        if getattr(res, "degraded", False):
            degraded += 1
        i += 1
    wall = time.perf_counter() - t0
    good = len(lat) - degraded
    cpu1, r1, busy1 = time.process_time(), cpu_seconds([redis_pid]), machine_busy()
    ms = np.asarray(lat) * 1e3
    cpu_server, cpu_redis = cpu1 - cpu0, r1 - r0
    busy = (busy1[0] - busy0[0]) / wall
    return {"system": system, "n": n, "c": 1, "duration_s": round(wall, 3), "requests": len(lat),
            "rps": good / wall, "rps_x2": 2 * good / wall, "rps_2xx": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "p999_ms": float(np.percentile(ms, 99.9)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "non2xx": 0, "socket_errors": 0,
            "degraded": degraded,
            "cpu_ms_per_req": {"server": 1e3 * cpu_server / len(lat), "redis": 1e3 * cpu_redis / len(lat),
                               "client": 0.0},
            "busy_cores": busy, "other_cores": max(0.0, busy - (cpu_server + cpu_redis) / wall),
            "stages_ms": {s: float(np.mean(v) * 1e3) for s, v in stages.items()}, "stage_source": "in-process",
            "cache_hit_rate": None}


# =============================================================================================
# servers and wrk
# =============================================================================================

class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, ready_path: str):
        self.name, self.port = name, int(cmd[cmd.index("--port") + 1])
        self.log_path = logdir / f"{name}.log"
        self.log_f = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log_f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.metrics = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, timeout: float = 5.0):
        import httpx

        return httpx.get(self.base + path, timeout=timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.get(self.ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.2)
        try:
            r = self.get("/metrics")
            self.metrics = r.status_code == 200 and "mtrank_" in r.text
        except httpx.HTTPError:
            self.metrics = False

    def scrape(self) -> list | None:
        if not self.metrics:
            return None
        try:
            r = self.get("/metrics")
            return parse_prometheus(r.text) if r.status_code == 200 else None
        except Exception:  # noqa: BLE001
            return None

    def log_size(self) -> int:
        self.log_f.flush()
        return self.log_path.stat().st_size

    def log_lines(self, start: int, end: int) -> list[str]:
        with self.log_path.open("rb") as f:
            f.seek(start)
            return f.read(end - start).decode(errors="replace").splitlines()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self.proc)
        self.log_f.close()


def run_wrk(base: str, bodies: Path, c: int, seconds: float, offset: int = 0) -> tuple[dict, float]:
    """One closed-loop wrk run; (its JSON summary, wrk's CPU seconds)."""
    cmd = ["wrk", "-t1", f"-c{c}", f"-d{max(1, int(round(seconds)))}s", "--timeout", WRK_TIMEOUT, "-s", str(LUA),
           base, "--", str(bodies), str(offset)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    for line in r.stdout.splitlines():
        if line.startswith("MTRANK_WRK_JSON "):
            return json.loads(line.split(" ", 1)[1]), cpu
    raise RuntimeError(f"wrk gave no summary (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def wait_idle(pid: int, timeout: float = 120.0, window: float = 0.5, quiet_cores: float = 0.1) -> float:
    """Wait until the server's process tree is idle (below ``quiet_cores`` of CPU over ``window``):
    wrk leaves requests in flight when it stops, and a server still working them off would slow the
    next cell (and shed its first requests). Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c0 = cpu_seconds(process_tree(pid))
        time.sleep(window)
        if (cpu_seconds(process_tree(pid)) - c0) / window < quiet_cores:
            break
    return time.monotonic() - t0


def _stage_delta(m0, m1) -> tuple[dict | None, float | None, float | None]:
    """(stage means in ms, item-cache hit rate, Δcount) from two /metrics scrapes."""
    if m0 is None or m1 is None:
        return None, None, None

    def sums(samples):
        st, hits, misses = {}, 0.0, 0.0
        for name, labels, v in samples:
            if name.startswith("mtrank_rank_stage_seconds") and name.endswith(("_sum", "_count")):
                stage = labels.get("stage") or next((x for x in labels.values() if x in STAGES), None)
                if stage:
                    kind = "sum" if name.endswith("_sum") else "count"
                    st[(stage, kind)] = st.get((stage, kind), 0.0) + v
            elif "cache" in name and not name.endswith("_created"):
                text = (name + " " + " ".join(f"{k}={x}" for k, x in labels.items())).lower()
                if "hit" in text and "miss" not in text:
                    hits += v
                elif "miss" in text:
                    misses += v
        return st, hits, misses

    s0, h0, x0 = sums(m0)
    s1, h1, x1 = sums(m1)
    stages, count = {}, None
    for stage in STAGES:
        dc = s1.get((stage, "count"), 0.0) - s0.get((stage, "count"), 0.0)
        ds = s1.get((stage, "sum"), 0.0) - s0.get((stage, "sum"), 0.0)
        if dc > 0:
            stages[stage] = 1e3 * ds / dc
            count = max(count or 0.0, dc)
    dh, dm = h1 - h0, x1 - x0
    rate = dh / (dh + dm) if dh + dm > 0 else None
    return (stages or None), rate, count


def _access_log_stats(lines: list[str]) -> tuple[dict | None, float | None, int, int]:
    """(stage means in ms, cache hit rate, lines, degraded lines) from the JSON access lines of /rank."""
    sums, n, hits, misses, degraded = {}, 0, 0.0, 0.0, 0
    for line in lines:
        i = line.find('{"')
        if i < 0 or '"rank"' not in line:
            continue
        try:
            rec = json.loads(line[i:])
        except ValueError:
            continue
        if rec.get("event") != "rank" or rec.get("status") != 200:
            continue
        ms = rec.get("ms") or {}
        n += 1
        degraded += bool(rec.get("degraded"))
        for s in STAGES:
            if s in ms:
                sums[s] = sums.get(s, 0.0) + float(ms[s])
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "cache" in k:
                if "hit" in k:
                    hits += v
                elif "miss" in k:
                    misses += v
    if not n:
        return None, None, 0, 0
    rate = hits / (hits + misses) if hits + misses > 0 else None
    return {s: v / n for s, v in sums.items()}, rate, n, degraded


def http_cell(system: str, server: Server, bodies: Path, n: int, c: int, duration: float, redis_pid: int,
              offset: int = 0) -> dict:
    idle_wait = wait_idle(server.pid)
    m0 = server.scrape()
    off0 = server.log_size()
    pids = process_tree(server.pid)
    cpu0, r0, busy0 = cpu_seconds(pids), cpu_seconds([redis_pid]), machine_busy()
    t0 = time.perf_counter()
    res, wrk_cpu = run_wrk(server.base, bodies, c, duration, offset)
    wall = time.perf_counter() - t0
    cpu1, r1, busy1 = cpu_seconds(process_tree(server.pid)), cpu_seconds([redis_pid]), machine_busy()
    m1 = server.scrape()
    stages, hit_rate, _ = _stage_delta(m0, m1)
    source = "metrics" if stages else None
    log_stages, log_rate, log_n, log_degraded = _access_log_stats(server.log_lines(off0, server.log_size()))
    if stages is None and log_stages:
        stages, source = log_stages, "access_log"
    if hit_rate is None:
        hit_rate = log_rate
    secs = res["duration_us"] / 1e6 or wall
    statuses = {int(k): v for k, v in res.get("statuses", {}).items()}
    non2xx = sum(v for k, v in statuses.items() if not 200 <= k < 300)
    sock = sum(res["errors"][k] for k in ("connect", "read", "write", "timeout"))
    pct = res["latency_us"]["percentiles"] if res["requests"] else {}
    if not res["requests"]:
        res["latency_us"].update(mean=None, max=None)
    cpu_server, cpu_redis = cpu1 - cpu0, r1 - r0
    busy = (busy1[0] - busy0[0]) / wall
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    degraded = max(res.get("degraded", 0), log_degraded)
    reqs = max(1, ok - degraded)  # CPU per useful answer: rejected and degraded ones cost, but do not count
    return {"system": system, "n": n, "c": c, "duration_s": round(secs, 3), "requests": res["requests"],
            "rps": (ok - degraded) / secs, "rps_2xx": ok / secs, "rps_all": res["requests"] / secs,
            "p50_ms": _ms(pct.get("50")), "p90_ms": _ms(pct.get("90")), "p99_ms": _ms(pct.get("99")),
            "p999_ms": _ms(pct.get("99.9")), "mean_ms": _ms(res["latency_us"]["mean"]),
            "max_ms": _ms(res["latency_us"]["max"]), "statuses": statuses, "non2xx": non2xx,
            "socket_errors": sock, "errors": res["errors"],
            "degraded": degraded,
            "cpu_ms_per_req": {"server": 1e3 * cpu_server / reqs, "redis": 1e3 * cpu_redis / reqs,
                               "client": 1e3 * wrk_cpu / reqs},
            "busy_cores": busy, "other_cores": max(0.0, busy - (cpu_server + cpu_redis + wrk_cpu) / wall),
            "stages_ms": stages, "stage_source": source, "access_lines": log_n, "cache_hit_rate": hit_rate,
            "idle_wait_s": round(idle_wait, 2)}


def _ms(us) -> float | None:
    return None if us is None else float(us) / 1e3


def memory_sample(server: Server) -> dict:
    workers = worker_pids(server.pid)
    tree = process_tree(server.pid)
    return {"workers": len(workers), "rss_mb_per_worker": [round(rss_bytes(p) / 2 ** 20, 1) for p in workers],
            "rss_mb_tree": round(sum(rss_bytes(p) for p in tree) / 2 ** 20, 1)}


def runtime_baseline_mb() -> float | None:
    """RSS of an interpreter that imported the service (FastAPI, onnxruntime, numpy...) but loaded
    no model: the runtime's own share of a worker."""
    code = ("import service.app, service.cli, onnxruntime, numpy, uvicorn, httptools; import os;"
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return round(int(r.stdout.strip().splitlines()[-1]) / 2 ** 20, 1)
    except Exception:  # noqa: BLE001
        return None


# =============================================================================================
# systems
# =============================================================================================

def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTRANK_", "NAIVE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_ours(name: str, store: Path, redis_url: str, logdir: Path, extra_env: dict, workers: int | None) -> Server:
    env = _clean_env()
    env.update({"MTRANK_REDIS_URL": redis_url, "MTRANK_MODEL_STORE": str(store), "MTRANK_MODEL_NAME": MODEL_NAME})
    if workers:
        env["MTRANK_WORKERS"] = str(workers)
    env.update(extra_env)
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Server(name, cmd, env, logdir, "/readyz")


def start_naive(model_pt: Path, redis_url: str, logdir: Path, workers: int, threads: int) -> Server:
    env = _clean_env()
    env.update({"NAIVE_MODEL": str(model_pt), "NAIVE_REDIS_URL": redis_url, "NAIVE_PREFIX": "naive",
                "NAIVE_TORCH_THREADS": str(threads)})
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.naive_peer.app:app", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers)]
    return Server("naive", cmd, env, logdir, "/healthz")


def wait_workers(server: Server, want: int, timeout: float = 120.0) -> int:
    """Poll the naive peer's /healthz (it answers its pid) until ``want`` workers answered."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        try:
            seen.add(server.get("/healthz", timeout=2).json().get("pid"))
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    return len(seen)


def int8_routing_configs(workdir: Path) -> list[Path]:
    """Candidate routing configs that ask for the int8 bundle (the key's exact place is the
    service's: variant level first, then inside the model reference)."""
    out = []
    texts = [
        "salt: bench\nvariants:\n  - name: int8\n    percent: 100\n    model: {name: %s, version: latest}\n"
        "    precision: int8\n" % MODEL_NAME,
        "salt: bench\nvariants:\n  - name: int8\n    percent: 100\n"
        "    model: {name: %s, version: latest, precision: int8}\n" % MODEL_NAME,
    ]
    for i, t in enumerate(texts):
        p = workdir / f"routing-int8-{i}.yaml"
        p.write_text(t)
        out.append(p)
    return out


def service_has(word: str) -> bool:
    """Whether the service code (other than its settings) mentions ``word``: a feature that has
    only a setting so far is not implemented."""
    for p in (ROOT / "service").glob("*.py"):
        if p.name != "settings.py" and word in p.read_text():
            return True
    return False


# =============================================================================================
# targets and report
# =============================================================================================

def _best(cells, system, n, max_p99=None):
    rows = [c for c in cells if c["system"] == system and c["n"] == n and c.get("rps")
            and (max_p99 is None or (c.get("p99_ms") is not None and c["p99_ms"] <= max_p99))]
    return max(rows, key=lambda c: c["rps"]) if rows else None


def _cell(cells, system, n, c):
    return next((x for x in cells if x["system"] == system and x["n"] == n and x["c"] == c), None)


def targets(report: dict, n: int, p99_bound: float | None) -> list[dict]:
    cells = report["cells"]
    out = []

    def add(name, value, op, threshold, detail, applicable=True):
        ok = None
        if applicable and value is not None and not (isinstance(value, float) and math.isnan(value)):
            ok = value >= threshold if op == ">=" else value <= threshold
        out.append({"target": name, "value": value, "op": op, "threshold": threshold, "pass": ok, "detail": detail})

    floor = _cell(cells, "floor", n, 1)
    ours_best = _best(cells, "ours", n)
    f2 = floor["rps_x2"] if floor else None
    add(f"fp32 throughput / (2 x floor) at N={n}", ours_best["rps"] / f2 if ours_best and f2 else None, ">=", 0.9,
        f"ours {_f(ours_best and ours_best['rps'])} req/s (c={ours_best and ours_best['c']}), "
        f"floor x2 {_f(f2)} req/s")
    c1 = _cell(cells, "ours", n, 1)
    add(f"p50 at c=1 / floor p50 at N={n}", c1["p50_ms"] / floor["p50_ms"] if c1 and floor else None, "<=", 1.15,
        f"ours {_f(c1 and c1['p50_ms'], 2)} ms, floor {_f(floor and floor['p50_ms'], 2)} ms")
    conc = sorted({x["c"] for x in cells if x["system"] == "ours"})
    cmid = 8 if 8 in conc else (conc[len(conc) // 2] if conc else 8)
    c8 = _cell(cells, "ours", n, cmid)
    add(f"p99 / p50 at c={cmid}, N={n}", c8["p99_ms"] / c8["p50_ms"] if c8 else None, "<=", 3.0,
        f"p99 {_f(c8 and c8['p99_ms'], 1)} ms, p50 {_f(c8 and c8['p50_ms'], 1)} ms")
    naive_best = _best(cells, "naive", n)
    bound = p99_bound if p99_bound else (naive_best["p99_ms"] if naive_best else None)
    ours_b = _best(cells, "ours", n, bound) if bound else None
    naive_b = _best(cells, "naive", n, bound) if bound else None
    add(f"ours / naive throughput at p99 <= {_f(bound, 0)} ms, N={n}",
        (ours_b["rps"] if ours_b else 0.0) / naive_b["rps"] if naive_b else None, ">=", 3.0,
        f"ours {_f(ours_b and ours_b['rps'])} req/s (c={ours_b and ours_b['c']}), naive "
        f"{_f(naive_b and naive_b['rps'])} req/s (c={naive_b and naive_b['c']}); bound = "
        + ("--p99-bound-ms" if p99_bound else "naive's p99 at its best throughput"))
    i8 = _best(cells, "ours-int8", n)
    unsplit = _cell(cells, "floor-unsplit", n, 1)
    base = unsplit or floor
    b2 = base["rps_x2"] if base else None
    add(f"int8 + user side once throughput / fp32 floor x2 at N={n}", i8["rps"] / b2 if i8 and b2 else None, ">=",
        2.5, (f"ours-int8 {_f(i8['rps'])} req/s (c={i8['c']}), {base['system']} x2 {_f(b2)} req/s"
              + ("" if unsplit else " (the floor's bundle already has the split: no unsplit baseline)")) if i8 and base
        else "n/a: no int8 variant ran")
    if unsplit and floor:
        add(f"user side once, in-process: floor / floor-unsplit throughput at N={n}", floor["rps"] / unsplit["rps"],
            ">=", 1.0, f"{_f(floor['rps'], 1)} vs {_f(unsplit['rps'], 1)} /s; export "
            f"{report.get('export', {}).get('commit', '')[:10]}")
    fi8 = _cell(cells, "floor-int8", n, 1)
    if fi8 and base:
        add(f"int8 + user side once, in-process: floor-int8 / {base['system']} throughput at N={n}",
            fi8["rps"] / base["rps"], ">=", 2.5, f"{_f(fi8['rps'], 1)} vs {_f(base['rps'], 1)} /s (single process)")
    q = report.get("model", {}).get("quality", {}) or {}
    d = q.get("delta")
    worst = max((abs(v) for v in d.values() if v == v), default=None) if d else None
    recorded = ((report.get("model", {}).get("precisions") or {}).get("int8") or {}).get("auc_delta")
    add("int8 AUC |delta| vs fp32, test split", worst, "<=", 0.001,
        (", ".join(f"{k} {v:+.4f}" for k, v in d.items()) + f" ({q.get('rows', 0):,} rows, onnxruntime, "
         f"{q.get('batch_rows')} rows a batch)" if d else "n/a: the bundle has no model.int8.onnx")
        + (f"; the manifest records {', '.join(f'{k} {v:+.4f}' for k, v in recorded.items())}" if recorded else ""))
    mem = report.get("memory", {}).get("ours")
    if mem and mem.get("budget_mb"):
        worst_rss = max(mem["after"]["rss_mb_per_worker"] or [0])
        add("RSS per worker / (model + cache budget)", worst_rss / mem["budget_mb"], "<=", 1.5,
            f"{worst_rss:.0f} MB vs model {mem['model_mb']:.1f} MB + cache {mem['cache_budget_mb']:.1f} MB")
        if mem.get("runtime_baseline_mb"):
            above = worst_rss - mem["runtime_baseline_mb"]
            add("(RSS - bare runtime) / (model + cache budget)", above / mem["budget_mb"], "<=", 1.5,
                f"{above:.0f} MB above a bare interpreter with the service imported "
                f"({mem['runtime_baseline_mb']:.0f} MB)")
    soak = report.get("soak")
    if soak and soak.get("growth_mb") is not None:
        add(f"RSS growth over a {soak['seconds']:.0f} s soak (last vs first window)", soak["growth_mb"], "<=",
            soak["allowed_growth_mb"], f"first {soak['first_mb']:.1f} MB, last {soak['last_mb']:.1f} MB per worker "
            f"(max over workers), {soak.get('rps', 0):.0f} req/s")
    return out


def _f(v, d=0):
    if v is None:
        return "n/a"
    return f"{v:,.{d}f}"


def render(report: dict) -> str:
    m, g = report["machine"], report["git"]
    lines = [f"# Serving benchmark ({report['mode']})", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; "
             f"load average at start {', '.join(f'{x:.2f}' for x in report['loadavg_start'])}, "
             f"at end {', '.join(f'{x:.2f}' for x in report.get('loadavg_end', [0, 0, 0]))}",
             f"- commit {g['commit'][:12]}{' (dirty)' if g['dirty'] else ''} \"{g['subject']}\"; export code "
             f"{report['export']['commit'][:12]} ({report['export']['date']}) \"{report['export']['subject']}\"",
             f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
             f"- {report['started_at']}, {report['seconds']:.0f} s in all; "
             f"{report['args']['duration']:.0f} s per cell after {report['args']['warmup']:.0f} s warm-up per "
             f"server and N; {report['args']['bodies']} request bodies per N (Zipf {report['args']['zipf']})"]
    d, mo = report["data"], report["model"]
    lines.append(f"- data: {d['synth_config']['n_users']:,} users, {d['synth_config']['n_items']:,} items; schema "
                 f"{d['schema']['fields']['sparse']} sparse (emb {d['schema']['embedding_dim']}), "
                 f"{d['schema']['fields']['dense']} dense, {d['schema']['fields']['sequence']} sequences")
    lines.append(f"- model: PLE {MODEL_CFG}, {mo['parameters']:,} parameters, model.onnx "
                 f"{mo['files'].get('model.onnx', 0) / 2 ** 20:.1f} MB"
                 + (f", model.int8.onnx {mo['files']['model.int8.onnx'] / 2 ** 20:.1f} MB"
                    if "model.int8.onnx" in mo["files"] else "")
                 + f"; trained 1 epoch on {mo['train_rows']:,} rows in {mo['train_seconds']:.0f} s")
    lines.append("")
    lines.append("## Systems")
    lines.append("")
    for name in sorted(report["systems"], key=lambda x: ALL_SYSTEMS.index(x) if x in ALL_SYSTEMS else 99):
        s = report["systems"][name]
        lines.append(f"- **{name}**: " + (s.get("description", "") if s.get("ran") else f"n/a ({s.get('reason')})"))
    lines += ["", "## Targets (issue 5)", ""]
    lines.append(md_table(["target", "value", "needs", "pass", "detail"],
                          [[t["target"], t["value"], f"{t['op']} {t['threshold']}",
                            "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL"), t["detail"]]
                           for t in report["targets"]], digits=3))
    lines += ["", "## Load (req/s, latency ms, CPU ms per request)", "",
              "floor: in-process single process (`x2` column = scaled to 2 cores); others: wrk on loopback, "
              "closed loop with c connections. req/s counts 2xx answers that were not degraded. `errors` = "
              "non-2xx answers + socket errors (timeouts); a `*` marks cells where they exceed 1%: wrk's "
              "latencies then include those (fast) error answers. CPU: server process tree, redis-server, wrk; "
              "`other` = cores busy with anything else on the machine during the cell (noise: ~0 on a quiet "
              "machine).", ""]
    rows = []
    for c in sorted(report["cells"], key=lambda x: (x["n"], ALL_SYSTEMS.index(x["system"])
                                                   if x["system"] in ALL_SYSTEMS else 99, x["c"])):
        cpu = c["cpu_ms_per_req"]
        errs = c["non2xx"] + c.get("socket_errors", 0)
        mark = "*" if errs > 0.01 * max(1, c["requests"]) else ""
        rows.append([c["n"], c["system"], f"{c['c']}{mark}", c["rps"], c.get("rps_x2"), c["p50_ms"], c["p90_ms"],
                     c["p99_ms"], c["p999_ms"], errs, c.get("degraded", 0),
                     cpu["server"], cpu["redis"], cpu["client"], c.get("other_cores")])
    lines.append(md_table(["N", "system", "c", "req/s", "x2", "p50", "p90", "p99", "p99.9", "errors", "degraded",
                           "CPU server", "CPU redis", "CPU wrk", "other cores"], rows,
                          digits=[0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 2, 3, 3, 2]))
    lines += ["", "## Per-stage means (ms, the service's own timers)", ""]
    rows = []
    for c in sorted(report["cells"], key=lambda x: (x["n"], x["system"], x["c"])):
        st = c.get("stages_ms") or {}
        rows.append([c["n"], c["system"], c["c"], *[st.get(s) for s in STAGES], c.get("stage_source") or "n/a",
                     None if c.get("cache_hit_rate") is None else 100 * c["cache_hit_rate"]])
    lines.append(md_table(["N", "system", "c", *STAGES, "source", "cache hit %"], rows,
                          digits=[0, 0, 0, 3, 3, 3, 3, 3, 0, 1]))
    q = mo.get("quality") or {}
    lines += ["", "## Quality (onnxruntime on the test split)", ""]
    if q.get("fp32"):
        keys = list(q["fp32"])
        rows = [["fp32", *[q["fp32"][k] for k in keys]]]
        rows.append(["int8", *[q["int8"][k] for k in keys]] if q.get("int8") else ["int8", *["n/a"] * len(keys)])
        if q.get("delta"):
            rows.append(["delta", *[q["delta"][k] for k in keys]])
        lines.append(md_table(["model", *keys], rows, digits=4))
        lines.append("")
        lines.append(f"{q['rows']:,} test rows." + ("" if q.get("int8") else " int8: n/a (the bundle has no "
                                                      "model.int8.onnx)"))
    mem = report.get("memory", {})
    if mem:
        lines += ["", "## Memory (RSS, MB)", ""]
        rows = []
        for name, v in mem.items():
            rows.append([name, v.get("workers"), ", ".join(f"{x:.0f}" for x in v["warm"]["rss_mb_per_worker"]),
                         ", ".join(f"{x:.0f}" for x in v["after"]["rss_mb_per_worker"]), v.get("model_mb"),
                         v.get("cache_budget_mb"), v.get("runtime_baseline_mb")])
        lines.append(md_table(["system", "workers", "per worker after warm-up", "per worker after cells",
                               "model file", "cache budget", "bare runtime"], rows))
    soak = report.get("soak")
    if soak:
        lines += ["", f"## Soak ({soak['seconds']:.0f} s, c={soak['c']}, N={soak['n']})", "",
                  f"{soak.get('rps', 0):.1f} req/s, {soak.get('errors', 0)} errors; RSS per worker (max over "
                  f"workers) first window {soak.get('first_mb')} MB, last window {soak.get('last_mb')} MB, "
                  f"growth {soak.get('growth_mb')} MB (window {soak.get('window_s')} s)."]
    if report.get("errors"):
        lines += ["", "## Errors (whole tracebacks in the JSON)", ""]
        for e in report["errors"]:
            name, _, rest = e.partition(":")
            why = short_reason(rest)
            if not why.startswith("routing"):
                exc = [x for x in rest.splitlines() if re.match(r"[\w.]+(Error|Exception|Exit)\b", x)]
                why = exc[-1][:300] if exc else why
            lines.append(f"- {name}: {why}")
    return "\n".join(lines) + "\n"


# =============================================================================================
# main
# =============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, N=100, c=1,4, 2 s cells (smoke run)")
    p.add_argument("--out-dir", help="where serve.md/serve.json go (default bench/results; "
                                     "--quick: <workdir>/quick-results)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mtrank-bench-serve"),
                   help="cache of data and models, and the run's scratch files")
    p.add_argument("--sizes", help="candidates per request (default 100,500,1000)")
    p.add_argument("--concurrency", help="wrk connections (default 1,8,32)")
    p.add_argument("--duration", type=float, help="seconds per cell (default 15)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per server and N (default 3)")
    p.add_argument("--bodies", type=int, help="pre-generated request bodies per N (default 500)")
    p.add_argument("--systems", help=f"comma list of {', '.join(ALL_SYSTEMS)} (default all)")
    p.add_argument("--workers", type=int, help="MTRANK_WORKERS of our service (default: the service's default)")
    p.add_argument("--naive-workers", type=int, default=2)
    p.add_argument("--naive-threads", type=int, default=1, help="torch intra-op threads per naive worker")
    p.add_argument("--zipf", type=float, default=1.0, help="exponent of the candidates' popularity")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--exposures", type=int)
    p.add_argument("--train-rows", type=int)
    p.add_argument("--train-threads", type=int, help="torch threads while training the model (0 = all cores; "
                                                     "--quick: 1, which is faster on a busy machine)")
    p.add_argument("--target-n", type=int, help="N of the target ratios (default 500, --quick 100)")
    p.add_argument("--p99-bound-ms", type=float, help="p99 bound of the ours/naive ratio (default: the "
                                                      "naive peer's p99 at its best throughput)")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of memory soak (0 = none; the issue asks 600)")
    p.add_argument("--soak-interval", type=float, default=5.0, help="seconds between RSS samples of the soak")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached data and model")
    p.add_argument("--build-only", action="store_true", help="build (or find) the cached data and model, then exit")
    p.add_argument("--keep", action="store_true", help="keep the run's scratch files (server logs, bodies)")
    a = p.parse_args(argv)
    base = QUICK if a.quick else FULL
    for k, v in base.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.sizes = [int(x) for x in str(a.sizes).split(",") if x]
    a.concurrency = [int(x) for x in str(a.concurrency).split(",") if x]
    a.systems = [x.strip() for x in str(a.systems).split(",") if x.strip()]
    bad = set(a.systems) - set(ALL_SYSTEMS)
    if bad:
        p.error(f"unknown systems {sorted(bad)}")
    if a.target_n is None:
        a.target_n = a.sizes[len(a.sizes) // 2] if 500 not in a.sizes else 500
    if a.out_dir is None:
        a.out_dir = str(Path(a.workdir) / "quick-results") if a.quick else str(ROOT / "bench" / "results")
    return a


def estimate_seconds(a, n_http_systems: int) -> float:
    cells = len(a.sizes) * (len(a.concurrency) * n_http_systems) * a.duration
    warm = len(a.sizes) * n_http_systems * a.warmup
    floor = len(a.sizes) * (a.duration + a.warmup) * sum(s.startswith("floor") for s in a.systems)
    return cells + warm + floor + 25 * n_http_systems + a.soak


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.build_only:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        data_dir, _ = build_data(workdir, a)
        build_model(workdir, data_dir, a)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    t_start = time.time()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prune_cache(workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    out_dir = Path(a.out_dir)
    report: dict = {"benchmark": "serve", "mode": "quick" if a.quick else "full",
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0,
                    "args": {k: v for k, v in vars(a).items()}, "machine": machine_info(), "git": git_info(),
                    "export": path_commit("training/export.py"), "systems": {}, "cells": [], "memory": {},
                    "soak": None, "targets": [], "errors": []}
    report["loadavg_start"] = report["machine"]["loadavg"]

    def save():
        report["seconds"] = time.time() - t_start
        report["loadavg_end"] = list(os.getloadavg())
        report["targets"] = targets(report, a.target_n, a.p99_bound_ms)
        write_json(out_dir / "serve.json", report)
        (out_dir / "serve.md").write_text(render(report))

    # the assets are built in a child process: torch never loads into this one (the floor runs here)
    if a.rebuild or not ((data_dir_of(workdir, a) / "bench-data.json").exists()
                         and (model_dir_of(workdir, a) / "bench-model.json").exists()):
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--build-only"], cwd=ROOT, check=True)
    a.rebuild = False
    data_dir, data_info = build_data(workdir, a)
    report["data"] = data_info
    model_dir, model_info = build_model(workdir, data_dir, a)
    report["model"] = model_info
    store = model_dir / "store"
    bundle = model_dir / model_info["bundle"]
    has_int8 = (bundle / "model.int8.onnx").exists()
    has_cache = service_has("item_cache")
    log(f"model: {model_info['parameters']:,} parameters, files {model_info['files']}; int8 bundle: {has_int8}; "
        f"item cache in the service: {has_cache}")

    systems = report["systems"]
    why_not = {"floor-unsplit": None if (model_info.get("unsplit") or {}).get("file") else
               (model_info.get("unsplit") or {}).get("reason", "no unsplit export"),
               "floor-int8": None if has_int8 else "the bundle has no model.int8.onnx",
               "ours-int8": None if has_int8 else "the bundle has no model.int8.onnx",
               "ours-nocache": None if has_cache else "the service has no item cache yet (MTRANK_ITEM_CACHE_SIZE "
                                                      "is only a setting)"}
    for s in ALL_SYSTEMS:
        if s not in a.systems:
            systems[s] = {"ran": False, "reason": "not asked for (--systems)"}
        elif why_not.get(s):
            systems[s] = {"ran": False, "reason": why_not[s]}
    http_systems = [s for s in a.systems if not s.startswith("floor") and s not in systems]
    log(f"expected duration of the measurements: ~{estimate_seconds(a, len(http_systems)) / 60:.0f} min "
        f"(+ Redis load)")

    rds = OwnedRedis(run_dir / "redis")
    servers: list[Server] = []
    try:
        log(f"redis-server pid {rds.pid} on {rds.url}; loading features (mtrank features load)")
        t0 = time.perf_counter()
        env = _clean_env()
        subprocess.run([sys.executable, "-m", "service.cli", "features", "load", "--data", str(data_dir),
                        "--model-name", MODEL_NAME, "--store", str(store), "--redis-url", rds.url, "--quiet"],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        report["redis"] = {"ours_load_seconds": round(time.perf_counter() - t0, 1)}
        if "naive" in a.systems:
            from bench.naive_peer.load import load_hashes

            log("loading the naive peer's hashes (HSET per entity)")
            report["redis"]["naive_load"] = load_hashes(data_dir, bundle, rds.client())
        report["redis"]["used_memory_mb"] = round(rds.used_memory() / 2 ** 20, 1)

        bodies = make_bodies(data_dir, a.sizes, a.bodies, a.zipf, a.seed, run_dir)

        # ---- floor (in-process) ------------------------------------------------------------
        for sysname in ("floor", "floor-unsplit", "floor-int8"):
            if sysname not in a.systems or sysname in systems:
                continue
            try:
                cfgs = int8_routing_configs(run_dir) if sysname == "floor-int8" else [None]
                if sysname == "floor-unsplit":
                    cfgs = []
                ranker, variant, err = None, None, None
                for cfg in cfgs:
                    try:
                        ranker, variant = floor_ranker(store, rds.url, str(cfg) if cfg else None)
                        break
                    except Exception as e:  # noqa: BLE001 - try the next config layout
                        err = e
                desc = "in-process Ranker (built by the service's ServingManager), 1 ORT thread, no item cache, " \
                       "one process"
                if ranker is None and sysname == "floor-int8":
                    # the service cannot be asked for int8 yet: a bundle whose model is the int8 file
                    int8 = int8_bundle(store, bundle)
                    ranker, variant = floor_ranker(store, rds.url, None, model_name=int8.parent.name)
                    desc += (f"; bundle {int8.parent.name}: a copy with model.int8.onnx as its model.onnx, made by "
                             f"the benchmark because the service refused `precision: int8` ({short_reason(err)})")
                elif ranker is None and sysname == "floor-unsplit":
                    unsplit = copy_bundle(store, bundle, UNSPLIT_NAME, model_dir / model_info["unsplit"]["file"])
                    ranker, variant = floor_ranker(store, rds.url, None, model_name=unsplit.parent.name)
                    desc += (f"; bundle {unsplit.parent.name}: the same trained model exported with "
                             f"ServingModel(request_once=False), i.e. without computing the user side once")
                elif ranker is None:
                    raise err
                precision = getattr(variant.bundle, "precision", None)
                if sysname == "floor-int8" and precision not in (None, "int8"):
                    raise RuntimeError(f"asked for int8, the ranker's bundle says precision {precision!r}")
                if precision:
                    desc += f"; bundle precision {precision}"
                systems[sysname] = {"ran": True, "description": desc, "variant": getattr(variant, "name", None),
                                    "provider": getattr(variant.bundle, "provider", None), "precision": precision,
                                    "bundle": str(getattr(variant.bundle, "path", ""))}
                for n in a.sizes:
                    log(f"{sysname} N={n}")
                    cell = floor_cell(sysname, ranker, read_bodies(bodies[n]), n, a.duration, a.warmup, rds.pid)
                    report["cells"].append(cell)
                    log(f"  {cell['rps']:.1f}/s p50 {cell['p50_ms']:.2f} ms p99 {cell['p99_ms']:.2f} ms")
                del ranker, variant
                close_floors()
            except Exception as e:  # noqa: BLE001
                systems[sysname] = {"ran": False, "reason": short_reason(e)}
                report["errors"].append(f"{sysname}: {traceback.format_exc(limit=3)}")
            save()

        # ---- HTTP systems ------------------------------------------------------------------
        baseline = None if a.quick else runtime_baseline_mb()
        item_size = _item_value_bytes(bundle)
        for sysname in http_systems:
            server = None
            try:
                server, desc = _start_system(sysname, a, store, rds.url, run_dir, model_dir, bundle)
                servers.append(server)
                systems[sysname] = {"ran": True, "description": desc}
                warm_mem = None
                for n in a.sizes:
                    run_wrk(server.base, bodies[n], max(a.concurrency), a.warmup)  # warm-up, not measured
                    if warm_mem is None:
                        warm_mem = memory_sample(server)
                    for c in a.concurrency:
                        log(f"{sysname} N={n} c={c}")
                        cell = http_cell(sysname, server, bodies[n], n, c, a.duration, rds.pid)
                        report["cells"].append(cell)
                        log(f"  {cell['rps']:.1f}/s p50 {_f(cell['p50_ms'], 2)} ms p99 {_f(cell['p99_ms'], 2)} ms "
                            f"errors {cell['non2xx'] + cell['socket_errors']} stages {cell['stage_source']}")
                mem = {"workers": len(worker_pids(server.pid)), "warm": warm_mem, "after": memory_sample(server),
                       "metrics_endpoint": server.metrics}
                if sysname.startswith("ours"):
                    mem.update(_budget(bundle, sysname, item_size))
                    mem["runtime_baseline_mb"] = baseline
                    try:
                        systems[sysname]["models"] = server.get("/models").json()
                    except Exception:  # noqa: BLE001
                        pass
                report["memory"][sysname] = mem
            except Exception as e:  # noqa: BLE001
                systems[sysname] = {"ran": False, "reason": short_reason(e)}
                report["errors"].append(f"{sysname}: {traceback.format_exc(limit=3)}"
                                        + (f"\nserver log tail:\n{server.tail()}" if server else ""))
                log(f"{sysname} failed: {e}")
            finally:
                if server is not None:
                    server.stop()
            save()

        # ---- soak --------------------------------------------------------------------------
        if a.soak > 0:
            report["soak"] = soak(a, store, rds, run_dir, bodies, model_dir)
            save()
    finally:
        for s in servers:
            s.stop()
        rds.stop()
    save()
    print(render(report))
    log(f"wrote {out_dir / 'serve.md'} and {out_dir / 'serve.json'} ({time.time() - t_start:.0f} s)")
    if a.keep:
        log(f"kept the run's scratch files (server logs, bodies) in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _item_value_bytes(bundle: Path) -> int:
    from service.codec import EntityCodec
    from service.contract import BundleManifest

    m = BundleManifest.from_json((bundle / "manifest.json").read_text())
    return EntityCodec.for_schema(m.feature_schema, "item").size


def _budget(bundle: Path, sysname: str, item_size: int) -> dict:
    from service.settings import Settings

    model = bundle / ("model.int8.onnx" if sysname == "ours-int8" else "model.onnx")
    size = 0 if sysname == "ours-nocache" else getattr(Settings(), "item_cache_size", 0)
    model_mb = model.stat().st_size / 2 ** 20
    cache_mb = size * item_size / 2 ** 20
    return {"model_mb": round(model_mb, 2), "cache_items": size, "cache_budget_mb": round(cache_mb, 2),
            "budget_mb": round(model_mb + cache_mb, 2),
            "budget_note": "cache budget = MTRANK_ITEM_CACHE_SIZE x packed item value bytes"}


def copy_bundle(store: Path, bundle: Path, name: str, model_file: Path) -> Path:
    """``<store>/<name>/<v>``: a copy of the bundle whose model.onnx is ``model_file`` (manifest name and
    sha256 to match): the int8 file for a service or floor that cannot be asked for int8 yet, or the
    export without the user-side split (the fp32 baseline before that change)."""
    from service.contract import sha256_file

    dst = store / name / bundle.name
    if (dst / "manifest.json").exists():
        return dst
    tmp = store / name / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp, ignore=shutil.ignore_patterns("model.*.onnx"))
    shutil.copyfile(model_file, tmp / "model.onnx")
    m = json.loads((tmp / "manifest.json").read_text())
    m["name"], m["sha256"] = name, sha256_file(tmp / "model.onnx")
    if "precisions" in m:
        m["precisions"] = {}
    (tmp / "manifest.json").write_text(json.dumps(m, indent=2))
    try:
        os.rename(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def int8_bundle(store: Path, bundle: Path) -> Path:
    return copy_bundle(store, bundle, INT8_NAME, bundle / "model.int8.onnx")


def _start_system(sysname: str, a, store: Path, redis_url: str, run_dir: Path, model_dir: Path,
                  bundle: Path) -> tuple[Server, str]:
    if sysname == "naive":
        server = start_naive(model_dir / "model.pt", redis_url, run_dir, a.naive_workers, a.naive_threads)
        server.wait_ready()
        got = wait_workers(server, a.naive_workers)
        return server, (f"bench/naive_peer: FastAPI + torch eager, uvicorn {a.naive_workers} workers x "
                        f"{a.naive_threads} torch thread(s), HGETALL per entity pipelined, response_model JSON "
                        f"({got} workers answered before the load)")
    extra: dict = {}
    desc = "mtrank serve, service defaults"
    if sysname == "ours-nocache":
        extra["MTRANK_ITEM_CACHE_SIZE"] = "0"
        desc += ", MTRANK_ITEM_CACHE_SIZE=0"
    if sysname == "ours-int8":
        err = None
        for cfg in int8_routing_configs(run_dir):
            server = start_ours(sysname, store, redis_url, run_dir, {**extra, "MTRANK_ROUTING_CONFIG": str(cfg)},
                                a.workers)
            try:
                server.wait_ready(timeout=120)
                where = "the variant" if "    precision" in cfg.read_text() else "the variant's model"
                return server, desc + f", MTRANK_ROUTING_CONFIG: one variant (100%) with `precision: int8` on {where}"
            except Exception as e:  # noqa: BLE001 - that layout was refused: try the next
                err = e
                server.stop()
        # the service cannot be asked for int8 yet: serve the int8 file as a bundle of its own
        int8 = int8_bundle(store, bundle)
        server = start_ours(sysname, store, redis_url, run_dir, {**extra, "MTRANK_MODEL_NAME": int8.parent.name},
                            a.workers)
        server.wait_ready()
        return server, desc + (f", MTRANK_MODEL_NAME={int8.parent.name}: a copy of the bundle with model.int8.onnx "
                               f"as its model.onnx, made by the benchmark because the service refused "
                               f"`precision: int8` ({short_reason(err)})")
    if a.workers:
        desc += f", MTRANK_WORKERS={a.workers}"
    server = start_ours(sysname, store, redis_url, run_dir, extra, a.workers)
    server.wait_ready()
    return server, desc + f" (workers: {len(worker_pids(server.pid))})"


def soak(a, store: Path, rds: OwnedRedis, run_dir: Path, bodies: dict, model_dir: Path) -> dict:
    n = a.target_n if a.target_n in bodies else a.sizes[0]
    c = 8
    log(f"soak: ours, N={n}, c={c}, {a.soak:.0f} s, RSS every {a.soak_interval:.0f} s")
    server = start_ours("ours-soak", store, rds.url, run_dir, {}, a.workers)
    try:
        server.wait_ready()
        run_wrk(server.base, bodies[n], c, a.warmup)
        wait_idle(server.pid)
        cmd = ["wrk", "-t1", f"-c{c}", f"-d{int(a.soak)}s", "--timeout", WRK_TIMEOUT, "-s", str(LUA), server.base, "--",
               str(bodies[n])]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples = []
        while proc.poll() is None:
            samples.append({"t": round(time.monotonic() - t0, 1), **memory_sample(server)})
            time.sleep(a.soak_interval)
        out, _ = proc.communicate()
        res = next((json.loads(x.split(" ", 1)[1]) for x in out.splitlines() if x.startswith("MTRANK_WRK_JSON ")), {})
        window = min(60.0, a.soak / 4)
        per = [max(s["rss_mb_per_worker"]) for s in samples]
        first = [v for s, v in zip(samples, per) if s["t"] <= window]
        last = [v for s, v in zip(samples, per) if s["t"] >= samples[-1]["t"] - window]
        f_mb, l_mb = (float(np.mean(first)), float(np.mean(last))) if first and last else (None, None)
        statuses = {int(k): v for k, v in res.get("statuses", {}).items()}
        return {"seconds": a.soak, "n": n, "c": c, "window_s": window, "samples": samples,
                "first_mb": None if f_mb is None else round(f_mb, 1), "last_mb": None if l_mb is None else round(l_mb, 1),
                "growth_mb": None if f_mb is None else round(l_mb - f_mb, 1),
                "allowed_growth_mb": round(max(10.0, 0.02 * (f_mb or 0)), 1),
                "rps": res.get("requests", 0) / max(1e-9, res.get("duration_us", 0) / 1e6),
                "errors": sum(v for k, v in statuses.items() if not 200 <= k < 300)
                + sum(res.get("errors", {}).get(k, 0) for k in ("connect", "read", "write", "timeout"))}
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
