"""Settings: one small frozen dataclass, read from ``NERV_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from nerv_cluster import constants
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.fairshare import parse_weights
from nerv_cluster.sentinel import SentinelURL


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. Each field is read from ``NERV_<FIELD NAME IN CAPITALS>``."""

    #: ``redis://``, ``rediss://``, ``unix://``, or ``sentinel://host:port[,host:port...]/<service>[/<db>]``
    #: for Redis behind Sentinel (``nerv_cluster.sentinel``).
    redis_url: str = constants.DEFAULT_REDIS_URL
    #: The ACL user (``nerv_cluster.acl``: one per role) and its password that this process connects
    #: to Redis as, state and Celery broker alike, when the URL carries none (``nerv_cluster.redisauth``).
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    #: The Sentinels' own password (``requirepass`` of the Sentinels), if they have one.
    redis_sentinel_password: str = field(default="", repr=False)
    #: TLS to the Sentinels and the data nodes of a ``sentinel://`` URL (one server: say ``rediss://``;
    #: with ``redis://`` it is refused, not ignored). The server's certificate is always verified.
    redis_tls: bool = False
    #: The CA bundle (PEM) that TLS verifies the servers' certificates with, for ``sentinel://`` with
    #: ``redis_tls`` and for ``rediss://`` (a ``?ssl_ca_certs=`` in the URL wins); empty: the system's.
    redis_tls_ca_certs: str = ""
    #: Seconds a Redis command may go without a reply before it counts as a connection error (and is
    #: retried, through Sentinel, on the new primary); 0: none on plain URLs, 5 s on ``sentinel://``.
    redis_socket_timeout: float = 0.0
    #: Replicas that must hold a write whose loss would lose work (an accepted submission, a recorded
    #: outcome, a scheduler decision) before it is acknowledged (``WAIT``, ``nerv_cluster.replication``);
    #: 0: none, no cost. A write not replicated in time is a ``ReplicationError`` to its caller.
    redis_min_replicas: int = 0
    redis_replica_timeout_ms: int = constants.DEFAULT_REPLICA_TIMEOUT_MS
    #: Celery broker; defaults to ``redis_url``.
    broker_url: str = ""
    #: Whether this process's broker connection brings back messages a vanished consumer left
    #: unacknowledged (kombu's restore: writes to the queues). Off for Flower, which only watches, so
    #: its Redis user (the flower role, ``nerv_cluster.acl``) writes no queue.
    broker_restore: bool = True
    #: The namespace (``NERV_NAMESPACE``; ``NERV_PREFIX`` is its older name): the prefix of every Redis
    #: key and channel, Celery's included. Two teams on one Redis take two namespaces, each confined to
    #: its own by its ACL users.
    prefix: str = constants.DEFAULT_PREFIX
    max_payload_bytes: int = constants.DEFAULT_MAX_PAYLOAD_BYTES
    max_result_bytes: int = constants.DEFAULT_MAX_RESULT_BYTES
    max_tasks: int = constants.DEFAULT_MAX_TASKS
    #: Most elements a map node expands into (``Workflow.map``); a longer list fails the map.
    max_map_width: int = constants.DEFAULT_MAX_MAP_WIDTH
    #: Largest submission (the WORKFLOW_SUBMITTED event's JSON) and largest job message (with the
    #: upstream results in its arguments), in bytes.
    max_submission_bytes: int = constants.DEFAULT_MAX_SUBMISSION_BYTES
    max_job_bytes: int = constants.DEFAULT_MAX_JOB_BYTES
    lease_ttl_ms: int = constants.DEFAULT_LEASE_TTL_MS
    batch_size: int = constants.DEFAULT_BATCH_SIZE
    block_ms: int = constants.DEFAULT_BLOCK_MS
    retention_seconds: int = constants.DEFAULT_RETENTION_SECONDS
    visibility_timeout: int = constants.DEFAULT_VISIBILITY_TIMEOUT
    #: Modules with ``@task`` functions that workers import.
    worker_modules: tuple[str, ...] = ("nerv_cluster.examples.wordcount",)
    #: Modules the scheduler imports: those registering custom cache key functions (``Cache(key=)``).
    scheduler_modules: tuple[str, ...] = constants.DEFAULT_SCHEDULER_MODULES
    #: Worker processes for ``cpu`` (default: one per core) and threads for ``io`` (default: 8 per core).
    cpu_concurrency: int = 0
    io_concurrency: int = 0
    #: Default time limit (seconds; 0 = none) for tasks of each queue that set no timeout of their own.
    cpu_timeout: float = 0.0
    io_timeout: float = 0.0
    #: Times an attempt may lose its worker (the process died under it) before the task fails:
    #: bounds a poison task that kills every worker that runs it.
    max_redeliveries: int = 3
    #: Messages a worker process reserves ahead; more is faster for short tasks.
    prefetch_multiplier: int = 4
    #: Celery task events, which Flower needs; they cost a publish per task state change.
    task_events: bool = True
    log_level: str = "INFO"
    #: Hand a chain's next job straight to the worker waiting for it instead of through the Celery
    #: queue (``nerv_cluster.handoff``); off, every job is a Celery message of its own.
    handoff: bool = True
    #: Log entries a run gains before the scheduler checkpoints it (0: never); a new leader decodes the
    #: checkpoint and replays only what came after it.
    checkpoint_events: int = constants.DEFAULT_CHECKPOINT_EVENTS
    #: Retries of a Redis command on connection errors (exponential backoff capped at 1 s) before the
    #: error reaches the caller: how long a process rides out a Redis outage.
    redis_retries: int = constants.REDIS_RETRIES
    #: Port of the scheduler's Prometheus ``/metrics`` (0: not served), the address it binds (loopback
    #: unless told: ``0.0.0.0`` in a container that Prometheus scrapes from outside), and a bearer token
    #: it requires (``Authorization: Bearer <token>``; empty: none asked).
    metrics_port: int = 9808
    metrics_host: str = constants.DEFAULT_METRICS_HOST
    metrics_token: str = field(default="", repr=False)
    #: Seconds a scheduler leader's loop may go without completing a step before it lets its lease lapse.
    loop_stall_s: float = constants.DEFAULT_LOOP_STALL_S
    #: How deep child runs may nest (a task returning a Workflow past it fails; 0: no child runs).
    max_child_depth: int = constants.DEFAULT_MAX_CHILD_DEPTH
    #: Largest payload of a signal (``Client.signal``), in bytes of JSON (issue 11, part "waits").
    max_signal_bytes: int = constants.DEFAULT_MAX_SIGNAL_BYTES
    #: Export runs as OpenTelemetry traces from the scheduler (also on when ``OTEL_EXPORTER_OTLP_ENDPOINT``
    #: is set; see scheduler/tracing.py).
    otel: bool = False
    #: The web console's credentials (``nerv ui``, issue 12): a bearer token, or a user and password
    #: for basic auth; without either it serves only a loopback address. Kept out of the repr.
    ui_token: str = field(default="", repr=False)
    #: The key the scheduler signs every job and hand-off with and workers verify them by (HMAC-SHA256,
    #: see README.md#security). Unset: a per-cluster random key kept in Redis, with a warning (dev and
    #: demo only: anyone who can read Redis can then sign jobs). Kept out of the repr.
    signing_key: str = field(default="", repr=False)
    ui_user: str = ""
    ui_password: str = field(default="", repr=False)
    #: Seconds one Server-Sent Events stream of the console lasts before the server ends it and the
    #: browser resumes it with Last-Event-ID (0: as long as the browser stays; set it behind a proxy
    #: that cuts long requests).
    ui_stream_seconds: float = 0.0
    #: Fair share (issue 11, part 3; ``nerv_cluster.fairshare``): jobs per worker slot a queue may hold
    #: unstarted before the rest wait in the scheduler for their run's turn (0: no metering, first come
    #: first served); and the tenants' weights, ``TENANT=WEIGHT`` entries (a tenant not named weighs 1).
    fair_jobs_per_slot: int = constants.DEFAULT_FAIR_JOBS_PER_SLOT
    tenant_weights: tuple[str, ...] = ()
    #: Seconds a client waits for the scheduler's answer to a request (submit, cancel, rerun, signal,
    #: limits, schedules, cache clear) before it raises ``IntakeTimeoutError`` (issue 13).
    intake_timeout: float = constants.DEFAULT_INTAKE_TIMEOUT_S

    @property
    def namespace(self) -> str:
        """The namespace (the key prefix) in force."""
        return self.prefix

    @property
    def broker(self) -> str:
        """The Celery broker URL in force."""
        return self.broker_url or self.redis_url

    def weights(self) -> dict[str, float]:
        """The tenants' weights (``tenant_weights`` parsed); ConfigurationError for a malformed entry."""
        return parse_weights(self.tenant_weights)

    def keys(self) -> constants.Keys:
        """The key names for this prefix."""
        return constants.Keys(self.prefix)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``NERV_*`` variables; ``overrides`` win over the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        namespace, prefix = env.get("NERV_NAMESPACE") or "", env.get("NERV_PREFIX") or ""
        if namespace and prefix and namespace != prefix:
            raise ConfigurationError(
                f"NERV_NAMESPACE={namespace!r} and NERV_PREFIX={prefix!r} disagree (NERV_PREFIX is "
                "NERV_NAMESPACE's older name: set one)"
            )
        if namespace:
            values["prefix"] = namespace
        for f in fields(cls):
            raw = env.get(f"NERV_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            default = f.default
            try:
                if isinstance(default, bool):
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                elif isinstance(default, tuple):
                    values[f.name] = _split(raw)
                else:
                    values[f.name] = raw
            except ValueError:
                raise ConfigurationError(
                    f"NERV_{f.name.upper()}={raw!r} is not a valid {type(default).__name__}"
                ) from None
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dsn(cls, redis_url: str, **overrides: Any) -> Settings:
        """Settings from the environment, with this Redis URL."""
        return cls.from_env(redis_url=redis_url, **overrides)

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ConfigurationError(
                f"redis_url must be a redis://, rediss://, unix:// or sentinel:// URL, got {self.redis_url!r}"
            )
        if self.redis_url.startswith("sentinel://"):
            SentinelURL.parse(self.redis_url)
        if self.redis_tls and self.redis_url.startswith(("redis://", "unix://")):
            # Asked for TLS, given a plain URL: speaking in clear would be a silent downgrade.
            raise ConfigurationError(
                "redis_tls (NERV_REDIS_TLS) applies to sentinel:// URLs; for one server over TLS say rediss://"
            )
        if self.redis_min_replicas < 0 or self.redis_replica_timeout_ms <= 0 or self.redis_socket_timeout < 0:
            raise ConfigurationError(
                "redis_min_replicas must be 0 or more, redis_replica_timeout_ms positive, "
                "redis_socket_timeout 0 or more"
            )
        for name in (
            "max_payload_bytes",
            "max_result_bytes",
            "max_submission_bytes",
            "max_job_bytes",
            "lease_ttl_ms",
            "batch_size",
            "max_tasks",
            "max_map_width",
            "loop_stall_s",
            "max_signal_bytes",
            "intake_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.fair_jobs_per_slot < 0:
            raise ConfigurationError("fair_jobs_per_slot must be 0 or more")
        self.weights()  # a malformed entry fails at start, not at the first competing run
        if self.max_child_depth < 0:
            raise ConfigurationError("max_child_depth must be 0 or more")
