"""The state of every run as a pure fold of the event log: ``apply(state, event) -> state``.

No I/O happens here. The transitions table (``_HANDLERS``) is the whole state machine; each handler is
guarded by status and attempt, so applying an event twice, or a stale event of an older attempt,
changes nothing. Derived facts (a task became ready, a task can no longer run) are kept as sets the
scheduler turns into decisions; decisions come back as events.

Many events at once (a new leader rebuilding its state, a big batch) take the bulk path,
:func:`fold_run`: the same handlers run over mutable drafts of the run's maps, frozen back into PMaps
once at the end; :func:`fold` picks it per run where it pays. Its result equals applying the events one
by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self, TypeVar, cast

from pyrsistent import PMap, pmap

from nerv_cluster import caching, intake, mapping, waits
from nerv_cluster.constants import CLAIM_KEY
from nerv_cluster.errors import TaskFailedError
from nerv_cluster.model import (
    TERMINAL_TASK_STATUSES,
    WORKFLOW_END_EVENTS,
    Event,
    EventType,
    ParentRef,
    RunStatus,
    TaskDef,
    TaskError,
    TaskResult,
    TaskStatus,
    TriggerRule,
    WorkflowDef,
)
from nerv_cluster.planner import Plan, plan

_ACTIVE = (TaskStatus.READY, TaskStatus.RUNNING)
#: Statuses an outcome (TASK_COMPLETED/TASK_FAILED) can end: the active ones and a durable wait's.
_OPEN = (TaskStatus.READY, TaskStatus.RUNNING, TaskStatus.WAITING)
# Immutable empties shared as defaults. The states are NamedTuples: ``_replace`` is several times
# faster than ``dataclasses.replace``, and the fold does little else.
#: A set of task ids, kept as a pmap to True: pyrsistent's pset pays for an evolver on every add and
#: discard, several times the pmap underneath, and the fold changes these sets on nearly every event.
IdSet = PMap[str, bool]
_NO_TASKS: IdSet = pmap()
_STATUSES = tuple(TaskStatus)
_AT = {status: i for i, status in enumerate(_STATUSES)}
_NO_COUNTS: tuple[int, ...] = (0,) * len(_STATUSES)
_NO_PLAN = plan(())


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Draft(dict[_K, _V]):
    """A mutable stand-in for a PMap, used only inside :func:`fold_run`.

    A PMap ``set`` on a big map costs an evolver and a ``persistent()`` (microseconds), a dict store
    tens of nanoseconds; replaying a long log is nearly all such stores. The handlers use exactly
    ``set``, ``discard``, ``get``, ``[]`` and ``in`` and always go on with the map ``set``/``discard``
    returns, so a dict that changes in place and returns itself runs the very same handlers. It must
    never escape: :func:`fold_run` freezes every draft back into a PMap before returning.
    """

    __slots__ = ()

    def set(self, key: _K, value: _V) -> Self:
        """Like ``PMap.set``, but in place."""
        self[key] = value
        return self

    def discard(self, key: _K) -> Self:
        """Like ``PMap.discard`` (a missing key is no error), but in place."""
        self.pop(key, None)
        return self


def _set_all(m: PMap[_K, _V], items: Mapping[_K, _V]) -> PMap[_K, _V]:
    """``m`` with every entry of ``items`` set: in place for a draft, else one evolver for them all."""
    if not items:
        return m
    if type(m) is _Draft:
        m.update(items)
        return m
    return m.update(items)


def _draft(m: Mapping[_K, _V]) -> PMap[_K, _V]:
    """A fresh draft copy of ``m``, typed as the PMap it stands in for (the lie is confined to
    :func:`fold_run`, which freezes it before anything returns)."""
    # From items(): dict(a_pmap) would look every key up again through PMap.__getitem__, 2-3x slower.
    return cast("PMap[_K, _V]", _Draft(m.items()))


def _moved(tally: tuple[int, ...], old: TaskStatus, new: TaskStatus) -> tuple[int, ...]:
    """The tally after one task moved from ``old`` to ``new``."""
    counts = list(tally)
    counts[_AT[old]] -= 1
    counts[_AT[new]] += 1
    return tuple(counts)


class TaskState(NamedTuple):
    """One task's state. ``attempt`` is the current attempt (1-based); ``ok``/``failed``/``skipped`` count
    how its dependencies ended, which decides its trigger rule."""

    status: TaskStatus = TaskStatus.PENDING
    attempt: int = 1
    dispatched: bool = False
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    result: Any = None
    error: TaskError | None = None
    worker: str | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    due_at: float | None = None
    reason: str = ""
    #: Attempts given up because their worker was lost (bounded: a task that kills workers fails).
    lost: int = 0
    #: The Celery message the attempt runs in when that is not its own (a later job of a packed batch,
    #: a handed job): cancelling the run revokes that message.
    via: str | None = None
    #: The attempt was claimed together with the other jobs of its packed batch, before any of them
    #: ran (``start.lua`` in batch mode): a process lost then may never have started it, so the loss
    #: is not counted against it (its next attempt runs alone, claimed as it starts).
    batch: bool = False
    #: The first attempt of the current round: a rerun (see :mod:`nerv_cluster.rerun`) starts the
    #: retry policy over from its new attempt, so retries count ``attempt - first``.
    first: int = 1
    #: The cache key this task computes (recorded by its TASK_DISPATCHED): while the task is not
    #: terminal, other tasks with the same key wait for it (single flight, :mod:`nerv_cluster.caching`).
    cache_key: str | None = None
    #: Where the result came from when the task completed from the cache (``run_id/task_id``).
    cached_from: str | None = None
    #: Child runs (nerv_cluster/children.py): the definition (JSON form) the current attempt returned,
    #: from TASK_SPAWNED until its child run exists; then ``child``, that run's id. A task waiting for
    #: its child is RUNNING but not in ``RunState.running``: it has no worker to lose or time out.
    spawn: Any = None
    child: str | None = None
    #: Limits (nerv_cluster/limits.py): READY but held back for a concurrency key or a rate limit
    #: (TASK_HELD; in ``RunState.held``, not ``ready``), and the concurrency key whose slot the current
    #: attempt holds (recorded by its TASK_DISPATCHED) while it is dispatched or running.
    held: bool = False
    slot: str | None = None
    #: The current attempt's claim (nerv_cluster/outcomes.py): the hash of the nonce its TASK_STARTED
    #: named, which only the process that started it knows; an outcome must present that nonce.
    claim: str | None = None


class RunState(NamedTuple):
    """One run: its definition and plan, every task's state, and the pending decisions.

    ``ready`` holds READY tasks not yet dispatched (some may wait for ``due_at``); ``doomed`` holds
    PENDING tasks whose trigger rule can no longer be met, to be SKIPPED; ``running`` holds RUNNING
    tasks, which the scheduler watches for lost workers and timeouts (not a map node: no worker holds
    it); ``queued`` holds READY tasks already dispatched (their job is in a queue or reserved by a
    worker); ``gathered`` holds RUNNING map nodes whose elements have all ended, for the scheduler to
    end (see :mod:`nerv_cluster.mapping`).

    ``defs`` and ``plan`` are the definition's until a map expands; from then on they look the
    elements up too, and ``growth`` holds what the graph gained.
    """

    run_id: str
    definition: WorkflowDef
    plan: Plan
    defs: Mapping[str, TaskDef]
    tasks: PMap[str, TaskState]
    status: RunStatus = RunStatus.PENDING
    ready: IdSet = _NO_TASKS
    doomed: IdSet = _NO_TASKS
    running: IdSet = _NO_TASKS
    queued: IdSet = _NO_TASKS
    gathered: IdSet = _NO_TASKS
    #: The elements of expanded maps (``mapping.Growth``; the empty growth for a static run).
    growth: mapping.Growth = mapping.NO_GROWTH
    #: Tasks per status, indexed like ``_STATUSES`` (a tuple: cheaper to update than a map).
    tally: tuple[int, ...] = _NO_COUNTS
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    reason: str = ""
    cancel_requested: bool = False
    #: Why this run cannot go on (its submission is no valid workflow, or an event of it could not be
    #: applied); the scheduler fails it with this reason. Empty for a sound run.
    rejected: str = ""
    #: Bytes of the submitted definition's JSON, for the scheduler's submission bound.
    submitted_bytes: int = 0
    #: Reruns applied (WORKFLOW_RERUN_REQUESTED): the next one must carry this number plus one.
    reruns: int = 0
    #: Tasks completed from the cache (for progress).
    cached: int = 0
    #: RUNNING tasks whose attempt returned a workflow whose child run the scheduler has yet to create
    #: (or, after a rerun, whose failed child run it has yet to rerun: see :mod:`nerv_cluster.children`).
    spawning: IdSet = _NO_TASKS
    #: A child run rerun for a rerun of its parent task: the parent attempt its end is for now (0: the
    #: one its definition names). See :func:`parent_of`.
    parent_attempt: int = 0
    #: Durable waits (nerv_cluster/waits.py): WAITING tasks; those of them whose signal has arrived (the
    #: scheduler completes them); and the signals received, name -> payload (the first of a name wins),
    #: kept whether or not their node was reached yet.
    waiting: IdSet = _NO_TASKS
    woken: IdSet = _NO_TASKS
    signals: PMap[str, Any] = pmap()
    #: READY tasks held back for a concurrency key or a rate limit (see nerv_cluster/limits.py): the
    #: scheduler's gate releases them; deciding for the run does not look at them.
    held: IdSet = _NO_TASKS

    @property
    def name(self) -> str:
        """The workflow's name."""
        return self.definition.name

    @property
    def total(self) -> int:
        """Number of tasks (the elements of expanded maps included)."""
        return len(self.defs)

    @property
    def finished_tasks(self) -> int:
        """Number of tasks in a terminal status."""
        t = self.tally
        return sum(t[_AT[s]] for s in TERMINAL_TASK_STATUSES)

    @property
    def all_tasks_done(self) -> bool:
        """True when every task is terminal: the run can be finished."""
        return self.finished_tasks == self.total

    def count(self, status: TaskStatus) -> int:
        """How many tasks have ``status``."""
        return self.tally[_AT[status]]

    @property
    def counts(self) -> dict[str, int]:
        """Status name -> number of tasks in it (statuses with none left out)."""
        return {s.value: n for s, n in zip(_STATUSES, self.tally, strict=True) if n}


@dataclass(frozen=True, slots=True)
class State:
    """Every run the holder of this state knows of."""

    runs: PMap[str, RunState] = field(default_factory=pmap)


EMPTY = State()

# --------------------------------------------------------------------------------------------------
# helpers
#
# Handlers must use a run's maps linearly: go on with what ``set``/``discard`` return and never read a
# map of the ``run`` they were given after changing it, because inside fold_run those maps are drafts
# changed in place (tests/unit/test_fold.py checks the bulk path against the one-by-one one).


def _put(run: RunState, tid: str, old: TaskState, new: TaskState, **changes: Any) -> RunState:
    """Store ``new`` for ``tid``, keeping the per-status counts right, plus any RunState changes (a
    ``tasks`` or ``tally`` among them is built on instead of the run's)."""
    tally = changes.pop("tally", run.tally)
    tasks = changes.pop("tasks", run.tasks)
    if old.status != new.status:
        tally = _moved(tally, old.status, new.status)
        if new.status is TaskStatus.RUNNING:
            changes["running"] = run.running.set(tid, True)
        elif old.status is TaskStatus.RUNNING:
            changes["running"] = run.running.discard(tid)
        if new.status is TaskStatus.WAITING:
            changes["waiting"] = run.waiting.set(tid, True)
        elif old.status is TaskStatus.WAITING:
            changes["waiting"] = run.waiting.discard(tid)
            changes["woken"] = run.woken.discard(tid)
    if old.spawn is not None and new.status is not TaskStatus.RUNNING:
        # The attempt ended (cancelled, failed) before its child run was created: none will be.
        changes["spawning"] = run.spawning.discard(tid)
        new = new._replace(spawn=None)
    if old.held and (new.status is not TaskStatus.READY or new.dispatched):
        # Released (dispatched) or ended (cancelled, skipped by a rerun): no longer held.
        changes["held"] = changes.pop("held", run.held).discard(tid)
        # The hold's reason goes with it (an ending keeps the reason it brings).
        new = new._replace(held=False, reason="" if new.reason == old.reason else new.reason)
    was_queued = old.status is TaskStatus.READY and old.dispatched
    is_queued = new.status is TaskStatus.READY and new.dispatched
    if was_queued != is_queued:
        changes["queued"] = run.queued.set(tid, True) if is_queued else run.queued.discard(tid)
    return run._replace(tasks=tasks.set(tid, new), tally=tally, **changes)


def rule_outcome(rule: TriggerRule, n: int, ok: int, failed: int, skipped: int) -> bool | None:
    """True: the task may run now; False: it never can; None: not decided yet."""
    done = ok + failed + skipped
    if rule is TriggerRule.ALL_SUCCESS:
        return False if failed or skipped else (True if ok == n else None)
    if rule is TriggerRule.ALL_DONE:
        return True if done == n else None
    if rule is TriggerRule.ONE_FAILED:
        return True if failed else (False if done == n else None)
    # NONE_FAILED
    return False if failed else (True if done == n else None)


#: What settling a task's end changes: the run's ``tasks``, ``ready``, ``doomed``, ``tally`` and
#: ``gathered``.
Settled = tuple[PMap[str, TaskState], IdSet, IdSet, tuple[int, ...], IdSet]


def _settle(run: RunState, tid: str, outcome: TaskStatus, current: Settled | None = None) -> Settled:
    """Tell ``tid``'s dependents how it ended; move those whose rule is decided to ready or doomed,
    and a map node whose elements have all ended (``tid`` was its last) to gathered.

    Returns the run's new ``tasks``, ``ready``, ``doomed``, ``tally`` and ``gathered``, for the caller
    to store; built on ``current`` (the same five, changed since ``run`` was made) when given.
    """
    if current is None:
        tasks, ready, doomed, tally, gathered = run.tasks, run.ready, run.doomed, run.tally, run.gathered
    else:
        tasks, ready, doomed, tally, gathered = current
    defs, may_start, layers = run.defs, not run.cancel_requested, run.growth.layers
    dependents = run.plan.dependents[tid]
    if not dependents:
        return tasks, ready, doomed, tally, gathered
    for child in dependents:
        cs = tasks[child]
        ok, failed, skipped, status = cs.ok, cs.failed, cs.skipped, cs.status
        if outcome is TaskStatus.COMPLETED:
            ok += 1
        elif outcome is TaskStatus.FAILED:
            failed += 1
        else:
            skipped += 1
        if status is TaskStatus.PENDING and child not in doomed:
            td = defs[child]
            verdict = rule_outcome(td.trigger, len(td.dependencies), ok, failed, skipped)
            if verdict is True and may_start:
                tally = _moved(tally, TaskStatus.PENDING, TaskStatus.READY)
                status = TaskStatus.READY
                ready = ready.set(child, True)
            elif verdict is False:
                doomed = doomed.set(child, True)
        elif layers and status is TaskStatus.RUNNING:  # a map node counts its elements' ends
            layer = layers.get(child)
            if layer is not None:
                if not tid.startswith(child + "["):  # a dependency ending late (after a rerun reset
                    continue  # it) is no element: nothing to count
                if ok + failed + skipped == len(layer):
                    gathered = gathered.set(child, True)
        # One new TaskState per dependent: replacing is most of the cost of a fold.
        tasks = tasks.set(child, cs._replace(status=status, ok=ok, failed=failed, skipped=skipped))
    return tasks, ready, doomed, tally, gathered


def event_time(ev: Event) -> float:
    """When an event happened, on the one clock deadlines are measured on: Redis's, when the event was
    read from the log (``logged_at``), else its own ``ts`` (an event the scheduler made and folds
    straight away, on its clock, which follows Redis's). A worker's ``ts`` is its host's clock, which may
    be off by any amount: compared with the scheduler's, it timed tasks out at once or held retries back
    for hours."""
    return ev.ts if ev.logged_at is None else ev.logged_at


# Fields of an event's data that the fold keeps: checked here, because what the state holds is read by
# the scheduler (the watchdog, timers), by clients (timings) and by checkpoints, which must never meet
# a value of another type. A field of the wrong type raises ValueError: the fold rejects that run
# (:func:`_broken`), as for any event it cannot apply (tests/unit/test_fuzz_fold.py fuzzes this).


def _when(data: Mapping[str, Any], key: str, default: float | None) -> float | None:
    """``data[key]``, a finite number of seconds (``default`` when absent or None)."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} is not a finite number: {value!r:.80}")
    return value


def _text(data: Mapping[str, Any], key: str, default: str | None) -> str | None:
    """``data[key]``, a string (``default`` when absent or None)."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string: {value!r:.80}")
    return value


def _error(data: Mapping[str, Any], default: TaskError | None) -> TaskError | None:
    """The error an outcome carries (``default`` when none)."""
    err = data.get("error")
    return TaskError.from_dict(err) if err else default


def _next_attempt(ev: Event, ts: TaskState) -> int:
    """The attempt a TASK_RETRYING / TASK_PENDING starts: after the current one (every writer gives
    ``attempt + 1``). An earlier or equal number would reuse an attempt whose outcome slot is taken: the
    task could never finish."""
    value = ev.data.get("next_attempt", ts.attempt + 1)
    if isinstance(value, bool) or not isinstance(value, int) or value <= ts.attempt:
        raise ValueError(f"next_attempt {value!r:.80} does not follow attempt {ts.attempt}")
    return value


def _due_at(ev: Event) -> float | None:
    """When the next attempt after a TASK_RETRYING may start: the logged time plus the delay the failure
    recorded (the writer's own ``due_at`` is on its clock, used only for events made in memory)."""
    delay = _when(ev.data, "delay", None)
    if ev.logged_at is not None and delay is not None:
        return ev.logged_at + delay
    return _when(ev.data, "due_at", None)


def _finish(
    run: RunState,
    ev: Event,
    tid: str,
    ts: TaskState,
    status: TaskStatus,
    run_changes: Mapping[str, Any] | None = None,
    **fields: Any,
) -> RunState:
    """End task ``tid`` with a terminal ``status`` and settle its dependents (``run_changes``: other
    RunState fields to set in the same new RunState; ``fields``: the task's)."""
    new = ts._replace(status=status, finished_at=ev.ts, dispatched=ts.dispatched, **fields)
    # Dependents first, then the task itself, so that one new RunState holds both: a task is never its
    # own dependent (the planner refuses that), so the order changes nothing.
    tasks, ready, doomed, tally, gathered = _settle(run, tid, status)
    if tid in gathered:
        gathered = gathered.discard(tid)
    return _put(
        run,
        tid,
        ts,
        new,
        tasks=tasks,
        tally=tally,
        ready=ready.discard(tid),
        doomed=doomed.discard(tid),
        gathered=gathered,
        **(run_changes or {}),
    )


# --------------------------------------------------------------------------------------------------
# transitions: one function per event type, (run, event) -> run; returning ``run`` means "no change".


def _wf_started(run: RunState, ev: Event) -> RunState:
    if run.status is not RunStatus.PENDING:
        return run
    return run._replace(status=RunStatus.RUNNING, started_at=ev.ts)


def _wf_end(status: RunStatus) -> Callable[[RunState, Event], RunState]:
    def handler(run: RunState, ev: Event) -> RunState:
        if run.status.terminal:
            return run
        return run._replace(status=status, finished_at=ev.ts, reason=str(ev.data.get("reason", "")))

    return handler


def _cancel_requested(run: RunState, ev: Event) -> RunState:
    if run.cancel_requested or run.status.terminal:
        return run
    return run._replace(cancel_requested=True, reason=str(ev.data.get("reason", "cancelled")))


def _current(run: RunState, ev: Event) -> tuple[str, TaskState] | None:
    """The task an event is about, if the event is for its current attempt."""
    tid = ev.task_id
    if tid is None:
        return None
    ts = run.tasks.get(tid)
    if ts is None or ev.attempt != ts.attempt:
        return None
    return tid, ts


def _dispatched(run: RunState, ev: Event) -> RunState:
    cur = _current(run, ev)
    if cur is None or cur[1].status is not TaskStatus.READY or cur[1].dispatched:
        return run
    tid, ts = cur
    if run.defs[tid].over is not None:  # a map node is expanded, never sent to a worker
        return run
    key = ev.data.get("cache_key")
    slot = ev.data.get("slot")
    new = ts._replace(
        dispatched=True,
        dispatched_at=ev.ts,
        due_at=None,
        cache_key=key if isinstance(key, str) else ts.cache_key,
        slot=slot if isinstance(slot, str) else None,
    )
    return _put(run, tid, ts, new, ready=run.ready.discard(tid))


def _held(run: RunState, ev: Event) -> RunState:
    """TASK_HELD: a ready task waits for a concurrency slot or a rate limit's next free start (limits,
    issue 11): out of ``ready`` (deciding for the run skips it), into ``held`` until released."""
    cur = _current(run, ev)
    if cur is None or cur[1].status is not TaskStatus.READY or cur[1].dispatched or cur[1].held:
        return run
    tid, ts = cur
    new = ts._replace(held=True, reason=str(ev.data.get("reason", "")))
    return _put(run, tid, ts, new, ready=run.ready.discard(tid), held=run.held.set(tid, True))


def _started(run: RunState, ev: Event) -> RunState:
    cur = _current(run, ev)
    if cur is None or cur[1].status not in _ACTIVE or cur[1].spawn is not None or cur[1].child:
        return run
    tid, ts = cur
    worker = _text(ev.data, "worker", None)
    via = _text(ev.data, "via", None)
    # The start on the log's clock: the watchdog measures the time limit from it.
    at = event_time(ev)
    if ts.status is TaskStatus.RUNNING:
        # Another process took the attempt over (its first worker died); idempotent for a replay.
        if worker == ts.worker or at <= (ts.started_at or 0):
            return run
        # The first process was lost: that counts towards the poison-task bound like a re-dispatch,
        # unless it held the attempt only as part of a batch claim (it may never have started it).
        new = ts._replace(
            worker=worker,
            started_at=at,
            lost=ts.lost + (0 if ts.batch else 1),
            via=via,
            batch=bool(ev.data.get("batch")),
            claim=_text(ev.data, CLAIM_KEY, None),
        )
        return _put(run, tid, ts, new)
    new = ts._replace(
        status=TaskStatus.RUNNING,
        dispatched=True,
        started_at=at,
        worker=worker,
        via=via,
        batch=bool(ev.data.get("batch")),
        claim=_text(ev.data, CLAIM_KEY, None),
    )
    return _put(run, tid, ts, new, ready=run.ready.discard(tid))


def _completed(run: RunState, ev: Event) -> RunState:
    cur = _current(run, ev)
    if cur is None or cur[1].status not in _OPEN:
        return run
    tid, ts = cur
    # A completion from the cache (the scheduler's, see nerv_cluster.caching) names its source.
    data = ev.data
    cached_from = str(data.get("cached_from", "")) if data.get("cached") is True else None
    return _finish(
        run,
        ev,
        tid,
        ts,
        TaskStatus.COMPLETED,
        # The run's count of hits in the same new RunState (a run of hits is nearly all such events).
        None if cached_from is None else {"cached": run.cached + 1},
        result=data.get("result"),
        worker=_text(data, "worker", ts.worker),
        started_at=_when(data, "started_at", ts.started_at),
        cached_from=cached_from,
    )


def _cache_hits(run: RunState, ev: Event) -> RunState:
    """CACHE_HITS: each hit as a TASK_COMPLETED from the cache of its task's current attempt (see
    :func:`nerv_cluster.caching.expand`, which gives readers exactly those events).

    A hit of a READY task no worker was sent (every hit the scheduler decides) changes only the run's
    tasks, counts and settled dependents, so those are carried from hit to hit and the run is rebuilt
    once; any other hit (a crafted or replayed one) goes through :func:`_finish` like a TASK_COMPLETED.
    """
    settled: Settled = (run.tasks, run.ready, run.doomed, run.tally, run.gathered)
    cached = run.cached
    for tid, attempt, result, source in caching.hit_rows(ev):
        tasks = settled[0]
        ts = tasks.get(tid)
        if ts is None or attempt != ts.attempt or ts.status not in _OPEN:
            continue
        if ts.status is not TaskStatus.READY or ts.dispatched or ts.held or ts.spawn is not None:
            run = _carry(run, settled, cached)
            run = _finish(
                run,
                ev,
                tid,
                ts,
                TaskStatus.COMPLETED,
                {"cached": cached + 1},
                result=result,
                cached_from=source,
            )
            settled, cached = (run.tasks, run.ready, run.doomed, run.tally, run.gathered), run.cached
            continue
        # As _finish and _put do for READY -> COMPLETED: no running, waiting, held or queued change.
        new = ts._replace(status=TaskStatus.COMPLETED, finished_at=ev.ts, result=result, cached_from=source)
        tasks, ready, doomed, tally, gathered = _settle(run, tid, TaskStatus.COMPLETED, settled)
        if tid in gathered:
            gathered = gathered.discard(tid)
        settled = (
            tasks.set(tid, new),
            ready.discard(tid),
            doomed.discard(tid),
            _moved(tally, TaskStatus.READY, TaskStatus.COMPLETED),
            gathered,
        )
        cached += 1
    return _carry(run, settled, cached)


def _carry(run: RunState, settled: Settled, cached: int) -> RunState:
    """``run`` with what :func:`_cache_hits` carried (itself when nothing changed)."""
    tasks, ready, doomed, tally, gathered = settled
    if tasks is run.tasks and cached == run.cached:
        return run
    return run._replace(
        tasks=tasks, ready=ready, doomed=doomed, tally=tally, gathered=gathered, cached=cached
    )


def _failed(run: RunState, ev: Event) -> RunState:
    cur = _current(run, ev)
    if cur is None or cur[1].status not in _OPEN:
        return run
    tid, ts = cur
    return _finish(
        run,
        ev,
        tid,
        ts,
        TaskStatus.FAILED,
        error=_error(ev.data, None),
        worker=_text(ev.data, "worker", ts.worker),
        started_at=_when(ev.data, "started_at", ts.started_at),
        reason=str(ev.data.get("reason", "")),
    )


def _again(run: RunState, ev: Event) -> RunState:
    """TASK_RETRYING / TASK_PENDING: the current attempt is over; a new one waits for dispatch."""
    cur = _current(run, ev)
    if cur is None or cur[1].status not in _ACTIVE or run.cancel_requested:
        return run
    tid, ts = cur
    if run.growth.layers and tid in run.growth.layers:  # an expanded map node never expands again
        return run
    attempt = _next_attempt(ev, ts)
    new = ts._replace(
        status=TaskStatus.READY,
        # A lost worker counts towards the poison bound, unless the verdict says it does not (the
        # attempt was only claimed in a batch: see TaskState.batch).
        lost=ts.lost + (1 if ev.type is EventType.TASK_PENDING and ev.data.get("counted", True) else 0),
        attempt=attempt,
        # A new attempt that is no retry (a child run a rerun could not rerun): its round starts there.
        first=attempt if ev.data.get("fresh") is True else ts.first,
        dispatched=False,
        due_at=_due_at(ev),
        error=_error(ev.data, ts.error),
        reason=str(ev.data.get("reason", "")),
        child=None,  # a new attempt starts a new child, if it returns a workflow again
    )
    return _put(run, tid, ts, new, ready=run.ready.set(tid, True))


def _spawned(run: RunState, ev: Event) -> RunState:
    """TASK_SPAWNED: the attempt returned a workflow; the task waits (RUNNING, off the watchdog's
    ``running``) for the scheduler to create its child run."""
    cur = _current(run, ev)
    if cur is None or cur[1].status not in _ACTIVE or cur[1].spawn is not None or cur[1].child:
        return run
    tid, ts = cur
    raw = ev.data.get("workflow")
    if not isinstance(raw, dict):
        raise ValueError("TASK_SPAWNED carries no workflow definition")
    new = ts._replace(
        status=TaskStatus.RUNNING,
        dispatched=True,
        spawn=raw,
        worker=_text(ev.data, "worker", ts.worker),
        started_at=_when(ev.data, "started_at", ts.started_at if ts.started_at is not None else ev.ts),
    )
    out = _put(run, tid, ts, new, ready=run.ready.discard(tid), spawning=run.spawning.set(tid, True))
    return out._replace(running=out.running.discard(tid))


def _child_started(run: RunState, ev: Event) -> RunState:
    """CHILD_STARTED: the child run of the current attempt exists; the task waits for its end."""
    cur = _current(run, ev)
    if cur is None or cur[1].spawn is None or cur[1].status is not TaskStatus.RUNNING:
        return run
    tid, ts = cur
    child = ev.data.get("child")
    if not isinstance(child, str) or not child:
        raise ValueError("CHILD_STARTED names no child run")
    return _put(run, tid, ts, ts._replace(spawn=None, child=child), spawning=run.spawning.discard(tid))


def _skipped(run: RunState, ev: Event) -> RunState:
    tid = ev.task_id
    ts = run.tasks.get(tid) if tid is not None else None
    if tid is None or ts is None or ts.status is not TaskStatus.PENDING:
        return run
    return _finish(run, ev, tid, ts, TaskStatus.SKIPPED, reason=str(ev.data.get("reason", "")))


def _cancelled(run: RunState, ev: Event) -> RunState:
    tid = ev.task_id
    ts = run.tasks.get(tid) if tid is not None else None
    if tid is None or ts is None or ts.status.terminal:
        return run
    return _finish(run, ev, tid, ts, TaskStatus.CANCELLED, reason=str(ev.data.get("reason", "cancelled")))


def _waiting(run: RunState, ev: Event) -> RunState:
    """TASK_WAITING: a READY wait node was reached; WAITING from now, its deadline counted from the
    event's logged time (see :mod:`nerv_cluster.waits`); woken at once if its signal came first.

    The scheduler folds its own TASK_WAITING at once, before the log dated it (``logged_at`` None: the
    deadline counts from its ``ts``), then reads the same event back from the log: that copy (the same
    ``ts``) moves the deadline to the logged time, so the state it holds is the one any refold builds."""
    cur = _current(run, ev)
    if cur is None or cur[1].dispatched:
        return run
    tid, ts = cur
    spec = run.defs[tid].wait
    if spec is None:  # only a wait node waits
        return run
    since = event_time(ev)
    if ts.status is TaskStatus.WAITING:
        if ev.logged_at is None or ts.started_at != ev.ts or since == ev.ts:
            return run
        # The logged copy of the event this node was made WAITING by (in memory): date it by the log.
        return _put(run, tid, ts, ts._replace(started_at=since, due_at=waits.deadline(spec, since)))
    if ts.status is not TaskStatus.READY:
        return run
    new = ts._replace(status=TaskStatus.WAITING, started_at=since, due_at=waits.deadline(spec, since))
    out = _put(run, tid, ts, new, ready=run.ready.discard(tid))
    name = waits.signal_of(run.defs[tid])
    if name is not None and name in out.signals:
        out = out._replace(woken=out.woken.set(tid, True))
    return out


def _signal(run: RunState, ev: Event) -> RunState:
    """SIGNAL_RECEIVED: keep the payload (the first signal of a name wins); wake its node if it waits."""
    name = ev.data.get("name")
    if not isinstance(name, str) or name in run.signals:
        return run
    out = run._replace(signals=run.signals.set(name, ev.data.get("payload")))
    tid = waits.task_for(run, name)
    if tid is not None and run.tasks[tid].status is TaskStatus.WAITING:
        out = out._replace(woken=out.woken.set(tid, True))
    return out


def _rerun_requested(run: RunState, ev: Event) -> RunState:
    """WORKFLOW_RERUN_REQUESTED: a finished run goes on (see :func:`nerv_cluster.rerun.requested`)."""
    # Imported here: the rerun module builds on this one (its states and rule_outcome).
    from nerv_cluster import rerun

    return rerun.requested(run, ev)


def outcome_counts(run: RunState, deps: Iterable[str]) -> tuple[int, int, int]:
    """(ok, failed, skipped) over ``deps`` that ended, counted as ``_settle`` counts them (CANCELLED
    counts as skipped; a task not ended counts for none)."""
    ok = failed = skipped = 0
    tasks = run.tasks
    for d in deps:
        status = tasks[d].status
        if status is TaskStatus.COMPLETED:
            ok += 1
        elif status is TaskStatus.FAILED:
            failed += 1
        elif status.terminal:
            skipped += 1
    return ok, failed, skipped


def _map_expanded(run: RunState, ev: Event) -> RunState:
    """MAP_EXPANDED: the map node's elements join the run (see :mod:`nerv_cluster.mapping`).

    Only for a READY map node not yet expanded whose list (recomputed from the state, the event only
    confirms its width) has the logged width: anything else changes nothing. O(width).
    """
    cur = _current(run, ev)
    if cur is None:
        return run
    tid, ts = cur
    td = run.defs[tid]
    if td.over is None or ts.status is not TaskStatus.READY or ts.dispatched or tid in run.growth.layers:
        return run
    src = mapping.source_of(run, tid)
    if not isinstance(src, mapping.Source) or ev.data.get("width") != src.width:
        return run
    grown = mapping.grow(run.defs, run.plan, run.growth, td, src)
    may_start = not run.cancel_requested
    base = outcome_counts(run, src.others)
    tasks, tally = run.tasks, list(run.tally)
    states: dict[str, TaskState] = {}
    ready: dict[str, bool] = {}
    doomed: dict[str, bool] = {}
    shared: dict[tuple[TaskStatus, int, int, int], TaskState] = {}  # one TaskState per distinct start
    for e in grown.elements:
        ok, failed, skipped = base
        if src.feed is not None:  # B[i] follows A[i]: count how A[i] ended, if it has
            up = tasks[e.dependencies[0]].status
            if up is TaskStatus.COMPLETED:
                ok += 1
            elif up is TaskStatus.FAILED:
                failed += 1
            elif up.terminal:
                skipped += 1
        verdict = rule_outcome(e.trigger, len(e.dependencies), ok, failed, skipped)
        status = TaskStatus.READY if verdict is True and may_start else TaskStatus.PENDING
        if status is TaskStatus.READY:
            ready[e.id] = True
        elif verdict is False:
            doomed[e.id] = True
        key = (status, ok, failed, skipped)
        state = shared.get(key)
        if state is None:
            state = shared[key] = TaskState(status=status, ok=ok, failed=failed, skipped=skipped)
        states[e.id] = state
        tally[_AT[status]] += 1
    # The maps following this one element-wise: its expansion is their dependency met, counted as the
    # outcome that lets some element run (a failure for one_failed: B[i] runs where A[i] failed), so
    # such a map is SKIPPED only when no element of it could ever run; each element's own rule decides.
    new_ready, new_doomed = _set_all(run.ready, ready), _set_all(run.doomed, doomed)
    for b in grown.followers:
        bs = tasks[b]
        bd = grown.defs[b]
        status, ok, failed = bs.status, bs.ok, bs.failed
        if bd.trigger is TriggerRule.ONE_FAILED:
            failed += 1
        else:
            ok += 1
        if status is TaskStatus.PENDING and b not in new_doomed:
            verdict = rule_outcome(bd.trigger, len(bd.dependencies), ok, failed, bs.skipped)
            if verdict is True and may_start:
                tally[_AT[TaskStatus.PENDING]] -= 1
                tally[_AT[TaskStatus.READY]] += 1
                status = TaskStatus.READY
                new_ready = new_ready.set(b, True)
            elif verdict is False:
                new_doomed = new_doomed.set(b, True)
        states[b] = bs._replace(status=status, ok=ok, failed=failed)
    # The map node runs while its elements do, its counters counting their ends; not in ``running``:
    # no worker holds it.
    tally[_AT[TaskStatus.READY]] -= 1
    tally[_AT[TaskStatus.RUNNING]] += 1
    states[tid] = ts._replace(status=TaskStatus.RUNNING, started_at=event_time(ev), ok=0, failed=0, skipped=0)
    gathered = run.gathered.set(tid, True) if not grown.elements else run.gathered
    return run._replace(
        defs=grown.defs,
        plan=grown.plan,
        growth=grown.growth,
        tasks=_set_all(tasks, states),
        ready=new_ready.discard(tid),
        doomed=new_doomed,
        gathered=gathered,
        tally=tuple(tally),
    )


_HANDLERS: dict[EventType, Callable[[RunState, Event], RunState]] = {
    EventType.WORKFLOW_STARTED: _wf_started,
    EventType.WORKFLOW_COMPLETED: _wf_end(RunStatus.COMPLETED),
    EventType.WORKFLOW_FAILED: _wf_end(RunStatus.FAILED),
    EventType.WORKFLOW_CANCELLED: _wf_end(RunStatus.CANCELLED),
    EventType.WORKFLOW_CANCEL_REQUESTED: _cancel_requested,
    EventType.TASK_DISPATCHED: _dispatched,
    EventType.TASK_STARTED: _started,
    EventType.TASK_COMPLETED: _completed,
    EventType.CACHE_HITS: _cache_hits,
    EventType.TASK_FAILED: _failed,
    EventType.TASK_RETRYING: _again,
    EventType.TASK_PENDING: _again,
    EventType.TASK_SKIPPED: _skipped,
    EventType.TASK_CANCELLED: _cancelled,
    # Circuit transitions concern a task function, not the run's state (see nerv_cluster.circuits).
    EventType.CIRCUIT_OPENED: lambda run, ev: run,
    EventType.CIRCUIT_HALF_OPENED: lambda run, ev: run,
    EventType.CIRCUIT_CLOSED: lambda run, ev: run,
    # idem (issue 11): schedule events concern a schedule, never a run (see nerv_cluster.schedules).
    EventType.SCHEDULE_SET: lambda run, ev: run,
    EventType.SCHEDULE_PAUSED: lambda run, ev: run,
    EventType.SCHEDULE_RESUMED: lambda run, ev: run,
    EventType.SCHEDULE_TRIGGERED: lambda run, ev: run,
    EventType.SCHEDULE_DELETED: lambda run, ev: run,
    EventType.SCHEDULE_FIRED: lambda run, ev: run,
    EventType.SCHEDULE_SKIPPED: lambda run, ev: run,
    EventType.SCHEDULES_SNAPSHOT: lambda run, ev: run,
    # rerun (issue 16)
    EventType.WORKFLOW_RERUN_REQUESTED: _rerun_requested,
    # Child runs (issue 16, part "child").
    EventType.TASK_SPAWNED: _spawned,
    EventType.CHILD_STARTED: _child_started,
    # Durable waits (issue 11, part "waits").
    EventType.TASK_WAITING: _waiting,
    EventType.SIGNAL_RECEIVED: _signal,
    # Limits (issue 11, part "limits"). LIMIT_SET belongs to no run (the gate folds it).
    EventType.TASK_HELD: _held,
    EventType.LIMIT_SET: lambda run, ev: run,
    # -- map (issue 16)
    EventType.MAP_EXPANDED: _map_expanded,
}


def _tasks_map(tasks: Mapping[str, TaskState]) -> PMap[str, TaskState]:
    """The PMap of a run's tasks, sized the same way whether built at submit or frozen by fold_run, so
    both lay a static run out, and iterate it, alike (a map's elements, added later, may lie
    differently in the two: equal maps, iterated in another order)."""
    return pmap(tasks, pre_size=len(tasks) * 2)


def new_run(
    run_id: str,
    definition: WorkflowDef,
    submitted_at: float,
    the_plan: Plan | None = None,
    *,
    drafts: bool = False,
) -> RunState:
    """The state of a freshly submitted run: roots READY, everything else PENDING.

    ``drafts`` (for :func:`fold_run` only) makes its maps drafts straight away rather than PMaps to be
    copied into drafts at once.
    """
    the_plan = the_plan or plan(definition.tasks)
    defs = {t.id: t for t in definition.tasks}
    roots = [t.id for t in definition.tasks if not t.dependencies]
    tasks = dict.fromkeys(defs, TaskState())  # TaskState is immutable: one shared default is fine
    root = TaskState(status=TaskStatus.READY)
    for r in roots:
        tasks[r] = root
    tally = tuple(
        len(defs) - len(roots) if s is TaskStatus.PENDING else len(roots) if s is TaskStatus.READY else 0
        for s in _STATUSES
    )
    if drafts:
        # Fresh drafts for every map: the shared empty defaults must never be changed in place.
        return RunState(
            run_id=run_id,
            definition=definition,
            plan=the_plan,
            defs=defs,
            tasks=_draft(tasks),
            ready=_draft(dict.fromkeys(roots, True)),
            doomed=_draft({}),
            running=_draft({}),
            queued=_draft({}),
            gathered=_draft({}),
            spawning=_draft({}),
            held=_draft({}),
            tally=tally,
            submitted_at=submitted_at,
        )
    return RunState(
        run_id=run_id,
        definition=definition,
        plan=the_plan,
        defs=defs,
        tasks=_tasks_map(tasks),
        ready=pmap(dict.fromkeys(roots, True)),
        tally=tally,
        submitted_at=submitted_at,
    )


def _created(ev: Event, drafts: bool = False) -> RunState:
    """The run a WORKFLOW_SUBMITTED event creates: a sound one, or a rejected one (see
    :mod:`nerv_cluster.intake`) that the scheduler fails, whatever was written into the log."""
    raw = ev.data.get("workflow")
    try:
        definition, the_plan, size = intake.accept(ev.run_id, raw)
    except Exception as exc:  # anything at all: one bad submission must never stop the fold
        return _rejected_run(ev, raw, f"invalid submission: {intake.describe(exc)}")
    run = new_run(ev.run_id, definition, ev.ts, the_plan, drafts=drafts)
    return run._replace(submitted_bytes=size)


def apply_submitted(state: State, ev: Event, accepted: tuple[WorkflowDef, Plan, int]) -> State:
    """``apply(state, ev)`` for a WORKFLOW_SUBMITTED whose workflow :func:`intake.accept` accepted
    already, as ``accepted`` (the scheduler's intake checks a submission before it writes it): the same
    run, without checking and planning a big definition a second time."""
    if ev.run_id in state.runs:
        return state
    definition, the_plan, size = accepted
    run = new_run(ev.run_id, definition, ev.ts, the_plan)._replace(submitted_bytes=size)
    return State(runs=state.runs.set(ev.run_id, run))


def _rejected_run(ev: Event, raw: Any, reason: str) -> RunState:
    """A run with no tasks that only waits to be failed with ``reason``."""
    name = raw.get("name") if isinstance(raw, dict) else None
    return RunState(
        run_id=ev.run_id,
        definition=WorkflowDef(name=name if isinstance(name, str) else "?", tasks=()),
        plan=_NO_PLAN,
        defs={},
        tasks=pmap(),
        submitted_at=ev.ts,
        rejected=reason,
    )


def _broken(run: RunState, ev: Event, exc: Exception) -> RunState:
    """``run`` after its handler raised on ``ev``: rejected (the scheduler fails it), never raising."""
    where = f"{ev.type.value} of task {ev.task_id!r}" if ev.task_id is not None else ev.type.value
    return run._replace(
        rejected=f"event {ev.id!r:.80} ({where}) could not be applied: {intake.describe(exc)}"
    )


def apply_to_run(run: RunState | None, ev: Event) -> RunState | None:
    """Apply one event to one run's state (None before the run was submitted).

    Never raises for a run's events: a handler that raises rejects that run (``RunState.rejected``),
    so one bad event fails its own run instead of every run of the fold; a rejected run takes only
    its end events from then on.
    """
    if ev.type is EventType.WORKFLOW_SUBMITTED:
        return _created(ev) if run is None else run
    if run is None:
        return None
    if run.rejected and ev.type not in WORKFLOW_END_EVENTS:
        return run
    handler = _HANDLERS.get(ev.type)
    if handler is None:  # a type this fold has no transition for changes nothing
        return run
    try:
        return handler(run, ev)
    except Exception as exc:
        return _broken(run, ev, exc)


def _thaw(run: RunState) -> RunState:
    """``run`` with a fresh draft of each of its maps: O(size of the run); ``run`` itself is untouched."""
    return run._replace(
        tasks=_draft(run.tasks),
        ready=_draft(run.ready),
        doomed=_draft(run.doomed),
        running=_draft(run.running),
        queued=_draft(run.queued),
        gathered=_draft(run.gathered),
        spawning=_draft(run.spawning),
        held=_draft(run.held),
    )


def _freeze(run: RunState) -> RunState:
    """``run`` with each draft made a PMap again, built in one go (no evolver per key)."""
    return run._replace(
        tasks=_tasks_map(run.tasks),
        ready=pmap(run.ready),
        doomed=pmap(run.doomed),
        running=pmap(run.running),
        queued=pmap(run.queued),
        gathered=pmap(run.gathered),
        spawning=pmap(run.spawning),
        held=pmap(run.held),
    )


def fold_run(run: RunState | None, events: Iterable[Event]) -> RunState | None:
    """Apply events in order to one run (None before it was submitted): the bulk path.

    The result equals ``apply_to_run`` event by event, but the run's maps are thawed into drafts once,
    changed in place by the same handlers, and frozen once at the end: O(size of the run + events)
    instead of a persistent-map update (an evolver, microseconds on a big map) per change. So it pays
    when the events are many next to the run's size: rebuilding a run from its log, or a run created
    by these very events; for a few events into a big run, apply them one by one (:func:`fold` chooses
    per run). ``run`` is never changed, and is returned itself when no event changed it.
    """
    cur = None if run is None else _thaw(run)
    changed = False
    for ev in events:
        if cur is None:
            if ev.type is EventType.WORKFLOW_SUBMITTED:
                cur, changed = _created(ev, drafts=True), True
            continue  # events before the submit change nothing, as in apply_to_run
        new = apply_to_run(cur, ev) or cur  # never None: the run exists
        if new is not cur:
            cur, changed = new, True
    if cur is None or not changed:
        return run
    return _freeze(cur)


#: The bulk path pays for a run when its events number at least 1/_BULK_RATIO of its tasks. Thawing and
#: freezing cost ~1.5 us per task; one by one, each event costs some 25 us more than in bulk on a
#: 50,000-task run (PMap updates, each an evolver) and several times that on a 333,000-task one (GC work
#: over the persistent maps' nodes). Measured, bulk time / one-by-one time for k events into a half-done
#: run of n tasks: n=50,000: k=n/32 1.0-1.5, n/16 0.8, n/8 0.5, n/4 0.4; n=333,333: n/16 0.15, n/8 0.1.
#: So break-even is near n/20; from n/8 on, bulk wins by 2x or more at either size, noise included.
_BULK_RATIO = 8


def _bulk_pays(run: RunState | None, n_events: int) -> bool:
    """Whether folding ``n_events`` events into ``run`` should take :func:`fold_run`: always for a run
    not yet known (it is created by these events, straight into drafts), otherwise when the events are
    many next to the run's size (thawing a 250,000-task run to apply 3 events would cost O(n))."""
    return run is None or n_events * _BULK_RATIO >= len(run.tasks)


def apply(state: State, ev: Event) -> State:
    """Apply one event to the whole state. Pure, and idempotent for every event."""
    run = state.runs.get(ev.run_id)
    new = apply_to_run(run, ev)
    if new is run or new is None:
        return state
    return State(runs=state.runs.set(ev.run_id, new))


def fold(events: Iterable[Event], state: State = EMPTY) -> State:
    """Apply events in order: the same result as :func:`apply` event by event, and ``state`` itself
    when nothing changed.

    Runs are independent, so the events are grouped by run (each run's in order) and each run is folded
    on its own, by :func:`fold_run` where that pays (see :func:`_bulk_pays`), else event by event.
    Events of a run neither known nor submitted among them change nothing, as in :func:`apply`.
    """
    by_run: dict[str, list[Event]] = {}
    weight: dict[str, int] = {}  # changes per run: a CACHE_HITS counts as its hits
    for ev in events:
        rid = ev.run_id
        evs = by_run.get(rid)
        if evs is None:
            by_run[rid] = [ev]
            weight[rid] = 0
        else:
            evs.append(ev)
        hits = ev.data.get("hits") if ev.type is EventType.CACHE_HITS else None
        weight[rid] += len(hits) if isinstance(hits, list) else 1
    runs = state.runs
    changed: dict[str, RunState] = {}
    for run_id, evs in by_run.items():
        old = runs.get(run_id)
        if _bulk_pays(old, weight[run_id]):
            new = fold_run(old, evs)
        else:
            new = old
            for ev in evs:
                new = apply_to_run(new, ev)
        if new is not None and new is not old:
            changed[run_id] = new
    return State(runs=runs.update(changed)) if changed else state


def evict(state: State, run_id: str) -> State:
    """Forget a run (the scheduler does this once a run is finished, to keep memory bounded)."""
    return State(runs=state.runs.discard(run_id))


# --------------------------------------------------------------------------------------------------
# projections


def task_result(run: RunState, tid: str) -> TaskResult:
    """Everything known about one task."""
    ts = run.tasks[tid]
    return TaskResult(
        task_id=tid,
        name=run.defs[tid].name,
        status=ts.status,
        result=mapping.result_of(run, tid) if run.growth.layers else ts.result,
        error=ts.error,
        attempts=ts.attempt if ts.dispatched else ts.attempt - 1,
        worker=ts.worker,
        dispatched_at=ts.dispatched_at,
        started_at=ts.started_at,
        finished_at=ts.finished_at,
        reason=ts.reason,
        cached=ts.cached_from is not None,
        cached_from=ts.cached_from,
        child=ts.child,
    )


class TaskResults(Mapping[str, TaskResult]):
    """Task id -> :class:`TaskResult` of a run, in the order the tasks were added, each made when first
    read: ``client.wait`` on a big run returns without building a result per task nobody reads."""

    __slots__ = ("_made", "_run")

    def __init__(self, run: RunState) -> None:
        self._run = run
        self._made: dict[str, TaskResult] = {}

    def __getitem__(self, tid: str) -> TaskResult:
        made = self._made.get(tid)
        if made is None:
            if tid not in self._run.defs:
                raise KeyError(tid)
            made = self._made[tid] = task_result(self._run, tid)
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.defs)

    def __len__(self) -> int:
        return len(self._run.defs)

    def __contains__(self, tid: object) -> bool:
        return tid in self._run.defs

    def __repr__(self) -> str:
        return repr(dict(self.items()))


@dataclass(frozen=True, slots=True)
class RunResult:
    """A run as the client sees it: its status, every task's :class:`TaskResult`, and timings."""

    run_id: str
    name: str
    status: RunStatus
    tasks: Mapping[str, TaskResult]
    reason: str = ""
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    #: For a child run: the task attempt it belongs to (its result becomes that task's result).
    parent: ParentRef | None = None
    #: How deep the run is nested under a run a client submitted (0 for those).
    depth: int = 0
    #: The run's output (``Workflow.output``; else the only sink's result, else sink id -> result).
    output: Any = None

    @property
    def results(self) -> dict[str, Any]:
        """Task id -> result value, for every COMPLETED task."""
        return {tid: t.result for tid, t in self.tasks.items() if t.status is TaskStatus.COMPLETED}

    @property
    def errors(self) -> dict[str, TaskError]:
        """Task id -> error, for every task whose last attempt failed."""
        return {tid: t.error for tid, t in self.tasks.items() if t.error is not None}

    @property
    def counts(self) -> dict[str, int]:
        """Status name -> number of tasks in it."""
        out: dict[str, int] = {}
        for t in self.tasks.values():
            out[t.status.value] = out.get(t.status.value, 0) + 1
        return out

    @property
    def done(self) -> bool:
        """True when the run is over."""
        return self.status.terminal

    @property
    def duration(self) -> float | None:
        """Seconds from submit to the end, when it ended."""
        return None if self.finished_at is None else self.finished_at - self.submitted_at

    def raise_for_status(self) -> RunResult:
        """Return self when COMPLETED; raise :class:`TaskFailedError` with the reason otherwise."""
        if self.status is not RunStatus.COMPLETED:
            raise TaskFailedError(f"run {self.run_id} is {self.status.value}: {self.reason}".rstrip(": "))
        return self


def run_result(run: RunState) -> RunResult:
    """Project a run's state to the client's view."""
    return RunResult(
        run_id=run.run_id,
        name=run.name,
        status=run.status,
        tasks=TaskResults(run),
        reason=run.reason,
        submitted_at=run.submitted_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        parent=parent_of(run),
        depth=run.definition.depth,
        output=run_output(run),
    )


def parent_of(run: RunState) -> ParentRef | None:
    """The task attempt a child run belongs to now: its definition's, with the attempt a rerun of the
    parent task moved it to (``RunState.parent_attempt``); None for a run without a parent."""
    ref = run.definition.parent
    if ref is None or not run.parent_attempt:
        return ref
    return ParentRef(ref.run_id, ref.task_id, run.parent_attempt)


def sinks(run: RunState) -> list[str]:
    """Tasks no other task depends on, in definition order."""
    dependents = run.plan.dependents
    return [tid for tid in run.defs if not dependents[tid]]


def run_output(run: RunState) -> Any:
    """A run's output: the result of the task ``Workflow.output`` named, else of the only sink, else a
    dict sink id -> result (a task that did not complete counts as None). What a child run's parent
    task completes with."""
    tasks = run.tasks

    def result(tid: str) -> Any:
        ts = tasks[tid]
        return ts.result if ts.status is TaskStatus.COMPLETED else None

    named = run.definition.meta.get("output")
    if isinstance(named, str) and named in tasks:
        return result(named)
    ends = sinks(run)
    if len(ends) == 1:
        return result(ends[0])
    return {tid: result(tid) for tid in ends}


def task_statuses(run: RunState) -> dict[str, TaskStatus]:
    """Task id -> status."""
    return {tid: ts.status for tid, ts in run.tasks.items()}


def results(run: RunState) -> dict[str, Any]:
    """Task id -> result, for COMPLETED tasks (a map node's: its elements' results)."""
    return {
        tid: mapping.result_of(run, tid) for tid, ts in run.tasks.items() if ts.status is TaskStatus.COMPLETED
    }


def completed(run: RunState) -> list[str]:
    """Ids of COMPLETED tasks."""
    return [tid for tid, ts in run.tasks.items() if ts.status is TaskStatus.COMPLETED]


def failed(run: RunState) -> dict[str, TaskError | None]:
    """Id -> error, for FAILED tasks."""
    return {tid: ts.error for tid, ts in run.tasks.items() if ts.status is TaskStatus.FAILED}


def run_outcome(run: RunState) -> tuple[RunStatus, str]:
    """How a run whose tasks are all done ends, and why.

    A FAILED task is handled when a dependent that runs on failure (``one_failed``/``all_done``) ended
    COMPLETED; any unhandled failure fails the run. A map's failed element stands for its map node
    (which failed with it, naming it): the map's dependents handle it, or not.
    """
    if run.cancel_requested:
        return RunStatus.CANCELLED, run.reason or "cancelled"
    unhandled = []
    for tid, ts in run.tasks.items():
        if ts.status is not TaskStatus.FAILED or mapping.is_element(tid):
            continue
        handled = any(
            run.defs[c].trigger in (TriggerRule.ONE_FAILED, TriggerRule.ALL_DONE)
            and run.tasks[c].status is TaskStatus.COMPLETED
            for c in run.plan.dependents[tid]
        )
        if not handled:
            unhandled.append(tid)
    if not unhandled:
        return RunStatus.COMPLETED, ""
    first = sorted(unhandled, key=lambda t: run.tasks[t].finished_at or 0)[0]
    err = run.tasks[first].error
    more = f" (and {len(unhandled) - 1} more)" if len(unhandled) > 1 else ""
    return RunStatus.FAILED, f"task {first!r} failed: {err or run.tasks[first].reason}{more}"


class StateProjector:
    """The seed's StateProjector: holds the current state, applies events, serves named projections."""

    def __init__(self, state: State = EMPTY) -> None:
        self._initial = state
        self._state = state
        self._projections: dict[str, Callable[[State], Any]] = {}

    @property
    def state(self) -> State:
        """The current snapshot."""
        return self._state

    def apply(self, event: Event) -> State:
        """Fold one event in and return the new snapshot."""
        self._state = apply(self._state, event)
        return self._state

    def apply_all(self, events: Iterable[Event]) -> State:
        """Fold many events in."""
        self._state = fold(events, self._state)
        return self._state

    def add_projection(self, name: str, fn: Callable[[State], Any]) -> None:
        """Register a named view of the state."""
        self._projections[name] = fn

    def project(self, name: str) -> Any:
        """Compute a named view; KeyError names the registered ones when ``name`` is not one."""
        try:
            fn = self._projections[name]
        except KeyError:
            raise KeyError(f"no projection {name!r}; have {sorted(self._projections)}") from None
        return fn(self._state)

    def reset(self) -> None:
        """Back to the initial snapshot."""
        self._state = self._initial
