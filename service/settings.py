"""Service settings (pydantic-settings, environment variables prefixed ``MTRANK_``).

Complex values (``MTRANK_FUSION_WEIGHTS``) are read as JSON. Validation errors name the field
and never echo the input (the Redis URL may hold a password); use :attr:`Settings.redis_url_redacted`
wherever the URL is shown or logged.
"""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.fusion import FusionName, weight_problems

#: short provider names accepted in ``MTRANK_PROVIDERS`` -> onnxruntime execution provider
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _cores() -> int:
    """CPU cores this process may run on (a container's CPU quota is not visible here: set
    MTRANK_WORKERS / MTRANK_ORT_INTRA_OP_THREADS explicitly under one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _userinfo(url: str) -> tuple[SplitResult, str, bool, str, str] | None:
    """The one parse of a URL's user info: (parts, user, has_password, password, host:port); None
    when the URL has no user info or does not parse."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return None
    user, colon, password = userinfo.partition(":")
    return parts, user, bool(colon), password, hostport


def url_secret(url: str) -> str | None:
    """The secret in a URL's user info, as written: the password, or a lone user name
    (``redis://token@host``, where the name is the secret); None when there is none."""
    info = _userinfo(url)
    if info is None:
        return None
    _, user, has_password, password, _ = info
    return (password if has_password else user) or None


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (a lone user name, which may be a token, too)."""
    try:
        urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    info = _userinfo(url)
    if info is None:
        return url
    parts, user, has_password, _, hostport = info
    # redis://user:pw@host keeps the user name; redis://token@host hides it (it is the secret)
    cred = f"{user}:***" if has_password else "***"
    return urlunsplit((parts.scheme, f"{cred}@{hostport}", parts.path, parts.query, parts.fragment))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MTRANK_",
        extra="ignore",
        hide_input_in_errors=True,  # never echo a secret-bearing value in an error
        protected_namespaces=(),
        validate_default=True,
        populate_by_name=True,  # fields with an alias (providers_strict) still take their own name
    )

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False,
                           description="Redis URL (redis://, rediss:// or unix://); may hold a password")
    redis_prefix: str = Field(default="mtrank", min_length=1, description="key prefix of the feature namespace")
    redis_timeout_ms: int = Field(default=100, gt=0, le=60_000,
                                  description="socket connect/read timeout of Redis calls, ms")
    model_store: str = Field(default="model_store", min_length=1, description="root of the bundle store")
    model_name: str = Field(default="demo", min_length=1, description="bundle name under the store")
    model_version: int | None = Field(default=None, ge=1, description="pinned version; None = newest")
    providers: str = Field(default="cpu", description="comma list of execution providers, in preference order")
    providers_strict: bool = Field(default=False,
                                   description="refuse to start instead of falling back to CPU when a requested "
                                               "provider is missing or its session falls back (the GPU image "
                                               "sets it)")
    ort_intra_op_threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0 = default")
    host: str = Field(default="127.0.0.1", description="listen address of mtrank serve and mtrank demo")
    port: int = Field(default=8000, ge=1, le=65535, description="listen port of mtrank serve and mtrank demo")
    fusion: FusionName = Field(default="weighted_product",
                               description="weighted_product: ctr^a * cvr^b * (1 + watch_time)^c; "
                                           "weighted_sum: a*ctr + b*cvr + c*log1p(watch_time)")
    fusion_weights: dict[str, float] = Field(
        default_factory=lambda: {"ctr": 1.0, "cvr": 1.0, "watch_time": 0.2},
        description="task -> weight (JSON in the environment). Unset: derived from each bundle's tasks "
                    "(1.0 per binary task, 0.2 per regression task: the value shown for ctr/cvr/watch_time)")
    max_items: int = Field(default=2000, ge=1, le=100_000, description="most items in one /rank request")
    log_level: LogLevel = Field(default="INFO", description="log level")
    routing_config: str | None = Field(default=None,
                                       description="experiment config (YAML); unset = one variant 'default'")
    version_policy: str = Field(default="latest",
                                description="versions kept loaded per model unless the routing config says: "
                                            "'latest', 'latest N', '3' or '3,4'")
    store_poll_s: float = Field(default=5.0, ge=0, le=86_400,
                                description="seconds between checks of the model store and the routing "
                                            "config file; 0 = only POST /admin/reload")
    admin_token: SecretStr | None = Field(default=None, repr=False,
                                          description="bearer token of the /admin routes; unset = disabled")

    # -- feature store: cluster, deadline, failure mode, circuit breaker, item cache ----------------
    redis_cluster: bool = Field(default=False, description="use redis-py's cluster client (also implied by a "
                                                           "redis+cluster:// or rediss+cluster:// URL)")
    redis_deadline_ms: float = Field(default=15.0, gt=0, le=60_000,
                                     description="budget of one request's feature reads, ms; past it the "
                                                 "request is answered degraded (or 503, see redis_failure_mode)")
    redis_failure_mode: Literal["degrade", "fail"] = Field(
        default="degrade", description="Redis timeout/down: 'degrade' = default features + cached items, "
                                       "'degraded': true; 'fail' = 503")
    redis_pool_size: int = Field(default=8, ge=1, le=1024,
                                 description="warm connections per Redis node (per worker), opened and replaced by a "
                                             "background thread; a /rank never connects: it waits for a free one "
                                             "within its budget")
    breaker_failures: int = Field(default=3, ge=1, description="consecutive Redis failures that open the breaker")
    breaker_probe_s: float = Field(default=0.2, gt=0, le=60,
                                   description="while open, one probe of Redis at most this often, s")
    item_cache_size: int = Field(default=50_000, ge=0, description="items kept in the in-process feature "
                                                                     "cache per bundle; 0 = off")
    item_cache_ttl_s: float = Field(default=60.0, ge=0, description="seconds a cached item value is used")

    # -- overload and input limits ---------------------------------------------------------------
    max_inflight: int = Field(default=0, ge=0, description="/rank executing at once per worker; more wait "
                                                           "in a queue; 0 = 8 x onnxruntime threads")
    max_queued: int = Field(default=0, ge=0, description="/rank waiting for a slot per worker; one more is "
                                                         "answered 429 + Retry-After at once; 0 = 32 x max_inflight")
    shed_queue_ms: float = Field(default=1000.0, gt=0, le=600_000,
                                 description="a /rank that waited this long for a slot is answered 429 + "
                                             "Retry-After before it runs (queue-time shedding), ms")
    max_body_bytes: int = Field(default=1_000_000, ge=1_024, description="largest request body, bytes (413)")
    max_id_length: int = Field(default=128, ge=1, le=4096, description="longest user/item id, characters")
    shutdown_drain_s: float = Field(default=10.0, ge=0, description="SIGTERM: seconds to finish in-flight "
                                                                     "requests before exit")

    # -- processes and observability -------------------------------------------------------------
    workers: int = Field(default=1, ge=1, le=256,
                         description="uvicorn worker processes (mtrank serve); default = one per visible GPU "
                                     "when CUDA is requested and available, else one per usable core, each "
                                     "with cores / workers onnxruntime threads (1 on CPU)")
    log_format: Literal["json", "text"] = Field(default="json", description="log line format")
    predlog_rate: float = Field(default=0.0, ge=0, le=1, description="share of ranked requests appended to "
                                                                      "the prediction-log Redis Stream")
    predlog_stream: str = Field(default="mtrank:predictions", min_length=1, description="prediction-log stream key")
    predlog_maxlen: int = Field(default=1_000_000, ge=1, description="approximate MAXLEN of the stream")
    predlog_max_bytes: int = Field(default=1 << 30, ge=1 << 16,
                                   description="approximate size bound of the prediction-log stream, bytes (the "
                                               "MAXLEN of each XADD is the smaller of predlog_maxlen and this over "
                                               "the mean record size)")
    predlog_queue_bytes: int = Field(default=64 << 20, ge=1 << 16,
                                     description="records waiting for the writer, bytes per worker (more are "
                                                 "dropped and counted)")
    predlog_features_rate: float = Field(default=0.0, ge=0, le=1,
                                         description="share of the logged requests that also carry the packed "
                                                     "feature values exactly as read (base64), for training data "
                                                     "as served")
    predlog_redis_url: str | None = Field(default=None, description="Redis of the prediction log; unset = "
                                                                    "MTRANK_REDIS_URL (may carry a password)")
    pseudonym_key: SecretStr | None = Field(default=None, repr=False, min_length=16,
                                            description="secret key of the user-id pseudonyms (HMAC-SHA256) in the "
                                                        "prediction log and `mtrank ab report`; required when "
                                                        "MTRANK_PREDLOG_RATE > 0")

    # -- outcome events: POST /events and `mtrank events consume` (docs/events.md) ----------------
    events_max_batch: int = Field(default=1000, ge=1, le=100_000, description="most events in one POST /events")
    events_maxlen: int = Field(default=1_000_000, ge=1, description="approximate MAXLEN of the events stream "
                                                                    "(<prefix>:events)")
    events_max_age_s: float = Field(default=86_400.0, gt=0, description="events older than this are trimmed "
                                                                        "from the stream (approximate MINID), s")
    events_group: str = Field(default="mtrank-sequences", min_length=1,
                              description="consumer group of `mtrank events consume`")
    events_batch: int = Field(default=256, ge=1, le=10_000, description="stream entries a consumer reads and "
                                                                        "applies in one step")
    events_claim_idle_ms: int = Field(default=10_000, ge=1, description="an entry pending this long with one "
                                                                        "consumer (it died) is claimed by another, ms")
    events_dedup_ttl_s: int = Field(default=3600, ge=1, description="how long an applied event_id is remembered: "
                                                                    "the same id again within it is not applied, s")

    @model_validator(mode="after")
    def _default_workers(self) -> Settings:
        if "workers" not in self.model_fields_set:
            from service.providers import default_workers, visible_gpus, wants_cuda

            available: list[str] = []
            gpus = 0
            if wants_cuda(self.provider_list):  # onnxruntime is asked only when CUDA is requested
                import onnxruntime as ort

                available, gpus = ort.get_available_providers(), visible_gpus()
            self.workers = default_workers(self.provider_list, available, _cores(), gpus)
        return self

    @field_validator("redis_url", "predlog_redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        scheme = v.split("://", 1)[0].lower() if v and "://" in v else ""
        if v is not None and scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            raise ValueError("must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://")
        return v

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, v: str) -> str:
        names = [p.strip() for p in v.split(",") if p.strip()]
        if not names:
            raise ValueError("needs at least one provider (e.g. 'cpu' or 'cuda,cpu')")
        for p in names:
            if p.lower() not in PROVIDER_ALIASES and not p.endswith("ExecutionProvider"):
                raise ValueError(f"unknown provider {p!r}; use one of {sorted(PROVIDER_ALIASES)} "
                                 "or a full onnxruntime provider name")
        return ",".join(names)

    @field_validator("fusion_weights")
    @classmethod
    def _check_weights(cls, v: dict[str, float]) -> dict[str, float]:
        problems = weight_problems(v)
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        return v

    @field_validator("routing_config", "admin_token", "pseudonym_key", "predlog_redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("version_policy")
    @classmethod
    def _check_policy(cls, v: str) -> str:
        from service.routing import parse_policy  # routing needs no settings: no cycle

        parse_policy(v)
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v):
        return v.upper() if isinstance(v, str) else v

    @property
    def provider_list(self) -> list[str]:
        """Requested providers as onnxruntime names, in preference order."""
        return [PROVIDER_ALIASES.get(p.lower(), p) for p in self.providers.split(",")]

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)

    @property
    def cluster(self) -> bool:
        """Whether the feature store is a Redis Cluster."""
        return self.redis_cluster or self.redis_url.split("://", 1)[0].lower().endswith("+cluster")

    @property
    def ort_threads(self) -> int:
        """onnxruntime intra-op threads per worker: the setting, else cores / workers (at least 1)."""
        if self.ort_intra_op_threads:
            return self.ort_intra_op_threads
        return max(1, _cores() // self.workers)

    @property
    def inflight_limit(self) -> int:
        """/rank executing at once per worker."""
        return self.max_inflight or 8 * self.ort_threads

    @property
    def queue_limit(self) -> int:
        """/rank waiting for a slot per worker before one more is refused at once."""
        return self.max_queued or 32 * self.inflight_limit

    @property
    def explicit_fusion_weights(self) -> dict[str, float] | None:
        """MTRANK_FUSION_WEIGHTS when it was set; None = derive from each bundle's tasks
        (:func:`service.fusion.default_weights`)."""
        return self.fusion_weights if "fusion_weights" in self.model_fields_set else None

    @property
    def redis_timeout_s(self) -> float:
        return self.redis_timeout_ms / 1000.0
