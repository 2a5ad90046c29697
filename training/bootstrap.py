"""The compose stack's one-shot job (``python -m training.bootstrap``): make sure the model store
holds a bundle and Redis holds that bundle's features, doing only what is missing.

1. No bundle of ``MTRANK_MODEL_NAME`` in ``MTRANK_MODEL_STORE`` (or ``JOB_RETRAIN=1``): synthesise
   the data set unless it is already on disk (``mtrank synth``; same seed, same data), then train
   and export (``mtrank train``).
2. Redis lacks the features of the newest bundle (the namespace's meta key is absent or was
   written for another bundle version), or this run trained: load them (``mtrank features load``).

Everything else is left alone, so a second ``docker compose up`` neither retrains nor publishes a
new version, and a Redis that lost its data (no persistence) gets the features back. The steps
are the CLI's own commands, run in-process; the settings the service reads (store, model name,
Redis URL and prefix) come from :class:`service.settings.Settings`, the job's own knobs from
``JOB_*`` variables (see :func:`options`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from service.contract import MANIFEST_FILE, BundleManifest, meta_key, namespace
from service.redis_client import client_for_url
from service.settings import Settings, redact_url
from service.store import bundle_dir, list_versions


@dataclass(frozen=True)
class Options:
    data: Path            # JOB_DATA: where the synthetic data set lives (a dataset.yaml directory)
    retrain: bool         # JOB_RETRAIN=1: train (and load features) even when a bundle exists
    arch: str             # JOB_ARCH
    epochs: int           # JOB_EPOCHS
    users: int            # JOB_SYNTH_USERS
    items: int            # JOB_SYNTH_ITEMS
    exposures: int        # JOB_SYNTH_EXPOSURES


def options(env: dict[str, str] | None = None) -> Options:
    env = os.environ if env is None else env

    def num(name: str, default: int) -> int:
        raw = env.get(name) or str(default)
        try:
            value = int(raw)
        except ValueError:
            raise SystemExit(f"{name}={raw!r} is not an integer") from None
        if value < 1:
            raise SystemExit(f"{name}={raw!r} must be >= 1")
        return value

    flag = (env.get("JOB_RETRAIN") or "0").strip().lower()
    if flag not in ("0", "1", "true", "false", "yes", "no"):
        raise SystemExit(f"JOB_RETRAIN={flag!r}: use 0 or 1")
    return Options(data=Path(env.get("JOB_DATA") or "/data/synth"), retrain=flag in ("1", "true", "yes"),
                   arch=env.get("JOB_ARCH") or "ple", epochs=num("JOB_EPOCHS", 4),
                   users=num("JOB_SYNTH_USERS", 20_000), items=num("JOB_SYNTH_ITEMS", 50_000),
                   exposures=num("JOB_SYNTH_EXPOSURES", 1_000_000))


def say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def mtrank(*argv: str) -> None:
    """Run one ``mtrank`` command in this process; a non-zero exit ends the job with it."""
    from service.cli import app

    t0 = time.perf_counter()
    say("mtrank " + " ".join(argv))
    code = app(list(argv), standalone_mode=False)
    if code:
        raise SystemExit(code)
    say(f"mtrank {argv[0]} done in {time.perf_counter() - t0:.1f}s")


def features_present(client, prefix: str, bundle: Path) -> bool:
    """Redis holds the features written for exactly this bundle (its meta key names it)."""
    manifest = BundleManifest.from_json((bundle / MANIFEST_FILE).read_text())
    raw = client.get(meta_key(namespace(prefix, manifest.feature_schema)))
    if raw is None:
        return False
    meta = json.loads(raw)
    return (meta.get("model"), meta.get("version")) == (manifest.name, manifest.version)


def main(env: dict[str, str] | None = None) -> int:
    opts = options(env)
    settings = Settings()
    store, name = settings.model_store, settings.model_name
    trained = False
    versions = list_versions(store, name)
    if versions and not opts.retrain:
        say(f"bundle {name}/{versions[-1]} is in {store}: not training (JOB_RETRAIN=1 trains anyway)")
    else:
        if (opts.data / "dataset.yaml").is_file():
            say(f"data set {opts.data} exists: not synthesising")
        else:
            mtrank("synth", "--out", str(opts.data), "--users", str(opts.users), "--items", str(opts.items),
                   "--exposures", str(opts.exposures))
        mtrank("train", "--data", str(opts.data), "--arch", opts.arch, "--name", name, "--store", store,
               "--epochs", str(opts.epochs), "--quiet")
        trained = True
    bundle = bundle_dir(store, name)
    client = client_for_url(settings.redis_url)
    if not trained and features_present(client, settings.redis_prefix, bundle):
        say(f"features of {name}/{bundle.name} are in Redis ({redact_url(settings.redis_url)}): not loading")
    else:
        if not (opts.data / "dataset.yaml").is_file():  # the data volume was removed, the store kept
            mtrank("synth", "--out", str(opts.data), "--users", str(opts.users), "--items", str(opts.items),
                   "--exposures", str(opts.exposures))
        mtrank("features", "load", "--data", str(opts.data), "--model-name", name, "--version", bundle.name,
               "--store", store, "--quiet")  # Redis URL and prefix: from the environment, as Settings reads them
    say(f"ready: {name}/{bundle.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
