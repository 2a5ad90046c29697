"""Model bundles on disk and their onnxruntime sessions.

Layout: ``<store_root>/<name>/<version>/{model.onnx, manifest.json, vocab.json}`` with integer
version directory names (anything else, such as ``.tmp-*`` staging directories, is ignored). A
bundle may also hold other precisions of its model (``model.int8.onnx``, listed with its own
sha256 in the manifest's ``precisions``); :func:`load_bundle` loads the one asked for (``fp32``,
the default, is ``model.onnx``).

:func:`load_bundle` is two steps. :func:`read_manifest` picks the newest version (or the pinned
one) and validates the manifest; :func:`open_bundle` reads the model file once and checks those
bytes against the manifest's sha256 (:func:`read_model`), then creates the onnxruntime session
*from the verified bytes* (:func:`open_verified`; the file is not opened again, so a file replaced
after the check is never what serves), checks that the session's inputs/outputs are the
manifest's, and warms the session up (:func:`warm_up`). Between the two the serving layer
checks that Redis holds features for the bundle's schema (:mod:`service.serving.feature_check`).
Which bundles are held at once, and the hot swap between them, are :mod:`service.serving`'s job;
this module loads one bundle at a time.

Execution providers are asked for in preference order (``["CUDAExecutionProvider",
"CPUExecutionProvider"]``). A provider that this onnxruntime build lacks is skipped with a
WARNING (CPU is the last resort), or raises :class:`ProviderError` when ``strict``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from service.contract import (
    MANIFEST_FILE,
    MODEL_FILE,
    PRECISION_FILES,
    PRECISIONS,
    VOCAB_FILE,
    BundleManifest,
    model_inputs,
)
from service.providers import ProviderMismatch, check_session_providers, preload_cuda_dlls, uses_run_gate
from service.settings import PROVIDER_ALIASES

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
_ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}


class BundleError(RuntimeError):
    """A bundle that cannot be served; the message says why."""


class ProviderError(BundleError):
    """A requested execution provider is not available and ``strict`` was asked for."""


@dataclass
class Bundle:
    manifest: BundleManifest
    path: Path
    session: ort.InferenceSession
    vocabs: dict[str, list[str]]
    provider: str  # the active (first) provider of the session
    requested_providers: list[str] = field(default_factory=list)
    precision: str = "fp32"  # which of the bundle's model files the session runs
    #: takes the CPU run gate (:func:`limit_concurrent_runs`): decided by the providers the session
    #: actually got (:func:`service.providers.uses_run_gate`), so a CUDA request that fell back to
    #: the CPU is gated like any CPU session
    gated: bool = True

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file(self.precision)[0]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.manifest.tasks]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.manifest.inputs]

    @property
    def session_providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model; ``{task: float32 [N]}``."""
        gate = _run_gate if self.gated else None
        if gate is not None:
            with gate:
                outs = self.session.run(self.manifest.outputs, dict(inputs))
        else:
            outs = self.session.run(self.manifest.outputs, dict(inputs))
        return {name: np.asarray(o).reshape(-1) for name, o in zip(self.manifest.outputs, outs, strict=True)}


#: at most this many onnxruntime runs at once in this process (see :func:`limit_concurrent_runs`)
_run_gate: threading.Semaphore | None = None


def limit_concurrent_runs(n: int) -> None:
    """Let at most ``n`` CPU model runs execute at once in this process (0 = no limit); bundles whose
    session runs on a GPU are not gated (:attr:`Bundle.gated`). Each CPU run already uses the
    worker's whole onnxruntime thread budget, so with ``n = 1`` concurrent requests queue here for
    the cores instead of time-slicing them (less cache thrashing, same answers)."""
    global _run_gate
    _run_gate = threading.Semaphore(n) if n > 0 else None


def list_versions(store_root: str | os.PathLike, name: str) -> list[int]:
    """Integer version directories of ``name``, ascending."""
    d = Path(store_root) / name
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and p.name.isascii())


def bundle_dir(store_root: str | os.PathLike, name: str, version: int | None = None) -> Path:
    """Directory of ``name``'s newest (or the pinned) version; :class:`BundleError` if there is none."""
    root = Path(store_root)
    versions = list_versions(root, name)
    if version is None:
        if not versions:
            raise BundleError(f"no bundle versions of {name!r} under {root}")
        version = versions[-1]
    elif version not in versions:
        raise BundleError(f"bundle {name!r} version {version} not found under {root} (have {versions})")
    return root / name / str(version)


def provider_names(providers: str | Sequence[str]) -> list[str]:
    """``"cuda,cpu"`` or ``["cuda", "CPUExecutionProvider"]`` -> full onnxruntime provider names."""
    if isinstance(providers, str):
        providers = providers.split(",")
    return [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in providers if p.strip()]


def resolve_providers(requested: str | Sequence[str], strict: bool = False) -> list[str]:
    """Requested providers (aliases like ``"cuda"`` or full names) that this onnxruntime has.

    Missing ones are dropped with a WARNING, or raise :class:`ProviderError` when ``strict``.
    CPU is appended as the fallback when not strict."""
    wanted = provider_names(requested) or [CPU]
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for p in wanted:
        if p in available:
            if p not in chosen:
                chosen.append(p)
            continue
        msg = f"execution provider {p} is not available in this onnxruntime build (available: {sorted(available)})"
        if strict:
            raise ProviderError(msg + "; refusing to start (MTRANK_PROVIDERS_STRICT=true)")
        log.warning("%s; falling back", msg)
    if not strict and CPU not in chosen:
        chosen.append(CPU)
    return chosen


def read_manifest(store_root: str | os.PathLike, name: str, version: int | None = None,
                  precision: str = "fp32") -> tuple[Path, BundleManifest]:
    """The bundle's directory and its checked manifest: the files exist, the manifest parses, names
    this directory, agrees with its feature schema and lists ``precision``. Reads no model bytes;
    :class:`BundleError` when any check fails."""
    if precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
    path = bundle_dir(store_root, name, version)
    version = int(path.name)

    for f in (MANIFEST_FILE, MODEL_FILE, VOCAB_FILE):
        if not (path / f).is_file():
            raise BundleError(f"{path}: missing {f}")
    try:
        manifest = BundleManifest.from_json((path / MANIFEST_FILE).read_bytes())
    except ValidationError as e:
        raise BundleError(f"{path / MANIFEST_FILE}: invalid manifest: {e}") from e
    if manifest.name != name or manifest.version != version:
        raise BundleError(f"{path}: manifest says {manifest.name!r} v{manifest.version}, "
                          f"directory is {name!r} v{version}")
    if manifest.inputs != model_inputs(manifest.feature_schema):
        raise BundleError(f"{path}: manifest inputs do not match its feature schema")
    if precision != "fp32" and precision not in manifest.precisions:
        raise BundleError(f"{path}: no {precision} model in this bundle (its manifest lists "
                          f"{['fp32', *manifest.precisions]}); export it with int8 on")
    model_file = manifest.model_file(precision)[0]
    if not (path / model_file).is_file():
        raise BundleError(f"{path}: missing {model_file} (the {precision} model its manifest lists)")
    return path, manifest


@dataclass(frozen=True)
class VerifiedModel:
    """A model file's bytes whose sha256 is the manifest's: what onnxruntime is given (the file is
    not opened again, so a file replaced after the check cannot be what serves)."""

    path: Path
    precision: str
    data: bytes = field(repr=False)


def read_model(path: Path, manifest: BundleManifest, precision: str = "fp32") -> VerifiedModel:
    """Read the ``precision`` model file of a manifest from :func:`read_manifest` once and check its
    sha256; :class:`BundleError` when it is unreadable or differs."""
    model_file, want_sha = manifest.model_file(precision)
    model_path = path / model_file
    try:
        data = model_path.read_bytes()
    except OSError as e:
        raise BundleError(f"{model_path}: unreadable: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != want_sha:
        raise BundleError(f"{model_path}: sha256 mismatch: file is {digest}, "
                          f"manifest says {want_sha} (corrupt or partial copy)")
    return VerifiedModel(model_path, precision, data)


def open_bundle(path: Path, manifest: BundleManifest, precision: str = "fp32",
                providers: str | Sequence[str] = ("CPUExecutionProvider",), strict: bool = False,
                intra_op_threads: int = 0, warmup: bool | Sequence[int] = True) -> Bundle:
    """The served bundle of a manifest from :func:`read_manifest`: :func:`read_model` (the bytes,
    checked against the sha256), then :func:`open_verified` on those bytes."""
    return open_verified(path, manifest, read_model(path, manifest, precision), providers=providers, strict=strict,
                         intra_op_threads=intra_op_threads, warmup=warmup)


def open_verified(path: Path, manifest: BundleManifest, model: VerifiedModel,
                  providers: str | Sequence[str] = ("CPUExecutionProvider",), strict: bool = False,
                  intra_op_threads: int = 0, warmup: bool | Sequence[int] = True) -> Bundle:
    """The bundle of verified model bytes: the onnxruntime session is created from ``model.data``
    (never from the path), opened on the providers, its inputs/outputs checked against the
    manifest, and warmed up. ``warmup``: ``True`` runs one batch of 2 items, a list of batch sizes
    one batch of each (:func:`warm_up`), ``False`` none."""
    precision, model_path = model.precision, model.path
    vocabs = read_vocabs(path / VOCAB_FILE, manifest)

    chosen = resolve_providers(providers, strict)
    preload_cuda_dlls(chosen)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    # idle onnxruntime workers must not spin: they would take the cores that Redis decoding,
    # fusion and JSON building of this and concurrent requests need (measured 2.5x slower /rank)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model.data, sess_options=opts, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"{model_path}: onnxruntime could not load it: {e}") from e
    got = list(session.get_providers())
    active = got[0]
    # onnxruntime silently falls back when a provider fails to initialise (e.g. missing CUDA libs)
    try:
        fallback = check_session_providers(chosen[0], got, strict)
    except ProviderMismatch as e:
        raise ProviderError(str(e)) from None
    if fallback:
        log.warning("%s", fallback)

    _check_session(session, manifest, path)
    bundle = Bundle(manifest=manifest, path=path, session=session, vocabs=vocabs, provider=active,
                    requested_providers=provider_names(providers), precision=precision, gated=uses_run_gate(got))
    if warmup:
        warm_up(bundle, (2,) if warmup is True else warmup)
    log.info("loaded bundle %s v%d%s from %s on %s", manifest.name, manifest.version,
             "" if precision == "fp32" else f" ({precision})", path, active)
    return bundle


def load_bundle(store_root: str | os.PathLike, name: str, version: int | None = None,
                providers: str | Sequence[str] = ("CPUExecutionProvider",), strict: bool = False,
                intra_op_threads: int = 0, warmup: bool | Sequence[int] = True, precision: str = "fp32") -> Bundle:
    """Load and check one bundle: :func:`read_manifest`, then :func:`open_bundle` (see the module
    doc). ``precision``: ``fp32`` (``model.onnx``) or another precision the manifest lists
    (``int8``): that file is checked against its own sha256 and run instead; a bundle without it
    is refused."""
    path, manifest = read_manifest(store_root, name, version, precision)
    return open_bundle(path, manifest, precision, providers=providers, strict=strict,
                       intra_op_threads=intra_op_threads, warmup=warmup)


def warm_up(bundle: Bundle, sizes: Sequence[int] = (1, 16, 128)) -> None:
    """Run one all-default batch of each size (first-run allocations happen here, not on a request);
    :class:`BundleError` when a run fails or gives outputs of the wrong shape or non-finite values."""
    for n in sizes:
        try:
            out = bundle.run(default_inputs(bundle.manifest, n_items=n))
        except Exception as e:
            raise BundleError(f"{bundle.model_path}: warm-up run with {n} items failed: {e}") from e
        for task, v in out.items():
            if v.shape != (n,):
                raise BundleError(f"{bundle.model_path}: warm-up output {task!r} has shape {v.shape}, "
                                  f"expected ({n},)")
            if not np.all(np.isfinite(v)):
                raise BundleError(f"{bundle.model_path}: warm-up output {task!r} is not finite")


def bundle_signature(path: str | os.PathLike) -> tuple:
    """(size, mtime_ns) of the bundle's files, every precision's model included (None for a missing
    one): changes when a file does."""
    out: list[tuple[int, int] | None] = []
    for f in (MANIFEST_FILE, MODEL_FILE, VOCAB_FILE, *(f for p, f in PRECISION_FILES.items() if p != "fp32")):
        try:
            st = os.stat(Path(path) / f)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def default_inputs(manifest: BundleManifest, n_items: int) -> dict[str, np.ndarray]:
    """All-default inputs (index 0, dense means): user/context batch 1, items batch ``n_items``."""
    schema = manifest.feature_schema
    out: dict[str, np.ndarray] = {}
    for mi in manifest.inputs:
        n = n_items if mi.entity == "item" else 1
        if mi.kind == "dense":
            mean = {f.name: f.mean for f in schema.dense}
            means = np.array([mean[f] for f in mi.fields], dtype=np.float32)
            out[mi.name] = np.tile(means, (n, 1))
        else:
            out[mi.name] = np.zeros((n, mi.width), dtype=np.int64)
    return out


def read_vocabs(path: Path, manifest: BundleManifest) -> dict[str, list[str]]:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable vocabulary: {e}") from e
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise BundleError(f"{path}: expected {{field: [values]}}")
    schema = manifest.feature_schema
    for f in schema.sparse:
        if f.name in raw and len(raw[f.name]) > f.vocab_size - 1:
            raise BundleError(f"{path}: vocabulary of {f.name!r} has {len(raw[f.name])} values, "
                              f"more than vocab_size - 1 = {f.vocab_size - 1}")
    for f in schema.sparse_of("context"):
        if f.name not in raw:
            raise BundleError(f"{path}: no vocabulary for context field {f.name!r}")
    return {k: [str(x) for x in v] for k, v in raw.items()}


def _check_session(session: ort.InferenceSession, manifest: BundleManifest, path: Path) -> None:
    ins = {i.name: i.type for i in session.get_inputs()}
    outs = [o.name for o in session.get_outputs()]
    want_ins = {i.name: _ORT_TYPES[i.dtype] for i in manifest.inputs}
    if set(ins) != set(want_ins):
        raise BundleError(f"{path}: model inputs {sorted(ins)} differ from manifest inputs {sorted(want_ins)}")
    wrong = {n: (ins[n], t) for n, t in want_ins.items() if ins[n] != t}
    if wrong:
        raise BundleError(f"{path}: model input types differ from the manifest (model, manifest): {wrong}")
    if sorted(outs) != sorted(manifest.outputs):
        raise BundleError(f"{path}: model outputs {sorted(outs)} differ from manifest outputs "
                          f"{sorted(manifest.outputs)}")
