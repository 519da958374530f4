"""Checkpoints: a run's folded state as JSON, with the position in its log that it covers.

A new scheduler leader rebuilds every active run from its log. For a long run that is a replay of
hundreds of thousands of events; with a checkpoint it decodes the state at the checkpoint and folds only
the events after it. A checkpoint is a cache of the fold, never a second truth: it is written from
``fold(log[:upto])`` (see ``scheduler.checkpointer.Checkpointer``), so ``decode(encode(run))`` must equal
``run`` exactly, which the unit tests check field by field. A checkpoint that cannot be decoded (an
older format, a bug) is ignored and the whole log is replayed.

The plan is not stored: it is a pure function of the definition and is recomputed on decode. Nor are
the elements of expanded maps: only which maps expanded, in order, with their widths; decode grows the
graph again with the same pure function the fold used (``mapping.grow``), from the decoded state.
"""

from __future__ import annotations

from typing import Any, cast

from pyrsistent import PMap, pmap

from nerv_cluster import mapping
from nerv_cluster.errors import MalformedCheckpointError, NervError
from nerv_cluster.intake import decode as decode_definition
from nerv_cluster.intake import describe
from nerv_cluster.model import RunStatus, TaskError, TaskStatus
from nerv_cluster.planner import plan
from nerv_cluster.state import RunState, TaskState

#: Bumped whenever the encoding changes; a checkpoint of another version is ignored.
#: 3: TaskState.first, RunState.reruns (rerun); 4: cache and child-run fields; 5: map growth, gathered (map);
#: 6: waiting, woken, signals (waits, issue 11); 7: limits (TaskState.held, .slot; RunState.held);
#: 8: TaskState.claim (claim nonces, README.md#security).
FORMAT = 8

_TASK_FIELDS = TaskState._fields
_STATUS_AT = _TASK_FIELDS.index("status")
_ERROR_AT = _TASK_FIELDS.index("error")
_DEFAULT_TASK = TaskState()
#: Status by value: a dict lookup, several times cheaper than ``TaskStatus(value)`` per task.
_STATUS_OF = {s.value: s for s in TaskStatus}
_STATUSES = tuple(TaskStatus)
_STATUS_INDEX = {s: i for i, s in enumerate(_STATUSES)}
#: The id sets of a run, stored as lists of task ids.
_ID_SETS = ("ready", "doomed", "running", "queued", "spawning", "gathered", "waiting", "woken", "held")
#: RunState fields stored as they are (JSON scalars).
_PLAIN = (
    "submitted_at",
    "started_at",
    "finished_at",
    "reason",
    "cancel_requested",
    "rejected",
    "submitted_bytes",
    "reruns",
    "cached",
    "parent_attempt",
)


def _encode_task(ts: TaskState) -> list[Any]:
    row = list(ts)
    row[_STATUS_AT] = ts.status.value
    row[_ERROR_AT] = ts.error.to_dict() if ts.error is not None else None
    return row


def _decode_task(row: list[Any]) -> TaskState:
    if len(row) != len(_TASK_FIELDS):
        raise ValueError(f"task row has {len(row)} fields, expected {len(_TASK_FIELDS)}")
    row = list(row)
    row[_STATUS_AT] = _STATUS_OF[row[_STATUS_AT]]
    row[_ERROR_AT] = TaskError.from_dict(row[_ERROR_AT]) if row[_ERROR_AT] is not None else None
    return TaskState(*row)


def encode(run: RunState) -> dict[str, Any]:
    """The JSON form of a run's state. Tasks still in their initial state are left out."""
    return {
        "format": FORMAT,
        "run_id": run.run_id,
        "definition": run.definition.to_dict(),
        "tasks": {tid: _encode_task(ts) for tid, ts in run.tasks.items() if ts != _DEFAULT_TASK},
        "status": run.status.value,
        "tally": list(run.tally),
        "maps": [[map_id, len(run.growth.layers[map_id])] for map_id in run.growth.order],
        **{name: list(getattr(run, name)) for name in _ID_SETS},
        **{name: getattr(run, name) for name in _PLAIN},
        "signals": dict(run.signals),
    }


def decode(data: Any) -> RunState:
    """Inverse of :func:`encode`; :class:`MalformedCheckpointError` (never another exception) for a
    checkpoint it cannot read: another format, or anything not written by :func:`encode`
    (``tests/unit/test_fuzz_checkpoint.py`` fuzzes it)."""
    try:
        run = _decode(data)
        _check(run)
    except MalformedCheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, NervError) as exc:
        raise MalformedCheckpointError(f"unreadable checkpoint: {describe(exc)}") from None
    return run


def _check(run: RunState) -> None:
    """ValueError unless the decoded state agrees with itself (O(tasks)): a checkpoint is a cache, and
    one that does not hold together is better replayed than trusted."""
    tasks = run.tasks
    counts = [0] * len(_STATUSES)
    for tid, ts in tasks.items():
        counts[_STATUS_INDEX[ts.status]] += 1
        if type(ts.attempt) is not int or type(ts.first) is not int or not 1 <= ts.first <= ts.attempt:
            raise ValueError(f"task {tid!r:.80} has attempt {ts.attempt!r:.20}, first {ts.first!r:.20}")
        if not all(type(n) is int and n >= 0 for n in (ts.ok, ts.failed, ts.skipped, ts.lost)):
            raise ValueError(f"task {tid!r:.80} has counts that are no numbers")
        for value in (ts.dispatched_at, ts.started_at, ts.finished_at, ts.due_at):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"task {tid!r:.80} has a time that is no number: {value!r:.40}")
        for text in (ts.worker, ts.via, ts.child, ts.slot, ts.cache_key, ts.cached_from, ts.claim):
            if text is not None and not isinstance(text, str):
                raise ValueError(f"task {tid!r:.80} has a name that is no string: {text!r:.40}")
        if not all(type(b) is bool for b in (ts.dispatched, ts.held, ts.batch)):
            raise ValueError(f"task {tid!r:.80} has flags that are no booleans")
        if not isinstance(ts.reason, str):
            raise ValueError(f"task {tid!r:.80} has a reason that is no string")
    if tuple(counts) != run.tally:
        raise ValueError("the tally does not match the tasks' statuses")
    for name in _ID_SETS:
        for tid in getattr(run, name):
            if tid not in tasks:
                raise ValueError(f"{name} names task {tid!r:.80}, which the run does not have")
    ready, running, waiting = TaskStatus.READY, TaskStatus.RUNNING, TaskStatus.WAITING
    sets = (
        ("ready", run.ready, lambda ts: ts.status is ready and not ts.dispatched),
        ("queued", run.queued, lambda ts: ts.status is ready and ts.dispatched),
        ("held", run.held, lambda ts: ts.status is ready),
        ("running", run.running, lambda ts: ts.status is running),
        ("waiting", run.waiting, lambda ts: ts.status is waiting),
    )
    for name, ids, fits in sets:
        for tid in ids:
            if not fits(tasks[tid]):
                raise ValueError(f"{name} holds task {tid!r:.80}, which is {tasks[tid].status.value}")
    if counts[_STATUS_INDEX[waiting]] != len(run.waiting):
        raise ValueError("a WAITING task is missing from the waiting set")
    for value in (run.submitted_at, run.started_at, run.finished_at):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"a run time that is no number: {value!r:.40}")


def _decode(data: Any) -> RunState:
    if data.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {data.get('format')!r}, expected {FORMAT}")
    definition = decode_definition(data["definition"])
    defs = {t.id: t for t in definition.tasks}
    rows = {tid: _decode_task(row) for tid, row in data["tasks"].items()}
    # A plain dict while the maps grow again (elements join it in order), made a PMap once at the end.
    tasks = dict.fromkeys(defs, _DEFAULT_TASK)
    tasks.update((t, r) for t, r in rows.items() if t in defs)
    tally = tuple(int(n) for n in data["tally"])
    if len(tally) != len(TaskStatus):
        raise ValueError("checkpoint tally does not match the task statuses")
    run = RunState(
        run_id=str(data["run_id"]),
        definition=definition,
        plan=plan(definition.tasks),
        defs=defs,
        tasks=cast("PMap[str, TaskState]", tasks),
        status=RunStatus(data["status"]),
        tally=tally,
        ready=_ids(data["ready"]),
        doomed=_ids(data["doomed"]),
        running=_ids(data["running"]),
        queued=_ids(data["queued"]),
        gathered=_ids(data["gathered"]),
        spawning=_ids(data.get("spawning", [])),
        waiting=_ids(data.get("waiting", [])),
        woken=_ids(data.get("woken", [])),
        signals=pmap(data.get("signals", {})),
        held=_ids(data.get("held", [])),
        submitted_at=float(data["submitted_at"]),
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        reason=str(data["reason"]),
        cancel_requested=bool(data["cancel_requested"]),
        # Absent from checkpoints written before these fields existed: their defaults then.
        rejected=str(data.get("rejected", "")),
        submitted_bytes=int(data.get("submitted_bytes", 0)),
        reruns=int(data.get("reruns", 0)),
        cached=int(data.get("cached", 0)),
        parent_attempt=int(data.get("parent_attempt", 0)),
    )
    run = _regrow(run, data["maps"], rows, tasks)
    for tid in rows:
        if tid not in run.defs:
            raise ValueError(f"checkpoint names task {tid!r} the definition does not have")
    return run._replace(tasks=pmap(tasks, pre_size=len(tasks) * 2))


def _regrow(
    run: RunState, maps: list[list[Any]], rows: dict[str, TaskState], tasks: dict[str, TaskState]
) -> RunState:
    """``run`` with the maps of a checkpoint expanded again, in order, as the fold expanded them (the
    lists they map over are in the decoded state: upstream results, or the maps they follow). Each
    map's elements join ``tasks`` (``run.tasks``, a dict here) with their decoded states before the
    next map grows."""
    for map_id, width in maps:
        td = run.defs[map_id]
        src = mapping.source_of(run, map_id)
        if not isinstance(src, mapping.Source) or src.width != width:
            raise ValueError(f"checkpoint map {map_id!r} of width {width} cannot be expanded again")
        grown = mapping.grow(run.defs, run.plan, run.growth, td, src)
        tasks.update((e.id, rows.get(e.id, _DEFAULT_TASK)) for e in grown.elements)
        run = run._replace(defs=grown.defs, plan=grown.plan, growth=grown.growth)
    return run


def _ids(ids: list[str]) -> PMap[str, bool]:
    return pmap(dict.fromkeys(ids, True))
