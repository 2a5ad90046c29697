"""The feature store connection: one object the service reads features through.

:class:`FeatureStore` wraps a redis-py client (a single Redis, or a Redis Cluster) and owns what
the request path needs around it: the per-request deadline, the circuit breaker and, on a
cluster, reads grouped per node. Everything that reads or writes features goes through
:func:`make_store` so a URL or ``MTRANK_REDIS_CLUSTER`` switch is honoured everywhere.

Failures surface as :class:`StoreUnavailable` (a ``redis.RedisError``) with a short ``reason``:
``timeout``, ``down`` or ``circuit_open``.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from service.settings import Settings


class StoreUnavailable(redis.RedisError):
    """The feature store did not answer in time or at all; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"feature store unavailable ({reason}){': ' + detail if detail else ''}")
        self.reason = reason


class FeatureStore:
    """Feature reads with a deadline. (Interface first; breaker and cluster grouping follow.)"""

    def __init__(self, client, settings: Settings):
        self.client = client
        self.settings = settings

    # -- request path ---------------------------------------------------------------------------
    def mget(self, keys: Sequence[str], deadline_s: float | None = None) -> list[bytes | None]:
        try:
            return self.client.mget(keys)
        except redis.TimeoutError as e:
            raise StoreUnavailable("timeout", str(e)) from e
        except redis.RedisError as e:
            raise StoreUnavailable("down", f"{type(e).__name__}: {e}") from e

    @property
    def healthy(self) -> bool:
        return True

    # -- pass-through for the control path (meta checks, readiness) --------------------------------
    def get(self, key: str):
        return self.client.get(key)

    def ping(self) -> bool:
        return self.client.ping()

    def close(self) -> None:
        self.client.close()


def make_client(settings: Settings):
    """A redis-py client for ``settings.redis_url`` (timeouts from the settings)."""
    return redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                                socket_connect_timeout=settings.redis_timeout_s)


def client_for_url(url: str, timeout_s: float = 5.0, cluster: bool | None = None):
    """A redis-py client for tools (loader, demo): a cluster client for a ``+cluster`` URL or
    ``cluster=True``, else a plain one."""
    return make_client(Settings(redis_url=url, redis_timeout_ms=timeout_s * 1000,
                                redis_cluster=bool(cluster)))


def make_store(settings: Settings) -> FeatureStore:
    return FeatureStore(make_client(settings), settings)
