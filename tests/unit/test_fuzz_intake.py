"""Fuzzing the submission's definition (issue 13, point 7): ``intake.accept`` returns a definition the
rest of the scheduler can work with, or raises a :class:`NervError` with a clear message: never another
exception type, whatever the ``workflow`` field holds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from nerv_cluster import intake
from nerv_cluster.errors import NervError
from nerv_cluster.model import Event, EventType, WorkflowDef
from nerv_cluster.state import EMPTY, apply, new_run
from scheduler.decisions import Decisions, decide
from tests import fuzzing

RUN = "run-1"


def _accept_or_refuse(raw: Any) -> WorkflowDef | None:
    """``accept``'s verdict; fails the test on anything but a NervError with a message."""
    try:
        definition, the_plan, size = intake.accept(RUN, raw)
    except NervError as exc:
        message = str(exc)
        assert message.strip(), f"{type(exc).__name__} without a message"
        assert len(intake.describe(exc)) <= intake.MAX_REASON_CHARS + 60
        return None
    assert size > 0
    assert set(the_plan.dependents) == {t.id for t in definition.tasks}
    return definition


def _usable(definition: WorkflowDef) -> None:
    """An accepted definition must be usable: a run made of it can be decided for, and it survives
    its own JSON round trip."""
    again = WorkflowDef.from_dict(json.loads(json.dumps(definition.to_dict())))
    assert [t.id for t in again.tasks] == [t.id for t in definition.tasks]
    run = new_run(RUN, definition, 1.0)
    decide(run, 2.0, "scheduler:test", Decisions())


@fuzzing.examples(100)
@given(fuzzing.definitions())
def test_valid_definitions_are_accepted(raw: dict[str, Any]) -> None:
    definition = _accept_or_refuse(raw)
    assert definition is not None, "a valid definition was refused"
    _usable(definition)


@fuzzing.examples(200)
@given(fuzzing.definition_inputs())
# Found by this fuzzer: each raised a bare KeyError, TypeError, AttributeError or ValueError before
# (the fold turned it into a rejected run, but the client-facing check had no clear error), and a NaN
# timeout was accepted.
@example({"name": "x"})  # no tasks key
@example({"name": "x", "tasks": 5})  # tasks not a list
@example({"name": "x", "tasks": [5]})  # a task not a mapping
@example({"name": "x", "tasks": [{"fn": "f"}]})  # no id
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "deps": 5}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "args": 5}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "kwargs": [1]}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "retry": {"max_retries": "3"}}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "retry": {"bogus": 1}}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "retry": [1]}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "circuit": {"failures": "x", "cooldown": 1}}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "tags": 3}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "deps": [["b"]]}]})
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "timeout": float("nan")}]})
# Found by the deep profile: a reference in the arguments to a task that is no dependency (accepted;
# building the job raised KeyError, so the scheduler failed the run only when it came to dispatch it).
@example(
    {
        "name": "x",
        "tasks": [{"id": "a", "fn": "f"}, {"id": "c", "fn": "f", "args": [[{"__nerv_ref__": "a"}]]}],
    }
)
@example({"name": "x", "tasks": [{"id": "a", "fn": "f", "kwargs": {"k": {"__nerv_ref__": ["a"]}}}]})
def test_any_definition_is_accepted_or_refused_clearly(raw: Any) -> None:
    definition = _accept_or_refuse(raw)
    if definition is not None:
        _usable(definition)


@fuzzing.examples(80)
@given(fuzzing.definition_inputs(), st.sampled_from(["run-1", "", "a b", "x" * 500, 5, None]))
def test_a_bad_submission_rejects_only_its_run(raw: Any, run_id: Any) -> None:
    """Through the fold: whatever the submission, the fold does not raise, other runs stay as they
    were, and the new run is either sound or rejected with the reason."""
    other = Event(
        EventType.WORKFLOW_SUBMITTED,
        "other",
        data={"workflow": {"name": "o", "tasks": [{"id": "a", "fn": "f"}]}},
    )
    state = apply(EMPTY, other)
    before = state.runs["other"]
    rid = run_id if isinstance(run_id, str) and run_id else "bad-run"
    after = apply(state, Event(EventType.WORKFLOW_SUBMITTED, rid, data={"workflow": raw}))
    assert after.runs["other"] is before
    run = after.runs[rid]
    if run.rejected:
        assert run.rejected.startswith("invalid submission: ")
        assert not run.tasks
    else:
        assert intake.accept(rid, raw)[0] == run.definition
