"""GPU smoke test: one command, under 5 minutes, on a machine with an NVIDIA GPU and the ``gpu``
install (onnxruntime-gpu).

    python bench/gpu_smoke.py                      # model_store/demo, newest version
    python bench/gpu_smoke.py --store S --name N --version V
    python bench/gpu_smoke.py --train-if-missing   # no bundle there: train a tiny one first (needs torch)

It

1. refuses at once, with a one-line reason and exit status 2, when this onnxruntime has no CUDA
   execution provider (a CPU machine, or the CPU build installed beside or instead of the GPU one);
2. loads the bundle through the service's own loader on CUDA, strictly
   (``MTRANK_PROVIDERS_STRICT`` semantics: a session that fell back to the CPU is an error), and
   asserts that the session's first provider is ``CUDAExecutionProvider``; and on the CPU;
3. checks parity: the same random (valid) inputs for 2,000 items through both sessions, every
   task's outputs within ``|cuda - cpu| <= atol + rtol * |cpu|`` (defaults 1e-3 each: the CUDA
   provider's defaults, TF32 matmuls included, are what the service runs, and they round
   differently from the CPU's fp32 kernels);
4. prints the model-run latency (p50/p99 over ``--reps`` runs after warm-up) at N = 100, 500,
   1,000 and 2,000 items for CPU and CUDA side by side, as a table and as one JSON line
   (``--json PATH`` also writes it to a file).

Exit status: 0 all good, 1 a check failed (the line says which), 2 no CUDA here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = (100, 500, 1000, 2000)
PARITY_ITEMS = 2000
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def fail(code: int, msg: str) -> None:
    print(f"gpu_smoke: {msg}", file=sys.stderr)
    raise SystemExit(code)


def random_inputs(manifest, n_items: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid inputs of the bundle's schema: ids within each field's vocabulary, dense values
    around each field's mean; user/context batch 1, items batch ``n_items``."""
    schema = manifest.feature_schema
    out = {}
    for mi in manifest.inputs:
        n = n_items if mi.entity == "item" else 1
        if mi.kind == "dense":
            cols = [rng.normal(f.mean, f.std or 1.0, n) for f in map(schema.field, mi.fields)]
            out[mi.name] = np.stack(cols, axis=1).astype(np.float32)
        elif mi.kind == "sparse":
            cols = [rng.integers(0, schema.field(f).vocab_size, n) for f in mi.fields]
            out[mi.name] = np.stack(cols, axis=1).astype(np.int64)
        else:  # sequence: each field's max_len ids from the vocabulary it shares
            cols = []
            for f in map(schema.field, mi.fields):
                vocab = schema.field(f.vocab_of).vocab_size if getattr(f, "vocab_of", None) else f.vocab_size
                cols.append(rng.integers(0, vocab, (n, f.max_len)))
            out[mi.name] = np.concatenate(cols, axis=1).astype(np.int64)
    return out


def latency(bundle, inputs, reps: int) -> tuple[float, float]:
    bundle.run(inputs)  # warm (allocations for this size)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        bundle.run(inputs)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3, times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3


def train_tiny(store: Path, name: str) -> None:
    """A small synthetic data set and a one-epoch model (about a minute on a GPU machine's CPU)."""
    from training.data.synth import SynthConfig, generate
    from training.train import TrainConfig, train

    data = Path(tempfile.mkdtemp(prefix="gpu-smoke-data-"))
    generate(data, SynthConfig(n_users=2000, n_items=5000, n_exposures=60_000, seed=1), progress=False)
    train(data, name=name, store=store, cfg=TrainConfig(arch="ple", epochs=1), progress=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--name", default="demo")
    ap.add_argument("--version", type=int, default=None)
    ap.add_argument("--train-if-missing", action="store_true", help="train a tiny bundle when none is there")
    ap.add_argument("--threads", type=int, default=0, help="CPU session's onnxruntime threads (0 = all cores)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    t_start = time.monotonic()

    import onnxruntime as ort

    from service.providers import preload_cuda_dlls
    from service.store import BundleError, list_versions, load_bundle

    available = ort.get_available_providers()
    if CUDA not in available:
        fail(2, f"no CUDA here: onnxruntime {ort.__version__} offers {available} (install the gpu extra "
                "on a machine with an NVIDIA GPU)")
    preload_cuda_dlls([CUDA])
    if not list_versions(a.store, a.name):
        if not a.train_if_missing:
            fail(1, f"no bundle {a.name!r} under {a.store} (train one, or pass --train-if-missing)")
        train_tiny(a.store, a.name)
    try:
        gpu = load_bundle(a.store, a.name, a.version, providers=[CUDA], strict=True, warmup=(1, PARITY_ITEMS))
    except BundleError as e:
        fail(1, f"CUDA session refused: {e}")
    first = gpu.session.get_providers()[0]
    if first != CUDA:
        fail(1, f"the session's first provider is {first}, not {CUDA}")
    cpu = load_bundle(a.store, a.name, gpu.version, providers=[CPU], intra_op_threads=a.threads,
                      warmup=(1, PARITY_ITEMS))

    rng = np.random.default_rng(0)
    inputs = random_inputs(gpu.manifest, PARITY_ITEMS, rng)
    out_gpu, out_cpu = gpu.run(inputs), cpu.run(inputs)
    diffs = {t: float(np.max(np.abs(out_gpu[t].astype(np.float64) - out_cpu[t]))) for t in out_cpu}
    parity_ok = all(np.allclose(out_gpu[t], out_cpu[t], rtol=a.rtol, atol=a.atol) and np.isfinite(out_gpu[t]).all()
                    for t in out_cpu)

    rows = []
    for n in SIZES:
        x = random_inputs(gpu.manifest, n, rng)
        c50, c99 = latency(cpu, x, a.reps)
        g50, g99 = latency(gpu, x, a.reps)
        rows.append({"items": n, "cpu_p50_ms": round(c50, 3), "cpu_p99_ms": round(c99, 3),
                     "cuda_p50_ms": round(g50, 3), "cuda_p99_ms": round(g99, 3), "speedup_p50": round(c50 / g50, 2)})

    print(f"bundle {gpu.name} v{gpu.version} ({gpu.manifest.architecture}); onnxruntime {ort.__version__}; "
          f"CUDA session providers {gpu.session.get_providers()}")
    print(f"parity on {PARITY_ITEMS} items (max |cuda - cpu| per task; atol {a.atol}, rtol {a.rtol}): "
          + ", ".join(f"{t} {v:.2e}" for t, v in diffs.items()) + ("  OK" if parity_ok else "  FAILED"))
    head = f"{'items':>6} | {'CPU p50':>9} | {'CPU p99':>9} | {'CUDA p50':>9} | {'CUDA p99':>9} | {'speedup':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['items']:>6} | {r['cpu_p50_ms']:>7.3f}ms | {r['cpu_p99_ms']:>7.3f}ms | {r['cuda_p50_ms']:>7.3f}ms | "
              f"{r['cuda_p99_ms']:>7.3f}ms | {r['speedup_p50']:>6.2f}x")
    result = {"bundle": {"name": gpu.name, "version": gpu.version, "architecture": gpu.manifest.architecture},
              "onnxruntime": ort.__version__, "session_providers": gpu.session.get_providers(),
              "parity": {"items": PARITY_ITEMS, "atol": a.atol, "rtol": a.rtol, "max_abs_diff": diffs, "ok": parity_ok},
              "latency": rows, "seconds": round(time.monotonic() - t_start, 1)}
    print(json.dumps(result))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    if not parity_ok:
        fail(1, f"CUDA and CPU outputs differ beyond atol {a.atol} + rtol {a.rtol}: max abs diff {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
