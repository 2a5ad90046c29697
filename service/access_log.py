"""The structured access log of ``/rank``: one JSON object per line on the logger ``service.access``.

Fields: ``ts`` (unix seconds), ``request_id``, ``status``, ``variant``, ``bucket``, ``forced``
(X-Mtrank-Variant honoured), ``model`` {name, version}, ``n_items``, ``n_returned``,
``missing_user``, ``missing_items``, ``ms`` (per stage: fetch, assemble, inference, fusion,
serialise, total), ``error`` (for a failed request: its kind, never a payload or a secret).

By default (see :func:`configure`) the lines go to stderr as bare JSON, one per line, so a log
shipper can parse them as they are; the logger does not propagate to the root logger then.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
import redis

from service.features import ContextError

log = logging.getLogger("service.access")


def configure(level: str | int = logging.INFO) -> None:
    """Give ``service.access`` its own bare-JSON stderr handler, unless it has handlers already."""
    log.setLevel(level)
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.propagate = False


def status_of(exc: BaseException) -> int:
    """The HTTP status the app answers for an exception raised on the /rank path."""
    from service.serving import NotReady, UnknownVariant  # imported here: serving imports nothing of ours

    if isinstance(exc, (ContextError, UnknownVariant)):
        return 422
    if isinstance(exc, (redis.RedisError, NotReady)):
        return 503
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else 500


def rank_line(*, request_id: str | None, status: int, variant: str | None = None, bucket: int | None = None,
              forced: bool = False, model: dict | None = None, n_items: int | None = None,
              n_returned: int | None = None, missing_user: bool | None = None, missing_items: int | None = None,
              timings: dict[str, float] | None = None, error: str | None = None) -> None:
    """Write one access line (skipped cheaply when the logger is off)."""
    if not log.isEnabledFor(logging.INFO):
        return
    rec: dict[str, Any] = {"ts": round(time.time(), 6), "event": "rank", "request_id": request_id,
                           "status": status, "variant": variant, "bucket": bucket, "forced": forced,
                           "model": model, "n_items": n_items}
    if n_returned is not None:
        rec["n_returned"] = n_returned
        rec["missing_user"] = missing_user
        rec["missing_items"] = missing_items
    if timings:
        rec["ms"] = {k: round(v * 1e3, 3) for k, v in timings.items()}
    if error:
        rec["error"] = error
    log.info(orjson.dumps(rec).decode())
