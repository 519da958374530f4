"""What the console shows, as plain JSON data computed from folded state: pure, no I/O.

Every page and API answer of the console is one of these projections of a :class:`RunState` (the fold
of the run's log, now or up to a cursor), so the console can never disagree with ``client.status``.
Sizes are bounded for big runs: a level or a map wider than ``group_limit`` is sent as a group (its
ids, no per-task markup), long values are shortened, the timeline keeps at most ``max_bars`` bars.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from nerv_cluster import constants, mapping
from nerv_cluster import state as st
from nerv_cluster.model import Event, EventType, TaskStatus

#: Levels (and maps) wider than this are drawn as a group that opens on a click.
GROUP_LIMIT = 60
#: Characters of an argument or result shown before it is cut.
SHORT_CHARS = 400
#: Bars the timeline draws at most (the longest ones are kept).
MAX_BARS = 3_000
#: Event types after which a page reloads the graph rather than patching statuses: the graph grew, or
#: many tasks were reset at once.
RELOAD_EVENTS = frozenset(
    {EventType.WORKFLOW_SUBMITTED, EventType.MAP_EXPANDED, EventType.WORKFLOW_RERUN_REQUESTED}
)


#: How :func:`readable` marks a reference inside the JSON text, for :func:`shorten` to unquote.
_REF_MARK = "\x00ref:"
_REF_TEXT = re.compile(r'"\\u0000ref:((?:[^"\\]|\\.)*)"')


def readable(value: Any) -> Any:
    """``value`` with each upstream reference (``{"__nerv_ref__": id}``) standing for ``<id>`` (what
    the task receives there is that task's result); :func:`shorten` writes it so, unquoted."""
    if isinstance(value, dict):
        if set(value) == {constants.REF_KEY} and isinstance(value[constants.REF_KEY], str):
            return f"{_REF_MARK}{value[constants.REF_KEY]}"
        return {k: readable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [readable(v) for v in value]
    return value


def shorten(value: Any, limit: int = SHORT_CHARS) -> str:
    """``value`` as compact JSON (its ``repr`` when it is no JSON), cut to ``limit`` characters with a
    note of how much was left out."""
    try:
        text = json.dumps(value, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    if "\\u0000ref:" in text:
        text = _REF_TEXT.sub(lambda m: f"<{json.loads(chr(34) + m.group(1) + chr(34))}>", text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def duration(started: float | None, finished: float | None) -> float | None:
    """Seconds between two times of one clock, when both are known."""
    return None if started is None or finished is None else max(0.0, finished - started)


def run_summary(run: st.RunState) -> dict[str, Any]:
    """A run's line in the runs list: status, progress, timings, its parent (for a child run)."""
    parent = st.parent_of(run)
    total = run.total
    done = run.finished_tasks
    return {
        "run_id": run.run_id,
        "name": run.name,
        "status": run.status.value,
        "reason": run.reason,
        "total": total,
        "finished": done,
        "progress": 1.0 if not total else done / total,
        "counts": run.counts,
        "submitted_at": run.submitted_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration": duration(run.submitted_at, run.finished_at),
        "parent": None
        if parent is None
        else {"run_id": parent.run_id, "task_id": parent.task_id, "attempt": parent.attempt},
        "depth": run.definition.depth,
    }


def nest_runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs list rows (newest first) with each child run right under its parent, in the order given,
    and ``indent`` its depth under the top of what is shown (a child whose parent is not among the rows
    stays where it is, unindented)."""
    by_id = {r["run_id"]: r for r in rows}
    children: dict[str, list[dict[str, Any]]] = {}
    tops: list[dict[str, Any]] = []
    for r in rows:
        parent = (r.get("parent") or {}).get("run_id")
        if isinstance(parent, str) and parent in by_id and parent != r["run_id"]:
            children.setdefault(parent, []).append(r)
        else:
            tops.append(r)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def put(row: dict[str, Any], indent: int) -> None:
        if row["run_id"] in seen:  # a loop of parents cannot come from the engine; never recurse on it
            return
        seen.add(row["run_id"])
        out.append({**row, "indent": indent})
        for child in children.get(row["run_id"], ()):
            put(child, indent + 1)

    for row in tops:
        put(row, 0)
    return out


def filter_runs(
    rows: Iterable[dict[str, Any]], status: str | None = None, name: str | None = None
) -> list[dict[str, Any]]:
    """Rows whose status is ``status`` (any, when empty) and whose name or id contains ``name``
    (case-insensitive)."""
    status = (status or "").upper()
    needle = (name or "").lower()
    return [
        r
        for r in rows
        if (not status or r["status"] == status)
        and (not needle or needle in r["name"].lower() or needle in r["run_id"].lower())
    ]


def _status_of(run: st.RunState, tid: str) -> str:
    return run.tasks[tid].status.value


def graph(run: st.RunState, group_limit: int = GROUP_LIMIT) -> dict[str, Any]:
    """The run's DAG laid out by the planner's levels.

    ``levels``: one entry per level of the static plan, ``{"level", "tasks", "group"}`` (``group`` True
    when it is wider than ``group_limit``: the page draws it folded). ``maps``: map node id -> its
    elements' ids (the graph grown at run time), each a group when wider than ``group_limit``.
    ``tasks``: id -> ``[name, status]``. ``deps``: id -> its dependencies, for the static tasks of a run
    small enough to draw edges for. ``critical``: the critical path (see :func:`critical_path`).
    """
    levels = [
        {"level": k, "tasks": list(ids), "group": len(ids) > group_limit}
        for k, ids in enumerate(run.plan.levels)
    ]
    maps = {
        map_id: {"tasks": [td.id for td in elements], "group": len(elements) > group_limit}
        for map_id, elements in run.growth.layers.items()
    }
    tasks = {tid: [run.defs[tid].name or tid, ts.status.value] for tid, ts in run.tasks.items()}
    static = run.definition.tasks
    deps = {td.id: list(td.dependencies) for td in static} if len(static) <= 4 * group_limit else {}
    return {
        "run_id": run.run_id,
        "levels": levels,
        "maps": maps,
        "tasks": tasks,
        "deps": deps,
        "critical": critical_path(run),
        "group_limit": group_limit,
    }


def critical_path(run: st.RunState) -> list[str]:
    """The chain of tasks that decided the run's length: from the task that finished last, back
    through the dependency that finished last each time (what it waited for longest). Before anything
    finished: the planner's critical path (the longest chain of dependencies)."""
    best: str | None = None
    best_end = float("-inf")
    for tid, ts in run.tasks.items():
        if ts.finished_at is not None and ts.finished_at > best_end:
            best, best_end = tid, ts.finished_at
    if best is None:
        return list(run.plan.critical_path)
    path = [best]
    seen = {best}
    while True:
        deps = run.defs[path[-1]].dependencies
        ends = [(run.tasks[d].finished_at, d) for d in deps if d in run.tasks and d not in seen]
        ended = [(end, d) for end, d in ends if end is not None]
        if not ended:
            break
        _, last = max(ended)
        path.append(last)
        seen.add(last)
    path.reverse()
    return path


def timeline(run: st.RunState, max_bars: int = MAX_BARS) -> dict[str, Any]:
    """A Gantt chart: one lane per worker, a bar per task attempt a worker started (its last attempt,
    as the fold keeps it), times relative to the run's submission; ``critical`` marks the critical path.
    A task still running ends at ``now`` (the latest time seen). At most ``max_bars`` bars (the longest
    kept) so a huge run stays drawable; ``dropped`` says how many were left out."""
    t0 = run.submitted_at
    latest = max(
        [t0, run.finished_at or t0]
        + [ts.finished_at or ts.started_at or t0 for ts in run.tasks.values() if ts.started_at is not None]
    )
    bars: list[tuple[float, str, str, float, float, str]] = []
    for tid, ts in run.tasks.items():
        # Only what a worker ran: a map node, a wait or a sub-workflow's node runs in no worker.
        if ts.started_at is None or ts.worker is None:
            continue
        end = ts.finished_at if ts.finished_at is not None else latest
        bars.append((end - ts.started_at, ts.worker, tid, ts.started_at - t0, end - t0, ts.status.value))
    dropped = max(0, len(bars) - max_bars)
    if dropped:
        bars.sort(reverse=True)
        bars = bars[:max_bars]
    lanes: dict[str, list[list[Any]]] = {}
    rows: dict[str, list[float]] = {}  # per lane: where each of its rows is free from
    for _, worker, tid, start, end, status in sorted(bars, key=lambda b: b[3]):
        # A thread pool runs several tasks in one process at once: overlapping bars of one worker go
        # on rows of their own within its lane (the first row free by then).
        free = rows.setdefault(worker, [])
        row = next((i for i, until in enumerate(free) if until <= start), len(free))
        if row == len(free):
            free.append(end)
        else:
            free[row] = end
        lanes.setdefault(worker, []).append([tid, round(start, 4), round(end, 4), status, row])
    return {
        "run_id": run.run_id,
        "span": round(latest - t0, 4),
        "lanes": [{"worker": w, "rows": len(rows[w]), "bars": lanes[w]} for w in sorted(lanes)],
        "critical": critical_path(run),
        "dropped": dropped,
    }


def task_detail(run: st.RunState, tid: str, limit: int = SHORT_CHARS) -> dict[str, Any]:
    """Everything the task panel shows of one task: its call, its outcome, its attempts and timings,
    and why it did not run (a skipped or cancelled task's reason)."""
    td = run.defs[tid]
    ts = run.tasks[tid]
    result = mapping.result_of(run, tid) if run.growth.layers else ts.result
    error = ts.error
    return {
        "task_id": tid,
        "name": td.name or tid,
        "fn": td.fn,
        "queue": td.queue,
        "status": ts.status.value,
        "args": [shorten(readable(a), limit) for a in td.args],
        "kwargs": {k: shorten(readable(v), limit) for k, v in td.kwargs.items()},
        "result": shorten(result, limit) if ts.status is TaskStatus.COMPLETED else None,
        "error": None
        if error is None
        else {"type": error.type, "message": error.message, "traceback": error.traceback},
        "attempts": ts.attempt if ts.dispatched else ts.attempt - 1,
        "worker": ts.worker,
        "dispatched_at": ts.dispatched_at,
        "started_at": ts.started_at,
        "finished_at": ts.finished_at,
        "ran_for": duration(ts.started_at, ts.finished_at),
        "reason": ts.reason,
        "dependencies": list(td.dependencies),
        "dependents": list(run.plan.dependents.get(tid, ())),
        "trigger": td.trigger.value,
        "cached_from": ts.cached_from,
        "child": ts.child,
        "level": run.plan.level_of.get(tid),
    }


def run_detail(run: st.RunState, *, tasks: bool = True) -> dict[str, Any]:
    """``GET /api/runs/{id}``: the summary and (by default) every task's status, attempts and timings."""
    out = run_summary(run)
    if tasks:
        out["tasks"] = {
            tid: {
                "name": run.defs[tid].name or tid,
                "status": ts.status.value,
                "attempts": ts.attempt if ts.dispatched else ts.attempt - 1,
                "worker": ts.worker,
                "started_at": ts.started_at,
                "finished_at": ts.finished_at,
                "reason": ts.reason,
                "error": None if ts.error is None else f"{ts.error.type}: {ts.error.message}",
            }
            for tid, ts in run.tasks.items()
        }
    return out


def event_dict(ev: Event, limit: int = 160) -> dict[str, Any]:
    """One line of the event log: its cursor, type, task, attempt, times and a short form of its data."""
    return {
        "cursor": ev.cursor,
        "type": ev.type.value,
        "task": ev.task_id,
        "attempt": ev.attempt,
        "ts": ev.ts,
        "source": ev.source,
        "data": shorten(ev.data, limit) if ev.data else "",
    }


def changes(old: st.RunState, new: st.RunState, ev: Event) -> dict[str, str]:
    """Task id -> new status for the tasks whose status one event changed: its own task, that task's
    dependents (which it may have made READY or doomed) and, for a map element, its map node. O(degree)
    per event, never a scan of the run (a graph-wide change is a :data:`RELOAD_EVENTS` type)."""
    tid = ev.task_id
    if tid is None or tid not in new.tasks:
        return {}
    near = [tid, *new.plan.dependents.get(tid, ())]
    if mapping.is_element(tid):
        near.append(tid.rpartition("[")[0])
    out: dict[str, str] = {}
    for t in near:
        after = new.tasks.get(t)
        if after is None:
            continue
        before = old.tasks.get(t)
        if before is None or before.status is not after.status:
            out[t] = after.status.value
    return out


def sse_message(ev: Event, old: st.RunState | None, new: st.RunState) -> dict[str, Any]:
    """The data of one Server-Sent Event: the event, what it changed, and the run's counts after it."""
    return {
        "event": event_dict(ev),
        "changes": {} if old is None else changes(old, new, ev),
        "reload": old is None or ev.type in RELOAD_EVENTS,
        "status": new.status.value,
        "counts": new.counts,
        "finished": new.finished_tasks,
        "total": new.total,
    }


__all__ = [
    "GROUP_LIMIT",
    "RELOAD_EVENTS",
    "changes",
    "critical_path",
    "event_dict",
    "filter_runs",
    "graph",
    "nest_runs",
    "run_detail",
    "run_summary",
    "shorten",
    "sse_message",
    "task_detail",
    "timeline",
]
