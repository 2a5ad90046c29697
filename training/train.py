"""The training loop: multi-task losses, early stopping, test metrics, a report, then export into a
versioned bundle.

The losses are :func:`training.losses.task_losses` (ESMM for conditional binary tasks), weighted
per task; the validation loss used for early stopping is their weighted sum. A model with
auxiliary training losses (mutual learning's Global Knowledge Distillation, see
``training.models.mutual``) has ``forward_with_aux`` and ``aux_losses``: ``fit`` adds those terms
to the weighted task losses. The test metrics are :func:`training.metrics.metrics_of`.

Under ``torchrun --nproc_per_node N`` the same code trains with DistributedDataParallel: sharded
batches, metrics gathered from all ranks, rank-0-only logging, report and export (the choices are
in :mod:`training.distributed`). ``TrainConfig.int8`` adds an int8 model to the bundle
(:mod:`training.quantize`). ``TrainConfig.calibration`` / ``watch_time_correction`` choose the
post-hoc maps fitted on the validation split and folded into the exported graph
(:mod:`training.calibration`); the test metrics judge the outputs as served.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from service.contract import TaskSpec
from training import calibration as calibration_mod
from training import distributed
from training.data.dataset import EncodedDataset, prepare
from training.export import export_bundle
from training.losses import task_losses
from training.metrics import metrics_of
from training.models import build_model
from training.quantize import Int8Job
from training.report import write_report

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    arch: str = "ple"
    epochs: int = 8
    batch_size: int = 2048
    lr: float = 2e-3
    weight_decay: float = 1e-6
    patience: int = 2  # epochs without validation improvement before stopping
    split: str = "random"  # random | time | column (the dataset's own train/valid/test column)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42  # initialisation, batch order and dropout; also the split's unless split_seed is set
    split_seed: int | None = None  # the random split's permutation (None: seed), separate from initialisation
    max_rows: int | None = None  # use only the first rows of the log (quick runs)
    threads: int = 0  # torch intra-op threads; 0 = all cores
    loss_weights: dict[str, float] = field(default_factory=dict)  # task -> weight (default 1)
    model: dict = field(default_factory=dict)  # architecture config overrides
    int8: bool = False  # also write an int8 model into the bundle (training.quantize), AUC deltas in the manifest
    device: str = "cpu"  # cpu | cuda | auto; under torchrun, cuda trains with nccl (one GPU per rank), cpu with gloo
    # platt | none: post-hoc map of binary outputs, fitted on validation (training.calibration)
    calibration: str = "platt"
    watch_time_correction: str = "ratio"  # ratio | smearing | none: regression outputs as expected values (ditto)

    def __post_init__(self):
        calibration_mod.check_options(self.calibration, self.watch_time_correction)

    def split_rows(self, ds: EncodedDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (train, validation, test) exposure rows of ``ds`` that :func:`fit` trains, stops and tests on."""
        return ds.split(self.split, self.fractions, self.seed if self.split_seed is None else self.split_seed)


def _tensors(batch: dict[str, np.ndarray], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    if device is None or device.type == "cpu":
        return out
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


class TrainStep(nn.Module):
    """One step's forward: ``(inputs, labels) -> (total loss, task losses, auxiliary losses)``.

    The module DistributedDataParallel wraps (its forward is what DDP hooks into), so the loss of a
    model with auxiliary terms (``forward_with_aux``/``aux_losses``) goes through it as well."""

    def __init__(self, model: nn.Module, tasks: list[TaskSpec], weights: dict[str, float]):
        super().__init__()
        self.model, self.tasks, self.weights = model, tasks, weights
        self.has_aux = hasattr(model, "forward_with_aux")

    def forward(self, inputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
        if self.has_aux:
            out, aux = self.model.forward_with_aux(inputs)
            aux_losses = self.model.aux_losses(out, aux, labels)
        else:
            out, aux_losses = self.model(inputs), {}
        losses = task_losses(out, labels, self.tasks)
        total = sum(self.weights[k] * v for k, v in losses.items()) + sum(aux_losses.values())
        return total, losses, aux_losses


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model, ds: EncodedDataset, rows: np.ndarray, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Raw model outputs (logits / log1p predictions) for the given exposure rows."""
    model.eval()
    device = _device_of(model)
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in ds.tasks}
    for i in range(0, len(rows), batch_size):
        out = model(_tensors(ds.inputs(rows[i:i + batch_size]), device))
        for k in parts:
            parts[k].append(out[k].cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}


def predictions(model, ds: EncodedDataset, rows: np.ndarray,
                ctx: distributed.Context | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(raw outputs, labels by label name)`` of ``rows``. With a parallel ``ctx`` each rank
    predicts every W-th row and the predictions are gathered: every rank gets all ``rows``."""
    if ctx is not None and ctx.parallel:
        rows = rows[ctx.rank::ctx.world]
        raw = distributed.gather({**predict(model, ds, rows), "__rows__": rows}, ctx)
        rows = raw.pop("__rows__")
    else:
        raw = predict(model, ds, rows)
    return raw, {t.label: ds.label(t.label, rows) for t in ds.tasks}


def evaluate(model, ds: EncodedDataset, rows: np.ndarray,
             ctx: distributed.Context | None = None) -> dict[str, float]:
    """Metrics of ``rows`` (:func:`training.metrics.metrics_of`, with the mean loss of each task)
    from the model's own outputs (:func:`predictions`; no post-hoc calibration)."""
    return metrics_of(*predictions(model, ds, rows, ctx), ds.tasks)


#: an epoch counts as a validation improvement when its loss is below the best so far minus this
MIN_DELTA = 1e-5


def best_epoch(history: list[dict]) -> int:
    """The epoch (1-based) whose weights :func:`fit` restored: the last one that improved the
    validation loss by more than :data:`MIN_DELTA` (0 for an empty history)."""
    best, at = math.inf, 0
    for rec in history:
        if rec["val_total"] < best - MIN_DELTA:
            best, at = rec["val_total"], rec["epoch"]
    return at


def fit(ds: EncodedDataset, cfg: TrainConfig, progress: bool = True, model=None):
    """Train with early stopping on the validation loss; returns (model, history, split rows).

    ``model`` (optional) is a ready module with the MultiTaskModel interface (the benchmark passes
    peer implementations); by default ``cfg.arch`` / ``cfg.model`` build one. Inside a torchrun
    process group (:func:`training.distributed.setup`) it trains data-parallel; only rank 0
    shows progress."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = distributed.current(cfg.device)
    progress = progress and ctx.main
    train_rows, val_rows, test_rows = cfg.split_rows(ds)
    if model is None:
        model = build_model(cfg.arch, ds.schema, ds.tasks, **cfg.model)
    model.to(ctx.device)
    weights = {t.name: cfg.loss_weights.get(t.name, 1.0) for t in ds.tasks}
    step = TrainStep(model, ds.tasks, weights)
    if ctx.parallel:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs per rank; the weights come from rank 0
        # static_graph: the same parameters take part in every step (some may never: DDP learns
        # which at the first step instead of failing on them)
        step = DistributedDataParallel(step, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                       static_graph=True)
    # fused: one kernel over all parameters (the same Adam; ~4x faster a step than the per-tensor loop on CPU)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=ctx.device.type in ("cpu", "cuda"))
    rng = np.random.default_rng(cfg.seed)  # the same permutations on every rank
    history: list[dict] = []
    best, best_state, bad = math.inf, None, 0
    batch = max(1, cfg.batch_size // ctx.world)  # per rank: cfg.batch_size is the global batch
    n_rows = len(train_rows) // ctx.world
    n_batches = math.ceil(n_rows / batch)
    if n_rows % batch == 1 and n_batches > 1:
        n_batches -= 1  # a last batch of one row cannot be batch-normalised: leave it for next epoch
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = distributed.shard(rng.permutation(train_rows), ctx)
        sums = {t.name: 0.0 for t in ds.tasks}
        aux_sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
        for b in bar:
            rows = order[b * batch:(b + 1) * batch]
            labels = _tensors({t.label: ds.label(t.label, rows) for t in ds.tasks}, ctx.device)
            total, losses, aux_losses = step(_tensors(ds.inputs(rows), ctx.device), labels)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            for k, v in losses.items():
                sums[k] += v.item()
            for k, v in aux_losses.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + v.item()
            if b % 20 == 0:
                bar.set_postfix(loss=f"{total.item():.4f}")
        distributed.sync_buffers(model, ctx)
        val = evaluate(model, ds, val_rows, ctx)  # the same numbers on every rank
        val_total = sum(weights[t.name] * val[f"loss/{t.name}"] for t in ds.tasks)
        rec = {"epoch": epoch, "seconds": round(time.perf_counter() - t0, 2),
               "train": {k: v / n_batches for k, v in sums.items()}, "val": val, "val_total": val_total}
        if aux_sums:
            rec["train_aux"] = {k: v / n_batches for k, v in aux_sums.items()}
        if ctx.parallel:
            rec["ranks"] = ctx.world  # train losses are rank 0's batches; val over all rows
        history.append(rec)
        shown = "  ".join(f"{k}={v:.4f}" for k, v in val.items() if not k.startswith("loss/"))
        if ctx.main:
            log.info("epoch %d  %.1fs  val loss %.5f  %s", epoch, rec["seconds"], val_total, shown)
        if progress:
            tqdm.write(f"epoch {epoch}: {rec['seconds']:.0f}s  val_loss={val_total:.5f}  {shown}")
        if val_total < best - MIN_DELTA:
            best, bad = val_total, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                if progress:
                    tqdm.write(f"early stopping: no validation improvement for {bad} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history, (train_rows, val_rows, test_rows)


def train(data: str | Path, name: str, store: str | Path = "model_store", cfg: TrainConfig | None = None,
          progress: bool = True) -> tuple[Path, dict[str, float]]:
    """Prepare the data, fit, evaluate on the test split, write the report, export the bundle.

    Under torchrun every rank trains (data-parallel, :mod:`training.distributed`) and computes the
    test metrics; rank 0 alone writes the report and the bundle, whose path every rank returns."""
    cfg = cfg or TrainConfig()
    ctx, owns_group = distributed.setup(cfg.device)
    try:
        return _train(data, name, store, cfg, progress and ctx.main, ctx)
    finally:
        distributed.teardown(owns_group)


def _train(data, name, store, cfg: TrainConfig, progress: bool, ctx: distributed.Context):
    t0 = time.perf_counter()
    ds = prepare(data, max_rows=cfg.max_rows)
    if progress:
        tqdm.write(f"data: {len(ds):,} exposures, {len(ds.users.ids):,} users, {len(ds.items.ids):,} items, "
                   f"{len(ds.schema.all_fields())} fields  ({time.perf_counter() - t0:.1f}s)"
                   + (f"  [{ctx.world} ranks]" if ctx.parallel else ""))
    model, history, (train_rows, val_rows, test_rows) = fit(ds, cfg, progress)
    # post-hoc calibration: fitted on the validation rows; the test metrics judge the outputs as
    # served, with the model's own as <family>_uncalibrated/<name> (training.calibration)
    calib = calibration_mod.fit(*predictions(model, ds, val_rows, ctx), ds.tasks, cfg.calibration,
                                cfg.watch_time_correction)
    test_raw, test_labels = predictions(model, ds, test_rows, ctx)
    metrics = calibration_mod.served_metrics(test_raw, test_labels, ds.tasks, calib)
    curves = calibration_mod.curves(test_raw, test_labels, ds.tasks, calib) if ctx.main else {}
    metrics = {k: v for k, v in metrics.items() if not k.startswith("loss/")} | \
              {f"test_{k.replace('/', '_')}": v for k, v in metrics.items() if k.startswith("loss/")}
    n_params = sum(p.numel() for p in model.parameters())
    info = {"rows": {"train": len(train_rows), "validation": len(val_rows), "test": len(test_rows)},
            "parameters": n_params, "seconds": round(time.perf_counter() - t0, 1),
            "epochs_run": len(history), "best_epoch": best_epoch(history), "epoch_cap": cfg.epochs}
    if ctx.parallel:
        info["ranks"] = ctx.world
    bundle: Path | None = None
    error: str | None = None
    if ctx.main:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                report_json, report_png = write_report(Path(tmp), cfg=asdict(cfg), model_config=asdict(model.config),
                                                       history=history, test_metrics=metrics, info=info,
                                                       calibration=calib, reliability=curves)
                parity_rows = test_rows[:2048]
                int8 = None
                if cfg.int8:
                    int8 = Int8Job(eval_inputs=ds.inputs(test_rows),
                                   eval_labels={t.label: ds.label(t.label, test_rows) for t in ds.tasks},
                                   calibration=ds.inputs(val_rows[:1024]))
                bundle = export_bundle(
                    model, name=name, store=store,
                    train_config={"train": asdict(cfg), "model": asdict(model.config), **info},
                    metrics=metrics, parity_inputs=ds.inputs(parity_rows), vocabs=ds.vocabs,
                    extra_files={"report.json": report_json, "report.png": report_png}, int8=int8,
                    calibration=calib,
                )
        except BaseException as e:
            if not ctx.parallel:
                raise
            error = f"{type(e).__name__}: {e}"
            distributed.broadcast((None, error), ctx)
            raise
    bundle, error = distributed.broadcast((bundle, error), ctx)
    if error is not None:
        raise RuntimeError(f"rank 0 failed to export the bundle: {error}")
    return bundle, metrics


def format_metrics(metrics: dict[str, float]) -> str:
    return "\n".join(f"  {k:<28} {v:.4f}" for k, v in metrics.items())

