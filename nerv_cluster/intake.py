"""Turning a logged WORKFLOW_SUBMITTED into a run the fold can hold, or into a reason it cannot.

The client validates before it writes, but the log takes whatever anyone writes into Redis (an old or
buggy client, a corrupted entry). Invariant: :func:`accept` either returns a definition every handler,
the planner and the scheduler can work with (valid ids and queues, a known graph without cycles, sane
option types) or raises; the fold (``state._created``) turns the raise into a rejected run, which the
scheduler fails with the reason. It is a pure function of the event, so a refold decides alike.
"""

from __future__ import annotations

from typing import Any

from nerv_cluster import constants, mapping, waits
from nerv_cluster.errors import WorkflowError
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
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise WorkflowError(f"{where}: timeout must be a positive number of seconds, got {timeout!r:.80}")
    for dep in t.dependencies:
        if not isinstance(dep, str):
            raise WorkflowError(f"{where}: dependency {dep!r:.80} is not a task id")
    if t.over is not None:  # a map node
        src = mapping.source(t)
        if src is None and not isinstance(t.over, list):
            raise WorkflowError(f"{where}: a map maps over a task reference or a list, not {t.over!r:.80}")
        if src is not None and src not in t.dependencies:
            raise WorkflowError(f"{where}: maps over {src!r:.80}, which is not among its dependencies")
    if t.workflow is not None and not isinstance(t.workflow, dict):
        raise WorkflowError(f"{where}: a sub-workflow must be a workflow definition")


def accept(run_id: Any, raw: Any, size: int | None = None) -> tuple[WorkflowDef, Plan, int]:
    """The definition, plan and JSON size of a submitted workflow; raises (a :class:`WorkflowError`,
    or whatever a malformed definition makes decoding raise) when it is no valid workflow. ``size``:
    the length of the JSON ``raw`` was decoded from, when the caller has it (the scheduler's intake:
    not encoding a big definition again to measure it)."""
    check_id(run_id, "run id")
    if not isinstance(raw, dict):
        raise WorkflowError("the submission carries no workflow definition")
    if size is None:
        size = len(compact(raw))
    definition = WorkflowDef.from_dict(raw)
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
