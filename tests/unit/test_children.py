"""Child runs (issue 16, part "child"), without Redis: the fold of TASK_SPAWNED and CHILD_STARTED, the
scheduler's decisions (spawns, the depth bound, the parent's outcome, cancels), the output rule and
child ids."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
from pyrsistent import PMap, pmap

from nerv_cluster import checkpoint, children
from nerv_cluster.errors import UnknownTaskError, WorkflowError
from nerv_cluster.ids import is_valid_id
from nerv_cluster.model import Event, EventType, ParentRef, RetryPolicy, RunStatus, TaskStatus, WorkflowDef
from nerv_cluster.state import RunState, apply_to_run, fold_run, run_output, run_result
from nerv_cluster.workflow import Workflow
from scheduler.decisions import Decisions, Limits, decide, decide_isolated
from tests.unit.helpers import RUN, completes, ev, fails, submitted, td, wdef

E = EventType
CHILD_DEF = wdef(td("x"), td("y", "x"), name="child-wf").to_dict()


def _fold(events: list[Event]) -> RunState:
    run = functools.reduce(apply_to_run, events, None)
    assert run is not None
    return run


def _spawned_log(child_def: dict[str, Any] = CHILD_DEF, retry: RetryPolicy | None = None) -> list[Event]:
    """A run whose task 'p' returned a workflow, then 'q' after it."""
    definition = wdef(td("p", retry=retry), td("q", "p"), name="parent")
    return [
        submitted(definition),
        ev(E.WORKFLOW_STARTED),
        ev(E.TASK_DISPATCHED, "p", 1, queue="cpu"),
        ev(E.TASK_STARTED, "p", 1, worker="w1"),
        ev(E.TASK_SPAWNED, "p", 1, workflow=child_def, worker="w1"),
    ]


def _child_of(parent: RunState, tid: str = "p") -> RunState:
    """The child run the scheduler would create for ``tid``, folded from its submission."""
    out = Decisions()
    decide(parent, 100.0, "scheduler:t", out)
    (spawn,) = out.spawns
    return _fold([spawn.submitted, ev(E.WORKFLOW_STARTED, run_id=spawn.child_id)])


def test_child_ids_derive_from_the_attempt() -> None:
    a = children.child_run_id("Fib 12!", ParentRef("run-x", "t", 1))
    assert a == children.child_run_id("Fib 12!", ParentRef("run-x", "t", 1)), "a pure function"
    assert a.startswith("fib-12-") and is_valid_id(a)
    others = {
        children.child_run_id("Fib 12!", ParentRef("run-x", "t", 2)),
        children.child_run_id("Fib 12!", ParentRef("run-x", "u", 1)),
        children.child_run_id("Fib 12!", ParentRef("run-y", "t", 1)),
    }
    assert a not in others and len(others) == 3
    assert is_valid_id(children.child_run_id("..." * 80, ParentRef("r", "t", 1)))
    assert is_valid_id(children.child_run_id(None, ParentRef("r", "t", 1)))


def test_task_spawned_leaves_the_watchdog_and_waits_for_its_child() -> None:
    log = _spawned_log()
    before = _fold(log[:-1])
    assert "p" in before.running
    run = _fold(log)
    ts = run.tasks["p"]
    assert ts.status is TaskStatus.RUNNING and ts.spawn == CHILD_DEF and ts.child is None
    assert "p" not in run.running, "no worker holds it: the watchdog must not see it"
    assert dict(run.spawning) == {"p": True}
    assert apply_to_run(run, log[-1]) is run, "applying it twice changes nothing"
    late_start = ev(E.TASK_STARTED, "p", 1, worker="w2")
    assert apply_to_run(run, late_start) is run, "a copy of the job starting later changes nothing"

    started = ev(E.CHILD_STARTED, "p", 1, child="child-abc")
    run2 = apply_to_run(run, started)
    assert run2 is not None
    assert run2.tasks["p"].child == "child-abc" and run2.tasks["p"].spawn is None
    assert not run2.spawning and run2.tasks["p"].status is TaskStatus.RUNNING
    assert apply_to_run(run2, started) is run2
    assert apply_to_run(run2, ev(E.CHILD_STARTED, "p", 1, child="other")) is run2, "one child per attempt"
    assert run_result(run2).tasks["p"].child == "child-abc"

    done = apply_to_run(run2, ev(E.TASK_COMPLETED, "p", 1, result=5, child="child-abc"))
    assert done is not None
    assert done.tasks["p"].status is TaskStatus.COMPLETED and done.tasks["p"].result == 5
    assert done.tasks["q"].status is TaskStatus.READY


def test_a_static_sub_workflow_is_spawned_by_the_scheduler_when_ready() -> None:
    sub = Workflow("sub")
    sub.add("tests.noop", id="only")
    wf = Workflow("outer")
    first = wf.add("tests.noop", id="first")
    wf.add(sub, id="inner", dependencies=[first])
    definition = wf.definition()
    assert definition.tasks[1].workflow == sub.definition().to_dict()
    log = [submitted(definition), ev(E.WORKFLOW_STARTED), *completes("first")]
    run = _fold(log)
    out = Decisions()
    decide(run, 50.0, "scheduler:t", out)
    assert not out.jobs, "no worker runs a sub-workflow task"
    (spawned,) = [e for e in out.events if e.type is E.TASK_SPAWNED]
    assert spawned.task_id == "inner" and spawned.data["workflow"] == sub.definition().to_dict()
    run = apply_to_run(run, spawned)
    assert run is not None and run.tasks["inner"].status is TaskStatus.RUNNING and "inner" in run.spawning


def test_the_scheduler_creates_the_child_with_its_lineage() -> None:
    run = _fold(_spawned_log())
    out = Decisions()
    decide(run, 100.0, "scheduler:t", out)
    (spawn,) = out.spawns
    ref = ParentRef(RUN, "p", 1)
    assert spawn.parent == ref and spawn.child_id == children.child_run_id("child-wf", ref)
    assert spawn.started.type is E.CHILD_STARTED and spawn.started.data == {"child": spawn.child_id}
    child = _fold([spawn.submitted])
    assert child.definition.parent == ref and child.definition.depth == 1
    assert run_result(child).parent == ref and run_result(child).depth == 1
    # Deeper: the child's own spawns are one level further down.
    grand = _fold([*(_child_log(child)), ev(E.TASK_SPAWNED, "x", 1, run_id=child.run_id, workflow=CHILD_DEF)])
    out = Decisions()
    decide(grand, 101.0, "scheduler:t", out)
    (deeper,) = out.spawns
    assert _fold([deeper.submitted]).definition.depth == 2


def _child_log(child: RunState) -> list[Event]:
    spawn_ev = Event(
        E.WORKFLOW_SUBMITTED, child.run_id, data={"workflow": child.definition.to_dict()}, ts=1.0
    )
    return [
        spawn_ev,
        ev(E.WORKFLOW_STARTED, run_id=child.run_id),
        ev(E.TASK_DISPATCHED, "x", 1, run_id=child.run_id, queue="cpu"),
        ev(E.TASK_STARTED, "x", 1, run_id=child.run_id, worker="w1"),
    ]


def test_the_depth_bound_fails_the_task_instead_of_spawning() -> None:
    run = _fold(_spawned_log())
    out = Decisions()
    decide(run, 100.0, "scheduler:t", out, limits=Limits(max_child_depth=0))
    assert not out.spawns
    (failed,) = [e for e in out.events if e.type is E.TASK_FAILED]
    assert failed.task_id == "p" and failed.data["error"]["type"] == "ChildDepthError"
    assert "NERV_MAX_CHILD_DEPTH" in failed.data["error"]["message"]
    after = apply_to_run(run, failed)
    assert after is not None and not after.spawning and after.tasks["p"].spawn is None


def _parent_and_child(retry: RetryPolicy | None = None) -> tuple[RunState, RunState]:
    parent = _fold(_spawned_log(retry=retry))
    child = _child_of(parent)
    parent = apply_to_run(parent, ev(E.CHILD_STARTED, "p", 1, child=child.run_id))
    assert parent is not None
    return parent, child


def _end(child: RunState, parent: RunState, events: list[Event]) -> Decisions:
    child = functools.reduce(apply_to_run, events, child)  # type: ignore[arg-type]
    out = Decisions()
    decide_isolated(child, 200.0, "scheduler:t", out, runs=pmap({RUN: parent, child.run_id: child}))
    return out


def test_a_completed_child_completes_its_parent_in_the_same_write_before_its_end() -> None:
    parent, child = _parent_and_child()
    cid = child.run_id
    out = _end(child, parent, [*_done(cid, "x", 3), *_done(cid, "y", 8)])
    kinds = [(e.run_id, e.type) for e in out.events]
    assert kinds == [(RUN, E.TASK_COMPLETED), (cid, E.WORKFLOW_COMPLETED)], "the outcome goes first"
    outcome = out.events[0]
    assert (outcome.task_id, outcome.attempt, outcome.data["result"]) == ("p", 1, 8)
    # A new leader deciding again after the outcome was folded writes no second one.
    parent2 = apply_to_run(parent, outcome)
    assert parent2 is not None and parent2.tasks["p"].status is TaskStatus.COMPLETED
    again = _end(child, parent2, [*_done(cid, "x", 3), *_done(cid, "y", 8)])
    assert [e.type for e in again.events] == [E.WORKFLOW_COMPLETED]
    assert apply_to_run(parent2, outcome) is parent2, "a duplicate outcome changes nothing"


def _done(run_id: str, tid: str, result: Any) -> list[Event]:
    return [
        ev(E.TASK_DISPATCHED, tid, 1, run_id=run_id, queue="cpu"),
        ev(E.TASK_STARTED, tid, 1, run_id=run_id, worker="w1"),
        ev(E.TASK_COMPLETED, tid, 1, run_id=run_id, result=result, worker="w1"),
    ]


def test_a_failed_child_fails_its_parent_naming_the_child_and_its_failed_task() -> None:
    parent, child = _parent_and_child()
    cid = child.run_id
    failing = [Event(e.type, cid, e.task_id, e.attempt, e.data, ts=e.ts) for e in fails("x", "bad input")]
    out = _end(child, parent, failing)  # 'y' cannot run any more: skipped
    skipped = [e for e in out.events if e.type is E.TASK_SKIPPED]
    assert [e.task_id for e in skipped] == ["y"]
    child2 = functools.reduce(apply_to_run, [*failing, *skipped], child)
    out = Decisions()
    decide_isolated(child2, 201.0, "scheduler:t", out, runs=pmap({RUN: parent}))  # type: ignore[arg-type]
    outcome, end = out.events
    assert end.type is E.WORKFLOW_FAILED and outcome.type is E.TASK_FAILED
    err = outcome.data["error"]
    assert err["type"] == "ChildRunFailedError"
    assert cid in err["message"] and "'x'" in err["message"] and "bad input" in err["message"]
    assert outcome.data["child"] == cid


def test_a_failed_child_of_a_task_with_retries_gives_a_new_attempt_and_a_new_child() -> None:
    parent, child = _parent_and_child(retry=RetryPolicy(max_retries=1, backoff=0))
    cid = child.run_id
    failing = [Event(e.type, cid, e.task_id, e.attempt, e.data, ts=e.ts) for e in fails("x")]
    child2 = functools.reduce(apply_to_run, [*failing, ev(E.TASK_SKIPPED, "y", run_id=cid)], child)
    out = Decisions()
    decide_isolated(child2, 201.0, "scheduler:t", out, runs=pmap({RUN: parent}))  # type: ignore[arg-type]
    outcome = out.events[0]
    assert outcome.type is E.TASK_RETRYING and outcome.data["next_attempt"] == 2
    parent2 = apply_to_run(parent, outcome)
    assert parent2 is not None
    ts = parent2.tasks["p"]
    assert (ts.status, ts.attempt, ts.child) == (TaskStatus.READY, 2, None)
    respawned = [ev(E.TASK_DISPATCHED, "p", 2, queue="cpu"), ev(E.TASK_SPAWNED, "p", 2, workflow=CHILD_DEF)]
    parent3 = functools.reduce(apply_to_run, respawned, parent2)
    new_child = _child_of(parent3)  # type: ignore[arg-type]
    assert new_child.run_id != cid and new_child.definition.parent == ParentRef(RUN, "p", 2)


def test_an_outcome_for_an_attempt_no_longer_waiting_is_not_written() -> None:
    parent, child = _parent_and_child()
    cancelled = apply_to_run(parent, ev(E.TASK_CANCELLED, "p", 1))
    assert cancelled is not None
    out = _end(child, cancelled, [*_done(child.run_id, "x", 1), *_done(child.run_id, "y", 2)])
    assert [e.type for e in out.events] == [E.WORKFLOW_COMPLETED]


def test_cancelling_a_parent_requests_the_cancel_of_its_children() -> None:
    parent, child = _parent_and_child()
    parent = apply_to_run(parent, ev(E.WORKFLOW_CANCEL_REQUESTED, reason="enough"))
    assert parent is not None
    out = Decisions()
    decide(parent, 300.0, "scheduler:t", out)
    (req,) = [e for e in out.events if e.type is E.WORKFLOW_CANCEL_REQUESTED]
    assert req.run_id == child.run_id and RUN in req.data["reason"] and "enough" in req.data["reason"]
    assert {e.task_id for e in out.events if e.type is E.TASK_CANCELLED} == {"p", "q"}
    assert not out.revoke, "no worker holds a task that waits for its child"
    cancelled_child = apply_to_run(child, req)
    assert cancelled_child is not None and cancelled_child.cancel_requested


def test_a_cancel_before_the_child_exists_spawns_nothing() -> None:
    run = _fold(_spawned_log())
    run = apply_to_run(run, ev(E.WORKFLOW_CANCEL_REQUESTED))
    assert run is not None
    out = Decisions()
    decide(run, 300.0, "scheduler:t", out)
    assert not out.spawns
    run = functools.reduce(apply_to_run, out.events, run)  # type: ignore[arg-type]
    assert not run.spawning and run.status is RunStatus.CANCELLED


def test_the_output_rule() -> None:
    def finished(definition: WorkflowDef, results: dict[str, Any]) -> RunState:
        events = [submitted(definition), ev(E.WORKFLOW_STARTED)]
        for tid, value in results.items():
            events += completes(tid, value)
        return _fold(events)

    two_sinks = wdef(td("a"), td("b", "a"), td("c", "a"))
    assert run_output(finished(two_sinks, {"a": 1, "b": 2, "c": 3})) == {"b": 2, "c": 3}
    assert run_output(finished(wdef(td("a"), td("b", "a")), {"a": 1, "b": 2})) == 2, "the only sink"
    named = WorkflowDef(name="n", tasks=two_sinks.tasks, meta={"output": "a"})
    assert run_output(finished(named, {"a": 1, "b": 2, "c": 3})) == 1, "Workflow.output wins"
    assert run_output(finished(two_sinks, {"a": 1, "b": 2})) == {"b": 2, "c": None}, "not completed: None"


def test_workflow_output_and_sub_workflow_errors() -> None:
    wf = Workflow("w")
    h = wf.add("tests.noop", id="a")
    wf.output(h)
    assert wf.definition().meta["output"] == "a"
    with pytest.raises(UnknownTaskError):
        wf.output("nope")
    with pytest.raises(WorkflowError, match="belongs to workflow"):
        Workflow("other").output(h)
    sub = Workflow("sub")
    with pytest.raises(WorkflowError, match="no tasks"):
        wf.add(sub)
    sub.add("tests.noop", id="s")
    with pytest.raises(WorkflowError, match="takes no arguments"):
        wf.add(sub, 1)
    with pytest.raises(WorkflowError, match="timeout"):
        wf.add(sub, timeout=3)
    with pytest.raises(WorkflowError, match="cannot contain itself"):
        wf.add(wf)


def test_spawned_data_refuses_a_workflow_the_client_would_refuse() -> None:
    wf = Workflow("cyclic")
    wf.add("tests.noop", id="a", dependencies=["b"])
    wf.add("tests.noop", id="b", dependencies=["a"])
    with pytest.raises(WorkflowError):
        children.spawned_data(wf, children.SpawnBounds())
    ok = Workflow("ok")
    ok.add("tests.noop", id="a")
    with pytest.raises(WorkflowError, match="NERV_MAX_SUBMISSION_BYTES"):
        children.spawned_data(ok, children.SpawnBounds(max_submission_bytes=10))
    assert children.spawned_data(ok, children.SpawnBounds()) == {"workflow": ok.definition().to_dict()}


def _whole_log() -> list[Event]:
    log = _spawned_log()
    return [
        *log,
        ev(E.CHILD_STARTED, "p", 1, child="c-1"),
        ev(E.TASK_COMPLETED, "p", 1, result=4),
        *completes("q"),
    ]


def test_fold_run_equals_one_by_one_and_checkpoints_round_trip_with_children() -> None:
    log = _whole_log()
    for i in range(1, len(log) + 1):
        one = _fold(log[:i])
        bulk = fold_run(None, log[:i])
        assert bulk is not None
        for name in RunState._fields:
            assert getattr(bulk, name) == getattr(one, name), (i, name)
        assert type(bulk.spawning) is PMap
        back = checkpoint.decode(json.loads(json.dumps(checkpoint.encode(one))))
        for name in RunState._fields:
            assert getattr(back, name) == getattr(one, name), (i, name)
        # A checkpoint plus the rest of the log is the whole fold.
        rest = fold_run(back, log[i:])
        assert rest == _fold(log)


def test_nest_runs_puts_children_under_their_parents() -> None:
    from nerv_cluster.progress import nest_runs
    from nerv_cluster.state import RunResult

    def row(rid: str, parent: str | None) -> tuple[str, float, RunResult]:
        ref = ParentRef(parent, "t", 1) if parent else None
        return rid, 0.0, RunResult(rid, rid, RunStatus.COMPLETED, {}, parent=ref, depth=1 if parent else 0)

    rows = [
        row("grandchild", "child"),
        row("child", "root"),
        row("other", None),
        row("root", None),
        row("orphan", "gone"),
        ("expired", 0.0, None),
    ]
    got = [(level, r[0]) for level, r in nest_runs(rows)]  # type: ignore[arg-type]
    assert got == [(0, "other"), (0, "root"), (1, "child"), (2, "grandchild"), (0, "orphan"), (0, "expired")]
