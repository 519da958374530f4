"""Rerun from failure: a finished run goes on, its failed part run again, its completed part kept.

Invariant: a rerun changes only the tasks it selects, and leaves the run exactly as if those tasks had
never run: each gets a new attempt number (so no outcome of an old attempt can count for it), its
retry policy starts over (``TaskState.first``), and every dependency count is recomputed from the
statuses its dependencies have afterwards. A COMPLETED task outside the selection keeps its result
and never runs again.

- :func:`check` (the client, before writing anything): the run must be finished and not rejected, the
  task ids named must be its own, and there must be something to rerun; the clear error otherwise.
- :func:`requested` (the fold's handler of WORKFLOW_RERUN_REQUESTED): applies only to a terminal run,
  and only the rerun numbered ``run.reruns + 1``, so applying the event twice, a stale copy after a
  later rerun, or a second request racing the first changes nothing.
- :func:`select` and :func:`reset`: which tasks, and the pure reset itself.

Without task ids the selection is every task that did not complete (FAILED, CANCELLED, SKIPPED, and
whatever a run failed by the scheduler left unfinished); with task ids it is those tasks and all their
descendants, whatever their status.

Run-time tasks hook in through :data:`HOOKS` (:class:`MapHook`: a map's elements; :class:`ChildHook`:
a task waiting for its child run): a :class:`Hook` can widen the selection (naming a map reruns its
elements; rerunning an element reruns its map node) and choose a task's state after the reset (a map
node goes back to waiting for its elements instead of being expanded again; a task whose child run
failed waits for that child, rerun, instead of starting a new one), and take what a request's data
says for its kind (a child run rerun for its parent: the parent's new attempt).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any

from nerv_cluster import children, mapping, waits
from nerv_cluster.errors import RerunError, RunNotFinishedError
from nerv_cluster.model import Event, RunStatus, TaskStatus
from nerv_cluster.state import RunState, TaskState, _moved, outcome_counts, rule_outcome

#: How many named task ids an error message lists before "and N more".
_SHOWN = 5


class Hook:
    """How a kind of run-time task takes part in a rerun. The defaults change nothing; a subclass
    overrides what its kind needs and returns the defaults for every other task."""

    def named(self, run: RunState, tid: str) -> Iterable[str]:
        """More tasks to rerun when ``tid`` is named (a map node: its elements)."""
        return ()

    def downstream(self, run: RunState, tid: str) -> Iterable[str]:
        """Tasks that build on ``tid`` beyond its plan's dependents (a map element: its map node)."""
        return ()

    def reset(self, run: RunState, tid: str, old: TaskState, new: TaskState) -> TaskState:
        """``tid``'s state after the reset, given its state before (``old``) and the default one
        (``new``: PENDING or READY by its trigger rule, with a new attempt)."""
        return new

    def after(self, run: RunState, selected: Sequence[str]) -> RunState:
        """The run once every selected task was reset: what the kind keeps beside the tasks' states
        (a map node's counts of its elements, the gathered set). Linear in the run's maps."""
        return run

    def request(self, run: RunState, data: Any) -> RunState:
        """The reset ``run`` taking what the request's ``data`` says for the kind (a child run: the
        parent attempt the scheduler reran it for)."""
        return run


class MapHook(Hook):
    """Map elements and map nodes (see :mod:`nerv_cluster.mapping`): naming a map reruns its
    elements; a reset map node waits for its elements again instead of expanding again."""

    def named(self, run: RunState, tid: str) -> Iterable[str]:
        return mapping.rerun_named(run, tid)

    def downstream(self, run: RunState, tid: str) -> Iterable[str]:
        return mapping.rerun_downstream(run, tid)

    def reset(self, run: RunState, tid: str, old: TaskState, new: TaskState) -> TaskState:
        return mapping.rerun_state(run, tid, old, new)

    def after(self, run: RunState, selected: Sequence[str]) -> RunState:
        return mapping.rerun_after(run, selected)


class ChildHook(Hook):
    """Tasks whose child run failed (see :mod:`nerv_cluster.children`): such a task, its arguments
    unchanged, waits for that child run to be rerun (same id, its completed tasks kept) instead of
    calling its function again; a child run rerun for its parent takes the parent's new attempt."""

    def reset(self, run: RunState, tid: str, old: TaskState, new: TaskState) -> TaskState:
        return children.rerun_state(run, tid, old, new)

    def after(self, run: RunState, selected: Sequence[str]) -> RunState:
        return children.rerun_after(run, selected)

    def request(self, run: RunState, data: Any) -> RunState:
        return children.rerun_requested(run, data)


#: The hooks every rerun consults, in order.
HOOKS: tuple[Hook, ...] = (MapHook(), ChildHook())


# -- which tasks ----------------------------------------------------------------------------------------


def unfinished(run: RunState) -> list[str]:
    """Every task that did not complete: what a rerun without task ids selects."""
    return [tid for tid, ts in run.tasks.items() if ts.status is not TaskStatus.COMPLETED]


def select(run: RunState, named: Sequence[str] | None, hooks: Sequence[Hook] = HOOKS) -> list[str]:
    """The tasks a rerun resets: without ``named``, :func:`unfinished`; else the named tasks (those the
    run has), what the hooks add for them, and every descendant of all of these (in the order found)."""
    if named is None:
        return unfinished(run)
    tasks = run.tasks
    chosen: dict[str, None] = {}
    todo: list[str] = []

    def add(tid: str) -> None:
        if tid in tasks and tid not in chosen:
            chosen[tid] = None
            todo.append(tid)

    for tid in named:
        add(tid)
        for hook in hooks:
            for more in hook.named(run, tid):
                add(more)
    while todo:
        for child in _builds_on(run, todo.pop(), hooks):
            add(child)
    return list(chosen)


def _builds_on(run: RunState, tid: str, hooks: Sequence[Hook]) -> Iterator[str]:
    """The tasks that build on ``tid``: its plan's dependents, then what the hooks add."""
    yield from run.plan.dependents.get(tid, ())
    for hook in hooks:
        yield from hook.downstream(run, tid)


# -- the reset ------------------------------------------------------------------------------------------


def _counts(run: RunState, tid: str, reset: Container[str]) -> tuple[int, int, int]:
    """How ``tid``'s dependencies stand once the tasks in ``reset`` are reset (and so not ended):
    ok, failed and skipped, counted as the fold settles them (CANCELLED counts as skipped)."""
    return outcome_counts(run, (dep for dep in run.defs[tid].dependencies if dep not in reset))


def _fresh(run: RunState, tid: str, old: TaskState, reset: Container[str]) -> TaskState:
    """The default state of a reset task: a new attempt (the old one's number again if it was never
    dispatched: no worker and no outcome slot ever saw it), its counts recomputed, READY when its rule
    is met already, else PENDING."""
    attempt = old.attempt + 1 if old.dispatched else old.attempt
    ok, failed, skipped = _counts(run, tid, reset)
    td = run.defs[tid]
    # A task without dependencies is ready at once, whatever its rule (as at submit).
    verdict = (
        True if not td.dependencies else rule_outcome(td.trigger, len(td.dependencies), ok, failed, skipped)
    )
    status = TaskStatus.READY if verdict is True else TaskStatus.PENDING
    return TaskState(status=status, attempt=attempt, first=attempt, ok=ok, failed=failed, skipped=skipped)


def reset(run: RunState, selected: Iterable[str], hooks: Sequence[Hook] = HOOKS) -> RunState:
    """``run`` with the ``selected`` tasks reset (see the module's invariant) and the run going on:
    RUNNING again (PENDING if it never started, so the scheduler checks its bounds and starts it), its
    end, reason and cancel request cleared, :attr:`RunState.reruns` counted up.

    O(selected tasks and their dependencies and dependents). Uses the run's maps linearly (the fold's
    bulk path hands it drafts): everything is computed from ``run`` first, then written.
    """
    old = {tid: run.tasks[tid] for tid in dict.fromkeys(selected) if tid in run.tasks}
    new: dict[str, TaskState] = {}
    for tid, ts in old.items():
        fresh = _fresh(run, tid, ts, old)
        for hook in hooks:
            fresh = hook.reset(run, tid, ts, fresh)
        new[tid] = fresh
    # Tasks outside the selection that depend on it (a COMPLETED fallback of a failed task): their
    # counts lose what the reset tasks had contributed, so the new outcomes are not counted twice.
    recount: dict[str, TaskState] = {}
    for tid in old:
        for child in _builds_on(run, tid, hooks):
            if child not in old and child not in recount and child in run.tasks:
                ok, failed, skipped = _counts(run, child, old)
                recount[child] = run.tasks[child]._replace(ok=ok, failed=failed, skipped=skipped)
    tasks, ready, doomed, running, queued, tally = (
        run.tasks,
        run.ready,
        run.doomed,
        run.running,
        run.queued,
        run.tally,
    )
    for tid, fresh in new.items():
        before = old[tid]
        if before.status is not fresh.status:
            tally = _moved(tally, before.status, fresh.status)
        tasks = tasks.set(tid, fresh)
        ready = (
            ready.set(tid, True)
            if fresh.status is TaskStatus.READY and not fresh.dispatched
            else ready.discard(tid)
        )
        queued = (
            queued.set(tid, True)
            if fresh.status is TaskStatus.READY and fresh.dispatched
            else queued.discard(tid)
        )
        running = running.set(tid, True) if fresh.status is TaskStatus.RUNNING else running.discard(tid)
        if fresh.status is TaskStatus.PENDING and _doomed(run, tid, fresh):
            doomed = doomed.set(tid, True)
        else:
            doomed = doomed.discard(tid)
    for tid, counted in recount.items():
        tasks = tasks.set(tid, counted)
    # Reset tasks that had completed from the cache count no more as cached (progress shows the rest).
    uncached = sum(
        1 for tid, fresh in new.items() if old[tid].cached_from is not None and fresh.cached_from is None
    )
    # Durable waits (nerv_cluster/waits.py): a reset node waits no more, and a signal node that had
    # completed with its signal waits for a new one (a signal that came after a timeout stays, for the
    # node to take when it is reached again).
    waiting, woken, signals = run.waiting, run.woken, run.signals
    for tid, before in old.items():
        waiting, woken = waiting.discard(tid), woken.discard(tid)
        name = waits.signal_of(run.defs[tid])
        if name is not None and before.status is TaskStatus.COMPLETED:
            signals = signals.discard(name)
    out = run._replace(
        waiting=waiting,
        woken=woken,
        signals=signals,
        tasks=tasks,
        ready=ready,
        doomed=doomed,
        running=running,
        queued=queued,
        tally=tally,
        status=RunStatus.RUNNING if run.started_at is not None else RunStatus.PENDING,
        finished_at=None,
        reason="",
        cancel_requested=False,
        reruns=run.reruns + 1,
        cached=max(0, run.cached - uncached),
    )
    for hook in hooks:
        out = hook.after(out, list(old))
    return out


def _doomed(run: RunState, tid: str, ts: TaskState) -> bool:
    """True when a PENDING task's trigger rule can no longer be met (the scheduler skips it)."""
    td = run.defs[tid]
    return rule_outcome(td.trigger, len(td.dependencies), ts.ok, ts.failed, ts.skipped) is False


# -- the event ------------------------------------------------------------------------------------------


def _named(data: Any) -> list[str] | None:
    """The task ids an event's data names, None for "the unfinished ones"; ValueError when mistyped."""
    tasks = data.get("tasks")
    if tasks is None:
        return None
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ValueError("tasks is not a list of task ids")
    return tasks


def requested(run: RunState, ev: Event, hooks: Sequence[Hook] = HOOKS) -> RunState:
    """The fold of WORKFLOW_RERUN_REQUESTED: ``run`` reset, if it is finished and ``ev`` is its next
    rerun (data ``n == run.reruns + 1``); ``run`` itself otherwise (a duplicate, a stale copy, a
    second request racing the first, or a mistyped event)."""
    n = ev.data.get("n")
    if not run.status.terminal or isinstance(n, bool) or n != run.reruns + 1:
        return run
    try:
        named = _named(ev.data)
    except ValueError:
        return run
    out = reset(run, select(run, named, hooks), hooks)
    for hook in hooks:
        out = hook.request(out, ev.data)
    return out


def event_data(run: RunState, tasks: Sequence[str] | None) -> dict[str, Any]:
    """The data of the WORKFLOW_RERUN_REQUESTED that reruns ``run`` (checked by :func:`check`)."""
    data: dict[str, Any] = {"n": run.reruns + 1}
    if tasks is not None:
        data["tasks"] = list(tasks)
    return data


def check(run: RunState, tasks: Iterable[str] | None, hooks: Sequence[Hook] = HOOKS) -> list[str] | None:
    """The task ids to name in the event (deduplicated; None: the unfinished ones), or the clear error
    why ``run`` cannot be rerun so: :class:`RunNotFinishedError` while it is going,
    :class:`RerunError` for a rejected run, an unknown task id, no task named, or nothing to rerun."""
    rid = run.run_id
    if not run.status.terminal:
        raise RunNotFinishedError(
            f"run {rid} is {run.status.value}: only a finished run can be rerun "
            f"({run.finished_tasks}/{run.total} tasks done; wait for it, or cancel it first)"
        )
    if run.rejected:
        raise RerunError(f"run {rid} cannot be rerun: it was refused ({run.rejected})")
    if tasks is None:
        if not unfinished(run):
            raise RerunError(
                f"run {rid} {run.status.value}: every task completed, nothing to rerun "
                "(name tasks to run them and their descendants again)"
            )
        return None
    if isinstance(tasks, str):  # a lone id would be taken for its characters
        tasks = [tasks]
    named = list(dict.fromkeys(tasks))
    if not named:
        raise RerunError(f"run {rid}: no task named (leave tasks out to rerun every unfinished task)")
    unknown = [t for t in named if not isinstance(t, str) or t not in run.tasks]
    if unknown:
        shown = ", ".join(f"{t!r:.80}" for t in unknown[:_SHOWN])
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        raise RerunError(f"run {rid} has no task {shown}{more}; nothing was rerun")
    return named


__all__ = [
    "HOOKS",
    "ChildHook",
    "Hook",
    "MapHook",
    "check",
    "event_data",
    "requested",
    "reset",
    "select",
    "unfinished",
]
