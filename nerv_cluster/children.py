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
6. A rerun of the parent run reruns the failed child run of a task instead of calling the task again
   (same child id: its completed tasks keep their results), recursively; see "rerun" below and
   ``scheduler/child_reruns.py``.

Invariants: a child's run id is a pure function of its parent attempt (:func:`child_run_id`), and
``spawn.lua`` creates it at most once (the parent's outcomes hash records the creation), so no crash
creates a child twice; the parent's outcome is written atomically with the child's end, so no crash
loses it (a new leader that finds an active child whose tasks are all done ends it and writes the
outcome again; the fold ignores a duplicate, as the attempt is over by then); runs nest at most
``NERV_MAX_CHILD_DEPTH`` deep. Everything here is pure: the scheduler's writes are in
``scheduler/effects.py`` and ``EventLog.spawn_children``.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
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
from nerv_cluster.state import RunState, TaskState, parent_of, run_output

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
        if ts.child is not None:  # an old child to rerun, not a new one to create (see ChildRerun)
            continue
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
    ref = parent_of(child)
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
        parent.defs[ref.task_id].retry, ref.attempt, TaskError.from_exception(exc), now, first=ts.first
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


# -- rerun (issue 16 part 4: a task whose child run failed has that child rerun) ----------------------
#
# A rerun of the parent run resets a task whose attempt ended because of its child run (FAILED or
# CANCELLED with ``child`` set) to a new attempt that does not call the task's function again: it is
# RUNNING, in ``spawning`` with ``spawn`` a marker ``{"rerun": child}`` beside ``child`` (a pair no other
# state has), dispatched, off ``running``. The scheduler then reruns that child run (``rerun.lua``,
# fenced by its lease), its WORKFLOW_RERUN_REQUESTED carrying ``parent_attempt``: the parent's new
# attempt, which the child's fold keeps (``RunState.parent_attempt``), so its next end is the outcome of
# that attempt (:func:`parent_outcome` matches attempt and child) and nothing else's; then it records
# CHILD_STARTED in the parent's log, and the task waits for the child as after a spawn.
#
# Crash safety: the rerun of the child is decided from the child's own log: it is due only while the
# child's parent attempt is not the task's current one, and the event that makes it so is the rerun
# itself, written atomically by rerun.lua (which also refuses a second rerun judged on the same log).
# So a new leader that finds the task still waiting for its child's rerun (it died between the two
# writes) finds the child rerun already and only writes CHILD_STARTED: no child is rerun twice.
#
# Only when the task's arguments are what they were: if any of its dependencies is reset too, its
# function runs again (a new child); likewise a COMPLETED task named in the rerun. A child that cannot
# be rerun (expired after the retention time, or refused as invalid) is no error of the rerun: the task
# starts a new attempt instead, which calls its function again and creates a new child.

#: The key of the ``TaskState.spawn`` marker of a task waiting for its child run's rerun.
RERUN_KEY = "rerun"


def awaits_rerun(ts: TaskState) -> bool:
    """True for a task waiting for the scheduler to rerun its child run (see above)."""
    return ts.child is not None and ts.spawn is not None


def rerun_state(run: RunState, tid: str, old: TaskState, new: TaskState) -> TaskState:
    """The state of ``tid`` after a rerun reset it: waiting for its old child run to be rerun, if its
    attempt ended because that child failed or was cancelled and none of its dependencies is reset
    (``new``, the default reset state, counts every dependency then); else ``new``."""
    if old.child is None or old.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        return new
    if new.ok + new.failed + new.skipped != len(run.defs[tid].dependencies):
        return new  # an upstream task runs again: its arguments may change, so its function runs again
    if new.status is not TaskStatus.READY:
        return new  # its trigger rule is not met as things stand: not run at all
    return new._replace(
        status=TaskStatus.RUNNING,
        dispatched=True,
        child=old.child,
        spawn={RERUN_KEY: old.child},
    )


def rerun_after(run: RunState, selected: Sequence[str]) -> RunState:
    """``run`` after a rerun reset ``selected``: each task waiting for its child's rerun is in
    ``spawning`` and off the watchdog's ``running``. Uses the run's maps linearly (they may be drafts)."""
    tasks, spawning, running = run.tasks, run.spawning, run.running
    changed = False
    for tid in selected:
        if awaits_rerun(tasks[tid]):
            spawning = spawning.set(tid, True)
            running = running.discard(tid)
            changed = True
    return run._replace(spawning=spawning, running=running) if changed else run


def rerun_requested(run: RunState, data: Mapping[str, Any]) -> RunState:
    """``run`` (reset by a rerun whose event has ``data``) taking the parent attempt the scheduler
    reran it for, if the data names one (a client's rerun names none)."""
    attempt = data.get("parent_attempt")
    if run.definition.parent is None or type(attempt) is not int or attempt < 1:
        return run
    return run._replace(parent_attempt=attempt)


@dataclass(frozen=True, slots=True)
class ChildRerun:
    """A child run to rerun for the current attempt of its parent task (``parent``)."""

    parent: ParentRef
    child_id: str


def child_reruns(run: RunState) -> list[ChildRerun]:
    """The child runs to rerun for ``run``'s tasks waiting for that (O(spawning tasks))."""
    tasks = run.tasks
    return [
        ChildRerun(ParentRef(run.run_id, tid, tasks[tid].attempt), str(tasks[tid].child))
        for tid in run.spawning
        if awaits_rerun(tasks[tid])
    ]


class Rerun(enum.Enum):
    """What to do for a :class:`ChildRerun`, given the child run as its log has it (:func:`judge`)."""

    #: Rerun the child (its failed part; nothing when it completed: it ends again, handing its output).
    RERUN = "rerun"
    #: The child was rerun for this attempt already (a crash came between): record CHILD_STARTED only.
    RECORD = "record"
    #: The child is still going (its cancel not done yet, a rerun by hand): wait for its end.
    WAIT = "wait"
    #: The child is gone (expired) or was refused: the task starts a new attempt, i.e. a new child.
    ANEW = "anew"


def judge(intent: ChildRerun, child: RunState | None) -> Rerun:
    """What to do for ``intent``, given the child run (None: its log is gone)."""
    if child is None or child.rejected:
        return Rerun.ANEW
    ref = parent_of(child)
    if ref is None or (ref.run_id, ref.task_id) != (intent.parent.run_id, intent.parent.task_id):
        return Rerun.ANEW  # not that task's child at all (a log under that id, but another run's)
    if ref.attempt == intent.parent.attempt:
        return Rerun.RECORD
    return Rerun.RERUN if child.status.terminal else Rerun.WAIT


def rerun_event(intent: ChildRerun, child: RunState, now: float, source: str) -> Event:
    """The WORKFLOW_RERUN_REQUESTED that reruns ``child`` for ``intent``'s parent attempt: every task
    that did not complete (its completed tasks keep their results)."""
    data = {"n": child.reruns + 1, "parent_attempt": intent.parent.attempt}
    return Event(EventType.WORKFLOW_RERUN_REQUESTED, child.run_id, data=data, ts=now, source=source)


def rerun_recorded(intent: ChildRerun, now: float, source: str) -> Event:
    """CHILD_STARTED in the parent's log: the child was rerun, the task waits for its end."""
    p = intent.parent
    data = {"child": intent.child_id, "rerun": True}
    return Event(EventType.CHILD_STARTED, p.run_id, p.task_id, p.attempt, data, ts=now, source=source)


def rerun_anew(intent: ChildRerun, why: str, now: float, source: str) -> Event:
    """TASK_PENDING that gives the task a new attempt (its function runs again, a new child) when its
    old child cannot be rerun; not counted as a lost worker."""
    p = intent.parent
    data = {
        "next_attempt": p.attempt + 1,
        "counted": False,
        "fresh": True,
        "reason": f"child run {intent.child_id} cannot be rerun ({why}): a new attempt",
    }
    return Event(EventType.TASK_PENDING, p.run_id, p.task_id, p.attempt, data, ts=now, source=source)
