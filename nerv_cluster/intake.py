"""Turning a logged WORKFLOW_SUBMITTED into a run the fold can hold, or into a reason it cannot.

The client validates before it writes, but the log takes whatever anyone writes into Redis (an old or
buggy client, a corrupted entry). Invariant: :func:`accept` either returns a definition every handler,
the planner and the scheduler can work with (valid ids and queues, a known graph without cycles, sane
option types) or raises; the fold (``state._created``) turns the raise into a rejected run, which the
scheduler fails with the reason. It is a pure function of the event, so a refold decides alike.
"""

from __future__ import annotations

import math
from typing import Any

from nerv_cluster import constants, gcpause, mapping, waits
from nerv_cluster.errors import NervError, WorkflowError
from nerv_cluster.ids import check_id
from nerv_cluster.jsonform import compact
from nerv_cluster.model import TaskDef, WorkflowDef
from nerv_cluster.planner import Plan, plan

#: Longest reason kept for a rejected run (it is logged and stored in the run's end event).
MAX_REASON_CHARS = 500


def describe(exc: BaseException) -> str:
    """``exc`` as one short line (its type and message, whitespace folded, cut): safe to log."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + f"... [{len(text) - MAX_REASON_CHARS} characters cut]"
    return text


def _refs(value: Any, out: list[Any]) -> None:
    """Append the task ids of the reference markers in JSON ``value`` to ``out``."""
    if isinstance(value, list | tuple):
        for v in value:
            _refs(v, out)
    elif isinstance(value, dict):
        if len(value) == 1 and constants.REF_KEY in value:
            out.append(value[constants.REF_KEY])
            return
        for v in value.values():
            _refs(v, out)


def _check_task(t: TaskDef) -> None:
    check_id(t.id, "task id")
    where = f"task {t.id!r}"
    if not isinstance(t.fn, str) or not t.fn:
        raise WorkflowError(f"{where}: fn must be a task name, got {t.fn!r:.80}")
    if not isinstance(t.name, str):
        raise WorkflowError(f"{where}: name must be a string")
    if t.queue not in constants.QUEUES:
        raise WorkflowError(
            f"{where}: unknown queue {t.queue!r:.80}; expected one of {', '.join(constants.QUEUES)}"
        )
    timeout = t.timeout
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < math.inf  # NaN and infinity too: no time limit can be set from them
    ):
        raise WorkflowError(f"{where}: timeout must be a positive number of seconds, got {timeout!r:.80}")
    for dep in t.dependencies:
        if not isinstance(dep, str):
            raise WorkflowError(f"{where}: dependency {dep!r:.80} is not a task id")
    if t.args or t.kwargs:
        # A reference is replaced by its task's result when the job is built: one to a task that is
        # not a dependency has no result to take (the scheduler could never build the job).
        refs: list[Any] = []
        _refs(t.args, refs)
        _refs(t.kwargs, refs)
        for ref in refs:
            if not isinstance(ref, str) or ref not in t.dependencies:
                raise WorkflowError(
                    f"{where}: its arguments refer to {ref!r:.80}, which is not among its dependencies"
                )
    if t.over is not None:  # a map node
        src = mapping.source(t)
        if src is None and not isinstance(t.over, list):
            raise WorkflowError(f"{where}: a map maps over a task reference or a list, not {t.over!r:.80}")
        if src is not None and src not in t.dependencies:
            raise WorkflowError(f"{where}: maps over {src!r:.80}, which is not among its dependencies")
    if t.workflow is not None and not isinstance(t.workflow, dict):
        raise WorkflowError(f"{where}: a sub-workflow must be a workflow definition")


#: The raw task fields that must hold a JSON list or object: ``TaskDef.from_dict`` would take a string
#: for a list (``tuple("abc")`` is three arguments) where the writer meant something else.
_LISTS = ("deps", "args", "tags")


def _task(i: int, raw: Any) -> TaskDef:
    """Task ``i`` of a definition's JSON form, or a :class:`WorkflowError` naming it and what is wrong."""
    if not isinstance(raw, dict):
        raise WorkflowError(f"task #{i} is not a JSON object, got {raw!r:.80}")
    tid = raw.get("id")
    where = f"task #{i} ({tid!r:.80})" if tid is not None else f"task #{i}"
    if tid is None or "fn" not in raw:
        raise WorkflowError(f"{where}: a task needs an id and a fn")
    for key in _LISTS:
        value = raw.get(key)
        if value is not None and not isinstance(value, list):
            raise WorkflowError(f"{where}: {key} must be a list, got {value!r:.80}")
    kwargs = raw.get("kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise WorkflowError(f"{where}: kwargs must be an object, got {kwargs!r:.80}")
    try:
        return TaskDef.from_dict(raw)
    except NervError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        # A field of the wrong shape (an unhashable dependency, a retry policy's count as text...).
        raise WorkflowError(f"{where}: malformed field: {describe(exc)}") from None


def decode(raw: Any) -> WorkflowDef:
    """The :class:`WorkflowDef` of a definition's JSON form; :class:`WorkflowError` (never another
    exception) when it has not that form. Checks the shape only: :func:`accept` checks the rest."""
    if not isinstance(raw, dict):
        raise WorkflowError("the submission carries no workflow definition")
    tasks, meta = raw.get("tasks"), raw.get("meta", {})
    if not isinstance(tasks, list):
        raise WorkflowError(f"the workflow definition has no task list, got {tasks!r:.80}")
    if not isinstance(meta, dict):
        raise WorkflowError(f"the workflow's meta must be an object, got {meta!r:.80}")
    if "name" not in raw:
        raise WorkflowError("the workflow definition has no name")
    return WorkflowDef(
        name=raw["name"], tasks=tuple(_task(i, t) for i, t in enumerate(tasks)), meta=dict(meta)
    )


@gcpause.pausing  # decoding and planning build millions of acyclic containers for a big workflow
def accept(run_id: Any, raw: Any, size: int | None = None) -> tuple[WorkflowDef, Plan, int]:
    """The definition, plan and JSON size of a submitted workflow; a :class:`WorkflowError` (a
    subclass for a cycle, an unknown dependency, a bad id...) when it is no valid workflow, never
    another exception (``tests/unit/test_fuzz_intake.py`` fuzzes it). ``size``: the length of the
    JSON ``raw`` was decoded from, when the caller has it (the scheduler's intake: not encoding a big
    definition again to measure it)."""
    check_id(run_id, "run id")
    if not isinstance(raw, dict):
        raise WorkflowError("the submission carries no workflow definition")
    try:
        if size is None:
            size = len(compact(raw))
    except (TypeError, ValueError) as exc:  # only from a dict built in memory: the wire holds JSON
        raise WorkflowError(f"the workflow definition is not JSON: {describe(exc)}") from None
    definition = decode(raw)
    if not isinstance(definition.name, str):
        raise WorkflowError("the workflow name must be a string")
    if not definition.tasks:
        raise WorkflowError(f"workflow {definition.name!r:.80} has no tasks")
    waiting = []
    for t in definition.tasks:
        _check_task(t)
        if t.wait is not None or t.fn == constants.WAIT_FN:
            waiting.append(t)
    if waiting or definition.meta.get(waits.SIGNALS_META):
        waits.check_definition(definition, waiting)
    return definition, plan(definition.tasks), size
