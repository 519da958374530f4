"""Every name, default and limit of nerv-cluster in one place.

Redis keys of one run share the hash tag ``{run_id}`` so a run's keys land in one Redis Cluster slot.
"""

from __future__ import annotations

from typing import Final

#: Default Redis URL when ``NERV_REDIS_URL`` is not set.
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
#: Default namespace: the prefix of every Redis key and channel (``NERV_NAMESPACE``, alias
#: ``NERV_PREFIX``); teams sharing one Redis each take their own, confined to it by their ACL users
#: (``nerv_cluster.acl``).
DEFAULT_PREFIX: Final = "nerv"
#: What follows the namespace in the names of Celery's (kombu's) own keys and channels: its queues,
#: bindings, unacked hashes, pidbox and event channels (kombu's ``global_keyprefix``).
CELERY_KEY_INFIX: Final = ":celery:"
#: kombu's ``fanout_prefix``: what its pub/sub channels start with after the namespace's Celery prefix
#: (kombu strips up to the first "." of a channel starting with "/": the "." is needed).
CELERY_FANOUT_PREFIX: Final = "/fanout."

#: The address the scheduler's ``/metrics`` binds unless ``NERV_METRICS_HOST`` says otherwise: loopback,
#: so only what runs beside it (or a port-forward) can scrape it.
DEFAULT_METRICS_HOST: Final = "127.0.0.1"

#: The worker queues a task can ask for.
QUEUES: Final = ("cpu", "io")
DEFAULT_QUEUE: Final = "cpu"

#: Largest JSON payload (args + kwargs of one task) accepted at submit.
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024
#: Largest JSON result a task may return.
DEFAULT_MAX_RESULT_BYTES: Final = 1024 * 1024
#: Largest number of tasks in one workflow.
DEFAULT_MAX_TASKS: Final = 200_000
#: Most elements one map node may expand into (``NERV_MAX_MAP_WIDTH``); a longer list fails the map.
DEFAULT_MAX_MAP_WIDTH: Final = 100_000
#: Largest WORKFLOW_SUBMITTED event (its JSON, the whole definition) accepted: the client refuses a
#: bigger one, the scheduler fails a bigger one written into the log by other means.
DEFAULT_MAX_SUBMISSION_BYTES: Final = 64 * 1024 * 1024
#: Largest job (its JSON, with the upstream results copied into its arguments) the scheduler sends:
#: a bigger one fails its task with PayloadTooLargeError instead of going to the broker.
DEFAULT_MAX_JOB_BYTES: Final = 32 * 1024 * 1024
#: Longest exception message and traceback a TaskError keeps (longer ones are cut, with a marker).
MAX_ERROR_MESSAGE_CHARS: Final = 4_096
MAX_TRACEBACK_CHARS: Final = 16_384

#: Run ids and task ids: ASCII letters, digits, '_', '-' and '.', a letter or digit first, at most
#: ``MAX_ID_LENGTH`` characters. They go into Redis keys (inside the ``{run}`` hash tag), job ids
#: (``run:task:attempt``, split on ':') and log lines, so none of ':', '{', '}', whitespace or
#: control characters may appear in them.
MAX_ID_LENGTH: Final = 128
ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"

#: The scheduler lease: how long it lives and how often the holder renews it.
DEFAULT_LEASE_TTL_MS: Final = 5_000
LEASE_RENEW_FRACTION: Final = 3  # renew every ttl/3 so two missed renewals still keep it
#: Random bytes in each fencing token (beside the epoch counter), so a counter Redis rolled back after
#: losing writes never hands out a token twice.
LEASE_NONCE_BYTES: Final = 8
#: Events read from the feed per round trip.
DEFAULT_BATCH_SIZE: Final = 2_000
#: How long a scheduler read blocks waiting for new events.
DEFAULT_BLOCK_MS: Final = 200
#: How long a finished run's log and keys stay in Redis.
DEFAULT_RETENTION_SECONDS: Final = 7 * 24 * 3600
#: Celery's Redis visibility timeout: an unacked message is redelivered after it.
DEFAULT_VISIBILITY_TIMEOUT: Final = 3600
#: Worker liveness: a heartbeat key refreshed every interval, expiring after the TTL.
WORKER_HEARTBEAT_INTERVAL_S: Final = 1.0
WORKER_HEARTBEAT_TTL_MS: Final = 4_000
#: The scheduler's watchdog: how often it looks for lost workers and overdue tasks, how long a
#: worker's heartbeat must stay missing before its tasks are re-dispatched, and how long past its time
#: limit a task may run before the scheduler fails it (after the worker's own soft and hard limits).
WATCHDOG_INTERVAL_S: Final = 0.5
#: The scheduler's gauges (ready, running, ready soon) are refreshed each sweep, but never sooner than
#: this many times their last refresh's cost after it (they walk every ready and active task).
GAUGES_COST_FACTOR: Final = 20.0
LOST_WORKER_GRACE_S: Final = 1.5
#: How long a live worker's heartbeat may leave out a RUNNING attempt it was said to hold before the
#: watchdog re-dispatches it: a few heartbeat intervals, so a beat written just before the claim (or
#: before a handed job arrived) never counts.
UNHELD_GRACE_S: Final = 4 * WORKER_HEARTBEAT_INTERVAL_S
TIMEOUT_GRACE_S: Final = 3.0
#: How often the scheduler reads Redis's clock (``TIME``), on which it measures every deadline; between
#: readings it advances the last one with its monotonic clock.
CLOCK_SAMPLE_S: Final = 5.0
#: Retries (exponential backoff capped at 1 s) of a Redis command on connection errors: ~30 s.
REDIS_RETRIES: Final = 40
#: How long the reply of a fenced scheduler write is kept (``fenced_append.lua``): longer than the
#: client's retries of a command (``REDIS_RETRIES``), which may resend a call whose reply was lost.
FENCED_REPLY_TTL_MS: Final = 120_000
#: Events kept in a client EventBus history, and the most bytes (of their JSON) it keeps.
DEFAULT_HISTORY_LIMIT: Final = 1_000
DEFAULT_HISTORY_BYTES: Final = 8 * 1024 * 1024
#: A scheduler leader whose loop completed no step for this long stops renewing its lease, so a
#: standby takes over (``NERV_LOOP_STALL_S``), and then stays out of the race for the lease this many
#: lease lifetimes, so the standby wins it.
DEFAULT_LOOP_STALL_S: Final = 30.0
STALLED_HOLD_OFF_TTLS: Final = 2

#: The launcher (``nerv_cluster.launcher``): what a worker logs once it has registered its tasks
#: (``worker/app.py`` ``on_ready``), how long services get to come up, how long they get to stop after
#: SIGTERM before SIGKILL, and how long the kernel gets to take a SIGKILLed process group away.
WORKER_READY_LINE: Final = "ready with"
LAUNCH_START_TIMEOUT_S: Final = 90.0
LAUNCH_STOP_TIMEOUT_S: Final = 10.0
LAUNCH_REAP_TIMEOUT_S: Final = 10.0

#: ``nerv dev`` (nerv_cluster/dev.py): how often it looks at the app's files' modification times, how
#: long a file must stay unchanged before the services reload (an editor saving in several writes
#: reloads once), and how long a reloading service gets after SIGTERM before SIGKILL.
DEV_POLL_S: Final = 0.3
DEV_SETTLE_S: Final = 0.2
DEV_RELOAD_STOP_TIMEOUT_S: Final = 3.0
#: What ``nerv dev`` prints once its services are up again after a reload (tests wait for it).
DEV_RELOADED_LINE: Final = "reloaded"

#: OpenTelemetry traces (scheduler/tracing.py): the standard variables whose setting turns tracing on
#: (besides ``NERV_OTEL=1``), and the ``service.name`` of the spans unless ``OTEL_SERVICE_NAME`` says.
OTEL_ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
OTEL_SERVICE_NAME: Final = "nerv-scheduler"

#: Child runs (nerv_cluster/children.py): how deep runs may nest (``NERV_MAX_CHILD_DEPTH``), the hex
#: digits of the hash in a child's run id, and the ``fn`` of a static sub-workflow's task (``Workflow.add
#: (other_workflow)``), which no ``@task`` can be registered under (names start with a letter or '_').
DEFAULT_MAX_CHILD_DEPTH: Final = 64
CHILD_ID_HEX: Final = 12
SUBWORKFLOW_FN: Final = "<workflow>"

#: Durable waits (issue 11, part "waits"; nerv_cluster/waits.py): the ``fn`` of a wait node
#: (``wait_for``, ``sleep``, ``sleep_until``), which no ``@task`` can be registered under and no worker
#: runs, and the largest signal payload (``NERV_MAX_SIGNAL_BYTES``, bytes of JSON).
WAIT_FN: Final = "<wait>"
DEFAULT_MAX_SIGNAL_BYTES: Final = 64 * 1024

#: The marker that stands for an upstream task's result inside args/kwargs on the wire.
REF_KEY: Final = "__nerv_ref__"

#: Stream entry field that holds the JSON event.
EVENT_FIELD: Final = "e"
#: The stream field of a worker's feed entry that carries its attempt's claim token (never in a run log).
TOKEN_FIELD: Final = "t"
#: The event data key by which a worker's event carries its token to ``EventLog`` (which moves it to
#: ``TOKEN_FIELD``: the logged event never holds it).
TOKEN_KEY: Final = "tok"
#: The event data key by which a worker's outcome carries its claim's nonce to ``EventLog``, which appends
#: it to the token in ``TOKEN_FIELD`` (``<token>.<nonce>``): the logged event never holds it.
NONCE_KEY: Final = "nonce"
#: The data key of a TASK_STARTED that names its claim: the hash of the nonce only the process that
#: claimed the attempt knows (``nerv_cluster.outcomes``); logged, folded into ``TaskState.claim``.
CLAIM_KEY: Final = "claim"
#: The data key of a waiting worker's TASK_COMPLETED naming the claim of the job it waits for (the
#: scheduler's hand-off TASK_STARTED records it: the nonce never leaves the worker process).
HANDOFF_CLAIM_KEY: Final = "handoff_claim"
#: Between the token and the nonce in a feed entry's token field (both are hex: it is in neither).
CREDENTIAL_SEP: Final = "."
#: Worker nodes announce their queues and concurrency this often; older announcements are ignored.
CAPACITY_INTERVAL_S: Final = 5.0
CAPACITY_STALE_S: Final = 20.0
#: A registered task name no live worker has refreshed for this long is dropped from the registry
#: (workers refresh theirs with every capacity announcement).
REGISTRY_STALE_S: Final = 60.0
#: Most jobs the scheduler packs into one Celery message, and how many messages per worker slot it
#: aims for at least (so packing never starves a slot).
MAX_BATCH: Final = 32
BATCHES_PER_SLOT: Final = 4
#: Longest the scheduler holds ready jobs back to pack them, and only behind a deep backlog (a full round
#: of messages per worker slot waiting, see ``scheduler.dispatch.Outbox``).
PACK_HOLD_S: Final = 0.02
#: Direct hand-off, for latency along chains. A worker process that has just finished a job whose
#: success makes a dependent on the same queue ready waits this long on its own hand-off list, and the
#: scheduler passes it that dependent there: the hop skips Celery's delivery (several ms a message:
#: the consumer, the prefetch bookkeeping, the pool's pipe), which is most of a chain's time per hop.
HANDOFF_WAIT_S: Final = 0.02
#: A worker's hand-off list and waiting flag expire this long after their last write, so a worker
#: that died leaves nothing behind (a live one deletes its flag when it stops waiting).
HANDOFF_TTL_MS: Final = 10_000
#: The scheduler checkpoints a run once its log has grown past its last checkpoint by this many
#: events and by as many events as the run has tasks (so encoding costs O(1) per event), and looks for
#: such runs this often.
DEFAULT_CHECKPOINT_EVENTS: Final = 20_000
CHECKPOINT_INTERVAL_S: Final = 5.0
#: Circuit transitions kept in the circuits stream (only the latest per function matters).
CIRCUITS_MAXLEN: Final = 10_000
#: Modules the scheduler imports by default (none: only custom cache key functions need any).
DEFAULT_SCHEDULER_MODULES: Final[tuple[str, ...]] = ()
#: Cache entries the scheduler stores or reads per script call, and keys deleted per round trip by
#: ``nerv cache clear`` (bounds how long one call holds Redis).
CACHE_CHUNK: Final = 5_000
#: Cache hits per CACHE_HITS event, and about how many bytes of results one carries (a hit bigger than
#: that goes alone): one event per run and step for a fan-out of hits, each a bounded log entry.
CACHE_HITS_PER_EVENT: Final = 5_000
CACHE_HITS_EVENT_BYTES: Final = 1024 * 1024
#: Limits (issue 11, part "limits"): the longest concurrency key or rate limit name (a resolved key
#: past it keeps its start and a digest), the LIMIT_SET events kept in the limits stream (each key's
#: latest matters; set_limit is an operator's command, rare), and the run id those events carry (they
#: belong to no run: the fold of runs ignores them).
MAX_LIMIT_KEY_CHARS: Final = 200
LIMITS_MAXLEN: Final = 100_000
LIMITS_RUN_ID: Final = "_limits"
#: Fair share and run priority (issue 11, part 3; nerv_cluster/fairshare.py). Jobs per worker slot a
#: queue may hold that no worker has started yet (``NERV_FAIR_JOBS_PER_SLOT``; 0: no metering, first
#: come first served): a full round of full messages, so packing stays at its widest and no slot runs
#: dry between two refills. The most jobs one run takes per turn (one full message). The weight a run's
#: priority gives it among its tenant's runs, indexed by ``TaskPriority`` (LOW, MEDIUM, HIGH, CRITICAL).
#: The longest tenant name.
DEFAULT_FAIR_JOBS_PER_SLOT: Final = BATCHES_PER_SLOT * MAX_BATCH
FAIR_QUANTUM: Final = MAX_BATCH
#: A metered queue is refilled (to a full round) once what it holds unstarted is down to this part of
#: its round.
FAIR_REFILL_AT: Final = 0.5
RUN_PRIORITY_WEIGHTS: Final[tuple[float, ...]] = (1.0, 4.0, 16.0, 64.0)
MAX_TENANT_CHARS: Final = 200
# idem (issue 11, parts 4 and 5): idempotent submission and schedules.
#: Longest idempotency key accepted (the run id keeps its start and a digest of all of it).
MAX_IDEMPOTENCY_KEY_CHARS: Final = 200
#: Shortest interval of an ``every=`` schedule, in seconds.
MIN_SCHEDULE_INTERVAL_S: Final = 0.1
#: Most missed slots one schedule fires at once with ``catchup=True`` (the latest ones).
SCHEDULE_MAX_CATCHUP: Final = 100
#: Most slots one SCHEDULE_SKIPPED counts (a cron schedule's missed slots are counted one by one).
SCHEDULE_MAX_SKIP_COUNT: Final = 100_000
#: The schedules stream is compacted into one snapshot once it holds this many entries per schedule
#: (plus a few): it stays bounded however often schedules fire.
SCHEDULES_COMPACT_PER_SCHEDULE: Final = 8
#: Longest schedule name (it goes into run ids: ``<name>.<slot>``).
MAX_SCHEDULE_NAME_CHARS: Final = 64
#: The intake (issue 13; nerv_cluster/requests.py, scheduler/intake.py): how long a client waits for the
#: scheduler's answer by default (``NERV_INTAKE_TIMEOUT``), how long one blocking pop of it lasts (it
#: must stay under the socket timeout of a sentinel:// client), how long an answer waits for its client,
#: how long the scheduler remembers an applied request (to answer a second copy of it without applying
#: it again: copies of one request sit side by side in the intake, so minutes are plenty), and the bytes
#: a request's own fields may take beyond the payload they carry (a signal's, a schedule's kwargs).
DEFAULT_INTAKE_TIMEOUT_S: Final = 30.0
INTAKE_WAIT_CHUNK_S: Final = 1.0
INTAKE_REPLY_TTL_MS: Final = 60_000
INTAKE_DONE_TTL_MS: Final = 600_000
INTAKE_REQUEST_OVERHEAD_BYTES: Final = 64 * 1024
#: Stream entry fields of an intake request: its id, the request (JSON), and a submission's workflow
#: definition (JSON, kept apart so the scheduler writes it into the run log without encoding it again).
INTAKE_ID_FIELD: Final = "i"
INTAKE_REQUEST_FIELD: Final = "q"
INTAKE_WORKFLOW_FIELD: Final = "w"
#: How often the leader drops registry names no live worker refreshed (clients only read the registry).
REGISTRY_PRUNE_S: Final = 30.0
#: Cap on the scheduler feed stream, a safety net when no scheduler trims it (the run logs stay whole).
FEED_MAXLEN: Final = 1_000_000

# The console (issue 12; nerv_cluster/console/): where ``nerv ui`` listens by default, the variables
# holding its credentials (a bearer token, or a user and a password for basic auth: without either it
# serves only a loopback address), its cookies, and how long one Server-Sent Events stream lasts before
# the server ends it and the browser resumes it with Last-Event-ID (0: until the client goes away).
UI_DEFAULT_HOST: Final = "127.0.0.1"
UI_DEFAULT_PORT: Final = 8765
UI_TOKEN_ENV: Final = "NERV_UI_TOKEN"
UI_USER_ENV: Final = "NERV_UI_USER"
UI_PASSWORD_ENV: Final = "NERV_UI_PASSWORD"
UI_STREAM_SECONDS_ENV: Final = "NERV_UI_STREAM_SECONDS"
UI_TOKEN_COOKIE: Final = "nerv_ui_token"
UI_CSRF_COOKIE: Final = "nerv_ui_csrf"
UI_CSRF_HEADER: Final = "x-csrf-token"
#: Runs the console keeps folded in memory (the most recently viewed), each brought up to date from
#: its log on every view; and the newest runs its runs list looks at.
UI_RUN_CACHE: Final = 32
UI_RUNS_LIMIT: Final = 200
#: Runs list lines kept (small: a summary each), each with the log entry it was folded up to.
UI_SUMMARY_CACHE: Final = 10_000
#: Milliseconds a Server-Sent Events stream waits on the log per read, and the retry it tells browsers.
UI_STREAM_BLOCK_MS: Final = 500
UI_STREAM_RETRY_MS: Final = 500
#: Threads the console's handlers and open event streams share (each stream holds one while it waits).
UI_THREADS: Final = 200
#: What ``nerv ui`` logs once it listens (uvicorn's line).
UI_READY_LINE: Final = "Uvicorn running on"


#: The claim secret's key is the namespace followed by this (outside every ``<namespace>:*`` pattern, so
#: only the scheduler's ACL user, which names it, can read it).
CLAIM_SECRET_SUFFIX: Final = "!claim-secret"


class Keys:
    """Every Redis key and channel name, built from one prefix.

    Per-run keys carry the hash tag ``{run_id}``; the feed, the lease and the registries are global.
    """

    __slots__ = (
        "active",
        "capacity",
        "celery",
        "circuits",
        "claim_secret",
        "epoch",
        "feed",
        "intake",
        "lease",
        "limits",
        "prefix",
        "registry",
        "registry_seen",
        "replication_probe",
        "runs",
        "schedules",
        "signing_key",
        "transcribed",
        "workers",
    )

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.feed = f"{prefix}:feed"  # events the scheduler must react to (from clients and workers)
        self.active = f"{prefix}:runs:active"  # ids of runs not finished yet
        self.runs = f"{prefix}:runs"  # every run id, scored by submit time
        self.lease = f"{prefix}:scheduler:lease"  # holder's token; expires unless renewed
        self.epoch = f"{prefix}:scheduler:epoch"  # counter: the first part of each new holder's token
        self.registry = f"{prefix}:registry"  # task name -> queue, as registered by workers
        self.registry_seen = f"{prefix}:registry:seen"  # task name -> Redis time of its last refresh
        self.workers = f"{prefix}:workers"  # worker id -> JSON description
        self.circuits = f"{prefix}:circuits"  # CIRCUIT_* events of every task function
        self.capacity = f"{prefix}:capacity"  # worker node -> JSON {queues, concurrency, at}
        self.limits = f"{prefix}:limits"  # LIMIT_SET events (client.set_limit), refolded by a leader
        self.schedules = f"{prefix}:schedules"  # SCHEDULE_* events (idem, issue 11): the schedules' log
        # README.md#security: the feed entry up to which the leader transcribed workers' events (set in
        # its fenced write), the secret attempt tokens are minted with (scheduler only), and the
        # job-signing key of a cluster without NERV_SIGNING_KEY (dev and demo).
        self.transcribed = f"{prefix}:scheduler:transcribed"
        # Not under "<prefix>:": the ACL users of workers and clients read every key there
        # (deploy/redis, README.md#security), and a worker holding this secret could mint any attempt's token.
        self.claim_secret = f"{prefix}{CLAIM_SECRET_SUFFIX}"
        self.signing_key = f"{prefix}:signing-key"
        self.intake = f"{prefix}:intake"  # clients' requests, which only the scheduler applies (issue 13)
        #: kombu's ``global_keyprefix``: Celery's queues, bindings and channels live under it.
        self.celery = f"{prefix}{CELERY_KEY_INFIX}"
        #: The channel a replicated write publishes to (nobody listens), see ``nerv_cluster.replication``.
        self.replication_probe = f"{prefix}:replication-probe"

    def queue(self, name: str) -> str:
        """The Redis list of Celery queue ``name`` (``cpu``, ``io``) as kombu names it in this namespace."""
        return f"{self.celery}{name}"

    def log(self, run_id: str) -> str:
        """The run's event log stream: the source of truth for the run."""
        return f"{self.prefix}:{{{run_id}}}:log"

    def outcomes(self, run_id: str) -> str:
        """Hash ``task:attempt`` -> outcome: makes each attempt's outcome recorded once."""
        return f"{self.prefix}:{{{run_id}}}:outcomes"

    def claims(self, run_id: str) -> str:
        """Hash ``task:attempt`` -> worker id that runs it."""
        return f"{self.prefix}:{{{run_id}}}:claims"

    def channel(self, run_id: str) -> str:
        """The run's pub/sub channel (a hint for live listeners, never state)."""
        return f"{self.prefix}:{{{run_id}}}:bus"

    @property
    def channel_pattern(self) -> str:
        """Pattern matching every run's channel."""
        return f"{self.prefix}:*:bus"

    def handoff(self, worker_id: str) -> str:
        """A worker process's hand-off list: the scheduler pushes a job there for it to run next."""
        return f"{self.prefix}:handoff:{worker_id}"

    def reply(self, request_id: str) -> str:
        """The stored reply of one fenced scheduler write, so a resent call is not applied twice."""
        return f"{self.prefix}:scheduler:reply:{request_id}"

    def intake_reply(self, request_id: str) -> str:
        """The list the scheduler pushes its answer to one client request onto (the client BLPOPs it)."""
        return f"{self.prefix}:intake:reply:{request_id}"

    def intake_done(self, request_id: str) -> str:
        """The answer to a request the scheduler applied, kept a while: a second copy of the request
        (a resent XADD) is answered from it instead of being applied again."""
        return f"{self.prefix}:intake:done:{request_id}"

    def handoff_waiting(self, worker_id: str) -> str:
        """Set while a worker process waits for a hand-off; the scheduler consumes it to hand one job."""
        return f"{self.prefix}:handoff:{worker_id}:waiting"

    def heartbeat(self, worker_id: str) -> str:
        """A worker process's liveness key; it expires when the process stops renewing it."""
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def heartbeat_prefix(self) -> str:
        """What :meth:`heartbeat` puts before the worker id."""
        return f"{self.prefix}:worker:"

    def checkpoint(self, run_id: str) -> str:
        """The run's latest checkpoint: its folded state and the log position it covers (a cache)."""
        return f"{self.prefix}:{{{run_id}}}:checkpoint"

    def reruns(self, run_id: str) -> str:
        """How many times the run was rerun (``rerun.lua`` counts, ``close.lua`` compares)."""
        return f"{self.prefix}:{{{run_id}}}:reruns"

    def run_keys(self, run_id: str) -> tuple[str, str, str, str, str]:
        """The keys a run owns, for expiry when it is over (``close.lua`` takes them in this order)."""
        return (
            self.log(run_id),
            self.outcomes(run_id),
            self.claims(run_id),
            self.checkpoint(run_id),
            self.reruns(run_id),
        )

    def cache_entry(self, fn: str, digest: str) -> str:
        """A cache entry: a result of task function ``fn`` for the key ``digest`` (64 hex digits), with
        its TTL (see :mod:`nerv_cluster.caching`)."""
        return f"{self.prefix}:cache:{fn}:{digest}"

    def cache_pattern(self, fn: str | None = None) -> str:
        """A SCAN pattern matching every cache entry, or those of task function ``fn``."""

        def glob_escaped(text: str) -> str:
            return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)

        start = f"{glob_escaped(self.prefix)}:cache:"
        return f"{start}*" if fn is None else f"{start}{glob_escaped(fn)}:*"


#: High availability (issue 17; nerv_cluster/sentinel.py, nerv_cluster/replication.py). A client of
#: Redis behind Sentinel gives up on a command after this many seconds without a reply (unless
#: ``NERV_REDIS_SOCKET_TIMEOUT`` says otherwise), so a paused primary never holds a process forever;
#: it must outlast our longest blocking read (``client.follow``: 1 s).
SENTINEL_SOCKET_TIMEOUT_S: Final = 5.0
#: The writes that must reach replicas (``NERV_REDIS_MIN_REPLICAS``, default none) wait this long for
#: them (``NERV_REDIS_REPLICA_TIMEOUT_MS``), and are tried this many times, reconnecting through
#: Sentinel in between, before the caller gets a ``ReplicationError``.
DEFAULT_REPLICA_TIMEOUT_MS: Final = 1_000
REPLICATION_TRIES: Final = 3
#: The channel a retried replicated write publishes to (nobody listens), so its ``WAIT`` covers the
#: primary's whole replication stream so far (the first try's write included).
REPLICATION_PROBE_CHANNEL: Final = "nerv:replication-probe"
