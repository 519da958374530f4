"""What the scheduler decides for a run, as a pure function of its state: events out, jobs to send.

``decide`` does no I/O. The service writes the events (fenced), folds them back in, then sends the jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from nerv_cluster import caching, children, constants, mapping, waits
from nerv_cluster.caching import CacheView, Kind
from nerv_cluster.circuits import Breakers, Circuit
from nerv_cluster.errors import CircuitOpenError, PayloadTooLargeError
from nerv_cluster.failures import failure_outcome, job_failed
from nerv_cluster.intake import describe
from nerv_cluster.jobs import Job, build_job, job_id
from nerv_cluster.jsonform import compact
from nerv_cluster.limits import Gate
from nerv_cluster.model import (
    WORKFLOW_END_EVENTS,
    Event,
    EventType,
    RunStatus,
    TaskDef,
    TaskError,
    TaskStatus,
)
from nerv_cluster.settings import Settings
from nerv_cluster.state import RunState, rule_outcome, run_outcome

log = logging.getLogger("nerv.scheduler")


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds the scheduler holds runs to (from :class:`Settings`): a run over the task or
    submission bound fails before it starts; a job over the job bound fails its task unsent."""

    max_tasks: int = constants.DEFAULT_MAX_TASKS
    max_submission_bytes: int = constants.DEFAULT_MAX_SUBMISSION_BYTES
    max_job_bytes: int = constants.DEFAULT_MAX_JOB_BYTES
    #: Child runs: how deep they nest, and the largest output a child hands its parent task.
    max_child_depth: int = constants.DEFAULT_MAX_CHILD_DEPTH
    max_result_bytes: int = constants.DEFAULT_MAX_RESULT_BYTES
    #: Most elements a map node may expand into (a longer list fails the map).
    max_map_width: int = constants.DEFAULT_MAX_MAP_WIDTH

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The limits of these settings."""
        return cls(
            max_tasks=settings.max_tasks,
            max_submission_bytes=settings.max_submission_bytes,
            max_job_bytes=settings.max_job_bytes,
            max_child_depth=settings.max_child_depth,
            max_result_bytes=settings.max_result_bytes,
            max_map_width=settings.max_map_width,
        )


_NO_LIMITS = Limits()


@dataclass(slots=True)
class Decisions:
    """Everything the scheduler will do for some runs in one step."""

    events: list[Event] = field(default_factory=list)
    jobs: list[tuple[Job, str]] = field(default_factory=list)
    revoke: list[str] = field(default_factory=list)
    #: (due time, run id, task id, attempt) of ready tasks that wait for a retry delay.
    delayed: list[tuple[float, str, str, int]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    #: The TASK_CANCELLED events (also in ``events``) of attempts a worker may hold: the scheduler takes
    #: their outcome slots before writing anything, and :func:`settle_cancels` keeps only those it won.
    cancels: list[Event] = field(default_factory=list)
    #: Child runs to create (after ``events`` are written), see :mod:`nerv_cluster.children`.
    spawns: list[children.Spawn] = field(default_factory=list)
    #: Child runs to rerun for their parent tasks (a rerun of the parent), see ``scheduler.child_reruns``.
    child_reruns: list[children.ChildRerun] = field(default_factory=list)

    def cancelled_attempts(self) -> list[tuple[str, str, int]]:
        """(run, task, attempt) of each of ``cancels``, whose outcome slots the scheduler takes."""
        return [(ev.run_id, str(ev.task_id), int(ev.attempt or 0)) for ev in self.cancels]

    def extend(self, other: Decisions) -> None:
        """Add ``other``'s decisions to these."""
        self.events.extend(other.events)
        self.jobs.extend(other.jobs)
        self.revoke.extend(other.revoke)
        self.delayed.extend(other.delayed)
        self.finished.extend(other.finished)
        self.cancels.extend(other.cancels)
        self.spawns.extend(other.spawns)
        self.child_reruns.extend(other.child_reruns)


#: Outcomes a worker records that end its task: an attempt that has one keeps it over a cancel.
_FINAL_OUTCOMES = frozenset({EventType.TASK_COMPLETED.value, EventType.TASK_FAILED.value})


def settle_cancels(out: Decisions, holders: Sequence[str]) -> None:
    """Given what holds the outcome slot of each of ``out.cancels`` after the scheduler tried to take
    them (in order), keep in ``out.events`` the TASK_CANCELLED events the log may record.

    An attempt whose worker recorded COMPLETED or FAILED first keeps that outcome: its TASK_CANCELLED is
    dropped, so the log says what the outcomes hash says (cancelling first and taking the slot after let
    a completion in between be logged beside the cancel). One whose worker recorded RETRYING first keeps
    that too, and the task is cancelled as its next attempt. Anything else (the scheduler's own mark)
    means the scheduler holds the slot: the attempt is cancelled.

    A run with such a kept COMPLETED or FAILED is not ended now (its WORKFLOW_CANCELLED is dropped):
    the worker's event is on the feed, not yet folded, and is logged only once the scheduler reads it
    (README.md#security); the run ends in the step that folds it, after it in the log.
    """
    replaced: dict[str, Event | None] = {}
    unread: set[str] = set()
    for ev, holder in zip(out.cancels, holders, strict=True):
        if holder in _FINAL_OUTCOMES:
            replaced[ev.id] = None
            unread.add(ev.run_id)
        elif holder == EventType.TASK_RETRYING.value:
            replaced[ev.id] = replace(ev, attempt=int(ev.attempt or 0) + 1)
    out.cancels = []
    if replaced:
        kept = (replaced.get(ev.id, ev) for ev in out.events)
        out.events = [
            ev
            for ev in kept
            if ev is not None and not (ev.type is EventType.WORKFLOW_CANCELLED and ev.run_id in unread)
        ]


def _fail_run(run: RunState, reason: str, now: float, source: str) -> Event:
    """The WORKFLOW_FAILED that ends a run which cannot go on (logged here, once per decision)."""
    log.error("failing run %r: %s", run.run_id, reason)
    return Event(EventType.WORKFLOW_FAILED, run.run_id, data={"reason": reason}, ts=now, source=source)


def _over_bounds(run: RunState, limits: Limits) -> str:
    """Why a run not yet started is over a bound of ``limits`` (empty when it is not)."""
    if run.total > limits.max_tasks:
        return f"the workflow has {run.total} tasks; the limit is {limits.max_tasks} (NERV_MAX_TASKS)"
    if run.submitted_bytes > limits.max_submission_bytes:
        return (
            f"the submission is {run.submitted_bytes} bytes of JSON; the limit is "
            f"{limits.max_submission_bytes} (NERV_MAX_SUBMISSION_BYTES)"
        )
    return ""


def _too_large(job: Job, size: int, limit: int, now: float, source: str) -> Event:
    """TASK_FAILED for a job whose message would be over the job bound (it is not sent)."""
    error = TaskError.from_exception(
        PayloadTooLargeError(
            f"the job of task {job.task_id!r} is {size} bytes of JSON with its upstream results; the "
            f"limit is {limit} (NERV_MAX_JOB_BYTES): pass references to large data, not the data"
        )
    )
    return job_failed(job, error, "job too large", now, source)


def _small(value: object) -> bool:
    """True for a result whose JSON is hardly longer than the reference marker it replaces."""
    kind = type(value)
    return value is None or kind is bool or kind is float or (kind is int and -(1 << 63) <= value < 1 << 63)  # type: ignore[operator]


def _may_be_too_large(run: RunState, td: TaskDef, limits: Limits) -> bool:
    """Whether a job of ``run`` for ``td`` must be measured against the job bound: only upstream
    results make a job bigger than its part of the submission, and small scalar results (measuring
    costs a JSON encoding per job) cannot make it much bigger. A map's result (a list) and a map
    element's value (a piece of an upstream result) are upstream results too."""
    tasks, deps = run.tasks, td.dependencies
    if not all(_small(tasks[d].result) for d in deps):
        return True
    if run.growth.layers:
        layers = run.growth.layers
        if any(d in layers for d in deps):
            return True
        # An element over a list carries its piece of it (one following a map refers to its element,
        # an upstream result counted above).
        first = td.args[0] if mapping.is_element(td.id) else None
        if not _small(first) and not (type(first) is dict and constants.REF_KEY in first):
            return True
    return run.submitted_bytes * 2 + 64 * len(deps) + 1024 > limits.max_job_bytes


def job_size(job: Job) -> int:
    """Bytes of a job's JSON (what the job bound counts)."""
    return len(compact(job.to_dict()))


def _why_skipped(run: RunState, tid: str) -> str:
    td = run.defs[tid]
    bad = [d for d in td.dependencies if run.tasks[d].status in (TaskStatus.FAILED, TaskStatus.SKIPPED)]
    if bad:
        return f"trigger rule {td.trigger.value} cannot be met: upstream {', '.join(bad[:5])} " + (
            "did not succeed" if len(bad) > 1 else f"is {run.tasks[bad[0]].status.value}"
        )
    return f"trigger rule {td.trigger.value} cannot be met"


def _fail_fast(run: RunState, tid: str, circuit: Circuit, now: float, source: str) -> Event:
    td, ts = run.defs[tid], run.tasks[tid]
    error = TaskError.from_exception(
        CircuitOpenError(
            f"circuit of {td.fn!r} is {circuit.state.value} after {circuit.failures} consecutive failures; "
            f"not calling it before {circuit.until:.3f} (epoch seconds)"
        )
    )
    kind, data = failure_outcome(td.retry, ts.attempt, error, now, first=ts.first)
    data["reason"] = "circuit open"
    return Event(kind, run.run_id, tid, ts.attempt, data, ts=now, source=source)


def readies_successor(run: RunState, tid: str) -> bool:
    """True when the success of ``tid`` alone would make a dependent on its queue ready: the worker that
    runs it should wait for that dependent to be handed to it (a chain's next hop).

    Only for jobs without a time limit on either side: a handed-off job runs inside the message of the
    job before it, and Celery enforces time limits per message.
    """
    td = run.defs[tid]
    if td.timeout:
        return False
    tasks, defs = run.tasks, run.defs
    for child in run.plan.dependents[tid]:
        cs, cd = tasks[child], defs[child]
        if cd.queue != td.queue or cd.timeout or cs.status is not TaskStatus.PENDING or cd.wait is not None:
            continue  # (a wait node is never handed to a worker: it waits in the scheduler)
        if rule_outcome(cd.trigger, len(cd.dependencies), cs.ok + 1, cs.failed, cs.skipped) is True:
            return True
    return False


def decide(
    run: RunState,
    now: float,
    source: str,
    out: Decisions,
    breakers: Breakers | None = None,
    handoff: bool = True,
    limits: Limits = _NO_LIMITS,
    cache: CacheView | None = None,
    gate: Gate | None = None,
) -> None:
    """Append to ``out`` what to do next for ``run`` (``breakers``: the circuits, when they apply;
    ``handoff``: mark the jobs whose worker should wait for a hand-off, see :func:`readies_successor`;
    ``limits``: the bounds a run and its jobs are held to; ``cache``: the cache entries read for this
    step, without which cacheable tasks are dispatched like any other, see :mod:`nerv_cluster.caching`;
    ``gate``: concurrency keys and rate limits, see :mod:`nerv_cluster.limits`: its held tasks released
    for this run are decided with the ready ones, and without it limits are not applied)."""
    rid = run.run_id
    if run.status.terminal:
        out.finished.append(rid)
        return
    if run.rejected:
        out.events.extend(_cancel_children(run, now, source))
        out.events.append(_fail_run(run, run.rejected, now, source))
        return
    if run.status is RunStatus.PENDING:
        over = _over_bounds(run, limits)
        if over:
            out.events.append(_fail_run(run, over, now, source))
            return
        out.events.append(
            Event(
                EventType.WORKFLOW_STARTED,
                rid,
                ts=now,
                source=source,
                data={
                    "tasks": run.total,
                    "levels": len(run.plan.levels),
                    "width": run.plan.width,
                    "critical_path": run.plan.critical_path_length,
                },
            )
        )
    if run.cancel_requested:
        for tid, ts in run.tasks.items():
            if ts.status.terminal:
                continue
            cancel = Event(
                EventType.TASK_CANCELLED, rid, tid, ts.attempt, {"reason": run.reason}, ts=now, source=source
            )
            if ts.child is not None:  # waiting for its child run: cancel that, recursively
                out.events.append(children.cancel_child(run, ts, now, source))
            if ts.dispatched or ts.status is TaskStatus.RUNNING:
                # No job to revoke for an attempt no worker holds: a spawn, a child run, a map node.
                if ts.spawn is None and ts.child is None and tid not in run.growth.layers:
                    out.revoke.append(job_id(rid, tid, ts.attempt))
                out.cancels.append(cancel)
            out.events.append(cancel)
        out.events.append(
            Event(EventType.WORKFLOW_CANCELLED, rid, data={"reason": run.reason}, ts=now, source=source)
        )
        return
    for tid in run.doomed:
        out.events.append(
            Event(
                EventType.TASK_SKIPPED,
                rid,
                tid,
                data={"reason": _why_skipped(run, tid)},
                ts=now,
                source=source,
            )
        )
    for tid in run.woken:  # durable waits whose signal arrived: complete them with its payload
        out.events.append(waits.wake(run, tid, now, source))
    released = gate.take_released(rid) if gate is not None else []
    hits: list[caching.Hit] = []
    if run.ready or released:
        rank = run.plan.rank
        for tid in [*sorted(run.ready, key=rank.__getitem__), *released]:
            ts = run.tasks[tid]
            if ts.due_at is not None and ts.due_at > now:
                out.delayed.append((ts.due_at, rid, tid, ts.attempt))
                continue
            td = run.defs[tid]
            if td.over is not None:  # a map node: expanded here, never sent to a worker
                expanded = mapping.expansion(run, tid, limits.max_map_width, limits.max_tasks, now, source)
                if expanded is not None:
                    out.events.append(expanded)
                continue
            if td.workflow is not None:  # a static sub-workflow: spawned as a child, no worker
                out.events.append(children.static_spawn(run, tid, ts, now, source))
                continue
            if td.wait is not None:  # a durable wait: WAITING in the scheduler's state, no worker
                out.events.append(waits.enter(run, tid, ts.attempt, now, source))
                continue
            cache_key = None
            if td.cache is not None and cache is not None:  # before the circuit: a hit calls nothing
                verdict = cache.verdict(rid, tid)
                if verdict.kind is Kind.HIT and verdict.entry is not None:
                    hits.append((tid, ts.attempt, verdict.entry))
                    continue
                if verdict.kind is not Kind.MISS:
                    failed = verdict.failure(rid, tid, ts.attempt, now, source)  # None: held
                    if failed is not None:
                        out.events.append(failed)
                    continue
                cache_key = verdict.key
            slot = rate = None
            if gate is not None and (td.concurrency is not None or td.rate_limit is not None):
                admitted = gate.admit(run, tid, now)
                if not admitted.go:
                    if not ts.held:  # logged once; a released task held again waits in memory
                        out.events.append(_held(run, tid, ts.attempt, admitted.reason, now, source))
                    continue
                slot, rate = admitted.slot, admitted.rate
            if td.circuit is not None and breakers is not None:
                allowed, transition = breakers.admit(
                    td.fn, td.circuit, job_id(rid, tid, ts.attempt), rid, now, source
                )
                if transition is not None:
                    out.events.append(transition)
                if not allowed:
                    out.events.append(_fail_fast(run, tid, breakers.get(td.fn), now, source))
                    continue
            queue = td.queue
            job = build_job(run, tid, handoff and readies_successor(run, tid))
            if _may_be_too_large(run, td, limits):
                size = job_size(job)
                if size > limits.max_job_bytes:
                    out.events.append(_too_large(job, size, limits.max_job_bytes, now, source))
                    continue
            data = {"queue": queue}
            if slot is not None:
                data["slot"] = slot
            if rate is not None:
                data["rate"] = rate
            if cache_key is not None and cache is not None:
                data["cache_key"] = cache_key
                cache.claim(cache_key, rid, tid)
            out.events.append(
                Event(EventType.TASK_DISPATCHED, rid, tid, ts.attempt, data, ts=now, source=source)
            )
            out.jobs.append((job, queue))
    if hits:  # after the ready loop: each hit is another task's business than the dispatches
        out.events.extend(caching.hit_events(rid, hits, now, source))
        if _completed_by(run, len(hits)):
            # Ended in the same write: a run of hits needs no second step (fold, decide, write) to end.
            out.events.append(Event(EventType.WORKFLOW_COMPLETED, rid, ts=now, source=source))
            return
    for tid in run.gathered:  # map nodes whose elements have all ended
        out.events.append(mapping.end_event(run, tid, now, source))
    if run.spawning:
        out.spawns.extend(children.spawns(run, limits.max_child_depth, now, source, out.events))
        out.child_reruns.extend(children.child_reruns(run))
    if run.all_tasks_done and not run.doomed:
        status, reason = run_outcome(run)
        kind = EventType.WORKFLOW_COMPLETED if status is RunStatus.COMPLETED else EventType.WORKFLOW_FAILED
        out.events.append(Event(kind, rid, data={"reason": reason} if reason else {}, ts=now, source=source))


def _completed_by(run: RunState, hits: int) -> bool:
    """Whether ``run`` is COMPLETED once ``hits`` of its READY tasks complete from the cache: every
    other task has ended, none FAILED (whether a failure is handled is left to the usual end), nothing
    is cancelled or waits to be skipped."""
    return (
        not run.cancel_requested
        and not run.doomed
        and run.count(TaskStatus.FAILED) == 0
        and run.finished_tasks + hits == run.total
    )


def _held(run: RunState, tid: str, attempt: int, reason: str, now: float, source: str) -> Event:
    """TASK_HELD: ``tid`` is ready but waits for a concurrency slot or a rate limit (the gate keeps it)."""
    return Event(EventType.TASK_HELD, run.run_id, tid, attempt, {"reason": reason}, ts=now, source=source)


def _cancel_children(run: RunState, now: float, source: str) -> list[Event]:
    """Cancel requests for the child runs of ``run``'s unfinished tasks (``run`` cannot go on)."""
    return [
        children.cancel_child(run, ts, now, source)
        for ts in run.tasks.values()
        if ts.child is not None and not ts.status.terminal
    ]


def decide_isolated(
    run: RunState,
    now: float,
    source: str,
    out: Decisions,
    breakers: Breakers | None = None,
    handoff: bool = True,
    limits: Limits = _NO_LIMITS,
    cache: CacheView | None = None,
    runs: Mapping[str, RunState] | None = None,
    gate: Gate | None = None,
) -> None:
    """:func:`decide`, but a run it raises for is failed (WORKFLOW_FAILED with the error) and nothing
    else is decided for it: one run the scheduler cannot decide for never stops the others.

    ``runs``: every run the scheduler holds; a child run that ends gets its parent task's outcome
    (found there) written with its end event (:func:`nerv_cluster.children.with_parent_outcome`)."""
    mine = Decisions()
    try:
        decide(run, now, source, mine, breakers, handoff, limits, cache, gate)
    except Exception as exc:
        mine = Decisions(
            events=[_fail_run(run, f"the scheduler cannot run it: {describe(exc)}", now, source)]
        )
    if runs is not None:
        try:
            children.with_parent_outcome(run, mine.events, runs, limits.max_result_bytes, now, source)
        except Exception:
            # Never end a child without its parent's outcome: it stays open (a new leader tries again).
            log.exception("cannot write the parent outcome of child run %r", run.run_id)
            mine.events = [
                ev for ev in mine.events if ev.run_id != run.run_id or ev.type not in WORKFLOW_END_EVENTS
            ]
    out.extend(mine)


def in_flight(run: RunState) -> list[tuple[Job, str]]:
    """Jobs dispatched but not started: resent by a new leader, as the old one may have died before sending.

    Resending the same attempt is harmless: a worker claims an attempt once (``start.lua``).
    """
    return [(build_job(run, tid), run.defs[tid].queue) for tid in run.queued]
