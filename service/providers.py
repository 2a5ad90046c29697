"""Execution-provider decisions, as small pure functions (fed provider lists, no onnxruntime calls
except in :func:`preload_cuda_dlls` and :func:`visible_gpus`), so that every GPU decision is
testable on a CPU-only machine.

What decides what:

* **The run gate** follows the providers the session *actually got*
  (``session.get_providers()``), not the configured ones: a session whose first provider is the
  CPU (asked for, or fallen back to) runs one model run at a time per worker
  (:func:`uses_run_gate`); a GPU session queues on its device and is not gated.
* **The default worker count** (``MTRANK_WORKERS`` unset): one per visible GPU when CUDA is asked
  for and this onnxruntime build has the CUDA provider, else one per usable core
  (:func:`default_workers`). Workers are started before any session exists, so this is the one
  decision taken from the build's *available* providers; each worker's session then re-checks.
* **Strictness** (``MTRANK_PROVIDERS_STRICT``; the GPU
  image sets it): a requested provider the build lacks, or a session that silently fell back to
  another provider, refuses the bundle naming the provider (:func:`check_session_providers`);
  without it, a WARNING.
* **CUDA libraries**: onnxruntime-gpu >= 1.21 with the pip ``nvidia-*`` wheels finds cuDNN/cuBLAS
  only after ``onnxruntime.preload_dlls()``; it is called once when CUDA is asked for and the
  function exists (:func:`preload_cuda_dlls`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: providers whose sessions run on a GPU (one worker per device by default, no CPU run gate)
GPU_PROVIDERS = frozenset({CUDA, "TensorrtExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
                           "DmlExecutionProvider"})


class ProviderMismatch(RuntimeError):
    """Strict mode: the session does not run on the provider asked for first."""


def uses_run_gate(session_providers: Sequence[str]) -> bool:
    """Whether a session with these providers (``session.get_providers()``, in order) takes the
    CPU run gate: yes when it runs on the CPU, i.e. its first provider is not a GPU one."""
    return not session_providers or session_providers[0] not in GPU_PROVIDERS


def wants_cuda(requested: Sequence[str]) -> bool:
    return CUDA in requested or "TensorrtExecutionProvider" in requested


def default_workers(requested: Sequence[str], available: Sequence[str], cores: int, gpus: int) -> int:
    """Worker processes when ``MTRANK_WORKERS`` is unset: one per GPU when CUDA is requested, the
    build has it and at least one GPU is visible; else one per usable core (at least 1)."""
    if wants_cuda(requested) and CUDA in available and gpus > 0:
        return gpus
    return max(1, cores)


def check_session_providers(asked_first: str, session_providers: Sequence[str], strict: bool) -> str | None:
    """Compare the provider asked for first with the one the session runs on. Equal: None.
    Different: :class:`ProviderMismatch` when ``strict``, else the warning text to log."""
    active = session_providers[0] if session_providers else CPU
    if active == asked_first:
        return None
    msg = (f"asked for {asked_first} but the session runs on {active} (onnxruntime fell back: missing "
           f"{'CUDA/cuDNN libraries or no visible GPU' if asked_first == CUDA else 'provider libraries'})")
    if strict:
        raise ProviderMismatch(msg + "; refusing to start (MTRANK_PROVIDERS_STRICT=true)")
    return msg


def visible_gpus(environ: dict[str, str] | None = None, proc_dir: str = "/proc/driver/nvidia/gpus") -> int:
    """NVIDIA GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set (a comma list; empty or
    ``-1`` = none), else the devices the driver lists; 0 without a driver."""
    env = os.environ if environ is None else environ
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x.strip() for x in cvd.split(",") if x.strip()]
        return 0 if not ids or ids[0] == "-1" else len(ids)
    try:
        return len(os.listdir(proc_dir))
    except OSError:
        return 0


_preloaded = [False]


def preload_cuda_dlls(requested: Sequence[str]) -> bool:
    """Call ``onnxruntime.preload_dlls()`` once when CUDA is requested and this onnxruntime has it
    (onnxruntime-gpu >= 1.21: loads the CUDA/cuDNN libraries of the pip ``nvidia-*`` wheels);
    True when it was called (now or before)."""
    if not wants_cuda(requested):
        return False
    if _preloaded[0]:
        return True
    import onnxruntime as ort

    fn = getattr(ort, "preload_dlls", None)
    if fn is None:
        return False
    try:
        fn()
    except Exception as e:  # a missing library shows up again, clearly, when the session is made
        log.warning("onnxruntime.preload_dlls() failed: %s: %s", type(e).__name__, e)
        return False
    _preloaded[0] = True
    return True
