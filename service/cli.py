"""`mtrank`: the command line. It wires the modules together and does nothing else.

Training commands import torch lazily, so the service install (`pip install '.[cpu]'`, no torch) still has
`mtrank serve` and `mtrank features load`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path

import typer

from service.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Multi-task ranking: train, export, load features, serve.")
features_app = typer.Typer(no_args_is_help=True, help="Feature store (Redis) commands.")
app.add_typer(features_app, name="features")

# the defaults are Settings' own (one owner): the CLI only names the options
_DEFAULT = {name: field.default for name, field in Settings.model_fields.items()}
REDIS_URL = typer.Option(_DEFAULT["redis_url"], "--redis-url", envvar="MTRANK_REDIS_URL", show_default=True,
                         help="Redis URL (may carry a password; never printed).")
PREFIX = typer.Option(_DEFAULT["redis_prefix"], "--prefix", envvar="MTRANK_REDIS_PREFIX", help="Redis key prefix.")
#: seconds uvicorn waits for a worker's health-check answer (uvicorn >= 0.37; its default is 5)
WORKER_HEALTHCHECK_S = 30
STORE = typer.Option(Path(_DEFAULT["model_store"]), "--store", envvar="MTRANK_MODEL_STORE",
                     help="Model store directory.")
HOST = typer.Option(_DEFAULT["host"], "--host", envvar="MTRANK_HOST")
PORT = typer.Option(_DEFAULT["port"], "--port", envvar="MTRANK_PORT")


def _need_training():
    """Training commands need torch (the `train` extra); look for it without importing it."""
    if importlib.util.find_spec("torch") is None:
        typer.echo("this command needs the training extra: pip install '.[train]'", err=True)
        raise typer.Exit(2)


def _redact(url: str) -> str:
    from service.settings import redact_url
    return redact_url(url)


@app.command()
def synth(out: Path = typer.Option(Path("data/synth"), help="Output directory."),
          users: int = typer.Option(20_000, help="Number of users."),
          items: int = typer.Option(50_000, help="Number of items."),
          exposures: int = typer.Option(1_000_000, help="Number of exposures."),
          seed: int = typer.Option(7, help="Random seed (same seed, same data).")):
    """Write a synthetic multi-task exposure log (Parquet) and its dataset.yaml."""
    from training.data.synth import SynthConfig, generate

    spec = generate(out, SynthConfig(n_users=users, n_items=items, n_exposures=exposures, seed=seed))
    typer.echo(f"wrote {spec}")


@app.command()
def simulate(url: str = typer.Option("http://127.0.0.1:8000", help="Base URL of the running service."),
             data: Path = typer.Option(Path("data/synth"), help="The synthetic data the served model was trained on "
                                                               "(its truth/ holds the world the users follow)."),
             duration: float = typer.Option(60.0, min=0.1, help="Seconds to run."),
             requests: int | None = typer.Option(None, min=1, help="Stop after this many /rank requests."),
             concurrency: int = typer.Option(4, min=1, help="Simulated clients in parallel."),
             candidates: int = typer.Option(100, min=1, help="Candidates per /rank request."),
             k: int = typer.Option(10, min=1, help="Items shown per request (the top k)."),
             seed: int = typer.Option(0, help="Random seed of the simulated users.")):
    """Drive the service with synthetic users: rank, show the top k, draw outcomes from the synthetic
    data's ground truth, post them to /events. Then `mtrank ab report` reads what they did."""
    from training.simulate import SimConfig, Simulator

    cfg = SimConfig(url=url.rstrip("/"), data=data, duration_s=duration, requests=requests,
                    concurrency=concurrency, candidates=candidates, k=k, seed=seed)
    try:
        sim = Simulator(cfg)
    except FileNotFoundError as e:
        typer.echo(f"mtrank simulate: {e}", err=True)
        raise typer.Exit(2) from None
    report = sim.run()
    typer.echo("\n".join(report.lines()))
    if not report.variants:
        raise typer.Exit(1)


@app.command()
def movielens(out: Path = typer.Option(Path("data/movielens-100k"), help="Output directory (outside git)."),
              source: Path | None = typer.Option(None, help="MovieLens-100K folder (default: ../shared/...)."),
              seed: int = typer.Option(0, help="Seed of the sampled non-clicked exposures.")):
    """Turn MovieLens-100K into a multi-task exposure log (our implicit-exposure protocol, training/data/movielens.py).

    Train on it with `mtrank train --data OUT --split random` or `--split column` (per-user time split)."""
    from training.data.movielens import DEFAULT_SOURCE, build

    spec = build(out, source or DEFAULT_SOURCE, seed=seed)
    typer.echo(f"wrote {spec}")


@contextlib.contextmanager
def _user_errors(command: str):
    """A dataset spec or a bundle that cannot be used: its one-line message and exit 2, no traceback."""
    from service.store import BundleError
    from training.data.spec import SpecError

    try:
        yield
    except (SpecError, BundleError) as e:
        typer.echo(f"mtrank {command}: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def train(data: Path = typer.Option(..., help="Dataset spec file, or a directory holding dataset.yaml."),
          arch: str = typer.Option("ple", help="ple | mmoe | shared_bottom | dtrn"),
          backbone: str | None = typer.Option(None, help="DTRN's backbone: towers | mmoe | ple (default ple)."),
          mutual_learning: bool | None = typer.Option(
              None, "--mutual-learning/--no-mutual-learning",
              help="Deep Mutual Learning across the task towers (CTFM + GKD), on any architecture."),
          name: str = typer.Option("demo", help="Model name in the store."),
          store: Path = STORE,
          epochs: int = typer.Option(8), batch_size: int = typer.Option(2048), lr: float = typer.Option(2e-3),
          patience: int = typer.Option(2, help="Early-stopping patience in epochs."),
          split: str = typer.Option("random",
                                     help="random (8:1:1, seeded) | time | column (the spec's exposures.split)"),
          seed: int = typer.Option(42), max_rows: int | None = typer.Option(None, help="Use only the first rows."),
          split_seed: int | None = typer.Option(
              None, help="Seed of the random split, separate from the initialisation seed (default: --seed)."),
          model_config: str = typer.Option("{}", help='Architecture overrides as JSON, e.g. \'{"levels": 3}\'.'),
          int8: bool = typer.Option(False, "--int8/--no-int8",
                                    help="Also write model.int8.onnx into the bundle "
                                         "(AUC deltas vs fp32 in the manifest)."),
          device: str = typer.Option("cpu", help="cpu | cuda | auto. Under torchrun: gloo on cpu, nccl on cuda."),
          calibration: str | None = typer.Option(
              None, help="Post-hoc calibration of binary tasks, fitted on validation and folded into the ONNX "
                         "graph: platt (default) | none."),
          watch_time_correction: str | None = typer.Option(
              None, help="Serve regression tasks as expected values with a factor fitted on validation: "
                         "ratio (default) | smearing | none."),
          quiet: bool = typer.Option(False, help="No progress bars.")):
    """Train a multi-task model, evaluate it on the test split and export a versioned bundle."""
    _need_training()
    from training.train import TrainConfig, format_metrics
    from training.train import train as run_train

    model = json.loads(model_config)
    if backbone is not None:
        model["backbone"] = backbone
    if mutual_learning is not None:
        model["mutual_learning"] = mutual_learning
    extra = {k: v for k, v in (("calibration", calibration), ("watch_time_correction", watch_time_correction))
             if v is not None}  # unset: TrainConfig's defaults
    try:
        cfg = TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, split=split,
                          seed=seed, split_seed=split_seed, max_rows=max_rows, model=model, int8=int8, device=device,
                          **extra)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    with _user_errors("train"):
        bundle, metrics = run_train(data, name=name, store=store, cfg=cfg, progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the same; rank 0 reports
        typer.echo(f"test metrics:\n{format_metrics(metrics)}\nbundle: {bundle}")


@features_app.command("load")
def features_load(data: Path = typer.Option(..., help="Dataset spec file, or a directory holding dataset.yaml."),
                  model_name: str = typer.Option("demo", "--model-name", envvar="MTRANK_MODEL_NAME"),
                  version: int | None = typer.Option(None, help="Bundle version (default: newest)."),
                  store: Path = STORE, redis_url: str = REDIS_URL, prefix: str = PREFIX,
                  quiet: bool = typer.Option(False)):
    """Materialise the user and item features of a bundle's schema into Redis."""
    from service.redis_client import client_for_url
    from service.store import bundle_dir
    from training.materialize import load_features

    client = client_for_url(redis_url)
    with _user_errors("features load"):
        path = bundle_dir(store, model_name, version)
        summary = load_features(data, path, client, prefix=prefix, progress=not quiet)
    typer.echo(f"{summary} (bundle {path}, redis {_redact(redis_url)})")


@features_app.command("gc")
def features_gc(store: Path = STORE, redis_url: str = REDIS_URL, prefix: str = PREFIX,
                keep: list[str] = typer.Option([], "--keep", metavar="NAME:VERSION",
                                               help="Also keep this version's namespace (repeatable): versions an "
                                                    "operator loaded into a running service."),
                apply: bool = typer.Option(False, "--apply", help="Delete (default: a dry run that only prints).")):
    """Remove the feature namespaces under the prefix that no held or pinned bundle uses.

    Plans as the service does (MTRANK_ROUTING_CONFIG or MTRANK_MODEL_NAME, the version policy, the
    store listing); SCANs every master; never touches keys outside '<prefix>:' nor keys there that
    are not in a namespace. Dry run unless --apply."""
    import redis

    from service import namespaces
    from service.redis_client import client_for_url
    from service.routing import RoutingConfigError, is_safe_name
    from service.serving import ModelVersion

    pins = []
    for k in keep:
        name, _, version = k.rpartition(":")
        if not is_safe_name(name) or not version.isdecimal() or int(version) < 1:
            raise typer.BadParameter(f"{k!r}: expected NAME:VERSION, e.g. demo:3", param_hint="--keep")
        pins.append(ModelVersion(name, int(version)))
    client = client_for_url(redis_url)
    with _user_errors("features gc"):
        settings = Settings(model_store=str(store), redis_url=redis_url, redis_prefix=prefix)
        try:
            sv = namespaces.survey(client, prefix)
            namespaces.needed(settings, sv, pins)
        except (RoutingConfigError, redis.RedisError) as e:  # nothing deleted
            typer.echo(f"mtrank features gc: {type(e).__name__}: {e}", err=True)
            raise typer.Exit(2) from None
        for ns in sorted(sv.namespaces.values(), key=lambda n: n.name):
            verdict = f"keep ({', '.join(ns.needed_by)})" if ns.needed_by else "delete" if apply else "would delete"
            typer.echo(f"{ns.name}  {ns.keys:>10,} keys  {ns.describe_meta():<40}  {verdict}")
        doomed = sv.unused()
        n_keys = sum(ns.keys for ns in doomed)
        typer.echo(f"{len(sv.namespaces)} namespaces under {prefix!r} on {sv.masters} master(s) of "
                   f"{_redact(redis_url)}; {sv.other_keys:,} other keys under '{prefix}:' (never touched)")
        if not apply:
            typer.echo(f"dry run: would delete {len(doomed)} namespaces ({n_keys:,} keys); --apply deletes them")
            return
        deleted = namespaces.collect(client, sv, [ns.name for ns in doomed])
        typer.echo(f"deleted {len(doomed)} namespaces ({deleted:,} keys)")


@app.command()
def serve(host: str = HOST, port: int = PORT,
          workers: int | None = typer.Option(None, "--workers", envvar="MTRANK_WORKERS",
                                                help="uvicorn worker processes (default: one per visible GPU when "
                                                     "MTRANK_PROVIDERS asks for CUDA and it is available, else one "
                                                     "per usable core). onnxruntime threads per worker default to "
                                                     "cores / workers."),
          log_level: str = typer.Option(_DEFAULT["log_level"].lower(), envvar="MTRANK_LOG_LEVEL")):
    """Serve POST /rank with uvicorn (configuration from MTRANK_* environment variables).

    SIGTERM (or Ctrl-C): stop accepting, finish the requests in flight for at most
    MTRANK_SHUTDOWN_DRAIN_S seconds, exit 0."""
    import logging.config
    import signal
    import tempfile

    import uvicorn

    from service.access_log import logging_config
    from service.deps import DependencyError, check_runtime

    try:
        check_runtime()
    except DependencyError as e:
        typer.echo(f"mtrank serve: {e}", err=True)
        raise typer.Exit(2) from None

    if workers is not None:
        os.environ["MTRANK_WORKERS"] = str(workers)  # the workers read their Settings from the environment
    settings = Settings()
    n = settings.workers
    os.environ["MTRANK_LOG_LEVEL"] = log_level.upper()
    own_dir = None
    if n > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # metrics of several processes: prometheus-client's multi-process mode, in a fresh directory
        own_dir = tempfile.mkdtemp(prefix="mtrank-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    log_config = logging_config(settings.log_format, log_level.upper())
    logging.config.dictConfig(log_config)  # uvicorn applies it again; this is for our own lines before
    logging.getLogger("service.cli").info(
        "serving on %s:%d with %d worker(s), %d onnxruntime thread(s) each%s", host, port, n, settings.ort_threads,
        f"; metrics merged through PROMETHEUS_MULTIPROC_DIR={own_dir}" if own_dir else "")
    # uvicorn re-raises the signal it shut down on once it is done (and restores the handlers it found):
    # ours turns it into a clean exit, so a drained shutdown exits 0 instead of dying of the signal; a
    # signal before uvicorn took over exits 0 at once
    def _exit(signum, frame):
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit)
    try:
        uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=n,
                    log_level=log_level.lower(), log_config=log_config,
                    access_log=False,
                    # annotated int | None, but only passed to asyncio.wait_for as its timeout: a float is fine
                    timeout_graceful_shutdown=settings.shutdown_drain_s,  # type: ignore[arg-type]
                    # a worker importing the app on a loaded machine can take longer than uvicorn's 5 s
                    # health-check ping (it was then killed and restarted in a loop)
                    timeout_worker_healthcheck=WORKER_HEALTHCHECK_S)
    finally:
        if own_dir is not None:
            import shutil

            shutil.rmtree(own_dir, ignore_errors=True)


logs_app = typer.Typer(no_args_is_help=True, help="Prediction logs (the Redis Stream of ranked requests).")
app.add_typer(logs_app, name="logs")


PREDLOG_STREAM = typer.Option(_DEFAULT["predlog_stream"], "--stream", envvar="MTRANK_PREDLOG_STREAM",
                              help="Prediction-log stream key.")
PREDLOG_URL = typer.Option(None, "--predlog-redis-url", envvar="MTRANK_PREDLOG_REDIS_URL",
                           help="Redis of the prediction log (default: --redis-url; may carry a password).")
SINCE = typer.Option(None, help="From: stream id, unix ms or ISO 8601 time (UTC).")
UNTIL = typer.Option(None, help="Up to (inclusive), same forms.")
WINDOW = typer.Option(3600.0, "--window", min=0,
                      help="Seconds after a request within which an event without a request id is joined to it.")
TASK_EVENT = typer.Option([], "--task-event", help="TASK=OUTCOME (click | conversion | watch): which outcome "
                                                   "labels a task (default ctr=click, cvr=conversion, "
                                                   "watch_time=watch).")


def _pseudonym_key(command: str) -> bytes:
    """MTRANK_PSEUDONYM_KEY (the prediction log's key): the events' user ids are pseudonymised with it."""
    from service.predlog import pseudonym_key

    try:
        return pseudonym_key(Settings())
    except ValueError as e:
        typer.echo(f"mtrank {command}: {e}", err=True)
        raise typer.Exit(2) from None


@logs_app.command("export")
def logs_export(out: Path = typer.Option(..., "--out", help="Parquet file to write (a directory with "
                                                             "--with-outcomes)."),
                stream: str = PREDLOG_STREAM, since: str | None = SINCE, until: str | None = UNTIL,
                redis_url: str = REDIS_URL, predlog_redis_url: str | None = PREDLOG_URL,
                page: int = typer.Option(1000, help="Entries per XRANGE call."),
                with_outcomes: bool = typer.Option(
                    False, "--with-outcomes",
                    help="Training data as served: one row per logged candidate with its features as read "
                         "(records with features only) and its labels from the events stream; writes "
                         "exposures.parquet and dataset.yaml into --out for `mtrank train --data`."),
                prefix: str = PREFIX, store: Path = STORE, window: float = WINDOW,
                task_event: list[str] = TASK_EVENT,
                returned_only: bool = typer.Option(False, "--returned-only",
                                                   help="With --with-outcomes: only the candidates returned.")):
    """Write the prediction log to Parquet: one row per ranked request, list columns for the
    candidates, the returned positions and the scores (and a task -> scores map); or, with
    --with-outcomes, training data as served."""
    from service.predlog import export
    from service.redis_client import client_for_url

    log_url = predlog_redis_url or redis_url
    if not with_outcomes:
        try:
            rows = export(client_for_url(log_url), stream, out, since=since, until=until, page=page)
        except ValueError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {rows} rows from stream {stream!r} (redis {_redact(log_url)}) to {out}")
        return
    from service.readout import join, load
    from training.data import served

    key = _pseudonym_key("logs export")
    with _user_errors("logs export"):
        try:
            events = join.events_frame(load.events(client_for_url(redis_url), prefix, since), key)
            done = served.export(load.predictions(client_for_url(log_url), stream, since, until), events, store,
                                 out, join.task_events(task_event), window, returned_only)
        except ValueError as e:
            typer.echo(f"mtrank logs export: {e}", err=True)
            raise typer.Exit(2) from None
    typer.echo(f"wrote {done.rows} candidates of {done.requests} requests to {done.path} (labels: "
               f"{ {k: round(v, 2) for k, v in done.labelled.items()} }; {done.skipped} records without features "
               f"or of another schema skipped); train with: mtrank train --data {done.path}")


ab_app = typer.Typer(no_args_is_help=True, help="A/B experiments: the readout of the prediction log and events.")
app.add_typer(ab_app, name="ab")


@ab_app.command("report")
def ab_report(stream: str = PREDLOG_STREAM, since: str | None = SINCE, until: str | None = UNTIL,
              redis_url: str = REDIS_URL, predlog_redis_url: str | None = PREDLOG_URL, prefix: str = PREFIX,
              config: Path | None = typer.Option(None, "--config", envvar="MTRANK_ROUTING_CONFIG",
                                                 help="Routing config (the split the SRM test expects)."),
              control: str | None = typer.Option(None, help="Control variant (default: the ranking layer's "
                                                            "first)."),
              k: int = typer.Option(10, "--k", min=1, help="Shown = returned at positions below k."),
              window: float = WINDOW, task_event: list[str] = TASK_EVENT,
              bootstrap: int = typer.Option(500, min=50, help="User-level bootstrap resamples (AUC)."),
              seed: int = typer.Option(0, help="Bootstrap seed."),
              markdown: Path | None = typer.Option(None, "--markdown", help="Also write the report as Markdown."),
              plot: Path | None = typer.Option(None, "--plot", help="Also draw the lifts with intervals (PNG; "
                                                                    "needs matplotlib: the train extra)."),
              json_out: Path | None = typer.Option(None, "--json", help="Also write the numbers as JSON.")):
    """Per variant: users, requests, CTR@k, conversion rate, watch seconds, AUC per task with 95%
    intervals at the user level, lifts against control, and a sample-ratio-mismatch test against
    the configured split. Forced-variant requests are left out."""
    if importlib.util.find_spec("scipy") is None:
        typer.echo("mtrank ab report needs scipy: pip install '.[readout]'", err=True)
        raise typer.Exit(2)
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        typer.echo("--plot needs matplotlib: pip install '.[readout]'", err=True)
        raise typer.Exit(2)
    import dataclasses

    from service.readout import join, load, report
    from service.redis_client import client_for_url
    from service.routing import RoutingConfigError, load_config, variant_ranges

    key = _pseudonym_key("ab report")
    shares = None
    if config is not None:
        try:
            cfg = load_config(config)
        except (RoutingConfigError, OSError) as e:
            typer.echo(f"mtrank ab report: {e}", err=True)
            raise typer.Exit(2) from None
        shares = {v.name: (last - first + 1) / cfg.buckets
                  for v, (first, last) in zip(cfg.ranking.variants, variant_ranges(cfg.ranking, cfg.buckets),
                                              strict=True)}
    try:
        tasks = join.task_events(task_event)
        cands = join.candidates(load.predictions(client_for_url(predlog_redis_url or redis_url), stream, since,
                                                 until), returned_only=True)
        if cands.empty:
            raise ValueError(f"no prediction-log records in stream {stream!r}: serve with MTRANK_PREDLOG_RATE > 0")
        joined = join.label(cands, join.events_frame(load.events(client_for_url(redis_url), prefix, since), key),
                            window)
        rep = report.build(joined.frame, k=k, control=control, shares=shares, task_events=tasks,
                           bootstrap=bootstrap, seed=seed)
    except ValueError as e:
        typer.echo(f"mtrank ab report: {e}", err=True)
        raise typer.Exit(2) from None
    rep.notes.append(f"outcome events: {joined.events} distinct, {joined.joined} joined to a logged candidate "
                     f"(the rest: requests not sampled, items not returned, outside --window); "
                     f"{joined.duplicates} duplicates dropped")
    typer.echo(report.text(rep), nl=False)
    if markdown is not None:
        markdown.write_text(report.markdown(rep))
    if plot is not None:
        report.plot(rep, plot)
    if json_out is not None:
        json_out.write_text(json.dumps(dataclasses.asdict(rep), indent=2, default=str))
    if rep.srm is not None and rep.srm.mismatch:
        typer.echo(f"WARNING: sample ratio mismatch (p = {rep.srm.p:.2g})", err=True)


events_app = typer.Typer(no_args_is_help=True, help="Outcome events (POST /events, the events stream).")
app.add_typer(events_app, name="events")


@events_app.command("consume")
def events_consume(name: str | None = typer.Option(None, "--name", help="This consumer's name in the group "
                                                                        "(default: <host>-<pid>)."),
                   block_ms: int = typer.Option(1000, "--block-ms", min=1, help="Longest wait for new entries, ms.")):
    """Apply the events stream to the behaviour sequences of every held bundle (docs/events.md).

    Configuration from MTRANK_* (the service's own: Redis, model store, routing config, MTRANK_EVENTS_*).
    Runs until SIGTERM or Ctrl-C; safe to run as several processes."""
    import signal

    from service import access_log
    from service.events.consumer import Consumer, ConsumerError

    settings = Settings()
    access_log.configure(settings.log_level, settings.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        Consumer(settings, name, block_ms=block_ms).run(stop)
    except ConsumerError as e:
        typer.echo(f"mtrank events consume: {e}", err=True)
        raise typer.Exit(2) from None


class SelfCheckFailed(Exception):
    """The demo's self-check did not get a ranked answer; the message is the one-line reason."""


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """(status, body) of one HTTP request with the standard library (the service install has no
    HTTP client); an HTTP error status is returned, a connection failure raises OSError."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _self_check(base: str, data: Path, n_items: int = 500, ready_timeout_s: float = 300.0) -> None:
    """Once the demo service is ready, rank n_items candidates for one user and print the top;
    :class:`SelfCheckFailed` (one line) when the service does not become ready or /rank is not 200."""
    import pandas as pd

    from training.data.spec import load_spec

    spec = load_spec(data)
    ex = pd.read_parquet(spec.path(spec.exposures.path), columns=[spec.exposures.user_key, spec.exposures.item_key])
    user = str(ex[spec.exposures.user_key].iloc[0])
    items = [str(i) for i in ex[spec.exposures.item_key].drop_duplicates().iloc[:n_items]]
    deadline = time.monotonic() + ready_timeout_s
    last = "no answer"
    while True:
        try:
            status, raw = _http("GET", f"{base}/readyz", timeout=2)
            if status == 200:
                break
            last = f"HTTP {status}: {raw[:300].decode('utf-8', 'replace')}"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise SelfCheckFailed(f"the service at {base} was not ready within {ready_timeout_s:.0f} s ({last})")
        time.sleep(0.5)
    body = {"user_id": user, "items": items, "context": {"hour": 20, "device": "ios"}, "top_k": 5}
    t0 = time.perf_counter()
    try:
        status, raw = _http("POST", f"{base}/rank", body, timeout=30)
    except OSError as e:
        raise SelfCheckFailed(f"POST /rank failed: {type(e).__name__}: {e}") from None
    ms = (time.perf_counter() - t0) * 1000
    if status != 200:
        raise SelfCheckFailed(f"POST /rank answered HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
    typer.echo(f"\nPOST /rank with {len(items)} candidates -> HTTP {status} in {ms:.1f} ms")
    typer.echo(json.dumps(json.loads(raw), indent=2)[:2000])
    typer.echo(f"\ntry it:\n  curl -s {base}/rank -H 'content-type: application/json' "
               f"-d '{{\"user_id\": \"{user}\", \"items\": [\"{items[0]}\", \"{items[1]}\", \"{items[2]}\"]}}'\n")


@app.command()
def demo(host: str = HOST, port: int = PORT, redis_url: str = REDIS_URL, prefix: str = PREFIX, store: Path = STORE,
         data: Path = typer.Option(Path("data/synth"), help="Where the synthetic data goes."),
         users: int = typer.Option(20_000), items: int = typer.Option(50_000),
         exposures: int = typer.Option(1_000_000),
         arch: str = typer.Option("ple"), epochs: int = typer.Option(4),
         batch_size: int = typer.Option(2048, help="Training batch size."),
         name: str = typer.Option("demo"),
         check_items: int = typer.Option(500, min=3, help="Candidates ranked by the self-check."),
         ready_timeout: float = typer.Option(300.0, min=1, help="Seconds the self-check waits for /readyz."),
         serve_forever: bool = typer.Option(True, "--serve/--no-serve",
                                            help="Keep serving after the self-check (default), or exit after it: "
                                                 "0 when it got a ranked answer, 1 with a one-line reason if not.")):
    """End to end: synthesise data, train and export a model, load features into Redis, serve, rank."""
    _need_training()
    import redis
    import uvicorn

    from service.redis_client import client_for_url
    from training.data.synth import SynthConfig, generate
    from training.materialize import load_features
    from training.train import TrainConfig, format_metrics
    from training.train import train as run_train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = client_for_url(redis_url)
    try:
        client.ping()
    except redis.RedisError as e:
        typer.echo(f"Redis at {_redact(redis_url)} does not answer ({e}); start one or set MTRANK_REDIS_URL", err=True)
        raise typer.Exit(1) from None
    t0 = time.perf_counter()
    typer.echo(f"[1/4] synthetic data -> {data}")
    if not (data / "dataset.yaml").exists():
        generate(data, SynthConfig(n_users=users, n_items=items, n_exposures=exposures))
    typer.echo(f"[2/4] training {arch} ({time.perf_counter() - t0:.0f}s)")
    bundle, metrics = run_train(data, name=name, store=store,
                                cfg=TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size))
    typer.echo(f"test metrics:\n{format_metrics(metrics)}\nbundle: {bundle}")
    typer.echo(f"[3/4] loading features into Redis {_redact(redis_url)} ({time.perf_counter() - t0:.0f}s)")
    typer.echo(str(load_features(data, bundle, client, prefix=prefix)))
    typer.echo(f"[4/4] serving on http://{host}:{port} ({time.perf_counter() - t0:.0f}s)")
    os.environ.update(MTRANK_REDIS_URL=redis_url, MTRANK_REDIS_PREFIX=prefix, MTRANK_MODEL_STORE=str(store),
                      MTRANK_MODEL_NAME=name)
    from service.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(), host=host, port=port, log_level="info"))
    check_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    failure: list[str] = []

    def check():
        try:
            _self_check(f"http://{check_host}:{port}", data, n_items=check_items, ready_timeout_s=ready_timeout)
        except SelfCheckFailed as e:
            failure.append(str(e))
        except Exception as e:  # anything else: still one line, and the demo must not hang
            failure.append(f"{type(e).__name__}: {e}")
        if failure:
            typer.echo(f"self-check failed: {failure[0]}", err=True)
        if not serve_forever:
            server.should_exit = True

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    server.run()
    if not server.started and not failure:  # e.g. the port is taken: uvicorn logged why
        failure.append(f"the server did not start on {host}:{port}")
        typer.echo(f"self-check failed: {failure[0]}", err=True)
    if not serve_forever and failure:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
