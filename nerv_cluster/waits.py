"""Durable waits: nodes that wait for a signal or a timer in the scheduler's state, never in a worker.

A wait node (``Workflow.wait_for``, ``sleep``, ``sleep_until``) is a task whose ``fn`` is
``constants.WAIT_FN`` and whose ``TaskDef.wait`` says what it waits for:

- ``{"signal": name, "timeout": s}`` (``timeout`` optional): completes with the payload of the first
  ``SIGNAL_RECEIVED`` of that name (``Client.signal``); fails with ``TaskTimeoutError`` ``s`` seconds after
  it was reached, so trigger rules apply (a ``one_failed`` fallback runs);
- ``{"sleep": s}``: completes (result None) ``s`` seconds after it was reached;
- ``{"until": t}``: completes at epoch time ``t`` (at once if that is past).

Invariant: everything a wait decides follows from the log alone. Reaching the node is an event
(``TASK_WAITING``, written by the scheduler when the node is READY) and its deadline is that event's
logged time (Redis's clock, ``state.event_time``) plus the timeout, so a refold after a scheduler restart
finds the same deadline; a signal is an event of the run, kept in ``RunState.signals`` (the first of
each name wins) whether or not its node was reached, and the fold marks a WAITING node whose signal is
there as ``woken``; the scheduler turns ``woken`` into TASK_COMPLETED (``scheduler.decisions``) and
deadlines into TASK_COMPLETED/TASK_FAILED (``scheduler.waits``, a timer heap rebuilt on takeover). A node
ends once: whichever of its signal or deadline the scheduler folds first ends it, and the other finds it
no longer WAITING.

This module holds the pure parts: the node's JSON form and its checks, deadlines, the events the
scheduler writes, and the client's checks of a signal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nerv_cluster import constants
from nerv_cluster.errors import (
    PayloadTooLargeError,
    RunFinishedError,
    SerializationError,
    TaskTimeoutError,
    UnknownSignalError,
    WorkflowError,
)
from nerv_cluster.ids import check_id
from nerv_cluster.model import Event, EventType, TaskDef, TaskError, TaskStatus, WorkflowDef

if TYPE_CHECKING:
    from nerv_cluster.state import RunState

#: ``WorkflowDef.meta`` key of the signal index (signal name -> task id), so the fold finds a signal's
#: node in O(1) instead of scanning the definition.
SIGNALS_META = "signals"
#: The ``TaskError.type`` / reason of a signal wait that timed out.
TIMEOUT_REASON = "timeout"


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WorkflowError(f"{what} must be a number of seconds, got {value!r:.80}")
    return float(value)


def check_spec(tid: str, spec: Any) -> None:
    """Raise :class:`WorkflowError` unless ``spec`` is a valid ``TaskDef.wait`` (see the module)."""
    where = f"wait node {tid!r}"
    if not isinstance(spec, Mapping) or len(spec.keys() & {"signal", "sleep", "until"}) != 1:
        raise WorkflowError(f"{where}: a wait is one of signal=, sleep= or until=, got {spec!r:.80}")
    if "signal" in spec:
        if set(spec) - {"signal", "timeout"}:
            raise WorkflowError(f"{where}: unknown wait fields {sorted(set(spec) - {'signal', 'timeout'})}")
        check_id(spec["signal"], "signal name")
        timeout = spec.get("timeout")
        if timeout is not None and _seconds(timeout, f"{where}: timeout") <= 0:
            raise WorkflowError(f"{where}: timeout must be a positive number of seconds")
    elif "sleep" in spec:
        if len(spec) != 1 or _seconds(spec["sleep"], f"{where}: sleep") < 0:
            raise WorkflowError(f"{where}: sleep takes 0 or more seconds and nothing else")
    elif len(spec) != 1 or _seconds(spec["until"], f"{where}: until") < 0:
        raise WorkflowError(f"{where}: until takes an epoch time in seconds and nothing else")


def check_definition(wf: WorkflowDef, waits: list[TaskDef]) -> None:
    """Raise :class:`WorkflowError` unless the wait nodes ``waits`` of ``wf`` are sound: valid specs, no
    options a wait cannot honour, and a signal index (``meta["signals"]``) naming exactly its signal
    nodes, each signal name once."""
    index = wf.meta.get(SIGNALS_META, {})
    if not isinstance(index, Mapping):
        raise WorkflowError("the signal index of the workflow is not a mapping")
    named: dict[str, str] = {}
    for t in waits:
        check_spec(t.id, t.wait)
        if t.fn != constants.WAIT_FN or any(x is not None for x in (t.retry, t.cache, t.workflow, t.over)):
            raise WorkflowError(
                f"wait node {t.id!r}: a wait takes no function, retry, cache, sub-workflow or map"
            )
        name = signal_of(t)
        if name is None:
            continue
        if name in named:
            raise WorkflowError(f"signal {name!r} is waited for by two nodes: {named[name]!r} and {t.id!r}")
        named[name] = t.id
    if dict(index) != named:
        raise WorkflowError("the signal index of the workflow does not match its wait_for nodes")


def signal_of(td: TaskDef) -> str | None:
    """The signal name a wait node waits for (None for a timer or a task that is no wait)."""
    spec = td.wait
    name = spec.get("signal") if spec is not None else None
    return name if isinstance(name, str) else None


def task_for(run: RunState, name: str) -> str | None:
    """The task id of the node of ``run`` that waits for signal ``name`` (None: no such node)."""
    index = run.definition.meta.get(SIGNALS_META)
    tid = index.get(name) if isinstance(index, Mapping) else None
    return tid if isinstance(tid, str) and tid in run.defs else None


def deadline(spec: Mapping[str, Any], since: float) -> float | None:
    """When a wait node reached at ``since`` (Redis's clock) ends by its timer (None: only a signal
    ends it)."""
    if "signal" in spec:
        timeout = spec.get("timeout")
        return None if timeout is None else since + float(timeout)
    if "sleep" in spec:
        return since + float(spec["sleep"])
    return float(spec["until"])


# -- the scheduler's events ---------------------------------------------------------------------------


def enter(run: RunState, tid: str, attempt: int, now: float, source: str) -> Event:
    """TASK_WAITING: the READY wait node ``tid`` was reached and waits from now on."""
    spec = dict(run.defs[tid].wait or {})
    return Event(EventType.TASK_WAITING, run.run_id, tid, attempt, spec, ts=now, source=source)


def wake(run: RunState, tid: str, now: float, source: str) -> Event:
    """TASK_COMPLETED of a woken node: its signal's payload is its result."""
    ts = run.tasks[tid]
    name = signal_of(run.defs[tid]) or ""
    data = {"result": run.signals.get(name), "signal": name, "started_at": ts.started_at}
    return Event(EventType.TASK_COMPLETED, run.run_id, tid, ts.attempt, data, ts=now, source=source)


def expire(run: RunState, tid: str, attempt: int, now: float, source: str) -> Event | None:
    """The event that ends WAITING node ``tid`` (attempt ``attempt``) at its deadline, if it is due by
    ``now`` and still waiting (not woken by its signal meanwhile): TASK_COMPLETED for a timer,
    TASK_FAILED with :class:`TaskTimeoutError` for a signal wait."""
    ts = run.tasks.get(tid)
    if ts is None or ts.status is not TaskStatus.WAITING or ts.attempt != attempt or tid in run.woken:
        return None
    if ts.due_at is None or ts.due_at > now:
        return None
    td = run.defs[tid]
    name = signal_of(td)
    if name is None:
        data: dict[str, Any] = {"result": None, "started_at": ts.started_at}
        return Event(EventType.TASK_COMPLETED, run.run_id, tid, attempt, data, ts=now, source=source)
    timeout = (td.wait or {}).get("timeout")
    error = TaskError.from_exception(
        TaskTimeoutError(f"no signal {name!r} arrived within {timeout:g}s of the node being reached")
    )
    data = {"error": error.to_dict(), "reason": TIMEOUT_REASON, "started_at": ts.started_at}
    return Event(EventType.TASK_FAILED, run.run_id, tid, attempt, data, ts=now, source=source)


# -- the client's side --------------------------------------------------------------------------------


def signal_event(run: RunState, name: str, payload: Any, max_bytes: int) -> Event:
    """The SIGNAL_RECEIVED that delivers ``payload`` to ``run``'s node waiting for ``name``; raises (a
    :class:`~nerv_cluster.errors.SignalError`, :class:`SerializationError` or
    :class:`PayloadTooLargeError`, nothing written) for a finished run, a name no node waits for, or a
    payload that is not JSON or is over ``max_bytes``."""
    rid = run.run_id
    if run.status.terminal:
        raise RunFinishedError(f"run {rid} is {run.status.value}: no node of it can receive signal {name!r}")
    if not isinstance(name, str) or task_for(run, name) is None:
        index = run.definition.meta.get(SIGNALS_META)
        known = sorted(index) if isinstance(index, Mapping) else []
        raise UnknownSignalError(
            f"run {rid} has no wait_for node for signal {name!r:.80}; "
            + (f"it waits for: {', '.join(known)}" if known else "it waits for no signal")
        )
    try:
        size = len(json.dumps({"name": name, "payload": payload}, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"signal {name!r}: the payload is not JSON ({exc})") from None
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"signal {name!r}: the payload is {size} bytes of JSON; the limit is {max_bytes} "
            "(NERV_MAX_SIGNAL_BYTES): send a reference to large data, not the data"
        )
    return Event(EventType.SIGNAL_RECEIVED, rid, data={"name": name, "payload": payload}, source="client")
