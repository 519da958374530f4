"""Child runs: a task whose function returns a ``Workflow`` completes with that workflow's output.

The life of a child run, every step an event (so a refold rebuilds the same graph):

1. The worker does not run the workflow: it records TASK_SPAWNED (the child's definition) as the
   attempt's outcome, through the outcome slot (``finish.lua``), which frees its slot at once: no
   worker ever waits on a child. A static sub-workflow (``Workflow.add(other_workflow)``) gets its
   TASK_SPAWNED from the scheduler when the task is ready, without any worker.
2. The task stays RUNNING but leaves ``RunState.running`` (the watchdog's view: it has no worker to
   lose, and its timeout covers its own attempt, not its child run) for ``RunState.spawning``.
3. The scheduler creates the child run (``spawn.lua``, fenced) and records CHILD_STARTED in the
   parent's log in the same atomic step. The child's definition carries its parent attempt and depth.
4. When the child ends, the scheduler writes the parent task's outcome in the same fenced write as the
   child's end event, before it: TASK_COMPLETED with the child's output (``state.run_output``), or a
   failure (:class:`ChildRunFailedError`, naming the child run and its failed task) through the task's
   retry policy; a retried task starts a new child, as the attempt is part of the child's id.
5. Cancelling a run cancels the child runs of its unfinished tasks (WORKFLOW_CANCEL_REQUESTED into
   each), and so on down.

Invariants: a child's run id is a pure function of its parent attempt (:func:`child_run_id`), and
``spawn.lua`` creates it at most once (the parent's outcomes hash records the creation), so no crash
creates a child twice; the parent's outcome is written atomically with the child's end, so no crash
loses it (a new leader that finds an active child whose tasks are all done ends it and writes the
outcome again; the fold ignores a duplicate, as the attempt is over by then); runs nest at most
``NERV_MAX_CHILD_DEPTH`` deep. Everything here is pure: the scheduler's writes are in
``scheduler/effects.py`` and ``EventLog.spawn_children``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nerv_cluster import constants, ids
from nerv_cluster.errors import (
    ChildDepthError,
    ChildRunFailedError,
    ChildRunIdTakenError,
    PayloadTooLargeError,
)
from nerv_cluster.failures import failure_outcome
from nerv_cluster.model import (
    WORKFLOW_END_EVENTS,
    Event,
    EventType,
    ParentRef,
    TaskError,
    TaskStatus,
)
from nerv_cluster.state import RunState, TaskState, run_output

if TYPE_CHECKING:
    from nerv_cluster.settings import Settings
    from nerv_cluster.workflow import Workflow


def child_run_id(name: object, parent: ParentRef) -> str:
    """The run id of the child run of one parent attempt: the workflow name's slug and 12 hex digits of
    a sha256 of (parent run, task, attempt). A pure function of the attempt, so no crash makes a second
    one; a new attempt (a retry) gets a new child."""
    text = name.lower() if isinstance(name, str) else "child"
    digest = hashlib.sha256(f"{parent.run_id}:{parent.task_id}:{parent.attempt}".encode()).hexdigest()
    head = ids.slug(text, 40, "child").rstrip("_.-") or "child"
    return f"{head}-{digest[: constants.CHILD_ID_HEX]}"


# -- the worker's side ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpawnBounds:
    """What a worker checks a returned workflow against before recording it (as the client checks a
    submission): per-task payloads, the number of tasks, and the definition's JSON size."""

    max_payload_bytes: int = constants.DEFAULT_MAX_PAYLOAD_BYTES
    max_tasks: int = constants.DEFAULT_MAX_TASKS
    max_submission_bytes: int = constants.DEFAULT_MAX_SUBMISSION_BYTES

    @classmethod
    def of(cls, settings: Settings) -> SpawnBounds:
        """The bounds of these settings."""
        return cls(settings.max_payload_bytes, settings.max_tasks, settings.max_submission_bytes)


def spawned_data(workflow: Workflow, bounds: SpawnBounds) -> dict[str, Any]:
    """The data of the TASK_SPAWNED a worker records for a task that returned ``workflow``; raises a
    ``WorkflowError`` (the attempt fails with it, nothing is spawned) for a workflow the client would
    refuse (a cycle, no tasks, a bad argument) or one over the bounds."""
    from nerv_cluster.workflow import validate_definition

    definition = workflow.definition()
    validate_definition(definition, max_payload_bytes=bounds.max_payload_bytes, max_tasks=bounds.max_tasks)
    raw = definition.to_dict()
    size = len(json.dumps(raw, separators=(",", ":")))
    if size > bounds.max_submission_bytes:
        raise PayloadTooLargeError(
            f"the returned workflow {workflow.name!r} is {size} bytes of JSON; the limit is "
            f"{bounds.max_submission_bytes} (NERV_MAX_SUBMISSION_BYTES)"
        )
    return {"workflow": raw}


# -- the scheduler's decisions (pure) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    """A child run to create (``spawn.lua``): its submission, and the CHILD_STARTED recording it in the
    parent's log, written in one atomic step."""

    parent: ParentRef
    child_id: str
    submitted: Event
    started: Event


def _task_failed(run: RunState, tid: str, attempt: int, exc: Exception, now: float, source: str) -> Event:
    error = TaskError.from_exception(exc)
    return Event(
        EventType.TASK_FAILED,
        run.run_id,
        tid,
        attempt,
        {"error": error.to_dict(), "reason": "child run not started"},
        ts=now,
        source=source,
    )


def static_spawn(run: RunState, tid: str, ts: TaskState, now: float, source: str) -> Event:
    """TASK_SPAWNED for a ready static sub-workflow task: its definition is the task's own."""
    workflow = run.defs[tid].workflow
    return Event(
        EventType.TASK_SPAWNED, run.run_id, tid, ts.attempt, {"workflow": workflow}, ts=now, source=source
    )


def spawns(run: RunState, max_depth: int, now: float, source: str, events: list[Event]) -> list[Spawn]:
    """The child runs to create for ``run``'s spawning tasks; a spawn past ``max_depth`` fails its task
    instead (a TASK_FAILED appended to ``events``: retrying cannot make it shallower)."""
    out: list[Spawn] = []
    depth = run.definition.depth + 1
    for tid in run.spawning:
        ts = run.tasks[tid]
        raw = ts.spawn
        if depth > max_depth:
            exc = ChildDepthError(
                f"task {tid!r} of run {run.run_id!r} returned a workflow that would run {depth} levels "
                f"deep; the limit is {max_depth} (NERV_MAX_CHILD_DEPTH)"
            )
            events.append(_task_failed(run, tid, ts.attempt, exc, now, source))
            continue
        parent = ParentRef(run.run_id, tid, ts.attempt)
        child_id = child_run_id(raw.get("name"), parent)
        meta = dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {}
        meta.update(parent=parent.to_dict(), depth=depth, root=run.definition.root or run.run_id)
        submitted = Event(
            EventType.WORKFLOW_SUBMITTED,
            child_id,
            data={"workflow": {**raw, "meta": meta}},
            ts=now,
            source=source,
        )
        started = Event(
            EventType.CHILD_STARTED, run.run_id, tid, ts.attempt, {"child": child_id}, ts=now, source=source
        )
        out.append(Spawn(parent, child_id, submitted, started))
    return out


def taken(spawn: Spawn, run: RunState, now: float, source: str) -> Event:
    """TASK_FAILED for a spawn whose child run id another run holds (``spawn.lua`` said ``taken``)."""
    exc = ChildRunIdTakenError(
        f"the child run id {spawn.child_id!r} of task {spawn.parent.task_id!r} is taken by another run"
    )
    return _task_failed(run, spawn.parent.task_id, spawn.parent.attempt, exc, now, source)


def cancel_child(run: RunState, ts: TaskState, now: float, source: str) -> Event:
    """WORKFLOW_CANCEL_REQUESTED into the child run of a task of ``run``, which is being cancelled."""
    reason = f"parent run {run.run_id} cancelled: {run.reason or 'cancelled'}"
    return Event(
        EventType.WORKFLOW_CANCEL_REQUESTED, str(ts.child), data={"reason": reason}, ts=now, source=source
    )


def parent_outcome(
    child: RunState,
    end: Event,
    runs: Mapping[str, RunState],
    max_result_bytes: int,
    now: float,
    source: str,
) -> Event | None:
    """The outcome of the parent attempt of ``child``, which ``end`` (its WORKFLOW_* event) ends; None
    when ``child`` has no parent or its parent attempt is not waiting for it any more (cancelled, or
    an outcome written already)."""
    ref = child.definition.parent
    if ref is None:
        return None
    parent = runs.get(ref.run_id)
    if parent is None or parent.status.terminal:
        return None
    ts = parent.tasks.get(ref.task_id)
    if ts is None or ts.attempt != ref.attempt or ts.child != child.run_id:
        return None
    if ts.status is not TaskStatus.RUNNING:
        return None
    cid = child.run_id
    reason = str(end.data.get("reason", ""))
    if end.type is EventType.WORKFLOW_COMPLETED:
        value = run_output(child)
        size = len(json.dumps(value, separators=(",", ":")))
        if size <= max_result_bytes:
            data = {"result": value, "child": cid}
            return Event(
                EventType.TASK_COMPLETED, ref.run_id, ref.task_id, ref.attempt, data, ts=now, source=source
            )
        exc: Exception = PayloadTooLargeError(
            f"the output of child run {cid!r} is {size} bytes of JSON; the limit is {max_result_bytes}"
        )
    else:
        what = "was cancelled" if end.type is EventType.WORKFLOW_CANCELLED else "failed"
        exc = ChildRunFailedError(f"child run {cid!r} {what}: {reason}".rstrip(": "))
    kind, data = failure_outcome(
        parent.defs[ref.task_id].retry, ref.attempt, TaskError.from_exception(exc), now
    )
    data.update(child=cid, reason=f"child run {cid} did not complete")
    return Event(kind, ref.run_id, ref.task_id, ref.attempt, data, ts=now, source=source)


def with_parent_outcome(
    run: RunState,
    events: list[Event],
    runs: Mapping[str, RunState],
    max_result_bytes: int,
    now: float,
    source: str,
) -> None:
    """If ``events`` (decided for ``run``) end ``run`` and it is a child run, put its parent task's
    outcome right before that end event: both go to Redis in one fenced write, so no crash between
    them can lose the outcome."""
    if run.definition.parent is None:
        return
    for i in range(len(events) - 1, -1, -1):
        ev = events[i]
        if ev.run_id == run.run_id and ev.type in WORKFLOW_END_EVENTS:
            outcome = parent_outcome(run, ev, runs, max_result_bytes, now, source)
            if outcome is not None:
                events.insert(i, outcome)
            return
