"""Training speed (issues 5, 13): samples/s of our training loop for PLE next to torch-rechub's PLE,
like for like, on the same synthetic data, split, batch size, losses and loop, in one run.

    python bench/train_speed.py              # ~3-6 min on 2 cores; writes bench/results/train_speed.{md,json}
    python bench/train_speed.py --quick      # seconds; writes to a temp dir

Two pairs of the same architecture (PLE defaults: 2 levels, 1 task + 2 shared experts of
[128, 64], towers [64], dropout 0.1):

* **with BatchNorm** (the headline; both models' default): torch-rechub's ``MLP`` is Linear ->
  BatchNorm1d -> activation -> Dropout in every expert, tower and gate; ours has BatchNorm after
  every hidden layer of experts and towers (its gates are plain Linear -> softmax, so torch-rechub
  has the gates' BatchNorm on top: that is the whole parameter difference);
* **without BatchNorm** (an ablation): ours with ``batch_norm=False``, torch-rechub's with every
  BatchNorm1d replaced by an identity (``RechubConfig(batch_norm=False)``, bench/rechub_peer.py:
  its MLP has no switch).

All models go through ``training.train.fit`` - the loop ``mtrank train`` runs (batch gather from
the encoded data, forward, ESMM/MSE losses, backward, Adam) - torch-rechub's PLE behind the adapter
of ``bench/rechub_peer.py`` (as in bench/quality.py). A forward pre-hook stamps the time at the
start of every training step; samples/s = batch size x timed steps / (time from the start of the
first timed step to the start of the step after the last one), after ``--warmup`` steps; samples
per CPU-second, the same over the process's CPU time in that span (what a loaded, shared machine
distorts least, with ``--threads 1``). The
epoch is cut to ``warmup + steps + 1`` batches by the number of rows read; the validation pass at
its end is not timed. ``--rounds`` alternate the models (ours, peer, ours, peer, ... per pair);
the table shows the median and every round; the ratios are of the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.common import ROOT, build_once, git_info, machine_info, md_table, write_json  # noqa: E402

FRACTIONS = (0.9, 0.05, 0.05)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny data, 3 + 5 steps, 1 round, output to a temp dir")
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 20,000: the demo's)")
    p.add_argument("--items", type=int, default=None, help="synthetic items (default 50,000)")
    p.add_argument("--batch-size", type=int, default=2048, help="as `mtrank train` (default 2048)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per model (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--model-config", default="{}",
                   help='JSON overrides for both PLEs, e.g. \'{"expert_hidden": [256, 128]}\' (keys: '
                        'expert_hidden, tower_hidden, levels, shared_experts, task_experts, dropout)')
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mtrank-bench-train"))
    p.add_argument("--out-dir", help="default bench/results (--quick: <workdir>/quick-results)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    quick = dict(users=1_000, items=2_000, warmup=2, steps=5, rounds=1)
    full = dict(users=20_000, items=50_000, warmup=5, steps=30, rounds=3)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick and a.batch_size == 2048:
        a.batch_size = 512
    if a.out_dir is None:
        a.out_dir = str(Path(a.workdir) / "quick-results") if a.quick else str(ROOT / "bench" / "results")
    return a


def dataset(a):
    """Synthetic data with enough rows for warm-up + steps + 1 batches of the train split."""
    from training.data.dataset import prepare
    from training.data.synth import SynthConfig, generate

    rows = math.ceil((a.warmup + a.steps + 1) * a.batch_size / FRACTIONS[0]) + 16
    exposures = max(rows, 20_000)
    out = Path(a.workdir) / f"synth-{a.users}-{a.items}-{exposures}"
    build_once(out, lambda tmp: generate(tmp, SynthConfig(n_users=a.users, n_items=a.items, n_exposures=exposures,
                                                          seed=11), progress=False))
    return prepare(out, max_rows=rows), out


PHASES = ("forward", "loss + backward", "optimizer", "batch gather")


def time_fit(model, ds, a, seed: int) -> dict:
    """One run of training.train.fit for exactly warmup + steps + 1 batches; the timed steps' rate.

    Where the time goes: the model's forward (pre-hook to hook), the losses and backward (model
    hook to the optimizer's step pre-hook), Adam (its step pre- to post-hook) and the rest until the
    next step (slicing the next batch out of the encoded data), summed over the timed steps."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from training.train import TrainConfig, fit

    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time) at the start of each step
    marks: list[list[float]] = []  # per training step: [start, forward done, optimizer start, optimizer done]

    def pre(module, args):
        if module.training:
            stamps.append((time.perf_counter(), time.process_time()))
            marks.append([stamps[-1][0]])

    def mark(*_):
        if marks and len(marks[-1]) < 4 and (len(marks[-1]) != 1 or model.training):
            marks[-1].append(time.perf_counter())

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(mark),
               register_optimizer_step_pre_hook(mark), register_optimizer_step_post_hook(mark)]
    cfg = TrainConfig(epochs=1, batch_size=a.batch_size, seed=seed, fractions=FRACTIONS, patience=1,
                      threads=a.threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        fit(ds, cfg, progress=False, model=model)
    finally:
        for h in handles:
            h.remove()
    total = time.perf_counter() - t0
    timed = stamps[a.warmup:a.warmup + a.steps + 1]
    if len(timed) < 2:
        raise RuntimeError(f"only {len(stamps)} training steps ran; need {a.warmup + a.steps + 1}")
    steps = len(timed) - 1
    secs = timed[-1][0] - timed[0][0]
    cpu = timed[-1][1] - timed[0][1]
    spans = [0.0] * len(PHASES)
    for m, nxt in zip(marks[a.warmup:a.warmup + steps], marks[a.warmup + 1:a.warmup + steps + 1], strict=True):
        for i, (x, y) in enumerate(zip(m, m[1:] + [nxt[0]], strict=True)):
            spans[i] += y - x
    return {"steps": steps, "seconds": secs, "samples_per_s": steps * a.batch_size / secs,
            "ms_per_step": 1e3 * secs / steps, "cpu_seconds": cpu, "samples_per_cpu_s": steps * a.batch_size / cpu,
            "ms_per_step_by_phase": {k: 1e3 * v / steps for k, v in zip(PHASES, spans, strict=True)},
            "fit_seconds": total, "steps_run": len(stamps)}


#: operator families of a training step (aten op name -> family); the rest is "other"
OP_FAMILIES = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
    "BatchNorm": ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_batch_norm_impl_index",
                  "aten::batch_norm"),
    "dropout masks (draw, compare, scale)": ("aten::bernoulli_", "aten::ge_", "aten::uniform_", "aten::random_",
                                             "aten::native_dropout", "aten::native_dropout_backward", "aten::div_"),
    "multiply (applying masks, mixing, losses)": ("aten::mul", "aten::mul_"),
    "ReLU": ("aten::clamp_min", "aten::relu", "aten::threshold_backward", "aten::clamp_min_"),
    "embeddings (lookup, backward)": ("aten::embedding", "aten::embedding_dense_backward", "aten::index",
                                      "aten::index_select", "aten::_index_put_impl_", "aten::embedding_backward"),
    "copies and layout (copy, cat)": ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous"),
    "reductions (sum, softmax)": ("aten::sum", "aten::_softmax", "aten::_softmax_backward_data", "aten::mean"),
    "Adam": ("aten::_fused_adam_",),
}


def profile_ops(model, ds, a, seed: int, steps: int = 8) -> dict:
    """torch.profiler over ``steps`` training steps of training.train.fit (after the warm-up steps):
    self CPU time per operator family (:data:`OP_FAMILIES`), ms per step, and the top operators."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from training.train import TrainConfig, fit

    cfg = TrainConfig(epochs=1, batch_size=a.batch_size, seed=seed, fractions=FRACTIONS, patience=1,
                      threads=a.threads)
    torch.manual_seed(seed)
    with profile(activities=[ProfilerActivity.CPU],
                 schedule=schedule(wait=max(a.warmup - 1, 0), warmup=1, active=steps, repeat=1)) as prof:
        handle = register_optimizer_step_post_hook(lambda *_: prof.step())  # a step ends after Adam
        try:
            fit(ds, cfg, progress=False, model=model)
        finally:
            handle.remove()
    family = {op: fam for fam, ops in OP_FAMILIES.items() for op in ops}
    per: dict[str, float] = {}
    ops = []
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        ms = e.self_cpu_time_total / 1e3 / steps
        per[family.get(e.key, "other")] = per.get(family.get(e.key, "other"), 0.0) + ms
        ops.append((e.key, ms))
    ops.sort(key=lambda x: -x[1])
    return {"steps": steps, "ms_per_step_by_family": per, "top_ops_ms_per_step": dict(ops[:12])}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from rechub_peer import RechubConfig, RechubModel

    from training.models import build_model

    overrides = json.loads(a.model_config)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    ds, data_dir = dataset(a)
    # the peer takes the architecture overrides it knows (sizes); other keys are ours only
    peer_overrides = {k: v for k, v in overrides.items() if k in RechubConfig.__dataclass_fields__}

    def ours(bn: bool):
        return lambda: build_model("ple", ds.schema, ds.tasks, **{**overrides, "batch_norm": bn})

    def peer(bn: bool):
        cfg = RechubConfig(model="ple", **{**peer_overrides, "batch_norm": bn})
        return lambda: RechubModel(ds.schema, ds.tasks, cfg)

    pairs = {True: ("ours, with BatchNorm", "torch-rechub, with BatchNorm"),
             False: ("ours, without BatchNorm", "torch-rechub, without BatchNorm")}
    makers = {}
    for bn, (o, p) in pairs.items():
        makers[o], makers[p] = ours(bn), peer(bn)
    runs = {k: [] for k in makers}
    params = {}
    for r in range(a.rounds):
        for name, make in makers.items():
            torch.manual_seed(a.seed + r)
            model = make()
            params[name] = sum(p.numel() for p in model.parameters())
            res = time_fit(model, ds, a, a.seed + r)
            runs[name].append(res)
            print(f"round {r + 1}/{a.rounds} {name}: {res['samples_per_s']:,.0f} samples/s "
                  f"({res['ms_per_step']:.1f} ms/step)", flush=True)
    profiles = {}
    for name, make in makers.items():  # one profiled run per model: where the operators' time goes
        torch.manual_seed(a.seed)
        profiles[name] = profile_ops(make(), ds, a, a.seed, steps=min(8, a.steps))
    med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(x["samples_per_cpu_s"] for x in v) for k, v in runs.items()}
    ratios = {bn: med[o] / med[p] for bn, (o, p) in pairs.items()}
    ratios_cpu = {bn: med_cpu[o] / med_cpu[p] for bn, (o, p) in pairs.items()}
    threshold = 1.5  # issue 13
    report = {
        "benchmark": "train_speed", "mode": "quick" if a.quick else "full",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "seconds": round(time.time() - t_start, 1), "machine": machine_info(), "git": git_info(),
        "torch_threads": torch.get_num_threads(), "args": vars(a),
        "data": {"path": str(data_dir), "users": a.users, "items": a.items, "rows": len(ds),
                 "fields": {k: len(getattr(ds.schema, k)) for k in ("sparse", "dense", "sequence")}},
        "models": {k: {"parameters": params[k], "runs": runs[k], "median_samples_per_s": med[k],
                       "median_samples_per_cpu_s": med_cpu[k], "profile": profiles[k]} for k in makers},
        "per_cpu_second": {"with_batch_norm": ratios_cpu[True], "without_batch_norm": ratios_cpu[False]},
        "target": {"target": "ours / torch-rechub samples/s, both with BatchNorm (their default architecture)",
                   "value": ratios[True], "op": ">=", "threshold": threshold, "pass": ratios[True] >= threshold},
        "without_batch_norm": {"target": "ours / torch-rechub samples/s, both without BatchNorm",
                               "value": ratios[False], "op": ">=", "threshold": threshold,
                               "pass": ratios[False] >= threshold},
    }
    out = Path(a.out_dir)
    write_json(out / "train_speed.json", report)
    m = report["machine"]
    md = [f"# Training speed ({report['mode']})", "",
          f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['versions'].get('torch')} with "
          f"{report['torch_threads']} threads, load average at start {', '.join(f'{x:.2f}' for x in m['loadavg'])}",
          f"- commit {report['git']['commit'][:12]}{' (dirty)' if report['git']['dirty'] else ''}",
          f"- data: synthetic, {a.users:,} users, {a.items:,} items, {report['data']['fields']} fields; batch "
          f"{a.batch_size}; {a.warmup} warm-up + {a.steps} timed steps of training.train.fit per run, "
          f"{a.rounds} alternating rounds; model overrides {overrides or 'none (PLE defaults)'}",
          "",
          md_table(["model", "parameters", "median samples/s", "ms/step (median run)", "rounds (samples/s)",
                    "median samples / CPU-s", "rounds (samples / CPU-s)"],
                   [[k, params[k], med[k], statistics.median(x["ms_per_step"] for x in runs[k]),
                     ", ".join(f"{x['samples_per_s']:,.0f}" for x in runs[k]), med_cpu[k],
                     ", ".join(f"{x['samples_per_cpu_s']:,.0f}" for x in runs[k])] for k in makers]),
          "",
          md_table(["same architecture", "ours / torch-rechub (samples/s)", f"target >= {threshold}x",
                    "ours / torch-rechub (samples per CPU-second)"],
                   [["with BatchNorm (both defaults)", f"**{ratios[True]:.2f}x**",
                     "PASS" if ratios[True] >= threshold else "FAIL", f"{ratios_cpu[True]:.2f}x"],
                    ["without BatchNorm (ablation)", f"{ratios[False]:.2f}x",
                     "PASS" if ratios[False] >= threshold else "FAIL", f"{ratios_cpu[False]:.2f}x"]]),
          "",
          "Where a step's time goes (ms per step, median over rounds): the model's forward; the ESMM/MSE "
          "losses and the backward pass; Adam; slicing the next batch out of the encoded data.",
          "",
          md_table(["model", *PHASES, "sum"],
                   [[k, *(statistics.median(x["ms_per_step_by_phase"][ph] for x in runs[k]) for ph in PHASES),
                     statistics.median(sum(x["ms_per_step_by_phase"].values()) for x in runs[k])]
                    for k in makers]),
          "",
          "Where the operators' time goes (torch.profiler, self CPU time of the aten operators over "
          f"{min(8, a.steps)} training steps of one more run per model, ms per step; the profiler adds its own "
          "overhead, so compare the rows with each other, not with the table above):",
          "",
          md_table(["operators", *makers],
                   [[fam, *(profiles[k]["ms_per_step_by_family"].get(fam, 0.0) for k in makers)]
                    for fam in [*OP_FAMILIES, "other"]]
                   + [["sum", *(sum(profiles[k]["ms_per_step_by_family"].values()) for k in makers)]]),
          "",
          "torch-rechub's gates carry BatchNorm too (ours are Linear -> softmax): the parameter difference "
          "of the with-BatchNorm pair. The machine is shared: compare the rows of one run, not across runs. "
          "Samples per CPU-second (this process's CPU time over the same steps) is the less load-sensitive "
          "measure with one torch thread; with more threads it also counts OpenMP spin-waiting.",
          ""]
    (out / "train_speed.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out / 'train_speed.md'} and {out / 'train_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
