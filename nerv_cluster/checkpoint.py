"""Checkpoints: a run's folded state as JSON, with the position in its log that it covers.

A new scheduler leader rebuilds every active run from its log. For a long run that is a replay of
hundreds of thousands of events; with a checkpoint it decodes the state at the checkpoint and folds only
the events after it. A checkpoint is a cache of the fold, never a second truth: it is written from
``fold(log[:upto])`` (see ``scheduler.checkpointer.Checkpointer``), so ``decode(encode(run))`` must equal
``run`` exactly, which the unit tests check field by field. A checkpoint that cannot be decoded (an
older format, a bug) is ignored and the whole log is replayed.

The plan is not stored: it is a pure function of the definition and is recomputed on decode.
"""

from __future__ import annotations

from typing import Any

from pyrsistent import PMap, pmap

from nerv_cluster.model import RunStatus, TaskError, TaskStatus, WorkflowDef
from nerv_cluster.planner import plan
from nerv_cluster.state import RunState, TaskState

#: Bumped whenever the encoding changes; a checkpoint of another version is ignored.
FORMAT = 5  # 3: TaskState.first, RunState.reruns (rerun); 4: cache and child-run fields; 5: waits

_TASK_FIELDS = TaskState._fields
_STATUS_AT = _TASK_FIELDS.index("status")
_ERROR_AT = _TASK_FIELDS.index("error")
_DEFAULT_TASK = TaskState()
#: Status by value: a dict lookup, several times cheaper than ``TaskStatus(value)`` per task.
_STATUS_OF = {s.value: s for s in TaskStatus}
#: The id sets of a run, stored as lists of task ids.
_ID_SETS = ("ready", "doomed", "running", "queued", "spawning", "waiting", "woken")
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
        **{name: list(getattr(run, name)) for name in _ID_SETS},
        **{name: getattr(run, name) for name in _PLAIN},
        "signals": dict(run.signals),
    }


def decode(data: dict[str, Any]) -> RunState:
    """Inverse of :func:`encode`; ValueError (or KeyError/TypeError) on a checkpoint it cannot read."""
    if data.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {data.get('format')!r}, expected {FORMAT}")
    definition = WorkflowDef.from_dict(data["definition"])
    defs = {t.id: t for t in definition.tasks}
    tasks = dict.fromkeys(defs, _DEFAULT_TASK)
    for tid, row in data["tasks"].items():
        if tid not in tasks:
            raise ValueError(f"checkpoint names task {tid!r} the definition does not have")
        tasks[tid] = _decode_task(row)
    tally = tuple(int(n) for n in data["tally"])
    if len(tally) != len(TaskStatus):
        raise ValueError("checkpoint tally does not match the task statuses")
    return RunState(
        run_id=str(data["run_id"]),
        definition=definition,
        plan=plan(definition.tasks),
        defs=defs,
        tasks=pmap(tasks, pre_size=len(tasks) * 2),
        status=RunStatus(data["status"]),
        tally=tally,
        ready=_ids(data["ready"]),
        doomed=_ids(data["doomed"]),
        running=_ids(data["running"]),
        queued=_ids(data["queued"]),
        spawning=_ids(data.get("spawning", [])),
        waiting=_ids(data.get("waiting", [])),
        woken=_ids(data.get("woken", [])),
        signals=pmap(data.get("signals", {})),
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
    )


def _ids(ids: list[str]) -> PMap[str, bool]:
    return pmap(dict.fromkeys(ids, True))
