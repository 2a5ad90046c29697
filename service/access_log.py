"""Logging of the service: structured (JSON) or text lines, and the access line of ``/rank``.

``MTRANK_LOG_FORMAT=json`` (the default): every line is one JSON object with ``timestamp`` (UTC,
ISO 8601, ms), ``level``, ``logger``, ``message``, ``pid`` (the worker), the structured fields of the record (see
:func:`fields`), and ``exception`` when there is a traceback. ``text``: ``time level logger:
message`` followed by the fields as compact JSON.

The access line, one per ``/rank`` answer (logger ``service.access``, message ``rank``), carries
``request_id``, ``status``, ``variant``, ``bucket``, ``forced`` (X-Mtrank-Variant honoured),
``model`` {name, version}, ``n_items``, ``n_returned``, ``missing_user``, ``missing_items``,
``degraded`` (false or the reason), ``ms`` per stage (fetch, assemble, inference, fusion,
serialise, total), ``duration_ms`` (the whole request inside the process) and, for a request that
was not ranked, ``error`` (its kind; never a payload or a secret).

Writing: the access lines go through a :class:`~logging.handlers.QueueHandler` to a listener
thread (:func:`start_queue`, :func:`stop_queue`, called by the runtime at start and stop), so the
event loop never blocks on the log stream (a slow terminal, a full pipe); the lines keep their
order and the queue is drained at shutdown. Other loggers write directly (they are rare).

Secrets: the formatters replace every registered secret (the Redis password, the admin token; see
:func:`register_secrets`) with ``***`` in the final line, a last guard behind the code's own
redaction (which never logs them in the first place).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import Any, Literal
from urllib.parse import unquote

import orjson

from service.settings import url_secret

log = logging.getLogger("service.access")
_SECRETS: list[str] = []
_MIN_SECRET = 4  # shorter "secrets" would blank ordinary words out of every line
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# -- secrets ----------------------------------------------------------------------------------------

def register_secrets(*values: str | None) -> None:
    """Values that must never appear in a log line (scrubbed by the formatters)."""
    for v in values:
        if v and len(v) >= _MIN_SECRET and v not in _SECRETS:
            _SECRETS.append(v)
            if unquote(v) != v and len(unquote(v)) >= _MIN_SECRET:
                _SECRETS.append(unquote(v))
    _SECRETS.sort(key=len, reverse=True)


def register_settings_secrets(settings) -> None:
    """The Redis URL's password (or lone user name, which is then the secret) and the admin token."""
    secret = url_secret(settings.redis_url)
    if secret:
        register_secrets(secret)
    if settings.admin_token is not None:
        register_secrets(settings.admin_token.get_secret_value())
    if settings.pseudonym_key is not None:  # and the prediction log's: its key and its Redis URL's secret
        register_secrets(settings.pseudonym_key.get_secret_value())
    if settings.predlog_redis_url:
        register_secrets(url_secret(settings.predlog_redis_url))


def scrub(text: str) -> str:
    for s in _SECRETS:
        if s in text:
            text = text.replace(s, "***")
    return text


# -- formatters -------------------------------------------------------------------------------------

def fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """The structured fields of a record: ``logger.info(msg, extra={"fields": {...}})``."""
    f = getattr(record, "fields", None)
    return f if isinstance(f, dict) else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line (orjson), secrets scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        rec: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        f = fields(record)
        if f:
            for k, v in f.items():
                rec.setdefault(k, v)
        if record.exc_info:
            rec["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            rec["exception"] = record.exc_text
        if record.stack_info:
            rec["stack"] = self.formatStack(record.stack_info)
        line = orjson.dumps(rec, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        return scrub(line) if _SECRETS else line


class TextFormatter(logging.Formatter):
    """``time level logger: message {fields as JSON}``, secrets scrubbed."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, style: Literal["%", "{", "$"] = "%", **kw):
        super().__init__(fmt or TEXT_FORMAT, datefmt, style, **kw)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        f = fields(record)
        if f:
            line = f"{line} {orjson.dumps(f, default=str, option=orjson.OPT_NON_STR_KEYS).decode()}"
        return scrub(line) if _SECRETS else line


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def logging_config(fmt: str = "json", level: str = "INFO") -> dict:
    """A :func:`logging.config.dictConfig` for ``mtrank serve`` (uvicorn's ``log_config``): the root,
    uvicorn's loggers and ours all write ``fmt`` lines to stderr."""
    cls = "service.access_log.JsonFormatter" if fmt == "json" else "service.access_log.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": cls}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": level},
    }


def configure(level: str | int = "INFO", fmt: str = "json") -> None:
    """Logging of an app made by :func:`service.app.create_app`: a stderr handler on the root logger
    (unless someone - uvicorn's ``log_config``, pytest - configured one), ``fmt`` lines; uvicorn's
    own handlers get the same formatter so that every line has one format."""
    logging.getLogger("service").setLevel(level)
    log.setLevel(level)
    root = logging.getLogger()
    if not root.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter(fmt))
        root.addHandler(stream)
        root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        for h in logging.getLogger(name).handlers:
            if type(h.formatter).__module__.startswith("uvicorn"):
                h.setFormatter(formatter(fmt))


# -- the access lines go through a queue: the event loop never waits for the log stream ---------------

class _RootHandlers(logging.Handler):
    """The listener's side: hands each record to the root logger's handlers as they are when it is
    written (so handlers added later - pytest's, a test's - see access lines as before)."""

    def handle(self, record: logging.LogRecord) -> bool:
        for h in logging.getLogger().handlers:
            if record.levelno >= h.level:
                h.handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


class _InProcessQueueHandler(QueueHandler):
    """A QueueHandler for a queue read in this process: the record is queued as it is (no
    formatting on the event loop; the formatters of the real handlers run on the listener's thread)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


_queue_users = 0
_queue_lock = threading.Lock()
_listener: QueueListener | None = None
_queue_handler: QueueHandler | None = None


def start_queue() -> None:
    """Access lines (logger ``service.access``) from now on go through a
    :class:`~logging.handlers.QueueHandler` to a :class:`~logging.handlers.QueueListener` thread
    that writes them, in order, to the root logger's handlers. Counted: each start needs a
    :func:`stop_queue`."""
    global _queue_users, _listener, _queue_handler
    with _queue_lock:
        _queue_users += 1
        if _listener is not None:
            return
        q: queue.SimpleQueue = queue.SimpleQueue()
        _queue_handler = _InProcessQueueHandler(q)
        _listener = QueueListener(q, _RootHandlers())
        _listener.start()
        log.addHandler(_queue_handler)
        log.propagate = False


def stop_queue() -> None:
    """Write every queued line, then go back to writing access lines directly (the last user's stop)."""
    global _queue_users, _listener, _queue_handler
    with _queue_lock:
        _queue_users = max(0, _queue_users - 1)
        if _queue_users or _listener is None:
            return
        log.propagate = True
        if _queue_handler is not None:
            log.removeHandler(_queue_handler)
        _listener.stop()  # processes what is queued, then joins the thread
        _listener = _queue_handler = None


# -- the access line of /rank -----------------------------------------------------------------------

def rank_line(*, request_id: str | None, status: int, variant: str | None = None, bucket: int | None = None,
              forced: bool = False, model: dict | None = None, n_items: int | None = None,
              n_returned: int | None = None, missing_user: bool | None = None, missing_items: int | None = None,
              timings: dict[str, float] | None = None, degraded: str | None = None,
              duration_s: float | None = None, error: str | None = None) -> None:
    """Write one access line (skipped cheaply when the logger is off)."""
    if not log.isEnabledFor(logging.INFO):
        return
    rec: dict[str, Any] = {"event": "rank", "request_id": request_id, "status": status, "variant": variant,
                           "bucket": bucket, "forced": forced, "model": model, "n_items": n_items}
    if n_returned is not None:
        rec["n_returned"] = n_returned
        rec["missing_user"] = missing_user
        rec["missing_items"] = missing_items
        rec["degraded"] = degraded or False
    if timings:
        rec["ms"] = {k: round(v * 1e3, 3) for k, v in timings.items()}
    if duration_s is not None:
        rec["duration_ms"] = round(duration_s * 1e3, 3)
    if error:
        rec["error"] = error
    log.info("rank", extra={"fields": rec})
