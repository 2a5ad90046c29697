"""Assets of the serving benchmark: data, model, bundles, quality, request bodies.

Data and model are cached under the workdir, keyed by the settings and by the code they depend
on (:func:`data_dir_of`, :func:`model_dir_of`); a finished entry is published with one rename, so
concurrent runs share it. The model is built in a child process of ``bench/serve.py`` (torch never
loads into the process that runs the floor).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT
from bench.serving import log

MODEL_NAME = "bench"
UNSPLIT_NAME = "bench_unsplit"  # the fp32 model exported without the user-side split (see export_unsplit)
MODEL_CFG = {"levels": 2, "shared_experts": 2, "task_experts": 1, "expert_hidden": [256, 128]}
WIDEN_VERSION = 1  # bump when widen() changes: the data cache key holds it
BUILD_VERSION = 2  # bump when build_model() changes what it writes: the model cache key holds it
#: rows per onnxruntime run when scoring the test split: about a serving batch. Dynamic int8
#: quantises activations with one scale per batch, so its outputs depend on the batch they are in
EVAL_BATCH = 512


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sources_hash(patterns: list[str]) -> str:
    """Hash of the code in the files (Python: its syntax tree without docstrings, so comment and
    docstring edits keep the cache)."""
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
                    "derived columns (crosses, buckets, cohorts) to reach 24 sparse + 8 dense "
                    "(bench/serving/assets.py widen)"}
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

    int8_flags = {"int8": True}  # the bundle also holds model.int8.onnx (training.quantize)
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
    bundle's model.onnx on one user x 500 items. ``{"file": None, "reason": ...}`` when that
    fails (the floor-unsplit system is then n/a)."""
    try:
        import onnxruntime as ort

        from training.export import EXAMPLE_ROWS, ServingModel, _export_onnx

        feed = ds.inputs(rows[:EXAMPLE_ROWS])
        _export_onnx(ServingModel(model, request_once=False).eval(), feed, path)
        probe = ds.inputs(rows[:500])
        probe = {k: (v[:1] if k.startswith(("user_", "context_")) else v) for k, v in probe.items()}
        outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, probe)
                for p in (bundle / "model.onnx", path)]
        diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(*outs, strict=True))
        return {"file": path.name, "bytes": path.stat().st_size, "max_abs_diff_vs_bundle": diff}
    except Exception as e:  # noqa: BLE001 - an optional baseline
        return {"file": None, "reason": f"{type(e).__name__}: {e}"}


def _aucs(ds, rows, out: dict[str, np.ndarray]) -> dict[str, float]:
    """The AUCs of served outputs on ``rows``, named and computed as the trainer's test metrics."""
    from training.metrics import metrics_of
    from training.quantize import raw_scale

    labels = {t.label: ds.label(t.label, rows) for t in ds.tasks}
    m = metrics_of(raw_scale(out, ds.tasks), labels, ds.tasks)
    return {k: v for k, v in m.items() if k.startswith("auc/")}


def onnx_quality(bundle: Path, ds, rows: np.ndarray) -> dict:
    """Per-task AUC of the bundle's fp32 and int8 models on the test rows (onnxruntime)."""
    import onnxruntime as ort

    from service.contract import MANIFEST_FILE, BundleManifest

    manifest = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    files = {tag: bundle / manifest.model_file(tag)[0] for tag in ("fp32", "int8")}
    res: dict = {"rows": int(len(rows)), "batch_rows": EVAL_BATCH, "fp32": None, "int8": None, "delta": None,
                 "int8_file": files["int8"].name}
    for tag, path in files.items():
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            parts = {n: [] for n in names}
            for i in range(0, len(rows), EVAL_BATCH):
                feed = ds.inputs(rows[i:i + EVAL_BATCH])
                for n, v in zip(names, sess.run(names, feed), strict=True):
                    parts[n].append(np.asarray(v).reshape(-1))
            res[tag] = _aucs(ds, rows, {n: np.concatenate(v) for n, v in parts.items()})
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            res[f"{tag}_error"] = f"{type(e).__name__}: {e}"
    if res["fp32"] and res["int8"]:
        res["delta"] = {k: res["int8"][k] - res["fp32"][k] for k in res["fp32"]}
    return res


def unsplit_bundle(store: Path, bundle: Path, model_file: Path) -> Path:
    """``<store>/bench_unsplit/<v>``: a copy of the bundle whose fp32 model is ``model_file`` (the
    export without the user-side split, see :func:`export_unsplit`), its manifest's name and sha256
    to match and no other precisions: the fp32 baseline of floor-unsplit."""
    from service.contract import MANIFEST_FILE, MODEL_FILE, PRECISION_FILES, sha256_file

    dst = store / UNSPLIT_NAME / bundle.name
    if (dst / MANIFEST_FILE).exists():
        return dst
    tmp = store / UNSPLIT_NAME / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp, ignore=shutil.ignore_patterns(*PRECISION_FILES.values()))
    shutil.copyfile(model_file, tmp / MODEL_FILE)
    m = json.loads((tmp / MANIFEST_FILE).read_text())
    m["name"], m["sha256"], m["precisions"] = UNSPLIT_NAME, sha256_file(tmp / MODEL_FILE), {}
    (tmp / MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    try:
        os.rename(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


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
