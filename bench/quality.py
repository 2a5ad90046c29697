"""Model-quality benchmark: converged runs, an equal validation-tuned grid for every model (the
torch-rechub peers included), 5 seeds, calibrated outputs, baselines, ablations, paired differences.

    pip install -e '.[train,bench]'
    nice -n 15 python bench/quality.py                 # run what is missing (resumable), then --report
    python bench/quality.py --report                   # only aggregate the runs that exist
    python bench/quality.py --datasets movielens-time --max-runs 3 --threads 1

**Resumable.** Every run - (dataset, split seed, model, configuration, initialisation seed) - writes
its own JSON under ``bench/results/quality_runs/<dataset>/<model>/`` (committed), named by a hash
of everything that determines it; a run whose file exists is skipped, so the grid is finished over
several sessions. Several processes may share the work (a lock per run under the temp dir).
``--report`` aggregates whatever exists into ``bench/results/quality.{md,json}``, marking missing
cells "pending".

**Protocol** (all in the JSON):

* Order: per dataset (MovieLens per-user time split = the headline, then the random split, then
  synthetic data): the baselines; the tuning grid (every configuration of :data:`GRID` x every
  model, initialisation seed 0, configuration-major); the selected configuration at seeds 1-4; the ablations
  (:data:`ABLATIONS`, the parent's selected configuration with one switch changed) at seeds 0-4.
* Selection on validation only: the configuration with the lowest best validation loss (the
  early-stopping criterion: the weighted sum of the task losses) at seed 0. Same grid, same budget
  for every model.
* Convergence: ``--epochs`` is a cap high enough for early stopping (``--patience`` epochs without a
  validation improvement) to end every run; ``best_epoch`` and ``epochs_run`` are recorded and a run
  whose best epoch is the cap is flagged ``capped`` and left out of every verdict.
* Seeds: ``--split-seed`` (fixed, default 0) draws the random split; the initialisation seed (weights,
  batch order, dropout) is 0-4. The time split has no seed. So the std over seeds is initialisation
  variance on one split, and the paired differences (same seed, same split) compare like with like.
* Outputs as served: Platt scaling of the binary tasks and the ratio correction of the regression
  task, fitted on validation (``training.calibration.fit``, what ``mtrank train`` exports); the test
  metrics are of those outputs: AUC (Platt cannot change it), log loss and ECE (15 bins) per
  probability, RMSE/MAE in the label's unit (stars for MovieLens) and of log1p(label) on clicked rows.
* Statistics (:mod:`quality_stats`): sample std (ddof=1); paired differences with their sample std;
  a difference is a "gain" only when its paired mean exceeds two paired std.
* Baselines (no seeds): constant (train means), item popularity (train clicks of the item for CTR,
  the item's smoothed train conversion rate and mean rating for CVR and the rating), and a logistic
  regression (ridge for the rating) on the same features one-hot/multi-hot encoded, C chosen on
  validation; calibrated on validation like the models.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_once, git_info, machine_info, write_json  # noqa: E402
from quality_stats import paired, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ROOT / "bench" / "results" / "quality_runs"
DEFAULT_OUT = ROOT / "bench" / "results" / "quality"
RUNS, OUT = DEFAULT_RUNS, DEFAULT_OUT  # --runs-dir / --out
CACHE = Path(tempfile.gettempdir()) / "mtrank-bench-data"
LOCKS = Path(tempfile.gettempdir()) / "mtrank-quality-locks"

#: name -> (architecture, fixed overrides); "rechub" = torch-rechub's model via bench/rechub_peer.py
MODELS: dict[str, tuple[str, dict]] = {
    "ple": ("ple", {}),
    "mmoe": ("mmoe", {}),
    "shared_bottom": ("shared_bottom", {}),
    "dtrn+ple": ("dtrn", {"backbone": "ple"}),
    "ple+ml": ("ple", {"mutual_learning": True}),
    "rechub-ple": ("rechub", {"model": "ple"}),
    "rechub-mmoe": ("rechub", {"model": "mmoe"}),
}
#: the tuning grid, the same for every model: learning rate, dropout, embedding init std (ours
#: defaults to 0.05, torch-rechub's to 1e-4); BatchNorm stays on (both have it; off is an ablation)
GRID: dict[str, dict] = {
    "g0": {"lr": 2e-3, "dropout": 0.1, "embedding_init_std": 0.05},
    "g1": {"lr": 1e-3, "dropout": 0.1, "embedding_init_std": 0.05},
    "g2": {"lr": 5e-3, "dropout": 0.1, "embedding_init_std": 0.05},
    "g3": {"lr": 2e-3, "dropout": 0.3, "embedding_init_std": 0.05},
    "g4": {"lr": 2e-3, "dropout": 0.1, "embedding_init_std": 1e-4},
}
#: name -> (parent model, switch over the parent's selected configuration)
ABLATIONS: dict[str, tuple[str, dict]] = {
    "ple:no-bn": ("ple", {"batch_norm": False}),
    "ple:rechub-init": ("ple", {"embedding_init_std": 1e-4}),
    "rechub-ple:no-bn": ("rechub-ple", {"batch_norm": False}),
    "rechub-ple:our-init": ("rechub-ple", {"embedding_init_std": 0.05}),
    "dtrn+ple:tim-only": ("dtrn+ple", {"trm": False}),
    "dtrn+ple:trm-only": ("dtrn+ple", {"tim": False}),
    "ple+ml:ctfm-only": ("ple+ml", {"gkd": False}),
    "ple+ml:gkd-only": ("ple+ml", {"ctfm": False}),
}
#: (a, b): the paired differences a - b the report states
COMPARISONS: list[tuple[str, str]] = [
    ("ple", "rechub-ple"), ("mmoe", "rechub-mmoe"), ("mmoe", "ple"), ("shared_bottom", "ple"),
    ("dtrn+ple", "ple"), ("ple+ml", "ple"),
    ("ple:no-bn", "ple"), ("ple:rechub-init", "ple"), ("rechub-ple:no-bn", "rechub-ple"),
    ("rechub-ple:our-init", "rechub-ple"), ("ple:no-bn", "rechub-ple:no-bn"),
    ("dtrn+ple:tim-only", "ple"), ("dtrn+ple:trm-only", "ple"), ("dtrn+ple", "dtrn+ple:tim-only"),
    ("dtrn+ple", "dtrn+ple:trm-only"),
    ("ple+ml:ctfm-only", "ple"), ("ple+ml:gkd-only", "ple"),
]
DATASETS = {"movielens-time": "column", "movielens-random": "random", "synth": "random"}
SEEDS = 5
BASELINES = ("constant", "popularity", "logreg")


# ----------------------------------------------------------------------------- data

def _source_hash(*paths: str) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update((ROOT / p).read_bytes())
    return h.hexdigest()[:8]


@functools.cache
def built(name: str) -> Path:
    """The generated files (a temp cache, never the repository), rebuilt when the generating code changes."""
    source = "training/data/movielens.py" if name.startswith("movielens") else "training/data/synth.py"
    out = CACHE / f"{name.split('-')[0]}-{_source_hash(source)}"
    return build_once(out, functools.partial(_generate, name))


def _generate(name: str, root: Path) -> None:
    if name.startswith("movielens"):
        from training.data.movielens import build

        build(root, seed=0)
    else:
        from training.data.synth import SynthConfig, generate

        generate(root, SynthConfig(n_users=5_000, n_items=10_000, n_exposures=200_000, seed=11), progress=False)


def _canonical(t):
    """One Arrow type per kind of column (string or large string, list or large list, any child name)."""
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.large_string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.large_list(_canonical(t.value_type))
    return t


def content_version(root: Path) -> str:
    """A hash of what training reads from a generated dataset: every table's rows (its Arrow IPC
    stream in canonical types without schema metadata, not the parquet bytes, which name the writer
    and its version) and the dataset spec without ``training.data.spec.SERVING_ONLY_KEYS``. A protocol change = a
    new version = new runs; an edit that changes no row (a comment, a serving-only annotation, a
    new pandas writing large strings) keeps every run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from training.data.spec import SERVING_ONLY_KEYS

    h = hashlib.sha1()
    for p in sorted(root.glob("*.parquet")):
        table = pq.read_table(p)
        table = table.cast(pa.schema([pa.field(f.name, _canonical(f.type)) for f in table.schema])).combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        h.update(p.name.encode())
        h.update(sink.getvalue().to_pybytes())
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    for f in spec.get("features", []):
        for k in SERVING_ONLY_KEYS:
            f.pop(k, None)
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    return h.hexdigest()[:8]


@functools.cache
def data_version(name: str) -> str:
    """Names a dataset's data by its content (:func:`content_version`)."""
    return content_version(built(name))


def load_dataset(name: str):
    """The encoded dataset."""
    from training.data.dataset import prepare

    return prepare(built(name))


# ----------------------------------------------------------------------------- run identity

def run_config(args, dataset: str, model: str, knobs: dict) -> dict:
    """Everything that determines a run except the initialisation seed."""
    return {"dataset": dataset, "data_version": data_version(dataset), "split": DATASETS[dataset],
            "split_seed": args.split_seed if DATASETS[dataset] == "random" else None,
            "model": model, "knobs": dict(sorted(knobs.items())), "epoch_cap": args.epochs,
            "patience": args.patience, "batch_size": args.batch_size}


def run_path(cfg: dict, seed: int) -> Path:
    h = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    return RUNS / cfg["dataset"] / cfg["model"] / f"{h}-s{seed}.json"


def load_run(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def selected(args, dataset: str, model: str) -> tuple[str | None, dict]:
    """(name of the selected grid configuration or None while the grid is incomplete, grid results)."""
    results = {}
    for g, knobs in GRID.items():
        r = load_run(run_path(run_config(args, dataset, model, knobs), 0))
        results[g] = r
    if any(r is None for r in results.values()):
        return None, results
    return min(results, key=lambda g: results[g]["best_val_total"]), results


def variants(args, dataset: str) -> dict[str, tuple[str, dict] | None]:
    """Every reported model and ablation -> (base model, knobs) of its selected configuration, or None (pending)."""
    out: dict[str, tuple[str, dict] | None] = {}
    for m in MODELS:
        g, _ = selected(args, dataset, m)
        out[m] = None if g is None else (m, GRID[g])
    for a, (parent, switch) in ABLATIONS.items():
        base = out[parent]
        out[a] = None if base is None else (parent, {**base[1], **switch})
    return out


def plan(args, dataset: str) -> list[tuple[dict, int]]:
    """The runs of one dataset in order, available ones only (a stage needs its selection)."""
    # configuration-major: every model at g0 first (a like-for-like snapshot early), then g1, ...
    runs = [(run_config(args, dataset, m, knobs), 0) for knobs in GRID.values() for m in args.models]
    v = variants(args, dataset)
    for m in args.models:
        if v[m] is not None:
            runs += [(run_config(args, dataset, *v[m]), s) for s in range(1, SEEDS)]
    for a in args.ablations:
        if v[a] is not None:
            runs += [(run_config(args, dataset, *v[a]), s) for s in range(SEEDS)]
    return runs


# ----------------------------------------------------------------------------- training

def make_model(model: str, knobs: dict, ds):
    arch, fixed = MODELS[model]
    overrides = {**fixed, **{k: v for k, v in knobs.items() if k != "lr"}}
    if arch == "rechub":
        from rechub_peer import RechubConfig, RechubModel

        return RechubModel(ds.schema, ds.tasks, RechubConfig(**overrides))
    from training.models import build_model

    return build_model(arch, ds.schema, ds.tasks, **overrides)


def label_unit_metrics(raw, labels, tasks, calib) -> dict[str, float]:
    """RMSE and MAE of each regression task in the label's own unit (stars for MovieLens) on its
    condition's rows: of the served value and of the uncorrected ``expm1(max(pred, 0))``."""
    from training import calibration
    from training.metrics import regression_rows

    out = {}
    served = calibration.apply(raw, calib)
    for t in tasks:
        if t.kind != "regression":
            continue
        sel = regression_rows(t, labels, tasks)
        y = np.maximum(labels[t.label][sel].astype(np.float64), 0)
        for suffix, r in (("", served), ("_uncalibrated", raw)):
            err = np.expm1(np.maximum(r[t.name][sel].astype(np.float64), 0)) - y
            out[f"rmse{suffix}/{t.name}"] = float(np.sqrt(np.mean(err ** 2))) if len(y) else math.nan
            out[f"mae{suffix}/{t.name}"] = float(np.mean(np.abs(err))) if len(y) else math.nan
    return out


def label_means(args, dataset: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per regression task, per split: the observed label's count, mean and standard error
    (:func:`training.metrics.label_means`), on the splits every run of ``dataset`` uses."""
    from training.metrics import label_means as split_means
    from training.train import TrainConfig

    ds = load_dataset(dataset)
    rows = TrainConfig(split=DATASETS[dataset], split_seed=args.split_seed).split_rows(ds)
    return split_means(ds, dict(zip(("train", "validation", "test"), rows, strict=True)))


def served_test_metrics(ds, val_raw, val_labels, test_raw, test_labels, calibrate: bool = True):
    from training import calibration

    calib = (calibration.fit(val_raw, val_labels, ds.tasks, "platt", "ratio") if calibrate else {})
    m = calibration.served_metrics(test_raw, test_labels, ds.tasks, calib)
    m |= label_unit_metrics(test_raw, test_labels, ds.tasks, calib)
    maps = {k: {"method": c.method, "scale": c.scale, "shift": c.shift} for k, c in calib.items()}
    return {k: v for k, v in m.items() if not k.startswith("loss/")}, maps


def train_one(args, ds, cfg: dict, seed: int) -> dict:
    import torch

    from training.train import TrainConfig, best_epoch, fit, predictions

    knobs = cfg["knobs"]
    tc = TrainConfig(epochs=cfg["epoch_cap"], batch_size=cfg["batch_size"], lr=knobs["lr"],
                     patience=cfg["patience"], split=cfg["split"], seed=seed,
                     split_seed=cfg["split_seed"] if cfg["split_seed"] is not None else 0, threads=args.threads)
    torch.manual_seed(seed)
    model = make_model(cfg["model"], knobs, ds)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    model, history, (_, val_rows, test_rows) = fit(ds, tc, progress=False, model=model)
    seconds = time.perf_counter() - t0
    best = best_epoch(history)
    metrics, maps = served_test_metrics(ds, *predictions(model, ds, val_rows), *predictions(model, ds, test_rows))
    return {**cfg, "seed": seed, "epochs_run": len(history), "best_epoch": best,
            "capped": best == cfg["epoch_cap"], "best_val_total": min(h["val_total"] for h in history),
            "val_total": [round(h["val_total"], 6) for h in history],
            "train_seconds": round(seconds, 1), "epoch_seconds": [h["seconds"] for h in history],
            "params": sum(p.numel() for p in model.parameters()), "metrics": metrics, "calibration": maps,
            "torch_threads": torch.get_num_threads(), "loadavg_start": round(load0, 2),
            "loadavg_end": round(os.getloadavg()[0], 2), "commit": git_info()["commit"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ----------------------------------------------------------------------------- baselines

def design(ds, rows: np.ndarray):
    """The model's features as a sparse matrix: one-hot sparse ids, mean-pooled multi-hot sequences
    (as the models pool them), standardised dense values."""
    from scipy import sparse

    from service.contract import model_inputs

    inputs = ds.inputs(rows)
    n = len(rows)
    blocks = []
    for spec in model_inputs(ds.schema):
        x = inputs[spec.name]
        if x.shape[0] != n:
            x = np.broadcast_to(x, (n, *x.shape[1:]))
        if spec.kind == "sparse":
            for j, name in enumerate(spec.fields):
                v = ds.schema.field(name).vocab_size
                blocks.append(sparse.csr_matrix((np.ones(n), (np.arange(n), x[:, j])), shape=(n, v)))
        elif spec.kind == "dense":
            f = [ds.schema.field(name) for name in spec.fields]
            blocks.append(sparse.csr_matrix((x - np.array([g.mean for g in f])) / np.array([g.std for g in f])))
        else:
            start = 0
            for name in spec.fields:
                f = ds.schema.field(name)
                ids = x[:, start:start + f.max_len]
                start += f.max_len
                r, c = np.nonzero(ids)
                cnt = np.maximum((ids > 0).sum(1), 1)
                v = ds.schema.field(f.vocab_of).vocab_size
                blocks.append(sparse.csr_matrix((1.0 / cnt[r], (r, ids[r, c])), shape=(n, v)))
    return sparse.hstack(blocks, format="csr")


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def baseline_outputs(kind: str, ds, train_rows, rows_list) -> tuple[list[dict], dict]:
    """Raw outputs (logits / log1p predictions) of a baseline for each row set of ``rows_list``
    (the first is the validation rows), and what was chosen on validation."""
    tasks = ds.tasks
    ctr, cvr, reg = (next(t for t in tasks if t.kind == "binary" and t.condition is None),
                     next(t for t in tasks if t.kind == "binary" and t.condition),
                     next(t for t in tasks if t.kind == "regression"))
    click = ds.label(ctr.label, train_rows) > 0
    conv = ds.label(cvr.label, train_rows)
    y_reg = np.log1p(np.maximum(ds.label(reg.label, train_rows), 0))
    if kind == "constant":
        mean_label = np.maximum(ds.label(reg.label, train_rows), 0)[click].mean()  # the served value: the mean
        consts = {ctr.name: _logit(click.mean()), cvr.name: _logit(conv[click].mean()), reg.name: np.log1p(mean_label)}
        return [{k: np.full(len(r), v, np.float32) for k, v in consts.items()} for r in rows_list], {}
    if kind == "popularity":
        item = ds.item_row
        n_items = int(item.max()) + 1
        clicks = np.bincount(item[train_rows][click], minlength=n_items)
        convs = np.bincount(item[train_rows][click], conv[click], minlength=n_items)
        ratings = np.bincount(item[train_rows][click], y_reg[click], minlength=n_items)
        prior, a = conv[click].mean(), 10.0
        rate = (convs + a * prior) / (clicks + a)
        mean_reg = (ratings + a * y_reg[click].mean()) / (clicks + a)
        return [{ctr.name: np.log1p(clicks[item[r]]).astype(np.float32),
                 cvr.name: _logit(rate[item[r]]).astype(np.float32),
                 reg.name: mean_reg[item[r]].astype(np.float32)} for r in rows_list], {"smoothing": a}
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression, Ridge

        val_rows = rows_list[0]
        x_tr, xs = design(ds, train_rows), [design(ds, r) for r in rows_list]
        y_val_click = ds.label(ctr.label, val_rows) > 0
        from training.metrics import log_loss

        def pick(make, fit_rows_mask, y, score_val, val_mask):
            best = None
            for c in (0.1, 1.0, 10.0):
                est = make(c).fit(x_tr[fit_rows_mask], y)
                s = score_val(est, xs[0][val_mask])
                if best is None or s < best[0]:
                    best = (s, est, c)
            return best[1], best[2]

        def lr(c):
            return LogisticRegression(C=c, max_iter=1000)

        def ll(est, x, yv):
            return log_loss(yv, est.predict_proba(x)[:, 1])

        e_ctr, c_ctr = pick(lr, slice(None), click, lambda e, x: ll(e, x, y_val_click), slice(None))
        y_val_conv = ds.label(cvr.label, val_rows)[y_val_click]
        e_cvr, c_cvr = pick(lr, click, conv[click] > 0, lambda e, x: ll(e, x, y_val_conv > 0), y_val_click)
        y_val_reg = np.log1p(np.maximum(ds.label(reg.label, val_rows)[y_val_click], 0))
        e_reg, c_reg = pick(lambda c: Ridge(alpha=1.0 / c), click, y_reg[click],
                            lambda e, x: float(np.mean((e.predict(x) - y_val_reg) ** 2)), y_val_click)
        chosen = {"C_ctr": c_ctr, "C_cvr": c_cvr, "ridge_alpha": 1.0 / c_reg}
        return [{ctr.name: e_ctr.decision_function(x).astype(np.float32),
                 cvr.name: e_cvr.decision_function(x).astype(np.float32),
                 reg.name: e_reg.predict(x).astype(np.float32)} for x in xs], chosen
    raise ValueError(kind)


def run_baseline(args, ds, dataset: str, kind: str) -> dict:
    from training.train import TrainConfig

    split = DATASETS[dataset]
    train_rows, val_rows, test_rows = TrainConfig(split=split, split_seed=args.split_seed).split_rows(ds)  # as fit's
    t0 = time.perf_counter()
    (val_raw, test_raw), chosen = baseline_outputs(kind, ds, train_rows, [val_rows, test_rows])
    labels = [{t.label: ds.label(t.label, r) for t in ds.tasks} for r in (val_rows, test_rows)]
    metrics, maps = served_test_metrics(ds, val_raw, labels[0], test_raw, labels[1], calibrate=kind != "constant")
    return {"dataset": dataset, "data_version": data_version(dataset), "split": split,
            "split_seed": args.split_seed if split == "random" else None, "baseline": kind,
            "chosen": chosen, "metrics": metrics, "calibration": maps,
            "seconds": round(time.perf_counter() - t0, 1), "commit": git_info()["commit"]}


def baseline_path(args, dataset: str, kind: str) -> Path:
    seed = args.split_seed if DATASETS[dataset] == "random" else "none"
    return RUNS / dataset / "baselines" / f"{kind}-{data_version(dataset)}-split{seed}.json"


# ----------------------------------------------------------------------------- running

def _lock(path: Path):
    """A lock file per run (O_EXCL), so that several processes share the work; a dead pid's lock is taken over."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    lock = LOCKS / (hashlib.sha1(str(path).encode()).hexdigest() + ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return lock
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return None  # held by a live process
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
            except PermissionError:
                return None
    return None


def run(args) -> None:
    t_start = time.monotonic()
    done = 0
    for dataset in args.datasets:
        ds = None
        for kind in BASELINES:
            path = baseline_path(args, dataset, kind)
            if path.exists() or args.skip_baselines:
                continue
            lock = _lock(path)
            if lock is None:
                continue
            try:
                ds = ds or load_dataset(dataset)
                rec = run_baseline(args, ds, dataset, kind)
                write_json(path, rec)
                print(f"{dataset:17} baseline {kind:11} {rec['seconds']:6.1f}s  "
                      f"{ {k: round(v, 4) for k, v in rec['metrics'].items() if k.startswith(('auc/', 'rmse/'))} }",
                      flush=True)
            finally:
                lock.unlink(missing_ok=True)
        while True:
            todo = [(c, s) for c, s in plan(args, dataset) if not run_path(c, s).exists()]
            if not todo:
                break
            started = False
            for cfg, seed in todo:
                if args.max_runs is not None and done >= args.max_runs:
                    return
                if args.stop_after and time.monotonic() - t_start > args.stop_after:
                    print("stop-after reached: not starting another run", flush=True)
                    return
                path = run_path(cfg, seed)
                lock = _lock(path)
                if lock is None or path.exists():
                    continue
                try:
                    ds = ds or load_dataset(dataset)
                    rec = train_one(args, ds, cfg, seed)
                    write_json(path, rec)
                finally:
                    lock.unlink(missing_ok=True)
                done += 1
                started = True
                m = rec["metrics"]
                print(f"{dataset:17} {cfg['model']:14} {json.dumps(cfg['knobs'], sort_keys=True)} s{seed} "
                      f"{rec['train_seconds']:6.0f}s epochs {rec['epochs_run']} best {rec['best_epoch']}"
                      f"{' CAPPED' if rec['capped'] else ''}  val {rec['best_val_total']:.5f}  "
                      + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k.startswith(("auc/", "rmse/"))),
                      flush=True)
                break  # re-plan: a finished grid unlocks its seeds
            if not started:
                break  # everything left is locked by other processes


# ----------------------------------------------------------------------------- report

HEADLINE = ("auc/ctr", "auc/cvr", "auc/ctcvr")


def _reg_task(metrics: dict) -> str | None:
    return next((k.split("/", 1)[1] for k in metrics if k.startswith("rmse_log1p/")), None)


def _columns(reg: str | None) -> list[tuple[str, bool]]:
    """(metric, higher is better) shown per model."""
    cols = [(m, True) for m in HEADLINE]
    if reg:
        cols += [(f"rmse/{reg}", False), (f"mae/{reg}", False), (f"rmse_log1p/{reg}", False)]
    cols += [(f"ece/{t}", False) for t in ("ctr", "cvr", "ctcvr")]
    cols += [(f"logloss/{t}", False) for t in ("ctr", "cvr", "ctcvr")]
    return cols


def _fmt(s: dict, digits: int = 4) -> str:
    if not s["n"]:
        return "pending"
    if s["n"] == 1 or not math.isfinite(s["std"]):
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" + ("" if s["n"] >= SEEDS else f" (n={s['n']})")


def aggregate(args) -> dict:
    out: dict = {"protocol": {"models": MODELS, "grid": GRID, "ablations": ABLATIONS, "comparisons": COMPARISONS,
                              "seeds": SEEDS, "split_seed": args.split_seed, "epoch_cap": args.epochs,
                              "patience": args.patience, "batch_size": args.batch_size,
                              "selection": "lowest best validation loss at seed 0",
                              "verdict": "gain when the paired mean exceeds 2 paired std (ddof=1)"},
                 "datasets": {}, "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    all_seconds: dict[str, list[float]] = {}
    pending_runs: list[tuple[str, str]] = []
    counted: set[Path] = set()
    for dataset in DATASETS:
        d: dict = {"grid": {}, "selected": {}, "variants": {}, "baselines": {}, "comparisons": []}
        grids = {}
        for m in MODELS:
            g, results = selected(args, dataset, m)
            grids[m] = results
            d["selected"][m] = g
            d["grid"][m] = {name: None if r is None else
                            {"best_val_total": r["best_val_total"], "best_epoch": r["best_epoch"],
                             "epochs_run": r["epochs_run"], "capped": r["capped"], "train_seconds": r["train_seconds"]}
                            for name, r in results.items()}
            for g, r in results.items():
                if r is None:
                    pending_runs.append((dataset, m))
                else:
                    counted.add(run_path(run_config(args, dataset, m, GRID[g]), 0))
                    all_seconds.setdefault(m, []).append(r["train_seconds"])
        for name, v in variants(args, dataset).items():
            base = name.split(":")[0]
            if v is None:
                d["variants"][name] = None
                pending_runs += [(dataset, base)] * (SEEDS - 1 if name in MODELS else SEEDS)
                continue
            cfg = run_config(args, dataset, *v)
            runs = {s: load_run(run_path(cfg, s)) for s in range(SEEDS)}
            have = {s: r for s, r in runs.items() if r is not None}
            pending_runs += [(dataset, base)] * (SEEDS - len(have))
            for s, r in have.items():
                if run_path(cfg, s) not in counted:  # a grid run, or an ablation the grid already selected
                    counted.add(run_path(cfg, s))
                    all_seconds.setdefault(base, []).append(r["train_seconds"])
            metrics = sorted({k for r in have.values() for k in r["metrics"]})
            ok = {s: r for s, r in have.items() if not r["capped"]}
            d["variants"][name] = {
                "config": v[1], "seeds": sorted(have),
                "capped_seeds": sorted(s for s, r in have.items() if r["capped"]),
                "best_epoch": [have[s]["best_epoch"] for s in sorted(have)],
                "epochs_run": [have[s]["epochs_run"] for s in sorted(have)],
                "train_seconds": [have[s]["train_seconds"] for s in sorted(have)],
                "params": next(iter(have.values()))["params"] if have else None,
                "per_seed": {k: {s: r["metrics"].get(k, math.nan) for s, r in ok.items()} for k in metrics},
                "summary": {k: summary([r["metrics"].get(k, math.nan) for r in ok.values()]) for k in metrics}}
        for kind in BASELINES:
            r = load_run(baseline_path(args, dataset, kind))
            d["baselines"][kind] = r and {"metrics": r["metrics"], "chosen": r.get("chosen"), "seconds": r["seconds"]}
        found = [r["metrics"] for res in grids.values() for r in res.values() if r] + \
                [b["metrics"] for b in d["baselines"].values() if b]
        reg = next((_reg_task(m) for m in found), None)
        # a snapshot before the selections exist: every model at the first configuration, seed 0 (not a verdict)
        first = next(iter(GRID))
        d["snapshot"] = {"config": first, "note": "seed 0 of the first grid configuration, not tuned: no verdict",
                         "runs": {m: res[first] and {"metrics": res[first]["metrics"], "best_epoch":
                                                     res[first]["best_epoch"], "epochs_run": res[first]["epochs_run"],
                                                     "capped": res[first]["capped"]}
                                  for m, res in grids.items()}}
        for a, b in COMPARISONS:
            va, vb = d["variants"].get(a), d["variants"].get(b)
            row = {"a": a, "b": b, "metrics": {},
                   # an ablation whose switch the grid had already chosen is the selected run itself
                   "identical": bool(va and vb and va["config"] == vb["config"] and a.split(":")[0] == b.split(":")[0])}
            for k, hib in [(m, h) for m, h in _columns(reg) if m in HEADLINE or m.startswith("rmse/")]:
                pa_ = va["per_seed"].get(k, {}) if va else {}
                pb_ = vb["per_seed"].get(k, {}) if vb else {}
                row["metrics"][k] = paired(pa_, pb_, higher_is_better=hib)
            d["comparisons"].append(row)
        d["regression_task"] = reg
        d["label_means"] = label_means(args, dataset) if found else {}
        out["datasets"][dataset] = d
    med = {m: float(np.median(v)) for m, v in all_seconds.items()}
    overall = float(np.median([x for v in all_seconds.values() for x in v])) if all_seconds else math.nan
    est = sum(med.get(m, overall) for _, m in pending_runs)
    out["timing"] = {"runs_done": sum(len(v) for v in all_seconds.values()),
                     "train_seconds_done": round(sum(sum(v) for v in all_seconds.values()), 1),
                     "median_run_seconds": {m: round(s, 1) for m, s in med.items()},
                     "runs_pending": len(pending_runs),
                     "estimated_seconds_pending": round(est, 0) if math.isfinite(est) else None,
                     "note": "pending runs of a model without any finished run are estimated at the median of all"}
    return out


def _pending(t: dict) -> str:
    if not t["runs_pending"]:
        return "none pending: the grid is complete."
    est = t["estimated_seconds_pending"]
    return f"{t['runs_pending']} pending" + (f", estimated {est / 3600:.0f} h more at the median run time per model "
                                             "measured so far." if est else ".")


def markdown(rep: dict) -> str:
    p, t = rep["protocol"], rep["timing"]
    lines = ["# Model quality", "",
             f"Generated {rep['generated']} by `python bench/quality.py --report` from the per-run files in "
             "`bench/results/quality_runs/`. Test split; outputs as served (Platt / ratio correction fitted on "
             f"validation). Mean ± sample std (ddof=1) over initialisation seeds 0-{p['seeds'] - 1} of the "
             "configuration selected on validation; `(n=k)`: only k seeds so far; `pending`: not run yet. Runs whose "
             "best epoch is the cap are left out. Paired differences: same seed, same split; **gain**/**loss** only "
             "beyond two paired std.", "",
             f"Grid (same for every model): {', '.join(f'{g} = {k}' for g, k in p['grid'].items())}. "
             f"Epoch cap {p['epoch_cap']}, patience {p['patience']}, batch {p['batch_size']}, random-split seed "
             f"{p['split_seed']}.", "",
             f"Progress: {t['runs_done']} runs done ({t['train_seconds_done'] / 3600:.1f} h of training on a shared "
             f"2-core machine), {_pending(t)}", ""]
    for dataset, d in rep["datasets"].items():
        reg = d["regression_task"]
        cols = _columns(reg)
        lines += [f"## {dataset}", ""]
        lines += ["| model | config | " + " | ".join(c for c, _ in cols) + " | best epoch (of run) | params |",
                  "|---" * (len(cols) + 4) + "|"]
        for name, v in d["variants"].items():
            if v is None:
                lines.append(f"| {name} | pending | " + " | ".join("pending" for _ in cols) + " | | |")
                continue
            g = d["selected"].get(name.split(":")[0])
            cfg = g if name in MODELS else f"{g} + {ABLATIONS[name][1]}"
            cells = [_fmt(v["summary"].get(c, {"n": 0})) for c, _ in cols]
            epochs = ", ".join(f"{b}/{e}" for b, e in zip(v["best_epoch"], v["epochs_run"], strict=True))
            capped = f" **capped: seeds {v['capped_seeds']}**" if v["capped_seeds"] else ""
            lines.append(f"| {name} | {cfg} | " + " | ".join(cells) + f" | {epochs or 'pending'}{capped} | "
                         f"{v['params'] or ''} |")
        for kind, b in d["baselines"].items():
            if b is None:
                lines.append(f"| baseline: {kind} | | " + " | ".join("pending" for _ in cols) + " | | |")
                continue
            cells = [f"{b['metrics'].get(c, math.nan):.4f}" for c, _ in cols]
            lines.append(f"| baseline: {kind} | {b.get('chosen') or ''} | " + " | ".join(cells) + " | | |")
        if reg:
            bias = [f"mean_label/{reg}", f"mean_pred/{reg}", f"mean_bias/{reg}",
                    f"mean_pred_uncalibrated/{reg}", f"mean_bias_uncalibrated/{reg}"]
            lines += ["", f"The regression output as an expected value: mean predicted vs mean observed {reg} on the "
                      "clicked test rows, as served (the ratio correction fitted on validation) and uncorrected "
                      "(expm1 of the model's log1p output); bias = mean predicted / mean observed - 1.", "",
                      "| model | " + " | ".join(bias) + " |", "|---" * (len(bias) + 1) + "|"]
            for name, v in d["variants"].items():
                lines.append(f"| {name} | " + " | ".join("pending" if v is None else _fmt(v["summary"].get(c, {"n": 0}))
                                                      for c in bias) + " |")
            lm = d["label_means"].get(reg)
            if lm:
                rel = lm["test"]["se"] / lm["test"]["mean"]
                lines += ["", f"Observed mean {reg} (± standard error, clicked rows) per split: " + ", ".join(
                    f"{k} {x['mean']:.4g} ± {x['se']:.3g} (n={x['n']:,})" for k, x in lm.items())
                    + f". The test mean's own standard error is {rel:.1%} of it: a mean bias within about "
                    f"±{2 * rel:.1%} is within the test sample's noise."]
        shown = [c for c, _ in cols if c in HEADLINE or c.startswith("rmse/")]
        lines += ["", "Paired differences a - b (mean ± paired std, n seeds, verdict):", "",
                  "| a - b | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for row in d["comparisons"]:
            if row.get("identical"):
                lines.append(f"| {row['a']} - {row['b']} | " + " | ".join("same configuration (selected by the grid)"
                                                                        for _ in shown) + " |")
                continue
            cells = []
            for c in shown:
                r = row["metrics"][c]
                cells.append("pending" if r["verdict"] == "pending" else
                             f"{r['mean']:+.4f} ± {r['std']:.4f} (n={r['n']}) {r['verdict']}")
            lines.append(f"| {row['a']} - {row['b']} | " + " | ".join(cells) + " |")
        snap = d["snapshot"]
        lines += ["", f"Snapshot: every model at {snap['config']} (the first grid configuration), seed 0 - "
                  "**provisional, not tuned, one seed: no verdict**; the table above is the result.", "",
                  "| model | " + " | ".join(c for c, _ in cols) + " | best epoch / run |",
                  "|---" * (len(cols) + 2) + "|"]
        for m, r in snap["runs"].items():
            if r is None:
                lines.append(f"| {m} | " + " | ".join("pending" for _ in cols) + " | |")
                continue
            cap = " CAPPED" if r["capped"] else ""
            lines.append(f"| {m} | " + " | ".join(f"{r['metrics'].get(c, math.nan):.4f}" for c, _ in cols)
                         + f" | {r['best_epoch']}/{r['epochs_run']}{cap} |")
        lines += ["", "Tuning grid (seed 0): best validation loss (best epoch / epochs run); * = selected.", "",
                  "| model | " + " | ".join(p["grid"]) + " |", "|---" * (len(p["grid"]) + 1) + "|"]
        for m, res in d["grid"].items():
            cells = []
            for g, r in res.items():
                if r is None:
                    cells.append("pending")
                    continue
                mark = "*" if d["selected"][m] == g else ""
                cap = " CAPPED" if r["capped"] else ""
                cells.append(f"{mark}{r['best_val_total']:.5f} ({r['best_epoch']}/{r['epochs_run']}){cap}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def report_files(rep: dict) -> str:
    """Writes ``OUT``.json and .md; returns the Markdown."""
    write_json(OUT.with_suffix(".json"), rep)
    md = markdown(rep)
    OUT.with_suffix(".md").write_text(md)
    return md


def report(args) -> None:
    rep = aggregate(args)
    rep["machine"] = machine_info()
    print(report_files(rep))
    print(f"wrote {OUT.with_suffix('.md')} and {OUT.with_suffix('.json')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ablations", default=",".join(ABLATIONS))
    p.add_argument("--epochs", type=int, default=50, help="epoch cap (early stopping should end every run before)")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--stop-after", type=float, default=None, help="seconds after which no new run starts")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--report", action="store_true", help="only aggregate the existing runs")
    p.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help="where the per-run files live")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="report path without suffix")
    args = p.parse_args()
    global RUNS, OUT
    RUNS, OUT = Path(args.runs_dir), Path(args.out)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.models = [m for m in args.models.split(",") if m]
    args.ablations = [a for a in args.ablations.split(",") if a]
    for d in args.datasets:
        if d not in DATASETS:
            p.error(f"--datasets: unknown {d!r}; choose from {list(DATASETS)}")
    if not args.report:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
