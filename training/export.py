"""Export a trained :class:`MultiTaskModel` to ONNX as a new, versioned bundle.

A bundle is ``<store>/<name>/<version>/`` holding ``model.onnx``, ``manifest.json``,
``vocab.json`` and any extra files (reports). It is written into ``<store>/<name>/.tmp-<uuid>``
and renamed into place in one step, so a reader never sees half a bundle. Before the rename, a
parity gate compares onnxruntime with PyTorch on the given rows and on a broadcast case (one
user, all the items); a bundle that disagrees by more than ``atol`` is not published.

Rewrites make the exported graphs cheaper than the model as trained, with the same maths:

* the request side once (``request_once``, see :mod:`training.models.blocks`): the user's and
  the context's columns of every first layer are multiplied at batch 1 and broadcast-added to
  the items' part at batch N;
* BatchNorm folded (:func:`fold_batch_norms`): in eval mode a BatchNorm is a fixed affine map per
  channel, so it is folded into the weights and bias of the layer before it - no BatchNorm node,
  and no transposes around the experts' per-(expert, channel) statistics;
* for the int8 model only, the experts' later layers one GEMM per expert
  (:attr:`~training.models.blocks.Experts.per_expert`): onnxruntime quantises a 2-D GEMM per
  output channel, a batched matmul over a 3-D weight only per tensor, and the per-expert int8
  model runs faster. (The float32 graph keeps the batched matmul: there it is the faster form.)

The parity gate's reference is the model exactly as trained (plain ``[N, D]`` tensors, BatchNorm
as a layer) followed by the same post-hoc calibration (:mod:`training.calibration`), so the gate
checks both rewrites and the calibration as exported.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import math
import os
import platform
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from service.contract import (
    MANIFEST_FILE,
    MODEL_FILE,
    PRECISION_FILES,
    VOCAB_FILE,
    BundleManifest,
    OutputCalibration,
    model_inputs,
    sha256_file,
)
from service.store import list_versions
from training.models.blocks import MLP, EmbeddingLayer, Experts, MultiTaskModel
from training.quantize import Int8Job, make_int8

log = logging.getLogger(__name__)

OPSET = 17
EXAMPLE_ROWS = 8  # rows traced for the export (the batch axes are dynamic)


class ExportParityError(RuntimeError):
    """onnxruntime and PyTorch disagree on the parity rows: the bundle was not published."""


@contextlib.contextmanager
def _flag(model: nn.Module, kind: type, attr: str, on: bool):
    """Within the block, every ``kind`` module of ``model`` has ``attr`` set to ``on``; the previous
    values are restored after."""
    layers = [m for m in model.modules() if isinstance(m, kind)]
    before = [getattr(m, attr) for m in layers]
    for m in layers:
        setattr(m, attr, on)
    try:
        yield model
    finally:
        for m, b in zip(layers, before, strict=True):
            setattr(m, attr, b)


def request_once(model: nn.Module, on: bool = True):
    """Within the block, the model's embedding layers return :class:`~training.models.blocks.Parts`
    (user/context blocks at their own batch) when ``on``; their previous setting is restored after."""
    return _flag(model, EmbeddingLayer, "request_once", on)


class ServingModel(nn.Module):
    """A :class:`MultiTaskModel` as served: positional inputs in ``model_inputs`` order, outputs in
    task order - a probability for a binary task, ``expm1(max(pred, 0))`` (>= 0) for a regression.

    ``request_once`` (default): the first layers compute the user/context part at their own batch
    (1 at serving) and broadcast-add it (:func:`request_once`); False runs the model as trained.
    ``per_expert``: the experts' later layers as one GEMM per expert
    (:attr:`~training.models.blocks.Experts.per_expert`), the graph the int8 model is quantised
    from; False (default): one batched matmul, the faster float32 graph.
    ``calibration`` (by task, :class:`~service.contract.OutputCalibration`): the post-hoc maps
    traced into the graph - ``sigmoid(scale * logit + shift)`` (platt) and
    ``max(scale * exp(max(pred, 0)) - 1, 0)`` (smearing); a task without one is served as above."""

    def __init__(self, model: MultiTaskModel, request_once: bool = True,
                 calibration: dict[str, OutputCalibration] | None = None, per_expert: bool = False):
        super().__init__()
        self.model = model
        self.request_once = request_once
        self.per_expert = per_expert
        self.calibration = dict(calibration or {})
        unknown = set(self.calibration) - {t.name for t in model.tasks}
        if unknown:
            raise ValueError(f"calibration for unknown tasks {sorted(unknown)}")
        self.input_names = [i.name for i in model_inputs(model.schema)]

    def _output(self, task, x: Tensor) -> Tensor:
        c = self.calibration.get(task.name)
        if task.kind == "binary":
            return torch.sigmoid(x if c is None else x * c.scale + c.shift)
        # exp(x) - 1 rather than expm1: ONNX has no Expm1 (x >= 0 here, so no precision is lost)
        e = torch.exp(x.clamp(min=0))
        return e - 1 if c is None else (e * c.scale - 1).clamp(min=0)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        with request_once(self.model, self.request_once), _flag(self.model, Experts, "per_expert", self.per_expert):
            out = self.model(dict(zip(self.input_names, inputs, strict=True)))
        return tuple(self._output(t, out[t.name]) for t in self.model.tasks)


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------

def latest_version(store: str | Path, name: str) -> int | None:
    """Newest published version (the store's own listing: integer directories only)."""
    versions = list_versions(store, name)
    return versions[-1] if versions else None


# ---------------------------------------------------------------------------------------------
# ONNX export and the parity gate
# ---------------------------------------------------------------------------------------------

def _as_arrays(model: MultiTaskModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for mi in model_inputs(model.schema):
        if mi.name not in inputs:
            raise ValueError(f"parity inputs lack {mi.name!r}")
        a = np.ascontiguousarray(inputs[mi.name], dtype=mi.dtype)
        if a.ndim != 2 or a.shape[1] != mi.width:
            raise ValueError(f"parity input {mi.name!r} has shape {a.shape}, expected [rows, {mi.width}]")
        out[mi.name] = a
    return out


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that follows a linear layer into it, in place; returns ``model``.

    ``BN(x W + b) = x (W s) + ((b - mean) s + beta)`` with ``s = gamma / sqrt(var + eps)`` per
    channel: in an :class:`MLP` a ``Linear`` followed by ``BatchNorm1d`` (the BatchNorm becomes an
    Identity); in :class:`Experts` each layer's ``[E*h]`` statistics fold into its ``[E, in, h]``
    weights (``norms`` becomes None). Computed in float64. Only for inference: the running
    statistics are baked in."""
    def scale_shift(bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
        s = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            s = s * bn.weight.double()
        shift = -bn.running_mean.double() * s + (bn.bias.double() if bn.bias is not None else 0.0)
        return s, shift

    for m in list(model.modules()):
        if isinstance(m, MLP):
            for i in range(len(m) - 1):
                lin, bn = m[i], m[i + 1]
                if isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats:
                    s, shift = scale_shift(bn)
                    lin.weight.copy_((lin.weight.double() * s[:, None]).float())
                    lin.bias.copy_((lin.bias.double() * s + shift).float())
                    m[i + 1] = nn.Identity()
        elif isinstance(m, Experts) and m.norms is not None:
            for w, b, bn in zip(m.weights, m.biases, m.norms, strict=True):
                s, shift = (t.view(m.n_experts, 1, -1) for t in scale_shift(bn))  # [E, 1, h]
                w.copy_((w.double() * s).float())
                b.copy_((b.double() * s + shift).float())
            m.norms = None
    return model


def _export_onnx(serving: ServingModel, example: dict[str, np.ndarray], path: Path) -> None:
    """Trace ``serving`` into ``path``: the model's BatchNorms folded (on a copy) and the request
    side once as ``serving`` says."""
    serving = ServingModel(fold_batch_norms(copy.deepcopy(serving.model).eval()), serving.request_once,
                           serving.calibration, serving.per_expert)
    schema_inputs = model_inputs(serving.model.schema)
    axis = {"user": "user_batch", "context": "context_batch", "item": "n"}
    dynamic_axes = {mi.name: {0: axis[mi.entity]} for mi in schema_inputs}
    dynamic_axes.update({t.name: {0: "n"} for t in serving.model.tasks})
    args = tuple(torch.from_numpy(example[mi.name]) for mi in schema_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(serving, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=[mi.name for mi in schema_inputs],
                          output_names=[t.name for t in serving.model.tasks],
                          dynamic_axes=dynamic_axes)
    onnx.checker.check_model(str(path))


def parity_cases(model: MultiTaskModel, inputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The rows as given (one user per row), and a broadcast case: the first row's user and context
    (batch 1) with every item row."""
    entity = {mi.name: mi.entity for mi in model_inputs(model.schema)}
    broadcast = {k: (v if entity[k] == "item" else v[:1]) for k, v in inputs.items()}
    return {"rows": inputs, "broadcast": broadcast}


def check_parity(serving: ServingModel, onnx_path: str | Path, parity_inputs: dict[str, np.ndarray],
                 atol: float = 1e-4) -> dict[str, float]:
    """Max difference per task between onnxruntime and PyTorch (eval mode) over :func:`parity_cases`.

    The PyTorch side is ``serving.model`` as trained (``request_once`` off), whatever ``serving``
    was exported with, followed by ``serving.calibration``: the gate checks the request-once
    rewrite and the calibration as well as the export.

    Binary tasks are compared as probabilities; regression tasks on the ``log1p`` scale the model
    predicts on (an absolute difference in seconds would fail on float32 rounding of large values).
    Raises :class:`ExportParityError` if a task differs by more than ``atol``; returns the diffs.
    """
    model = serving.model
    serving = ServingModel(model, request_once=False, calibration=serving.calibration)  # the model as trained
    inputs = _as_arrays(model, parity_inputs)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [mi.name for mi in model_inputs(model.schema)]
    diffs = {t.name: 0.0 for t in model.tasks}
    device = next(serving.parameters()).device
    was_training = serving.training
    serving.eval()
    try:
        for case in parity_cases(model, inputs).values():
            got = session.run([t.name for t in model.tasks], case)
            with torch.no_grad():
                want = serving(*(torch.from_numpy(case[n]).to(device) for n in names))
            for t, g, w in zip(model.tasks, got, want, strict=True):
                g, w = g.astype(np.float64), w.cpu().numpy().astype(np.float64)
                if g.shape != w.shape:
                    raise ExportParityError(f"task {t.name!r}: onnx shape {g.shape} != torch shape {w.shape}")
                if t.kind == "regression":
                    g, w = np.log1p(g), np.log1p(w)
                d = float(np.max(np.abs(g - w))) if g.size else 0.0
                diffs[t.name] = max(diffs[t.name], d if np.isfinite(d) else float("inf"))
    finally:
        serving.train(was_training)
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise ExportParityError("onnxruntime and PyTorch disagree: "
                                + ", ".join(f"task {k!r} max abs diff {v:.3g} > atol {atol:g}" for k, v in bad.items()))
    return diffs


# ---------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def export_bundle(model: MultiTaskModel, *, name: str, store: str | Path, train_config: dict,
                  metrics: dict[str, float], parity_inputs: dict[str, np.ndarray],
                  vocabs: dict[str, list[str]], extra_files: dict[str, str | Path] | None = None,
                  atol: float = 1e-4, int8: Int8Job | None = None,
                  calibration: dict[str, OutputCalibration] | None = None) -> Path:
    """Export ``model`` to ``<store>/<name>/<next version>/`` and return that path.

    ``parity_inputs``: arrays by ONNX input name, one user per row (>= 1000 rows recommended).
    ``extra_files``: ``{target file name: source path}`` copied into the bundle.
    ``int8``: also write ``model.int8.onnx`` (:func:`training.quantize.make_int8`, scored on the
    job's test rows) and record it in the manifest's ``precisions`` - before the bundle is published.
    ``calibration``: post-hoc maps by task (:mod:`training.calibration`, fitted on validation) that
    the graph applies and the parity gate checks; recorded in the manifest's ``calibration``.
    The manifest's metrics get ``parity_max_abs_diff/<task>``; non-finite metrics (NaN, inf) are
    left out with a warning, since JSON cannot hold them.
    """
    reserved = {MODEL_FILE, MANIFEST_FILE, VOCAB_FILE, *PRECISION_FILES.values()}
    for target in extra_files or {}:
        if target in reserved or Path(target).name != target or target.startswith("."):
            raise ValueError(f"extra file name {target!r} must be a plain file name other than {sorted(reserved)}")
    inputs = _as_arrays(model, parity_inputs)
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) != 1 or 0 in rows:
        raise ValueError(f"parity inputs need the same, non-zero number of rows everywhere, got {sorted(rows)}")

    root = Path(store) / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    serving = ServingModel(copy.deepcopy(model).cpu().eval(), calibration=calibration)  # the caller's is untouched
    try:
        onnx_path = tmp / MODEL_FILE
        _export_onnx(serving, {k: v[:EXAMPLE_ROWS] for k, v in inputs.items()}, onnx_path)
        diffs = check_parity(serving, onnx_path, inputs, atol)
        precisions = {}
        if int8 is not None:  # quantised from the same model traced with one GEMM per expert (gated too)
            source = tmp / ".int8-source.onnx"
            per_expert = ServingModel(serving.model, calibration=serving.calibration, per_expert=True)
            _export_onnx(per_expert, {k: v[:EXAMPLE_ROWS] for k, v in inputs.items()}, source)
            check_parity(per_expert, source, inputs, atol)
            precisions["int8"] = make_int8(tmp, model.tasks, int8.eval_inputs, int8.eval_labels, int8.calibration,
                                           int8.config, source=source)
            source.unlink()

        (tmp / VOCAB_FILE).write_text(json.dumps(vocabs))
        for target, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / target)
        dropped = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
        if dropped:  # JSON has no NaN/inf: pydantic would write null and the manifest would not load back
            log.warning("export %s: leaving out non-finite metrics %s", name, dropped)
        all_metrics = {**{k: float(v) for k, v in metrics.items() if k not in dropped},
                       **{f"parity_max_abs_diff/{k}": v for k, v in diffs.items()}}
        sha = sha256_file(onnx_path)

        version = (latest_version(store, name) or 0) + 1
        while True:
            manifest = BundleManifest(
                name=name, version=version, architecture=model.arch, tasks=model.tasks,
                inputs=model_inputs(model.schema), outputs=[t.name for t in model.tasks],
                feature_schema=model.schema, metrics=all_metrics, train_config=train_config,
                sha256=sha, library_versions=library_versions(), precisions=precisions,
                calibration=serving.calibration)
            text = manifest.to_json()
            BundleManifest.from_json(text)  # never publish a manifest that does not load back
            (tmp / MANIFEST_FILE).write_text(text)
            final = root / str(version)
            try:
                if final.exists():  # rename() would silently replace an empty directory
                    raise FileExistsError(final)
                os.rename(tmp, final)
                return final
            except OSError as e:
                if not isinstance(e, FileExistsError) and e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version = max(version + 1, (latest_version(store, name) or 0) + 1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
