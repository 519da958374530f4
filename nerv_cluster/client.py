"""The client: submit workflows, wait for them, read their status and events, cancel them, subscribe."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import redis
from pyrsistent import pmap
from redis.backoff import ExponentialWithJitterBackoff

from nerv_cluster import caching, constants, history, idempotency, limits, redisauth, sentinel, tls, waits
from nerv_cluster import rerun as reruns
from nerv_cluster import state as st
from nerv_cluster.bus import EventBus, Handler, RedisBridge
from nerv_cluster.caching import REFRESH_META
from nerv_cluster.errors import (
    IdempotencyKeyError,
    IntakeTimeoutError,
    PayloadTooLargeError,
    RunNotFoundError,
    ScheduleError,
    ScheduleNotFoundError,
    StoreFullError,
    UnknownTaskError,
    WaitTimeoutError,
)
from nerv_cluster.eventlog import EventLog, is_full
from nerv_cluster.fairshare import run_meta
from nerv_cluster.ids import check_id
from nerv_cluster.jsonform import compact
from nerv_cluster.model import WORKFLOW_END_EVENTS, Event, EventType, RunStatus, TaskPriority, new_run_id
from nerv_cluster.registry import TaskFunction
from nerv_cluster.replication import Replication
from nerv_cluster.requests import Request, read_answer
from nerv_cluster.schedules import Schedule, ScheduleSpec, check_spec
from nerv_cluster.schedulestore import ScheduleStore
from nerv_cluster.settings import Settings
from nerv_cluster.workflow import Workflow, check_definition, nested_tasks

#: How long one blocking read of a run's log waits before the loop checks its deadline again.
_FOLLOW_BLOCK_MS = 1_000
#: Events folded at once when a run's log is read from the start.
_FOLD_CHUNK = 10_000


def connect(settings: Settings, retries: int | None = None) -> redis.Redis:
    """A Redis client for nerv's own keys: decoded responses, health checks, and retries with backoff
    on connection errors, so every process rides out a Redis restart (``retries``, default
    ``settings.redis_retries``: about half a minute).

    Every write nerv retries is idempotent (scripts check before they write), so a retried command
    whose first try did run changes nothing.

    A ``sentinel://`` URL gives a client of the primary the Sentinels name (``nerv_cluster.sentinel``):
    each new connection asks them where it is, so a retried command after a failover reaches the new one.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        # Bytes that are no UTF-8 (anyone who reaches Redis can write them into a stream or a list)
        # would fail the whole reply that holds them (an XREAD of the feed: every time, for every
        # reader); replaced, they make one entry that is no valid event or job, refused on its own.
        # nerv's own writes are ASCII JSON, which this never changes.
        "encoding_errors": "replace",
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "retry": tls.CertificateAwareRetry(
            ExponentialWithJitterBackoff(base=0.05, cap=1.0),
            settings.redis_retries if retries is None else retries,
        ),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    if sentinel.is_sentinel(settings.redis_url):
        options["socket_timeout"] = settings.redis_socket_timeout or constants.SENTINEL_SOCKET_TIMEOUT_S
        return sentinel.master_client(settings, **options)
    if settings.redis_socket_timeout:
        options["socket_timeout"] = settings.redis_socket_timeout
    # rediss://: the CA bundle of NERV_REDIS_TLS_CA_CERTS (a ?ssl_ca_certs= in the URL wins).
    options.update(tls.client_options(settings, settings.redis_url))
    # The process's ACL user (NERV_REDIS_USERNAME / NERV_REDIS_PASSWORD) when the URL names none.
    url = redisauth.with_credentials(settings.redis_url, settings)
    if url.startswith("unix://") and not redisauth.url_has_credentials(url):
        given = (("username", settings.redis_username), ("password", settings.redis_password))
        options.update({k: v for k, v in given if v})
    return redis.Redis.from_url(url, **options)


class Client:
    """Talks to a nerv cluster through Redis. Thread-safe; cheap to keep for the life of a process.

    ``Client()`` reads ``NERV_REDIS_URL``; ``Client("redis://host:6379/0")`` names the Redis.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        redis_client: redis.Redis | None = None,
        bus: EventBus | None = None,
    ) -> None:
        settings = settings or Settings.from_env()
        if url:
            settings = settings.with_(redis_url=url)
        self.settings = settings
        self.redis = redis_client or connect(settings)
        self.keys = settings.keys()
        self.log = EventLog(self.redis, self.keys, Replication.of(settings))
        self.bus = bus or EventBus()
        self._bridge = RedisBridge(self.redis, self.keys, self.bus)

    # -- submit ---------------------------------------------------------------------------------------

    def registered_tasks(self) -> dict[str, str]:
        """Task name -> queue for every task some live worker has registered (refreshed lately)."""
        return self.log.registered_tasks(prune=False)  # a client only reads; the leader prunes

    def submit(
        self,
        workflow: Workflow,
        *,
        run_id: str | None = None,
        check_names: bool = True,
        refresh_cache: bool = False,
        idempotency_key: str | None = None,
        priority: TaskPriority | str | int | None = None,
        tenant: str | None = None,
    ) -> str:
        """Validate and submit a workflow; returns the run id at once.

        ``priority`` (``"low"``, ``"medium"``, the default, ``"high"``, ``"critical"``) and ``tenant``:
        when runs compete for workers, their ready tasks take turns (see :mod:`nerv_cluster.fairshare`):
        tenants share by their weights (``NERV_TENANT_WEIGHTS``), and a tenant's runs by their priority
        (a high run gets four times a medium one's turns). Child runs share their root run's turns.

        ``idempotency_key``: the same key gives the same run. The run id derives from the key, and while
        that run is retained (until its retention time after it ended) submitting under the key again
        returns its id and writes nothing, whatever the workflow; two clients submitting one key at once
        get one run (see :mod:`nerv_cluster.idempotency`). Not together with ``run_id``.

        ``refresh_cache``: the run's cached tasks (``cache=Cache(...)``) skip the cache and compute,
        and their results replace the stored entries.

        Raises a :class:`~nerv_cluster.errors.WorkflowError` (and writes nothing) for a cycle, an unknown
        dependency, a duplicate id, an id outside the id alphabet (``run_id`` too), a non-JSON argument,
        an oversized payload or submission, too many tasks, or (with
        ``check_names`` and once any worker has registered) a task name no worker knows.
        """
        if idempotency_key is not None:
            if run_id is not None:
                raise IdempotencyKeyError("give run_id or idempotency_key, not both")
            run_id = idempotency.run_id_for_key(idempotency_key)
        definition = workflow.definition()
        share = run_meta(priority, tenant)
        if share:
            definition = replace(definition, meta={**definition.meta, **share})
        if refresh_cache:
            definition = replace(definition, meta={**definition.meta, REFRESH_META: True})
        run_id = check_id(run_id, "run id") if run_id is not None else new_run_id(workflow.name)
        raw = definition.to_dict()
        try:  # the whole submission's size bounds each task's arguments (Workflow made them JSON)
            text: str | None = compact(raw)
        except (TypeError, ValueError):  # a hand-made definition that is no JSON: validation says where
            text = None
        size = None if text is None else len(text)
        # Structure first (cycles, payloads), then names, then the submission's size: the first error
        # is the most basic one.
        check_definition(  # validate_definition's checks; the plan is the scheduler's to make
            definition,
            max_payload_bytes=self.settings.max_payload_bytes,
            max_tasks=self.settings.max_tasks,
            total_bytes=size,
        )
        runnable = list(nested_tasks(definition))  # static sub-workflows' tasks too
        main_names = sorted({t.fn for t in runnable if t.fn.startswith("__main__.")})
        if main_names:
            raise UnknownTaskError(
                f"{', '.join(main_names)}: tasks defined in a script run as __main__ cannot be found by "
                "workers; define them in an importable module (or give @task(name=...))"
            )
        # Only what workers registered counts: a name registered in this process alone runs nowhere.
        known = self.registered_tasks() if check_names else {}
        if known:
            for t in runnable:
                if t.fn not in known:
                    raise UnknownTaskError(
                        f"task {t.id!r} calls {t.fn!r}, which no worker has registered; "
                        "start a worker with the module that defines it (nerv worker --app MODULE)"
                    )
        if text is None:
            text = compact(raw)
        size = len(text)
        if size > self.settings.max_submission_bytes:
            raise PayloadTooLargeError(
                f"workflow {workflow.name!r}: the submission is {size} bytes of JSON; the limit is "
                f"{self.settings.max_submission_bytes} (NERV_MAX_SUBMISSION_BYTES)"
            )
        # The scheduler checks it all again, writes the run's log, and answers (nerv_cluster/requests.py).
        # Under a key its existence check is the claim: the second of two racing submitters gets the
        # first one's run.
        request = Request.make("submit", text, run_id=run_id, idempotency_key=idempotency_key)
        return str(self._ask(request, f"submission of run {run_id!r}", run_id)["run_id"])

    # -- the intake (issue 13): every change goes to the scheduler as a request -----------------------

    def _ask(self, request: Request, what: str, run_id: str | None = None) -> dict[str, Any]:
        """Append ``request`` to the intake and wait for the scheduler's answer (``NERV_INTAKE_TIMEOUT``
        seconds at most): what the call returns, or the error the scheduler refused it with, raised.
        :class:`IntakeTimeoutError` when no answer came (no scheduler runs, or it is far behind)."""
        k = self.keys
        replication = self.log.replication
        try:
            if replication.on:  # the request itself is acknowledged once replicas hold it
                pipe = self.redis.pipeline(transaction=False)
                pipe.xadd(k.intake, dict(request.fields()))  # type: ignore[arg-type]  # str -> str
                pipe.execute_command("WAIT", replication.min_replicas, replication.timeout_ms)
                replication.wait(self.redis, pipe.execute()[-1])
            else:
                self.redis.xadd(k.intake, dict(request.fields()))  # type: ignore[arg-type]  # str -> str
        except redis.ResponseError as exc:
            if is_full(exc):
                raise StoreFullError(
                    f"Redis is full (maxmemory reached, policy noeviction): {what} refused, nothing "
                    "written; retry once memory is freed or maxmemory is raised"
                ) from exc
            raise
        timeout = self.settings.intake_timeout
        deadline = time.monotonic() + timeout
        reply = k.intake_reply(request.id)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                about = f" (run {run_id})" if run_id else ""
                raise IntakeTimeoutError(
                    f"no scheduler answered the {request.op} request {request.id}{about} within {timeout:g}s "
                    "(NERV_INTAKE_TIMEOUT): it stays in the intake and may still be applied when a "
                    "scheduler runs; is a scheduler running?"
                )
            # In short pops: a sentinel:// client's socket times out after a few seconds of silence.
            got = self.redis.blpop([reply], timeout=max(0.01, min(left, constants.INTAKE_WAIT_CHUNK_S)))
            if got:
                break
        answer = read_answer(got[1])
        if replication.on:  # acknowledged once replicated, as the scheduler's write itself
            replication.confirm(self.redis)
        return answer

    # -- schedules (issue 11, idem) ------------------------------------------------------------------

    def schedule(
        self,
        name: str,
        factory: TaskFunction | str,
        *,
        cron: str | None = None,
        every: float | None = None,
        overlap: str = "skip",
        catchup: bool | int = False,
        timezone: str = "UTC",
        kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Add (or replace) a schedule; returns its name. See :mod:`nerv_cluster.schedules`.

        ``factory`` is a registered task function (or its name) returning a Workflow; each fire calls it
        with the slot's time (epoch seconds) and ``kwargs``, and the workflow it returns runs as the
        fire's child run. Give ``cron`` (a cron expression, read in ``timezone``) or ``every`` (seconds;
        slots are multiples of it since the epoch). ``overlap``: what a slot does while the schedule's
        previous run still runs: ``"skip"`` it, ``"buffer_one"`` (fire the latest such slot when the run
        ends) or ``"allow"`` it. ``catchup``: slots missed while no scheduler ran (or it was paused out)
        fire only the latest one by default; with ``overlap="allow"``, ``True`` fires them all (at most
        ``SCHEDULE_MAX_CATCHUP``, the latest) and a number fires that many. A replaced schedule goes on
        from now with its new definition. Raises :class:`ScheduleError` (writing nothing) for an invalid
        definition, or (once any worker has registered) a factory no worker knows.
        """
        fn = factory.name if isinstance(factory, TaskFunction) else factory
        queue = factory.queue if isinstance(factory, TaskFunction) else None
        if isinstance(fn, str) and fn:
            known = self.registered_tasks()
            if known and fn not in known:
                raise ScheduleError(
                    f"schedule {name!r}: the factory {fn!r} is a task no worker has registered; start a "
                    "worker with the module that defines it (nerv worker --app MODULE)"
                )
            queue = queue or known.get(fn)
        try:
            args = json.dumps(dict(kwargs or {}), separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ScheduleError(f"schedule {name!r}: kwargs must be JSON: {exc}") from None
        if len(args) > self.settings.max_payload_bytes:
            raise ScheduleError(
                f"schedule {name!r}: kwargs are {len(args)} bytes of JSON; the limit is "
                f"{self.settings.max_payload_bytes} (NERV_MAX_PAYLOAD_BYTES)"
            )
        spec = check_spec(
            ScheduleSpec(
                name=name,
                factory=fn,
                queue=queue or constants.DEFAULT_QUEUE,
                cron=cron,
                every=float(every) if isinstance(every, int) and not isinstance(every, bool) else every,
                overlap=overlap,
                catchup=catchup,
                timezone=timezone,
                kwargs=json.loads(args),
            )
        )
        self._ask(Request.make("schedule_set", spec=spec.to_dict()), f"schedule {name!r}")
        return name

    def schedules(self) -> dict[str, Schedule]:
        """Every schedule, by name, as its log says now."""
        return dict(ScheduleStore(self.redis, self.keys).schedules())

    def pause_schedule(self, name: str) -> None:
        """Pause a schedule: no slot fires until it is resumed (triggers still do)."""
        self._schedule_command("schedule_pause", self._require_schedule(name))

    def resume_schedule(self, name: str) -> None:
        """Resume a paused schedule; the slots that passed while it was paused do not fire."""
        self._schedule_command("schedule_resume", self._require_schedule(name))

    def trigger_schedule(self, name: str) -> str:
        """Fire a schedule now, once, whatever its overlap and pause; returns the fire's run id (the
        run exists as soon as the scheduler has read the request)."""
        return str(self._schedule_command("schedule_trigger", self._require_schedule(name))["run_id"])

    def delete_schedule(self, name: str) -> None:
        """Delete a schedule; runs it fired go on."""
        self._schedule_command("schedule_delete", self._require_schedule(name))

    def _require_schedule(self, name: str) -> str:
        if name not in ScheduleStore(self.redis, self.keys).schedules():
            raise ScheduleNotFoundError(f"no schedule {name!r}")
        return name

    def _schedule_command(self, op: str, name: str) -> dict[str, Any]:
        # The scheduler dates it on Redis's clock (the one slots are compared with).
        return self._ask(Request.make(op, name=name), f"schedule {name!r}")

    def clear_cache(self, task: TaskFunction | str | None = None) -> int:
        """Delete cached results (``cache=Cache(...)``): every entry, or those of one task function (a
        ``@task`` function or its registered name). Returns how many entries were deleted; the tasks
        they were for compute again next time. The scheduler deletes them (a request)."""
        name = task.name if isinstance(task, TaskFunction) else task
        return int(self._ask(Request.make("clear_cache", task=name), "cache clear")["deleted"])

    def set_limit(self, key: str, limit: int | None) -> None:
        """Set the limit of concurrency key ``key`` (a resolved key, as ``"tenant:acme"``) at run
        time, cluster-wide: ``limit`` attempts at most from now on (0 holds every task of the key;
        None goes back to the limit the tasks declare). A LIMIT_SET event in the limits stream, which
        every new leader refolds, so the change survives a scheduler restart."""
        limits.check_limit(key, limit)
        self._ask(Request.make("set_limit", key=key, limit=limit), f"limit of {key!r}")

    def limits(self) -> dict[str, int]:
        """The limits set at run time (``set_limit``), by key, as the limits stream folds them."""
        gate = limits.Gate()
        for _, ev in self.log.limit_events():
            gate.apply_limit_event(ev)
        return dict(gate.overrides)

    def cancel(self, run_id: str, reason: str = "cancelled by user") -> None:
        """Ask the scheduler to cancel a run: nothing new starts, running tasks are revoked."""
        self.log.require_run(run_id)
        self._ask(Request.make("cancel", run_id=run_id, reason=reason), f"cancel of run {run_id!r}", run_id)

    def rerun(self, run_id: str, *, tasks: Iterable[str] | None = None) -> str:
        """Rerun a finished run from where it failed; returns its run id (the same run goes on, and
        :meth:`wait` waits for its new end).

        Without ``tasks`` every task that did not complete (FAILED, CANCELLED, SKIPPED) gets a new
        attempt; with ``tasks``, those tasks and all their descendants, whatever their status. Other
        COMPLETED tasks keep their results and never run again; each rerun task's retry policy starts
        over. Raises (and writes nothing) :class:`RunNotFoundError` for an unknown or expired run,
        :class:`RunNotFinishedError` for a run still going, :class:`RerunError` for an unknown task id
        or nothing to rerun. See :mod:`nerv_cluster.rerun`.
        """
        # Read once: the request may be judged again below. A lone id would be read for its characters.
        wanted = None if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
        run, _ = self._fold(run_id)
        reruns.check(run, wanted)  # the fast error; the scheduler judges the request again
        self._ask(Request.make("rerun", run_id=run_id, tasks=wanted), f"rerun of run {run_id!r}", run_id)
        return run_id

    def signal(self, run_id: str, name: str, payload: Any = None) -> bool:
        """Send signal ``name`` with a JSON ``payload`` to a run: its ``wait_for(name)`` node completes
        with the payload as its result, now if it is WAITING, else as soon as it is reached (the signal
        is kept in the run's log until then). Returns True when this is the first signal of that name
        for the run (the one its node receives), False when one came before (this one changes nothing).

        Raises (and writes nothing) :class:`RunNotFoundError` for an unknown or expired run,
        :class:`RunFinishedError` for a finished one, :class:`UnknownSignalError` for a name no node of
        the run waits for, :class:`SerializationError` / :class:`PayloadTooLargeError` for a payload that
        is not JSON or is over ``NERV_MAX_SIGNAL_BYTES``. See :mod:`nerv_cluster.waits`.
        """
        check_id(run_id, "run id")
        run, _ = self._fold(run_id)
        waits.signal_event(run, name, payload, self.settings.max_signal_bytes)  # the fast errors
        request = Request.make("signal", run_id=run_id, name=name, payload=payload)
        return bool(self._ask(request, f"signal {name!r} to run {run_id!r}", run_id)["first"])

    # -- read -----------------------------------------------------------------------------------------

    def _fold(self, run_id: str) -> tuple[st.RunState, str]:
        state = st.EMPTY
        chunk: list[Event] = []
        last = "0-0"
        for entry_id, ev in self.log.read_run(run_id):
            chunk.append(ev)
            last = entry_id
            if len(chunk) >= _FOLD_CHUNK:
                state, chunk = st.fold(chunk, state), []
        # In chunks, each by whichever path pays (the bulk one for a run created by them): the same as
        # applying the events one by one, in bounded memory.
        run = st.fold(chunk, state).runs.get(run_id)
        if run is None:
            raise RunNotFoundError(
                f"no run {run_id!r} (never submitted, or expired after its retention time)"
            )
        return run, last

    def status(self, run_id: str, *, at: history.Position | None = None) -> st.RunResult:
        """The run as of now: its status and every task's status, result, error and timings.

        ``at``: the run as it was instead, after the events of its log up to and including the entry
        with that cursor (an ``Event.cursor``, a stream entry id), or after its first ``at`` events (an
        int): the fold of that part of the log (see :mod:`nerv_cluster.history`). Raises
        :class:`CursorError` for a position that names no point of the log.
        """
        if at is None:
            return st.run_result(self._fold(run_id)[0])
        return st.run_result(history.read_state(self.log, run_id, history.parse_position(at)))

    def follow(
        self, run_id: str, timeout: float | None = None, *, block_ms: int = _FOLLOW_BLOCK_MS
    ) -> Iterator[st.RunState]:
        """The run's state, folded from its log: first as logged now, then again after each batch of new
        events (or every ``block_ms`` when none come), the last one terminal.

        Reads the log, then follows it, so no event can be missed. Raises :class:`WaitTimeoutError` if
        the run is still going after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        run, last = self._fold(run_id)
        yield run
        while not run.status.terminal:
            block = block_ms
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(
                        f"run {run_id} still {run.status.value} after {timeout:g}s "
                        f"({run.finished_tasks}/{run.total} tasks done)"
                    )
                block = max(1, min(block, int(left * 1000)))
            batch = self.log.follow_run(run_id, last, block)
            if batch:
                # By whichever path pays for this many events (a run of cached tasks ends in one batch).
                folded = st.fold([ev for _, ev in batch], st.State(runs=pmap({run_id: run})))
                run = folded.runs.get(run_id, run)
            last = batch.upto or last  # past skipped entries too
            yield run

    def wait(self, run_id: str, timeout: float | None = None) -> st.RunResult:
        """Block until the run ends and return its :class:`RunResult` (whatever the outcome).

        Raises :class:`WaitTimeoutError` if the run is still going after ``timeout`` seconds.
        """
        run = deque(self.follow(run_id, timeout), maxlen=1)[0]  # the last state: the terminal one
        return st.run_result(run)

    def events(self, run_id: str, *, follow: bool = True, after: str = "0-0") -> Iterator[Event]:
        """The run's events from the log (after entry id ``after``), then live ones until the run ends.

        Each event carries its cursor (``ev.cursor``, its stream entry id): ``events(run_id,
        after=ev.cursor)`` goes on right after it, missing nothing, and ``status(run_id, at=ev.cursor)``
        is the run as it was right after it.

        A rerun goes on past an end: the logged part runs to its last end (if no rerun request follows
        that end, the run is over). With ``follow=False`` it stops at the end of what is logged now.
        The cache hits the scheduler logs together (one CACHE_HITS) come as one TASK_COMPLETED
        (``"cached": true``) per task.
        """
        self.log.require_run(run_id)
        last = after
        ended = False
        for entry_id, ev in self.log.read_run(run_id, after=after):
            last = entry_id
            yield from caching.expand(ev)
            if ev.type in WORKFLOW_END_EVENTS:
                ended = True
            elif ev.type is EventType.WORKFLOW_RERUN_REQUESTED:
                ended = False
        if ended:
            return
        while follow:
            batch = self.log.follow_run(run_id, last, _FOLLOW_BLOCK_MS)
            for _, ev in batch:
                yield from caching.expand(ev)
                if ev.type in WORKFLOW_END_EVENTS:
                    return
            last = batch.upto or last  # past skipped entries too

    def runs(self, limit: int = 20) -> list[tuple[str, float]]:
        """The newest runs (id, submit time), newest first."""
        return self.log.recent_runs(limit)

    # -- live events ------------------------------------------------------------------------------------

    def subscribe(
        self, event_type: EventType | str, handler: Handler, *, sender: str | None = None, weak: bool = False
    ) -> Callable[[], None]:
        """Call ``handler(event)`` for live events of a type (``"*"`` for all), of run ``sender`` if given.

        Bridged from Redis pub/sub into this client's Blinker :class:`EventBus`; returns an unsubscribe
        function. Pub/sub is at-most-once: use :meth:`events` or :meth:`wait` where nothing may be missed.
        """
        unsubscribe = self.bus.subscribe(event_type, handler, sender=sender, weak=weak)
        self._bridge.start()
        return unsubscribe

    def close(self) -> None:
        """Stop the pub/sub bridge and close connections."""
        self._bridge.stop()
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Client", "RunStatus", "connect"]
