"""The data model: statuses, priorities, event types, task definitions, results and events.

Everything here is immutable and converts to and from plain JSON-able dicts, because only JSON travels
between the client, the scheduler and the workers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, TypeVar

from nerv_cluster import constants, gcpause, ids
from nerv_cluster.errors import MalformedEventError, UnknownEventTypeError, WorkflowError
from nerv_cluster.jsonform import compact
from nerv_cluster.limits import Concurrency, RateLimit

T = TypeVar("T")


class TaskStatus(StrEnum):
    """Where a task is in its life. Serialises as its plain name."""

    PENDING = "PENDING"  # waiting for its dependencies (or for a retry delay)
    READY = "READY"  # dependencies satisfied; dispatched or about to be
    RUNNING = "RUNNING"  # a worker started the current attempt
    #: A durable wait (``wait_for``, ``sleep``): held in the scheduler's state for a signal or a
    #: timer, in no worker slot (issue 11, part "waits").
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"  # its trigger rule can no longer be met
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True when the task will not change any more."""
        return self in TERMINAL_TASK_STATUSES


TERMINAL_TASK_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.SKIPPED, TaskStatus.CANCELLED}
)


class RunStatus(StrEnum):
    """Where a whole workflow run is in its life."""

    PENDING = "PENDING"  # submitted, not yet accepted by a scheduler
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True when the run is over."""
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)


class TaskPriority(IntEnum):
    """Dispatch priority within a dependency level: higher goes first."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: TaskPriority | str | int) -> TaskPriority:
        """Accept a member, its name in any case (``"high"``) or its number."""
        if isinstance(value, TaskPriority):
            return value
        if isinstance(value, str):
            known = _PRIORITY_NAMES.get(value)  # the wire form's exact name: no upper(), no enum lookup
            if known is not None:
                return known
            try:
                return cls[value.upper()]
            except KeyError:
                raise WorkflowError(
                    f"unknown priority {value!r}; expected one of {', '.join(m.name.lower() for m in cls)}"
                ) from None
        try:
            return cls(value)
        except ValueError:
            raise WorkflowError(f"unknown priority {value!r}") from None


class TriggerRule(StrEnum):
    """When a task may run, given how its dependencies ended."""

    ALL_SUCCESS = "all_success"  # every dependency COMPLETED (the default)
    ALL_DONE = "all_done"  # every dependency ended, however
    ONE_FAILED = "one_failed"  # at least one dependency FAILED: the fallback rule
    NONE_FAILED = "none_failed"  # every dependency ended and none FAILED (SKIPPED is fine)

    @classmethod
    def parse(cls, value: TriggerRule | str) -> TriggerRule:
        """Accept a member or its value."""
        if isinstance(value, str):  # a member is one too: one dict lookup instead of the enum call
            known = _TRIGGERS.get(value)
            if known is not None:
                return known
        try:
            return cls(value)
        except ValueError:
            raise WorkflowError(
                f"unknown trigger rule {value!r}; expected one of {', '.join(m.value for m in cls)}"
            ) from None


#: Member by exact name and by value: the parsers' fast paths (every task of every submission is parsed).
_PRIORITY_NAMES: dict[str, TaskPriority] = {m.name: m for m in TaskPriority}
_TRIGGERS: dict[str, TriggerRule] = {m.value: m for m in TriggerRule}


class EventType(StrEnum):
    """Every lifecycle change that is written to the event log."""

    WORKFLOW_SUBMITTED = "WORKFLOW_SUBMITTED"  # the seed's WORKFLOW_CREATED; carries the definition
    WORKFLOW_STARTED = "WORKFLOW_STARTED"  # a scheduler accepted and planned the run
    WORKFLOW_COMPLETED = "WORKFLOW_COMPLETED"
    WORKFLOW_FAILED = "WORKFLOW_FAILED"
    WORKFLOW_CANCEL_REQUESTED = "WORKFLOW_CANCEL_REQUESTED"
    WORKFLOW_CANCELLED = "WORKFLOW_CANCELLED"
    TASK_PENDING = "TASK_PENDING"  # a task was reset to wait for a new attempt (its worker was lost)
    TASK_DISPATCHED = "TASK_DISPATCHED"
    TASK_STARTED = "TASK_STARTED"
    TASK_COMPLETED = "TASK_COMPLETED"
    TASK_FAILED = "TASK_FAILED"
    TASK_RETRYING = "TASK_RETRYING"
    TASK_SKIPPED = "TASK_SKIPPED"
    TASK_CANCELLED = "TASK_CANCELLED"
    # A task function's circuit breaker changed state (logged in the run that tripped it, and in the
    # cluster-wide circuits stream the scheduler refolds).
    CIRCUIT_OPENED = "CIRCUIT_OPENED"
    CIRCUIT_HALF_OPENED = "CIRCUIT_HALF_OPENED"
    CIRCUIT_CLOSED = "CIRCUIT_CLOSED"
    # rerun (issue 16): a client asks for a finished run to go on (see nerv_cluster.rerun); data ``n``
    # (the run's rerun number) and ``tasks`` (the task ids named, when any).
    WORKFLOW_RERUN_REQUESTED = "WORKFLOW_RERUN_REQUESTED"
    # Child runs (issue 16, part "child"): an attempt whose function returned a Workflow (data: the
    # child's definition, the worker), and the scheduler's record that the child run exists (data:
    # its run id). See nerv_cluster/children.py.
    TASK_SPAWNED = "TASK_SPAWNED"
    CHILD_STARTED = "CHILD_STARTED"
    # Durable waits (issue 11, part "waits"; see nerv_cluster/waits.py): the scheduler's record that a
    # wait node was reached (it is WAITING from then on: its deadline counts from this event's logged
    # time), and a client's signal (data: ``name``, ``payload``), kept in the run until its node takes it.
    TASK_WAITING = "TASK_WAITING"
    SIGNAL_RECEIVED = "SIGNAL_RECEIVED"
    # Limits (issue 11, part "limits"; see nerv_cluster/limits.py): a READY task the scheduler holds
    # back for a concurrency key or a rate limit (data: ``reason``), and a limit set
    # at run time (``client.set_limit``; data ``key``, ``limit``), in the cluster-wide limits stream.
    TASK_HELD = "TASK_HELD"
    LIMIT_SET = "LIMIT_SET"
    # Caching (issue 16): the cache hits of one run in one scheduler step, as one event (data ``hits``:
    # [task id, attempt, result, where it was computed] each). Readers of events see one
    # TASK_COMPLETED (``cached``: true) per hit (see nerv_cluster/caching.py, ``expand``).
    CACHE_HITS = "CACHE_HITS"
    # -- map (issue 16): a map node's list became known; its elements joined the run (data: width).
    MAP_EXPANDED = "MAP_EXPANDED"
    # idem (issue 11, part 5): schedules, in the cluster-wide schedules stream (see
    # nerv_cluster/schedules.py; their run id is ``schedule:<name>``, which no run has). Clients write
    # SET (data: spec, at), PAUSED / RESUMED (name, at), TRIGGERED (name, at), DELETED (name); the
    # leader writes FIRED (name, slot, run, trigger), SKIPPED (name, upto) and SNAPSHOT (schedules).
    SCHEDULE_SET = "SCHEDULE_SET"
    SCHEDULE_PAUSED = "SCHEDULE_PAUSED"
    SCHEDULE_RESUMED = "SCHEDULE_RESUMED"
    SCHEDULE_TRIGGERED = "SCHEDULE_TRIGGERED"
    SCHEDULE_DELETED = "SCHEDULE_DELETED"
    SCHEDULE_FIRED = "SCHEDULE_FIRED"
    SCHEDULE_SKIPPED = "SCHEDULE_SKIPPED"
    SCHEDULES_SNAPSHOT = "SCHEDULES_SNAPSHOT"

    @classmethod
    def parse(cls, value: EventType | str) -> EventType:
        """Accept a member or its name in any case."""
        try:
            return cls(str(value).upper())
        except ValueError:
            raise ValueError(f"unknown event type {value!r}") from None


WORKFLOW_END_EVENTS = frozenset(
    {EventType.WORKFLOW_COMPLETED, EventType.WORKFLOW_FAILED, EventType.WORKFLOW_CANCELLED}
)


def _qualname(kind: type | str) -> str:
    if isinstance(kind, str):
        return kind
    if not (isinstance(kind, type) and issubclass(kind, BaseException)):
        raise WorkflowError(f"retry_on expects exception classes or their names, got {kind!r}")
    return kind.__name__


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how late a failed task is tried again.

    The delay before attempt ``n + 1`` is ``backoff * factor ** (n - 1)``, capped at ``max_delay``, then
    spread by up to ``jitter`` (a fraction) either way. ``retry_on`` limits retries to exceptions of
    these types (names match the exception class or any of its bases); empty means any exception.
    """

    max_retries: int = 0
    backoff: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.0
    retry_on: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.factor < 1 or self.max_delay < 0:
            raise WorkflowError(f"invalid retry policy {self!r}: counts and delays must be >= 0, factor >= 1")
        if not 0 <= self.jitter <= 1:
            raise WorkflowError("retry jitter is a fraction between 0 and 1")
        object.__setattr__(self, "retry_on", tuple(_qualname(k) for k in self.retry_on))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one."""
        base = min(self.max_delay, self.backoff * self.factor ** max(0, attempt - 1))
        if self.jitter and base:
            spread = base * self.jitter
            base += (rng or random).uniform(-spread, spread)
        return max(0.0, base)

    def allows(self, attempt: int, error_types: Iterable[str]) -> bool:
        """True when failed attempt ``attempt`` may be retried for an error of these class names."""
        if attempt > self.max_retries:
            return False
        return not self.retry_on or any(name in self.retry_on for name in error_types)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "max_retries": self.max_retries,
            "backoff": self.backoff,
            "factor": self.factor,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "retry_on": list(self.retry_on),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetryPolicy:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "retry_on": tuple(data.get("retry_on", ()))})


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Stop calling a failing function for a while.

    After ``failures`` consecutive failed attempts of one task function (across all runs), new attempts
    fail fast with ``CircuitOpenError`` for ``cooldown`` seconds; then one trial attempt runs (half
    open): success closes the circuit, failure opens it again.
    """

    failures: int = 5
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.failures < 1 or self.cooldown < 0:
            raise WorkflowError(f"invalid circuit breaker {self!r}: failures >= 1 and cooldown >= 0")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"failures": self.failures, "cooldown": self.cooldown}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CircuitBreaker:
        """Inverse of :meth:`to_dict`."""
        return cls(failures=int(data["failures"]), cooldown=float(data["cooldown"]))


@dataclass(frozen=True, slots=True)
class Cache:
    """Complete a task from an earlier result instead of running it (see :mod:`nerv_cluster.caching`).

    A task whose function name, ``version`` and resolved arguments (upstream results included) match a
    COMPLETED result stored less than ``ttl`` seconds ago completes with that result, without a worker.
    ``key`` names a registered function ``(args, kwargs) -> str`` that says which part of the arguments
    matters (the scheduler calls it: start it with ``nerv scheduler --app MODULE``); bump ``version``
    when the function's meaning changes, so old entries are never used again.
    """

    ttl: float
    version: str = "1"
    #: A ``@task`` function or its registered name, given; always the name once constructed
    #: (:attr:`key_name` reads it typed).
    key: Any = None

    def __post_init__(self) -> None:
        ttl = self.ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < float("inf"):
            raise WorkflowError(f"cache ttl must be a positive number of seconds, got {ttl!r:.80}")
        if not isinstance(self.version, str):
            raise WorkflowError(f"cache version must be a string, got {self.version!r:.80}")
        key = self.key
        if key is not None and not isinstance(key, str):
            # A @task function stands for its registered name (functions never travel).
            name = getattr(key, "name", None)
            if not isinstance(name, str):
                raise WorkflowError(
                    f"cache key= must be a registered function (decorate it with @task) or its name, "
                    f"got {key!r:.80}"
                )
            object.__setattr__(self, "key", name)
        if self.key == "":
            raise WorkflowError("cache key= must not be empty")

    @property
    def key_name(self) -> str | None:
        """The registered name of the key function, or None for the default key."""
        return self.key if isinstance(self.key, str) else None

    @property
    def ttl_ms(self) -> int:
        """The time to live in whole milliseconds (at least 1), as Redis takes it."""
        return max(1, int(self.ttl * 1000))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        out: dict[str, Any] = {"ttl": self.ttl, "version": self.version}
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cache:
        """Inverse of :meth:`to_dict`; WorkflowError on a malformed form."""
        if not isinstance(data, Mapping) or "ttl" not in data:
            raise WorkflowError(f"a cache needs a ttl, got {data!r:.80}")
        ttl, version, key = data["ttl"], data.get("version", "1"), data.get("key")
        try:  # a fan-out's thousands of tasks share one Cache: made and checked once
            return _cache_of(ttl, version, key)
        except TypeError:  # an unhashable part: no valid cache; let the checks say why
            return cls(ttl=ttl, version=version, key=key)


@functools.lru_cache(maxsize=256, typed=True)
def _cache_of(ttl: Any, version: Any, key: Any) -> Cache:
    """One Cache per distinct JSON form (typed: ``True`` is no ``1``, which the checks refuse)."""
    return Cache(ttl=ttl, version=version, key=key)


@dataclass(frozen=True, slots=True)
class TaskDef:
    """One task of a workflow, as it travels on the wire.

    ``fn`` is the registered name of the function; ``args``/``kwargs`` are JSON where an upstream result
    is written as ``{"__nerv_ref__": task_id}``. ``dependencies`` holds every upstream task id, whether it
    came from a reference in the arguments or was listed explicitly.

    ``over`` makes the task a map node (see :mod:`nerv_cluster.mapping`): what it maps over, a
    reference marker to a task (or another map) among its dependencies, or a literal JSON list; the
    task itself never runs, each element of that list becomes a task ``<id>[<i>]`` of its own.
    """

    id: str
    fn: str
    name: str = ""
    description: str = ""
    dependencies: tuple[str, ...] = ()
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: TaskPriority = TaskPriority.MEDIUM
    timeout: float | None = None
    retry: RetryPolicy | None = None
    queue: str = constants.DEFAULT_QUEUE
    tags: tuple[str, ...] = ()
    trigger: TriggerRule = TriggerRule.ALL_SUCCESS
    context: bool = False  # call fn(ctx, *args) with a TaskContext first
    circuit: CircuitBreaker | None = None
    #: Complete from a stored earlier result when one matches (part "cache" of issue 16).
    cache: Cache | None = None
    #: A static sub-workflow (``Workflow.add(other_workflow)``): its definition's JSON form, run as a
    #: child run when the task is ready, without any worker (``fn`` is ``constants.SUBWORKFLOW_FN``).
    workflow: Mapping[str, Any] | None = None
    #: A durable wait node (``fn`` is ``constants.WAIT_FN``): ``{"signal": name, "timeout": s}``,
    #: ``{"sleep": s}`` or ``{"until": epoch_s}``, see :mod:`nerv_cluster.waits`.
    wait: Mapping[str, Any] | None = None
    #: Limits (issue 11): a concurrency key (its template bound to this task's arguments) and a rate
    #: limit, see :mod:`nerv_cluster.limits`.
    concurrency: Concurrency | None = None
    rate_limit: RateLimit | None = None
    over: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; defaults are left out to keep messages lean."""
        # The defaults are module constants: an enum member read through its class costs several
        # times a global's lookup, and this runs for every task of every submission.
        out: dict[str, Any] = {"id": self.id, "fn": self.fn}
        if self.name and self.name != self.id:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        if self.dependencies:
            out["deps"] = list(self.dependencies)
        if self.args:
            out["args"] = list(self.args)
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        if self.priority != _MEDIUM:
            out["priority"] = self.priority.name
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.retry is not None:
            out["retry"] = self.retry.to_dict()
        if self.queue != _DEFAULT_QUEUE:
            out["queue"] = self.queue
        if self.tags:
            out["tags"] = list(self.tags)
        if self.trigger != _ALL_SUCCESS:
            out["trigger"] = self.trigger.value
        if self.context:
            out["context"] = True
        if self.circuit is not None:
            out["circuit"] = self.circuit.to_dict()
        if self.cache is not None:
            out["cache"] = self.cache.to_dict()
        if self.workflow is not None:
            out["workflow"] = self.workflow
        if self.wait is not None:
            out["wait"] = self.wait
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency.to_dict()
        if self.rate_limit is not None:
            out["rate_limit"] = self.rate_limit.to_dict()
        if self.over is not None:
            out["over"] = self.over
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskDef:
        """Inverse of :meth:`to_dict`."""
        # Only what the form holds is passed (the rest keep their defaults): every task of every
        # submission comes this way, in the scheduler and in each client that folds the run, and a
        # fan-out's tasks hold little beyond an id, a function and arguments.
        get = data.get
        tid = data["id"]
        fields: dict[str, Any] = {"id": tid, "fn": data["fn"], "name": get("name") or tid}
        for key, value in data.items():
            convert = _TASK_FIELDS.get(key)
            if convert is not None:
                name, make = convert
                made = make(value)
                if made is not None:
                    fields[name] = made
        return make_task(**fields) if cls is TaskDef else cls(**fields)


#: The defaults ``TaskDef.to_dict`` compares with, read once (see there).
_MEDIUM, _ALL_SUCCESS, _DEFAULT_QUEUE = TaskPriority.MEDIUM, TriggerRule.ALL_SUCCESS, constants.DEFAULT_QUEUE


def fast_init(cls: type[T]) -> Callable[..., T]:
    """A constructor of frozen slots dataclass ``cls`` that takes what ``cls(...)`` takes and makes the
    same object, faster: by an unfrozen twin class (the same fields, slots and defaults), whose object
    then becomes a ``cls`` (the same slots: the object is exactly what ``cls(...)`` makes, equal to it,
    frozen from then on).

    A frozen dataclass's ``__init__`` stores each field through ``object.__setattr__`` (its own
    ``__setattr__`` refuses), several times slower than the direct slot stores of an unfrozen one; a
    million-task submission builds a million TaskDefs, in the client and in the scheduler.
    """
    twin = dataclasses.make_dataclass(
        f"_{cls.__name__}Init",
        [
            (f.name, f.type, field(default=f.default, default_factory=f.default_factory))
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        ],
        slots=True,
        eq=False,
        repr=False,
    )
    if twin.__slots__ != cls.__slots__:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} is no slots dataclass of plain fields")
    # A __post_init__ would not run for the twin's objects.
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__, which the twin would not run")

    def make(*args: Any, **fields: Any) -> T:
        obj = twin(*args, **fields)
        obj.__class__ = cls
        return obj  # a cls now

    make.__doc__ = f"``{cls.__name__}(...)``, built faster (see ``fast_init``)."
    return make


#: ``TaskDef(...)``, faster (see :func:`fast_init`).
make_task = fast_init(TaskDef)


def _deps(value: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(value))


def _or_none(make: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``make`` for a value that is there; None (the field keeps its default) for a falsy one."""
    return lambda value: make(value) if value else None


#: TaskDef's JSON keys (beyond id, fn and name) -> (field, how the field is made from the value; None
#: keeps the field's default). Keys not listed are ignored, as they always were.
_TASK_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "description": ("description", lambda v: v),
    "deps": ("dependencies", _deps),
    "args": ("args", tuple),
    "kwargs": ("kwargs", dict),
    "priority": ("priority", lambda v: TaskPriority.parse(v)),
    "timeout": ("timeout", lambda v: v),
    "retry": ("retry", _or_none(lambda v: RetryPolicy.from_dict(v))),
    "queue": ("queue", lambda v: v),
    "tags": ("tags", tuple),
    "trigger": ("trigger", lambda v: TriggerRule.parse(v)),
    "context": ("context", bool),
    "circuit": ("circuit", _or_none(lambda v: CircuitBreaker.from_dict(v))),
    "cache": ("cache", lambda v: None if v is None else Cache.from_dict(v)),
    "workflow": ("workflow", lambda v: v),
    "wait": ("wait", lambda v: v),
    "concurrency": ("concurrency", _or_none(lambda v: Concurrency.from_dict(v))),
    "rate_limit": ("rate_limit", _or_none(lambda v: RateLimit.from_dict(v))),
    "over": ("over", lambda v: v),
}


@dataclass(frozen=True, slots=True)
class ParentRef:
    """The task attempt a child run belongs to (``RunResult.parent``): its run, task and attempt."""

    run_id: str
    task_id: str
    attempt: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (kept in the child's definition, ``meta["parent"]``)."""
        return {"run": self.run_id, "task": self.task_id, "attempt": self.attempt}

    @classmethod
    def from_dict(cls, data: Any) -> ParentRef | None:
        """Inverse of :meth:`to_dict`; None for anything that is not one (a run without a parent)."""
        if not isinstance(data, Mapping):
            return None
        run, tid, attempt = data.get("run"), data.get("task"), data.get("attempt")
        if not (isinstance(run, str) and isinstance(tid, str) and type(attempt) is int):
            return None
        return cls(run, tid, attempt)


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """A whole workflow: a name and its tasks in the order they were added.

    ``meta`` may say which task's result is the workflow's output (``"output"``, see
    ``Workflow.output``) and, for a child run, its parent and depth (``"parent"``, ``"depth"``).
    """

    name: str
    tasks: tuple[TaskDef, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def parent(self) -> ParentRef | None:
        """The task attempt this run is the child of (None for a run a client submitted)."""
        return ParentRef.from_dict(self.meta.get("parent"))

    @property
    def root(self) -> str:
        """For a child run, the run a client submitted at the top of its tree ("" for that run itself)."""
        root = self.meta.get("root", "")
        return root if isinstance(root, str) else ""

    @property
    def depth(self) -> int:
        """How deep this run is nested under runs a client submitted (0 for those)."""
        depth = self.meta.get("depth", 0)
        return depth if type(depth) is int and depth >= 0 else 0

    @gcpause.pausing  # a dict (and lists) per task, no cycles: see nerv_cluster/gcpause.py
    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        out: dict[str, Any] = {"name": self.name, "tasks": [t.to_dict() for t in self.tasks]}
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    @gcpause.pausing
    def from_dict(cls, data: Mapping[str, Any]) -> WorkflowDef:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=data["name"],
            tasks=tuple(TaskDef.from_dict(t) for t in data["tasks"]),
            meta=dict(data.get("meta", {})),
        )


def truncate(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters; else its start and end (the end of a
    traceback names where it failed) around a marker saying how many characters were cut."""
    if len(text) <= limit:
        return text
    marker = ""
    keep = limit
    for _ in range(3):  # the marker's length depends on the number it states: settle it
        marker = f"\n... [{len(text) - keep} characters cut] ...\n"
        keep = max(0, limit - len(marker))
    head = keep // 3
    return text[:head] + marker + text[len(text) - (keep - head) :]


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why an attempt failed: the exception's class name, its message and the formatted traceback."""

    type: str
    message: str
    traceback: str = ""
    #: The exception's class and base class names, so retry_on can match a base class.
    types: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "type": self.type,
            "message": self.message,
            "traceback": self.traceback,
            "types": list(self.types),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskError:
        """Inverse of :meth:`to_dict`; ValueError for anything not of that form (an event carrying one
        is refused by the fold: its run is rejected rather than holding an error no reader can print)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an error is a JSON object, got {data!r:.80}")
        kind, message = data.get("type", "Error"), data.get("message", "")
        trace, types = data.get("traceback", ""), data.get("types", ())
        if not (isinstance(kind, str) and isinstance(message, str) and isinstance(trace, str)):
            raise ValueError(f"an error's type, message and traceback are strings, got {data!r:.120}")
        if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
            raise ValueError(f"an error's types are a list of class names, got {types!r:.80}")
        return cls(type=kind, message=message, traceback=trace, types=tuple(types))

    @classmethod
    def from_exception(cls, exc: BaseException, traceback: str = "") -> TaskError:
        """Describe a caught exception; a message or traceback over its bound is cut, with a marker
        saying how much (``MAX_ERROR_MESSAGE_CHARS``, ``MAX_TRACEBACK_CHARS``)."""
        kinds = tuple(k.__name__ for k in type(exc).__mro__ if k not in (object, BaseException))
        try:
            message = str(exc)
        except Exception as inner:  # a __str__ that raises must not lose the failure itself
            message = f"<str() of the exception raised {type(inner).__name__}>"
        return cls(
            type=type(exc).__name__,
            message=truncate(message, constants.MAX_ERROR_MESSAGE_CHARS),
            traceback=truncate(traceback, constants.MAX_TRACEBACK_CHARS),
            types=kinds,
        )

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True, slots=True)
class TaskResult:
    """Everything known about one task of a run: its status, value or error, and timings."""

    task_id: str
    status: TaskStatus
    result: Any = None
    error: TaskError | None = None
    attempts: int = 0
    worker: str | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    name: str = ""
    reason: str = ""
    #: Completed from the cache without running; ``cached_from`` names where the result was computed
    #: (``run_id/task_id``).
    cached: bool = False
    cached_from: str | None = None
    #: The child run of the current attempt, when its function returned a workflow.
    child: str | None = None

    @property
    def execution_time(self) -> float | None:
        """Seconds the last attempt ran, when it both started and finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the event log.

    ``id`` makes applying an event idempotent; ``source`` names the writer (``client``,
    ``scheduler:<token>``, ``worker:<id>``); ``data`` holds what the type needs.

    ``ts`` is the writer's clock, for display: clocks of different hosts disagree. ``logged_at`` is
    Redis's clock when the event entered the log (its stream entry id), filled in when it is read from
    a stream (None for an event made in memory, and never serialized): deadlines are measured on it.
    ``cursor`` is the stream entry id it was read from (None likewise): a reader resumes after it
    (``client.events(run_id, after=ev.cursor)``) and time travel folds up to it (:mod:`nerv_cluster.history`).
    """

    type: EventType
    run_id: str
    task_id: str | None = None
    attempt: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: str = ""
    logged_at: float | None = field(default=None, compare=False)
    cursor: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with short keys: this is the hottest thing on the wire."""
        out: dict[str, Any] = {"i": self.id, "t": self.type.value, "r": self.run_id, "ts": self.ts}
        if self.task_id is not None:
            out["k"] = self.task_id
        if self.attempt is not None:
            out["a"] = self.attempt
        if self.data:
            out["d"] = self.data
        if self.source:
            out["s"] = self.source
        return out

    def to_json(self) -> str:
        """Compact JSON."""
        return compact(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], logged_at: float | None = None) -> Event:
        """Inverse of :meth:`to_dict` (``logged_at``: when the log took it, if read from one)."""
        return cls(
            type=EventType(data["t"]),
            run_id=data["r"],
            task_id=data.get("k"),
            attempt=data.get("a"),
            data=data.get("d") or {},
            ts=data["ts"],
            id=data["i"],
            source=data.get("s", ""),
            logged_at=logged_at,
        )

    @classmethod
    def from_json(cls, raw: str | bytes, logged_at: float | None = None) -> Event:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(raw), logged_at)

    @classmethod
    def parse(cls, raw: str | bytes, logged_at: float | None = None, cursor: str | None = None) -> Event:
        """:meth:`from_json` for untrusted input: every field checked for its type, so what it returns
        cannot make the fold raise; :class:`UnknownEventTypeError` for a type this version does not
        know, :class:`MalformedEventError` for anything else wrong. ``logged_at``: as for
        :meth:`from_dict`; ``cursor``: the stream entry id it was read from."""
        try:
            if len(raw) < _BIG_EVENT_CHARS:
                data = json.loads(raw)
            else:  # a big workflow's submission: a dict and lists per task, no cycles
                with gcpause.paused():
                    data = json.loads(raw)
        except (ValueError, TypeError) as exc:  # not text, not UTF-8, not JSON
            raise MalformedEventError(f"not JSON: {exc}") from None
        except RecursionError:  # nesting deeper than the decoder goes
            raise MalformedEventError("not JSON: nested too deep") from None
        if not isinstance(data, dict):
            raise MalformedEventError("not a JSON object")
        name = data.get("t")
        kind = _EVENT_TYPES.get(name) if isinstance(name, str) else None
        if kind is None:
            raise UnknownEventTypeError(f"unknown event type {data.get('t')!r:.80}")
        run_id, task_id, attempt = data.get("r"), data.get("k"), data.get("a")
        ts, eid, body, source = data.get("ts"), data.get("i"), data.get("d") or {}, data.get("s", "")
        if not isinstance(run_id, str) or not run_id:
            raise MalformedEventError("no run id")
        if task_id is not None and not isinstance(task_id, str):
            raise MalformedEventError("the task id is not a string")
        if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
            raise MalformedEventError("the attempt is not an integer")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or ts != ts:
            raise MalformedEventError("no timestamp")
        if not isinstance(eid, str) or not isinstance(body, dict) or not isinstance(source, str):
            raise MalformedEventError("no event id, or a mistyped data or source field")
        return cls(kind, run_id, task_id, attempt, body, ts, eid, source, logged_at, cursor)


_EVENT_TYPES: dict[str, EventType] = {t.value: t for t in EventType}
#: An event's JSON from this size on is decoded with the cyclic GC paused (see nerv_cluster/gcpause.py).
_BIG_EVENT_CHARS = 1 << 16


def new_run_id(name: str) -> str:
    """A unique, readable run id: the workflow name's slug and 12 random hex digits."""
    # ids.slug keeps the id alphabet (ASCII only: str.isalnum would let 'é' through).
    return f"{ids.slug(name.lower(), 40, 'run').rstrip('_.-') or 'run'}-{uuid.uuid4().hex[:12]}"
