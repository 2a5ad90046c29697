"""An optional int8 model next to the fp32 one in a bundle, with its quality cost measured.

``model.int8.onnx`` is made from the exported (and parity-checked) ``model.onnx`` with
onnxruntime's quantisation tools, scored next to fp32 on the held-out test rows, and recorded in
the manifest (``precisions["int8"]``: file, sha256, method, ``auc_delta`` per AUC metric,
``metric_delta``, ``max_abs_diff``). The service serves it only to routing variants that ask
for ``precision: int8``.

What was chosen, and why:

* **Which ops**: the weight MatMul/Gemm nodes only (embedding gathers, softmax, the element-wise ops stay
  fp32). That is where the time goes, and their weights are initializers that can be quantised
  once, ahead of time.
* **Methods, tried in order until the AUCs hold** (``QuantizeConfig.methods``; the first whose
  every AUC metric drops by at most ``tolerance``, 0.001 by default, is kept):

  1. ``dynamic/per-channel`` - int8 weights with one scale per output channel (per expert and
     channel: the int8 model is quantised from the graph exported with one 2-D GEMM per expert
     layer (:attr:`training.models.blocks.Experts.per_expert`): onnxruntime's integer MatMul
     takes one scale per tensor for a 3-D weight, and the per-expert graph's int8 model is also
     the faster one; see ``docs/performance.md``), activations quantised on the fly per
     run (no calibration data, robust to each request's input range). First because it was both
     the more accurate and the faster of the dynamic variants on the demo and bench-size PLEs;
  2. ``dynamic`` - one weight scale per tensor;
  3. ``dynamic/per-channel/fp32-heads`` - as 1, but the gates and the towers' output layers stay
     fp32: they are small (no speed to win) and sit right before a softmax / sigmoid, where an
     error moves the prediction most;
  4. ``static/per-channel`` - QDQ with activation ranges calibrated (MinMax) on held-out rows.

  When none holds the bound, the one with the smallest worst AUC drop is kept, the manifest says
  ``within_tolerance: false`` and a warning is logged: the bundle is still published (fp32 is
  unaffected; a variant has to opt in to int8).
* **What is compared**: both models through onnxruntime on the same rows, so the delta is the
  quantisation's alone. Metrics are :func:`training.metrics.metrics_of` on the outputs mapped back
  to the raw scale (logit / ``log1p``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.onnx_model import ONNXModel

from service.contract import PRECISION_FILES, PrecisionFile, TaskSpec, sha256_file
from training.metrics import metrics_of

log = logging.getLogger(__name__)

#: rows per onnxruntime run when scoring: about a serving batch. Dynamic int8 quantises the
#: activations with one scale per run, so its error depends on what is in the batch.
EVAL_BATCH = 512
METHODS = ("dynamic/per-channel", "dynamic", "dynamic/per-channel/fp32-heads", "static/per-channel")
OPS = ["MatMul", "Gemm"]


@dataclass
class QuantizeConfig:
    methods: tuple[str, ...] = METHODS  # tried in this order (see the module doc)
    tolerance: float = 0.001  # largest AUC drop (any AUC metric of the test split) that is accepted
    calibration_rows: int = 1024  # held-out rows for the static method's activation ranges
    max_eval_rows: int = 200_000  # test rows scored for the deltas (the first ones)
    batch_rows: int = EVAL_BATCH  # rows per onnxruntime run while scoring
    extra: dict = field(default_factory=dict)  # extra_options passed to onnxruntime's quantiser


@dataclass
class Int8Job:
    """What :func:`training.export.export_bundle` needs to add an int8 model to a bundle: the test
    split's rows (model inputs by name, labels by label name), held-out calibration rows (for the
    static method) and the config."""

    eval_inputs: dict[str, np.ndarray]
    eval_labels: dict[str, np.ndarray]
    calibration: dict[str, np.ndarray] | None = None
    config: QuantizeConfig = field(default_factory=QuantizeConfig)


def weight_layers(model_path: str | Path) -> dict[str, int]:
    """``{node name: weight rank}`` of every MatMul/Gemm whose weight is an initializer."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    rank = {i.name: len(i.dims) for i in graph.initializer}
    return {n.name: rank[n.input[1]] for n in graph.node if n.op_type in OPS and n.input[1] in rank}


def _is_head(name: str) -> bool:
    """A gate or a tower's output layer (kept fp32 by the ``fp32-heads`` method)."""
    return "gate" in name or "/out/" in name


class _Rows(CalibrationDataReader):
    """Calibration batches of held-out rows (one user per row, as in training)."""

    def __init__(self, inputs: dict[str, np.ndarray], batch: int = 256):
        n = len(next(iter(inputs.values())))
        self._batches = iter([{k: v[i:i + batch] for k, v in inputs.items()} for i in range(0, n, batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_model(src: str | Path, dst: str | Path, method: str,
                   calibration: dict[str, np.ndarray] | None = None, extra: dict | None = None) -> None:
    """Write the int8 version of the ONNX model ``src`` to ``dst`` with ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantisation method {method!r}; choose from {list(METHODS)}")
    if method.startswith("static") and calibration is None:
        raise ValueError(f"{method} needs calibration rows")
    per_channel = "per-channel" in method
    with tempfile.TemporaryDirectory() as tmp:
        if method.startswith("dynamic"):
            # onnxruntime's dynamic quantiser first rewrites every Gemm into MatMul (+ Add) under a
            # new node name, so a Gemm named in the node list would silently stay float32: rewrite
            # it here and name the nodes of the rewritten graph
            model = ONNXModel(onnx.load(str(src)))
            model.replace_gemm_with_matmul()
            src = Path(tmp) / "matmul.onnx"
            onnx.save(model.model, str(src))
        layers = {k: r for k, r in weight_layers(src).items() if not ("fp32-heads" in method and _is_head(k))}
        if not layers:  # onnxruntime reads an empty node list as "every node"
            shutil.copyfile(src, dst)
        elif method.startswith("static"):
            quantize_static(str(src), str(dst), _Rows(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=OPS, per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=list(layers),
                            extra_options={"ActivationSymmetric": False, **(extra or {})})
        else:
            # onnxruntime's integer MatMul takes per-channel scales for a 2-D weight only: a stacked
            # [E, in, out] weight (the batched expert layers of a graph not exported per expert)
            # gets one scale per tensor, in a second pass
            passes = [(per_channel, [k for k, r in layers.items() if r == 2 or not per_channel]),
                      (False, [k for k, r in layers.items() if r != 2 and per_channel])]
            current = Path(src)
            for i, (channel, nodes) in enumerate(p for p in passes if p[1]):
                out = Path(tmp) / f"pass{i}.onnx"
                quantize_dynamic(str(current), str(out), op_types_to_quantize=OPS, per_channel=channel,
                                 weight_type=QuantType.QInt8, nodes_to_quantize=nodes, extra_options=extra or {})
                current = out
            shutil.copyfile(current, dst)


def run_onnx(path: str | Path, inputs: dict[str, np.ndarray], tasks: list[TaskSpec],
             batch_rows: int = EVAL_BATCH) -> dict[str, np.ndarray]:
    """The model's outputs ``{task: float32 [rows]}`` (probabilities / values, as served), in batches."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = len(next(iter(inputs.values())))
    names = [t.name for t in tasks]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, n, batch_rows):
        for k, v in zip(names, session.run(names, {k: v[i:i + batch_rows] for k, v in inputs.items()}), strict=True):
            parts[k].append(np.asarray(v).reshape(-1))
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}


def raw_scale(outputs: dict[str, np.ndarray], tasks: list[TaskSpec]) -> dict[str, np.ndarray]:
    """Served outputs back to the model's raw scale: logit of a probability, ``log1p`` of a regression."""
    out = {}
    for t in tasks:
        v = outputs[t.name].astype(np.float64)
        if t.kind == "binary":
            p = np.clip(v, 1e-12, 1 - 1e-7)
            out[t.name] = np.log(p) - np.log1p(-p)
        else:
            out[t.name] = np.log1p(np.maximum(v, 0))
    return out


def _diffs(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tasks: list[TaskSpec]) -> dict[str, float]:
    out = {}
    for t in tasks:
        x, y = a[t.name].astype(np.float64), b[t.name].astype(np.float64)
        if t.kind == "regression":
            x, y = np.log1p(np.maximum(x, 0)), np.log1p(np.maximum(y, 0))
        out[t.name] = float(np.max(np.abs(x - y))) if x.size else 0.0
    return out


def make_int8(bundle_dir: str | Path, tasks: list[TaskSpec], eval_inputs: dict[str, np.ndarray],
              eval_labels: dict[str, np.ndarray], calibration: dict[str, np.ndarray] | None = None,
              cfg: QuantizeConfig | None = None, source: str | Path | None = None) -> PrecisionFile:
    """Quantise ``<bundle_dir>/model.onnx`` into ``<bundle_dir>/model.int8.onnx`` (see the module doc)
    and return its manifest entry. ``eval_inputs``/``eval_labels``: the test split's rows (model
    inputs by name, labels by label name); ``calibration``: held-out rows for the static method;
    ``source``: the float32 graph to quantise when it is not ``model.onnx`` itself (the export
    passes the same model traced with one GEMM per expert); the deltas are always against
    ``model.onnx``."""
    cfg = cfg or QuantizeConfig()
    bundle_dir = Path(bundle_dir)
    fp32_file, dst = bundle_dir / PRECISION_FILES["fp32"], bundle_dir / PRECISION_FILES["int8"]
    src = Path(source) if source is not None else fp32_file
    n = min(len(next(iter(eval_inputs.values()))), cfg.max_eval_rows)
    inputs = {k: v[:n] for k, v in eval_inputs.items()}
    labels = {k: v[:n] for k, v in eval_labels.items()}
    if calibration is not None:
        calibration = {k: v[:cfg.calibration_rows] for k, v in calibration.items()}
    fp32_out = run_onnx(fp32_file, inputs, tasks, cfg.batch_rows)
    fp32 = metrics_of(raw_scale(fp32_out, tasks), labels, tasks)

    tried: list[tuple[float, str, dict, dict, dict]] = []
    with tempfile.TemporaryDirectory(dir=bundle_dir, prefix=".int8-") as tmp:
        for method in cfg.methods:
            if method.startswith("static") and calibration is None:
                continue
            candidate = Path(tmp) / f"{len(tried)}.onnx"
            quantize_model(src, candidate, method, calibration, cfg.extra)
            out = run_onnx(candidate, inputs, tasks, cfg.batch_rows)
            m = metrics_of(raw_scale(out, tasks), labels, tasks)
            delta = {k: m[k] - v for k, v in fp32.items()
                     if not k.startswith("loss/") and np.isfinite(v) and np.isfinite(m[k])}
            auc = {k.removeprefix("auc/"): d for k, d in delta.items() if k.startswith("auc/")}
            worst = max([-d for d in auc.values()] + [0.0])
            log.info("int8 %s: worst AUC drop %.5f  %s", method, worst, auc)
            tried.append((worst, method, auc, delta, _diffs(fp32_out, out, tasks)))
            candidate.rename(Path(tmp) / f"{method.replace('/', '_')}.onnx")
            if worst <= cfg.tolerance:
                break
        if not tried:
            raise ValueError("no quantisation method could run (a static method needs calibration rows)")
        worst, method, auc, delta, diffs = min(tried, key=lambda t: t[0]) if tried[-1][0] > cfg.tolerance \
            else tried[-1]
        (Path(tmp) / f"{method.replace('/', '_')}.onnx").replace(dst)
    ok = worst <= cfg.tolerance
    if not ok:
        log.warning("int8: no method keeps every AUC within %.4g of fp32 (best: %s, worst drop %.5f): the int8 "
                    "model is published with within_tolerance=false", cfg.tolerance, method, worst)
    return PrecisionFile(file=dst.name, sha256=sha256_file(dst), method=method, auc_delta=auc,
                         metric_delta=delta, max_abs_diff=diffs, rows=n, tolerance=cfg.tolerance,
                         within_tolerance=ok)
