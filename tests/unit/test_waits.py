"""Durable waits (issue 11, part "waits"), pure: the builder's checks, the fold, the decisions, the
deadline heap, the client's signal checks, checkpoints and reruns. No Redis."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nerv_cluster import checkpoint, constants, waits
from nerv_cluster.errors import (
    DuplicateTaskError,
    InvalidIdError,
    PayloadTooLargeError,
    RunFinishedError,
    SerializationError,
    UnknownSignalError,
    WorkflowError,
)
from nerv_cluster.model import Event, EventType, RunStatus, TaskStatus, WorkflowDef
from nerv_cluster.state import EMPTY, RunState, State, apply, apply_to_run, fold
from nerv_cluster.workflow import Workflow, nested_tasks, validate_definition
from scheduler.decisions import Decisions, decide, readies_successor
from scheduler.waits import WaitRoom
from tests.unit.helpers import RUN, ev, submitted

E = EventType
SRC = "scheduler:t"


def approval_wf(timeout: float | None = 10.0) -> WorkflowDef:
    wf = Workflow("deploy")
    approval = wf.wait_for("approval", timeout=timeout)
    wf.add("tests.deploy", approval, id="deploy")
    wf.add("tests.fallback", dependencies=[approval], trigger="one_failed", id="fallback")
    return wf.definition()


def run_of(events: list[Event]) -> RunState:
    run = fold(events).runs[RUN]
    return run


def step(run: RunState, now: float) -> tuple[RunState, Decisions]:
    """One decision round folded back (what the scheduler's loop does)."""
    out = Decisions()
    decide(run, now, SRC, out)
    new = fold(out.events, State(runs=EMPTY.runs.set(RUN, run))).runs[RUN]
    return new, out


def kinds(out: Decisions) -> list[tuple[EventType, str | None]]:
    return [(e.type, e.task_id) for e in out.events]


# -- the builder --------------------------------------------------------------------------------------


def test_wait_nodes_are_tasks_no_worker_runs() -> None:
    definition = approval_wf()
    node = definition.tasks[0]
    assert (node.id, node.fn, node.wait) == (
        "approval",
        constants.WAIT_FN,
        {"signal": "approval", "timeout": 10.0},
    )
    assert definition.meta[waits.SIGNALS_META] == {"approval": "approval"}
    assert [t.id for t in nested_tasks(definition)] == ["deploy", "fallback"]
    # Known names are checked for the tasks workers run, not for the wait node.
    validate_definition(definition, known_names={"tests.deploy", "tests.fallback"})
    assert WorkflowDef.from_dict(json.loads(json.dumps(definition.to_dict()))) == definition


def test_sleep_nodes_take_seconds_or_an_aware_datetime() -> None:
    wf = Workflow("sleepy")
    a = wf.sleep(2)
    at = datetime(2030, 1, 1, tzinfo=UTC)
    b = wf.sleep_until(at, dependencies=[a])
    c = wf.sleep_until(1_900_000_000.5, id="later")
    tasks = {t.id: t for t in wf.definition().tasks}
    assert tasks[a.id].wait == {"sleep": 2.0}
    assert tasks[b.id].wait == {"until": at.timestamp()} and tasks[b.id].dependencies == (a.id,)
    assert tasks[c.id].wait == {"until": 1_900_000_000.5}
    assert waits.SIGNALS_META not in wf.definition().meta


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda wf: wf.wait_for("approval", timeout=0), WorkflowError),
        (lambda wf: wf.wait_for("approval", timeout=float("inf")), WorkflowError),
        (lambda wf: wf.wait_for("approval", timeout=True), WorkflowError),
        (lambda wf: wf.wait_for("bad name!"), InvalidIdError),
        (lambda wf: [wf.wait_for("a"), wf.wait_for("a", id="other")], DuplicateTaskError),
        (lambda wf: [wf.add("tests.x", id="a"), wf.wait_for("a")], DuplicateTaskError),
        (lambda wf: wf.sleep(-1), WorkflowError),
        (lambda wf: wf.sleep("5"), WorkflowError),
        (lambda wf: wf.sleep_until(datetime(2030, 1, 1)), WorkflowError),  # naive: which zone?
        (lambda wf: wf.sleep_until(float("nan")), WorkflowError),
    ],
)
def test_bad_waits_are_refused_when_added(build: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        build(Workflow("bad"))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["meta"].update(signals={"approval": "deploy"}),  # the index names another task
        lambda d: d["meta"].pop("signals"),  # a signal node outside the index
        lambda d: d["tasks"][0].update(wait={"signal": "approval", "sleep": 1}),
        lambda d: d["tasks"][0].update(wait={"signal": "approval", "timeout": -1}),
        lambda d: d["tasks"][0].update(wait={"sleep": "soon"}),
        lambda d: d["tasks"][0].pop("wait"),  # the wait fn without a wait
        lambda d: d["tasks"][0].update(retry={"max_retries": 2}),
    ],
)
def test_a_tampered_wait_in_a_submission_rejects_only_its_run(tamper: Any) -> None:
    raw = approval_wf().to_dict()
    tamper(raw)
    run = fold([ev(E.WORKFLOW_SUBMITTED, workflow=raw)]).runs[RUN]
    assert run.rejected.startswith("invalid submission")
    with pytest.raises(WorkflowError):
        validate_definition(WorkflowDef.from_dict(raw))


# -- fold and decisions -------------------------------------------------------------------------------


def test_a_signal_after_the_node_is_reached_completes_it_with_the_payload() -> None:
    run = run_of([submitted(approval_wf())])
    run, out = step(run, 100.0)
    assert (E.TASK_WAITING, "approval") in kinds(out) and not out.jobs
    ts = run.tasks["approval"]
    assert ts.status is TaskStatus.WAITING and ts.due_at == 110.0 and ts.started_at == 100.0
    assert set(run.waiting) == {"approval"} and not run.ready and not run.running
    run, out = step(run, 101.0)
    assert out.events == [] and out.jobs == []  # waiting: nothing to do, no worker slot held
    run = apply_to_run(run, ev(E.SIGNAL_RECEIVED, name="approval", payload={"by": "ana"}))
    assert set(run.woken) == {"approval"}
    run, out = step(run, 102.0)
    assert kinds(out)[0] == (E.TASK_COMPLETED, "approval")
    assert run.tasks["approval"].status is TaskStatus.COMPLETED
    assert run.tasks["approval"].result == {"by": "ana"}
    assert not run.waiting and not run.woken
    run, out = step(run, 102.1)  # the next round (the loop goes on while decisions follow)
    assert [job.task_id for job, _ in out.jobs] == ["deploy"]
    assert out.jobs[0][0].to_dict()["args"] == [{"by": "ana"}]  # the payload as deploy's argument
    assert run.tasks["fallback"].status is TaskStatus.SKIPPED


def test_a_signal_before_the_node_is_reached_is_kept_until_it_is() -> None:
    wf = Workflow("later")
    first = wf.add("tests.first", id="first")
    wf.wait_for("go", dependencies=[first])
    run = run_of([submitted(wf.definition()), ev(E.SIGNAL_RECEIVED, name="go", payload=[1, 2])])
    assert dict(run.signals) == {"go": [1, 2]} and not run.woken
    run, _ = step(run, 10.0)
    run = fold(
        [ev(E.TASK_STARTED, "first", 1, worker="w"), ev(E.TASK_COMPLETED, "first", 1, result=0)],
        State(runs=EMPTY.runs.set(RUN, run)),
    ).runs[RUN]
    run, out = step(run, 11.0)
    assert (E.TASK_WAITING, "go") in kinds(out)
    assert set(run.woken) == {"go"}  # reached with its signal already there: woken at once
    run, out = step(run, 11.5)
    assert kinds(out)[0] == (E.TASK_COMPLETED, "go") and run.tasks["go"].result == [1, 2]


def test_the_first_signal_of_a_name_wins_and_applying_any_event_twice_changes_nothing() -> None:
    events = [
        submitted(approval_wf()),
        ev(E.SIGNAL_RECEIVED, name="approval", payload="first"),
        ev(E.SIGNAL_RECEIVED, name="approval", payload="second"),
        ev(E.SIGNAL_RECEIVED, name="unknown", payload=1),
        ev(E.SIGNAL_RECEIVED, payload="no name"),
        ev(E.TASK_WAITING, "approval", 1),
        ev(E.TASK_WAITING, "deploy", 1),  # not a wait node: ignored
        ev(E.TASK_WAITING, "approval", 2),  # another attempt: ignored
    ]
    state = EMPTY
    for e in events:
        once = apply(state, e)
        assert apply(once, e) == once
        state = once
    run = state.runs[RUN]
    assert run.signals["approval"] == "first" and run.signals["unknown"] == 1
    assert run.tasks["deploy"].status is TaskStatus.PENDING
    assert set(run.woken) == {"approval"}
    assert fold(events).runs[RUN] == run


def test_the_deadline_is_the_logged_time_of_reaching_the_node_plus_the_timeout() -> None:
    reached = Event(E.TASK_WAITING, RUN, "approval", 1, {}, ts=5.0, logged_at=50.0)
    run = run_of([submitted(approval_wf(timeout=3)), reached])
    # The writer's ts is for display: a refold finds the deadline on Redis's clock, the same each time.
    assert run.tasks["approval"].due_at == 53.0


def test_the_scheduler_s_own_copy_takes_the_logged_deadline_once_it_reads_it_back() -> None:
    sub = submitted(approval_wf(timeout=3))
    run, out = step(run_of([sub]), 100.0)
    (mine,) = [e for e in out.events if e.type is E.TASK_WAITING]
    assert run.tasks["approval"].due_at == 103.0  # folded at once, on the scheduler's clock
    room = WaitRoom()
    room.observe(out.events, State(runs=EMPTY.runs.set(RUN, run)))
    logged = Event(
        mine.type, RUN, mine.task_id, mine.attempt, dict(mine.data), mine.ts, mine.id, mine.source, 100.02
    )
    back = apply_to_run(run, logged)
    assert (
        back is not None
        and back.tasks["approval"].due_at == 103.02
        and back.tasks["approval"].started_at == 100.02
    )
    assert apply_to_run(back, logged) == back and apply_to_run(back, mine) == back
    # The same as a refold of the log, which only ever sees the logged copy.
    assert fold([sub, *(logged if e is mine else e for e in out.events)]).runs[RUN] == back
    state = State(runs=EMPTY.runs.set(RUN, back))
    assert room.expired(103.01, state, SRC) == []  # the old reminder: come back at the logged deadline
    assert room.next_due() == 103.02
    (ended,) = room.expired(103.02, state, SRC)
    assert ended.type is E.TASK_FAILED


def test_a_timeout_fails_the_node_with_task_timeout_error_and_the_fallback_runs() -> None:
    run = run_of([submitted(approval_wf(timeout=5))])
    run, out = step(run, 100.0)
    room = WaitRoom()
    state = State(runs=EMPTY.runs.set(RUN, run))
    room.observe(out.events, state)
    assert room.next_due() == 105.0
    assert room.expired(104.9, state, SRC) == []
    (timeout,) = room.expired(105.0, state, SRC)
    assert len(room) == 0
    assert (timeout.type, timeout.task_id) == (E.TASK_FAILED, "approval")
    assert timeout.data["error"]["type"] == "TaskTimeoutError"
    run = apply_to_run(run, timeout)
    assert run.tasks["approval"].status is TaskStatus.FAILED and not run.waiting
    run, out = step(run, 105.1)
    assert (E.TASK_SKIPPED, "deploy") in kinds(out)
    assert [job.task_id for job, _ in out.jobs] == ["fallback"]
    # A signal after the timeout wakes nothing (its node is over) but is kept, for a rerun.
    run = apply_to_run(run, ev(E.SIGNAL_RECEIVED, name="approval", payload="late"))
    assert not run.woken and run.signals["approval"] == "late"


def test_a_signal_and_a_deadline_end_the_node_once() -> None:
    run = run_of([submitted(approval_wf(timeout=1))])
    run, out = step(run, 100.0)
    state = State(runs=EMPTY.runs.set(RUN, run))
    room = WaitRoom()
    room.observe(out.events, state)
    waiting = run
    run = apply_to_run(run, ev(E.SIGNAL_RECEIVED, name="approval", payload="ok"))
    state = State(runs=EMPTY.runs.set(RUN, run))
    assert room.expired(200.0, state, SRC) == []  # woken: the signal came first, in the log
    run, out = step(run, 200.0)
    assert kinds(out)[0] == (E.TASK_COMPLETED, "approval")
    # A TASK_FAILED decided from the view before the signal would change nothing now.
    late = waits.expire(waiting, "approval", 1, 200.0, SRC)
    assert late is not None and apply_to_run(run, late) == run


def test_sleeps_complete_at_their_deadline_and_the_room_rebuilds_from_the_state() -> None:
    wf = Workflow("sleepy")
    nap = wf.sleep(2, id="nap")
    wf.sleep_until(50.0, id="alarm")
    wf.add("tests.after", dependencies=[nap], id="after")
    run = run_of([submitted(wf.definition())])
    run, out = step(run, 40.0)
    assert {t for k, t in kinds(out) if k is E.TASK_WAITING} == {"nap", "alarm"}
    assert run.tasks["nap"].due_at == 42.0 and run.tasks["alarm"].due_at == 50.0
    room = WaitRoom()  # a new leader: nothing observed, everything rebuilt from the refolded state
    state = State(runs=EMPTY.runs.set(RUN, run))
    room.rebuild(state)
    assert len(room) == 2 and room.next_due() == 42.0
    (woke,) = room.expired(45.0, state, SRC)
    assert (woke.type, woke.task_id, woke.data["result"]) == (E.TASK_COMPLETED, "nap", None)
    run = apply_to_run(run, woke)
    run, out = step(run, 45.0)
    assert [job.task_id for job, _ in out.jobs] == ["after"]
    assert room.next_due() == 50.0


def test_a_sleep_until_in_the_past_ends_at_once() -> None:
    wf = Workflow("past")
    wf.sleep_until(datetime.now(UTC) - timedelta(days=1), id="alarm")
    run, out = step(run_of([submitted(wf.definition())]), 10**10)
    room = WaitRoom()
    state = State(runs=EMPTY.runs.set(RUN, run))
    room.observe(out.events, state)
    assert [e.type for e in room.expired(10**10, state, SRC)] == [E.TASK_COMPLETED]


def test_cancelling_a_run_cancels_its_waiting_node_and_its_deadline_does_nothing() -> None:
    run, out = step(run_of([submitted(approval_wf(timeout=1))]), 100.0)
    state = State(runs=EMPTY.runs.set(RUN, run))
    room = WaitRoom()
    room.observe(out.events, state)
    run = apply_to_run(run, ev(E.WORKFLOW_CANCEL_REQUESTED, reason="stop"))
    run, out = step(run, 100.5)
    assert (E.TASK_CANCELLED, "approval") in kinds(out) and not out.revoke and not out.cancels
    assert run.status is RunStatus.CANCELLED and not run.waiting
    assert room.expired(200.0, State(runs=EMPTY.runs.set(RUN, run)), SRC) == []


# -- the client's checks ------------------------------------------------------------------------------


def test_bad_signals_are_refused_before_anything_is_written() -> None:
    run = run_of([submitted(approval_wf())])
    assert waits.signal_event(run, "approval", {"by": "ana"}, 100).data == {
        "name": "approval",
        "payload": {"by": "ana"},
    }
    with pytest.raises(UnknownSignalError, match="it waits for: approval"):
        waits.signal_event(run, "aproval", None, 100)
    with pytest.raises(SerializationError):
        waits.signal_event(run, "approval", {1, 2}, 100)
    with pytest.raises(SerializationError):
        waits.signal_event(run, "approval", float("inf"), 100)
    with pytest.raises(PayloadTooLargeError):
        waits.signal_event(run, "approval", "x" * 100, 100)
    done = apply_to_run(run, ev(E.WORKFLOW_CANCELLED))
    assert done is not None
    with pytest.raises(RunFinishedError):
        waits.signal_event(done, "approval", None, 100)
    wf = Workflow("plain")
    wf.add("tests.x")
    plain = run_of([submitted(wf.definition())])
    with pytest.raises(UnknownSignalError, match="waits for no signal"):
        waits.signal_event(plain, "approval", None, 100)


# -- checkpoints and reruns ---------------------------------------------------------------------------


def test_waits_round_trip_through_a_checkpoint() -> None:
    wf = Workflow("both")
    wf.wait_for("a")
    wf.wait_for("b", timeout=3)
    wf.sleep(1, id="nap")
    wf.wait_for("c")
    run = run_of([submitted(wf.definition()), ev(E.SIGNAL_RECEIVED, name="b", payload={"x": [1]})])
    run, _ = step(run, 10.0)
    run = apply_to_run(run, ev(E.SIGNAL_RECEIVED, name="c", payload=None))
    assert set(run.waiting) == {"a", "b", "nap", "c"} and set(run.woken) == {"b", "c"}
    back = checkpoint.decode(json.loads(json.dumps(checkpoint.encode(run))))
    for name in RunState._fields:
        assert getattr(back, name) == getattr(run, name), name


def test_a_rerun_waits_again_for_a_new_signal_or_takes_one_that_came_late() -> None:
    base = [submitted(approval_wf(timeout=1))]
    run, _ = step(run_of(base), 100.0)
    # Completed with a signal, then rerun by name: it waits for a new signal (the old one is spent).
    done = functools.reduce(
        lambda r, e: apply_to_run(r, e),
        [ev(E.SIGNAL_RECEIVED, name="approval", payload="v1")],
        run,
    )
    done, _ = step(done, 101.0)
    done = apply_to_run(done, ev(E.WORKFLOW_COMPLETED))
    again = apply_to_run(done, ev(E.WORKFLOW_RERUN_REQUESTED, n=1, tasks=["approval"]))
    assert again is not None and "approval" not in again.signals and not again.woken
    again, out = step(again, 200.0)
    assert (E.TASK_WAITING, "approval") in kinds(out) and not again.woken
    # Timed out, then a late signal, then a rerun: the node takes the late signal once reached.
    room = WaitRoom()
    state = State(runs=EMPTY.runs.set(RUN, run))
    room.rebuild(state)
    (timeout,) = room.expired(101.0, state, SRC)
    failed = apply_to_run(run, timeout)
    failed = apply_to_run(failed, ev(E.WORKFLOW_FAILED))
    failed = apply_to_run(failed, ev(E.SIGNAL_RECEIVED, name="approval", payload="late"))
    assert failed is not None
    again = apply_to_run(failed, ev(E.WORKFLOW_RERUN_REQUESTED, n=1))
    assert again is not None and again.tasks["approval"].status is TaskStatus.READY
    again, _ = step(again, 300.0)
    assert set(again.woken) == {"approval"}
    again, out = step(again, 300.1)
    assert kinds(out)[0] == (E.TASK_COMPLETED, "approval") and again.tasks["approval"].result == "late"


def test_a_worker_never_waits_for_a_wait_node_to_be_handed_to_it() -> None:
    wf = Workflow("handoff")
    first = wf.add("tests.first", id="first")
    wf.wait_for("go", dependencies=[first])
    run = run_of([submitted(wf.definition())])
    assert not readies_successor(run, "first")
    wf2 = Workflow("handoff")
    first = wf2.add("tests.first", id="first")
    wf2.add("tests.next", first, id="next")
    assert readies_successor(run_of([submitted(wf2.definition())]), "first")
