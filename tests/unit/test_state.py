"""The fold: ``apply(state, event) -> state`` over hand-made events, trigger rules, outcomes, idempotence."""

from __future__ import annotations

import random

import pytest

from nerv_cluster.errors import TaskFailedError
from nerv_cluster.model import Event, EventType, RunStatus, TaskStatus, TriggerRule, WorkflowDef
from nerv_cluster.state import (
    EMPTY,
    RunState,
    StateProjector,
    apply,
    completed,
    evict,
    failed,
    fold,
    results,
    rule_outcome,
    run_outcome,
    run_result,
    task_result,
    task_statuses,
)
from tests.unit.helpers import (
    RUN,
    Sim,
    completes,
    diamond,
    ev,
    fails,
    random_dag,
    run_of,
    submitted,
    td,
    wdef,
)

E = EventType
S = TaskStatus
A, B, C, D = "a", "b", "c", "d"


def flat(*parts) -> list[Event]:
    out: list[Event] = []
    for p in parts:
        out.extend(p if isinstance(p, list) else [p])
    return out


def run_after(definition: WorkflowDef, *parts) -> RunState:
    return run_of(fold(flat(submitted(definition), *parts)))


def statuses(run: RunState) -> dict[str, str]:
    return {k: v.value for k, v in task_statuses(run).items()}


# -- the basic life of a diamond ----------------------------------------------------------------------


def test_submit_makes_roots_ready():
    run = run_after(diamond())
    assert run.status is RunStatus.PENDING
    assert statuses(run) == {A: "READY", B: "PENDING", C: "PENDING", D: "PENDING"}
    assert set(run.ready) == {A}
    assert not run.doomed and not run.running
    assert run.count(S.READY) == 1 and run.count(S.PENDING) == 3
    assert run.total == 4 and run.finished_tasks == 0 and not run.all_tasks_done
    assert run.name == "diamond"
    assert run.plan.levels == ((A,), (B, C), (D,))


def test_several_roots_are_all_ready():
    run = run_after(wdef(td("x"), td("y"), td("z", "x", "y")))
    assert set(run.ready) == {"x", "y"}


def test_events_of_unknown_runs_change_nothing():
    assert apply(EMPTY, ev(E.TASK_COMPLETED, A, 1)) is EMPTY
    state = fold([submitted(diamond())])
    assert apply(state, ev(E.TASK_DISPATCHED, A, 1, run_id="other-run")) is state


def test_submitted_twice_keeps_the_first():
    state = fold([submitted(diamond()), *completes(A, 1)])
    assert apply(state, submitted(wdef(td("zzz")))) is state


def test_workflow_started_once():
    s1 = fold([submitted(diamond()), ev(E.WORKFLOW_STARTED, ts=50.0)])
    run = run_of(s1)
    assert run.status is RunStatus.RUNNING and run.started_at == 50.0
    assert apply(s1, ev(E.WORKFLOW_STARTED, ts=60.0)) is s1


def test_dispatch_start_complete_transitions():
    state = fold([submitted(diamond())])
    state = apply(state, ev(E.TASK_DISPATCHED, A, 1, ts=100.0, queue="cpu"))
    ts = run_of(state).tasks[A]
    assert (ts.status, ts.dispatched, ts.dispatched_at) == (S.READY, True, 100.0)
    assert set(run_of(state).ready) == set()  # dispatched: no longer waiting for dispatch

    state = apply(state, ev(E.TASK_STARTED, A, 1, ts=101.0, worker="w7"))
    run = run_of(state)
    ts = run.tasks[A]
    assert (ts.status, ts.worker, ts.started_at) == (S.RUNNING, "w7", 101.0)
    assert set(run.running) == {A}
    assert run.count(S.RUNNING) == 1 and run.count(S.READY) == 0

    state = apply(state, ev(E.TASK_COMPLETED, A, 1, ts=103.0, result={"n": 1}, worker="w7"))
    run = run_of(state)
    ts = run.tasks[A]
    assert (ts.status, ts.result, ts.finished_at) == (S.COMPLETED, {"n": 1}, 103.0)
    assert set(run.running) == set()
    assert statuses(run) == {A: "COMPLETED", B: "READY", C: "READY", D: "PENDING"}
    assert set(run.ready) == {B, C}
    tr = task_result(run, A)
    assert (tr.attempts, tr.worker, tr.execution_time) == (1, "w7", 2.0)


def test_dispatch_of_a_pending_task_is_ignored():
    state = fold([submitted(diamond())])
    assert apply(state, ev(E.TASK_DISPATCHED, D, 1)) is state


def test_dependents_become_ready_only_when_all_deps_completed():
    run = run_after(diamond(), completes(A, 1), completes(B, 2))
    assert run.tasks[D].status is S.PENDING
    assert D not in run.ready
    assert run.tasks[D].ok == 1
    run = run_after(diamond(), completes(A, 1), completes(B, 2), completes(C, 3))
    assert run.tasks[D].status is S.READY
    assert set(run.ready) == {D}


def test_results_projection():
    run = run_after(diamond(), completes(A, 1), completes(C, [3]), completes(B, {"two": 2}))
    assert results(run) == {A: 1, B: {"two": 2}, C: [3]}
    assert sorted(completed(run)) == [A, B, C]
    rr = run_result(run)
    assert rr.results == {A: 1, B: {"two": 2}, C: [3]}
    assert rr.counts == {"COMPLETED": 3, "READY": 1}
    assert rr.tasks[D].status is S.READY and rr.tasks[D].attempts == 0
    assert not rr.done and rr.duration is None


def test_run_result_tasks_are_a_mapping_made_as_read():
    run = run_after(diamond(), completes(A, 1), completes(C, [3]))
    tasks = run_result(run).tasks
    assert list(tasks) == [t.id for t in run.definition.tasks] and len(tasks) == 4
    assert tasks == {tid: task_result(run, tid) for tid in run.defs}  # equal to the dict of them
    assert tasks[A] is tasks[A] and tasks.get("nope") is None and "nope" not in tasks and A in tasks
    with pytest.raises(KeyError):
        tasks["nope"]
    assert repr(tasks).startswith("{") and "TaskResult" in repr(tasks)


def test_run_result_of_a_finished_run():
    run = run_after(
        diamond(),
        ev(E.WORKFLOW_STARTED, ts=10.0),
        completes(A),
        completes(B),
        completes(C),
        completes(D, "done"),
        ev(E.WORKFLOW_COMPLETED, ts=40.0),
    )
    rr = run_result(run)
    assert rr.status is RunStatus.COMPLETED and rr.done
    assert rr.started_at == 10.0 and rr.finished_at == 40.0
    assert rr.duration == 40.0 - rr.submitted_at
    assert rr.raise_for_status() is rr
    assert rr.errors == {}


# -- idempotence ------------------------------------------------------------------------------------


def _full_diamond_log() -> list[Event]:
    return flat(
        submitted(diamond()),
        ev(E.WORKFLOW_STARTED),
        completes(A, 1),
        ev(E.TASK_DISPATCHED, B, 1),
        ev(E.TASK_STARTED, B, 1, worker="w1"),
        ev(E.TASK_RETRYING, B, 1, next_attempt=2, due_at=5.0, error={"type": "E", "message": "m"}),
        completes(B, 2, attempt=2),
        completes(C, 3),
        completes(D, 4),
        ev(E.WORKFLOW_COMPLETED),
    )


def test_applying_every_event_twice_changes_nothing():
    log = _full_diamond_log()
    once = fold(log)
    twice = fold(e for e in log for _ in range(2))
    assert run_of(twice) == run_of(once)
    assert run_result(run_of(twice)) == run_result(run_of(once))
    assert statuses(run_of(twice)) == {A: "COMPLETED", B: "COMPLETED", C: "COMPLETED", D: "COMPLETED"}
    # Each event, applied a second time right away, returns the very same state.
    state = EMPTY
    for e in log:
        state = apply(state, e)
        assert apply(state, e) is state, e.type


def test_replaying_the_whole_log_changes_nothing():
    log = _full_diamond_log()
    once = fold(log)
    assert fold(log, once) is once
    assert run_of(fold(log + log)) == run_of(once)
    assert run_result(run_of(fold(log + log))) == run_result(run_of(once))


def test_stale_attempt_events_are_ignored():
    state = fold(
        [
            submitted(diamond()),
            ev(E.TASK_DISPATCHED, A, 1),
            ev(E.TASK_STARTED, A, 1, worker="w1"),
            ev(E.TASK_RETRYING, A, 1, next_attempt=2),
        ]
    )
    # Late news of attempt 1: none of it counts any more.
    for late in (
        ev(E.TASK_COMPLETED, A, 1, result="late"),
        ev(E.TASK_FAILED, A, 1, error={"type": "E"}),
        ev(E.TASK_STARTED, A, 1, worker="w1"),
        ev(E.TASK_DISPATCHED, A, 1),
        ev(E.TASK_RETRYING, A, 1, next_attempt=2),
    ):
        assert apply(state, late) is state, late.type
    run = run_of(state)
    assert run.tasks[A].status is S.READY and run.tasks[A].attempt == 2
    # Events without an attempt, or for an unknown task, are ignored too.
    assert apply(state, ev(E.TASK_COMPLETED, A, None)) is state
    assert apply(state, ev(E.TASK_COMPLETED, "ghost", 1)) is state
    # The current attempt does count.
    run = run_of(fold(completes(A, "fresh", attempt=2), state))
    assert run.tasks[A].status is S.COMPLETED and run.tasks[A].result == "fresh"
    assert task_result(run, A).attempts == 2


def test_completion_of_an_old_attempt_after_the_new_one_started():
    run = run_after(
        diamond(),
        ev(E.TASK_DISPATCHED, A, 1),
        ev(E.TASK_STARTED, A, 1, worker="w1"),
        ev(E.TASK_PENDING, A, 1, next_attempt=2, reason="worker lost"),
        ev(E.TASK_DISPATCHED, A, 2),
        ev(E.TASK_STARTED, A, 2, worker="w2"),
        ev(E.TASK_COMPLETED, A, 1, result="from the lost worker"),
    )
    ts = run.tasks[A]
    assert (ts.status, ts.attempt, ts.worker, ts.result) == (S.RUNNING, 2, "w2", None)
    assert run.tasks[B].status is S.PENDING


def test_task_retrying():
    error = {"type": "ValueError", "message": "try again", "types": ["ValueError"]}
    run = run_after(
        diamond(),
        ev(E.TASK_DISPATCHED, A, 1),
        ev(E.TASK_STARTED, A, 1, worker="w1"),
        ev(E.TASK_RETRYING, A, 1, next_attempt=2, delay=2.5, due_at=1234.5, error=error),
    )
    ts = run.tasks[A]
    assert ts.status is S.READY
    assert ts.attempt == 2
    assert ts.dispatched is False
    assert ts.due_at == 1234.5
    assert ts.error is not None and ts.error.message == "try again"
    assert ts.lost == 0
    assert set(run.ready) == {A} and set(run.running) == set()
    assert task_result(run, A).attempts == 1  # the second attempt has not been dispatched yet
    # Dispatching attempt 2 clears the due time.
    run = run_after(
        diamond(),
        ev(E.TASK_DISPATCHED, A, 1),
        ev(E.TASK_RETRYING, A, 1, next_attempt=2, due_at=1234.5),
        ev(E.TASK_DISPATCHED, A, 2),
    )
    ts = run.tasks[A]
    assert (ts.dispatched, ts.due_at, ts.attempt) == (True, None, 2)
    assert task_result(run, A).attempts == 2


def test_task_retrying_without_next_attempt_counts_up():
    run = run_after(diamond(), ev(E.TASK_DISPATCHED, A, 1), ev(E.TASK_RETRYING, A, 1))
    assert run.tasks[A].attempt == 2 and run.tasks[A].due_at is None


def test_task_pending_after_a_lost_worker_counts_it():
    run = run_after(
        diamond(),
        ev(E.TASK_DISPATCHED, A, 1),
        ev(E.TASK_STARTED, A, 1, worker="w1"),
        ev(E.TASK_PENDING, A, 1, next_attempt=2, reason="worker w1 lost"),
    )
    ts = run.tasks[A]
    assert (ts.status, ts.attempt, ts.dispatched, ts.lost) == (S.READY, 2, False, 1)
    assert ts.reason == "worker w1 lost"


def test_a_second_worker_taking_over_the_attempt():
    state = fold(
        [
            submitted(diamond()),
            ev(E.TASK_DISPATCHED, A, 1),
            ev(E.TASK_STARTED, A, 1, ts=10.0, worker="w1"),
            ev(E.TASK_STARTED, A, 1, ts=20.0, worker="w2"),
        ]
    )
    ts = run_of(state).tasks[A]
    assert (ts.worker, ts.started_at) == ("w2", 20.0)
    # A replay of the first start, older than the takeover, does not switch back.
    assert apply(state, ev(E.TASK_STARTED, A, 1, ts=10.0, worker="w1")) is state


# -- trigger rules ----------------------------------------------------------------------------------

ALL_SUCCESS, ALL_DONE, ONE_FAILED, NONE_FAILED = (
    TriggerRule.ALL_SUCCESS,
    TriggerRule.ALL_DONE,
    TriggerRule.ONE_FAILED,
    TriggerRule.NONE_FAILED,
)


@pytest.mark.parametrize(
    ("rule", "ok", "failed_", "skipped", "expected"),
    [
        (ALL_SUCCESS, 0, 0, 0, None),
        (ALL_SUCCESS, 1, 0, 0, None),
        (ALL_SUCCESS, 2, 0, 0, True),
        (ALL_SUCCESS, 1, 1, 0, False),
        (ALL_SUCCESS, 0, 1, 0, False),
        (ALL_SUCCESS, 0, 0, 1, False),
        (ALL_SUCCESS, 1, 0, 1, False),
        (ALL_DONE, 0, 0, 0, None),
        (ALL_DONE, 1, 0, 0, None),
        (ALL_DONE, 0, 1, 0, None),
        (ALL_DONE, 2, 0, 0, True),
        (ALL_DONE, 1, 1, 0, True),
        (ALL_DONE, 0, 2, 0, True),
        (ALL_DONE, 0, 0, 2, True),
        (ALL_DONE, 0, 1, 1, True),
        (ONE_FAILED, 0, 0, 0, None),
        (ONE_FAILED, 1, 0, 0, None),
        (ONE_FAILED, 0, 0, 1, None),
        (ONE_FAILED, 0, 1, 0, True),
        (ONE_FAILED, 1, 1, 0, True),
        (ONE_FAILED, 2, 0, 0, False),
        (ONE_FAILED, 1, 0, 1, False),
        (ONE_FAILED, 0, 0, 2, False),
        (NONE_FAILED, 0, 0, 0, None),
        (NONE_FAILED, 1, 0, 0, None),
        (NONE_FAILED, 2, 0, 0, True),
        (NONE_FAILED, 1, 0, 1, True),
        (NONE_FAILED, 0, 0, 2, True),
        (NONE_FAILED, 0, 1, 0, False),
        (NONE_FAILED, 1, 1, 0, False),
    ],
)
def test_rule_outcome_table(rule, ok, failed_, skipped, expected):
    assert rule_outcome(rule, 2, ok, failed_, skipped) is expected


def test_single_dependency_rules():
    assert rule_outcome(ALL_SUCCESS, 1, 1, 0, 0) is True
    assert rule_outcome(ONE_FAILED, 1, 0, 1, 0) is True
    assert rule_outcome(ONE_FAILED, 1, 1, 0, 0) is False
    assert rule_outcome(NONE_FAILED, 1, 0, 0, 1) is True
    assert rule_outcome(ALL_DONE, 1, 0, 0, 1) is True


def test_a_failed_task_dooms_all_success_dependents():
    run = run_after(diamond(), fails(A, "boom"))
    assert run.tasks[A].status is S.FAILED
    assert run.tasks[A].error is not None and run.tasks[A].error.message == "boom"
    assert set(run.doomed) == {B, C}
    assert run.tasks[B].status is S.PENDING and run.tasks[C].status is S.PENDING  # until TASK_SKIPPED
    assert set(run.ready) == set()
    assert failed(run)[A].message == "boom"


def test_task_skipped_propagates():
    run = run_after(diamond(), fails(A), ev(E.TASK_SKIPPED, B, reason="upstream a failed"))
    assert run.tasks[B].status is S.SKIPPED and run.tasks[B].reason == "upstream a failed"
    assert set(run.doomed) == {C, D}
    assert run.tasks[D].skipped == 1
    run = run_after(diamond(), fails(A), ev(E.TASK_SKIPPED, B), ev(E.TASK_SKIPPED, C), ev(E.TASK_SKIPPED, D))
    assert statuses(run) == {A: "FAILED", B: "SKIPPED", C: "SKIPPED", D: "SKIPPED"}
    assert set(run.doomed) == set() and run.all_tasks_done


def test_task_skipped_only_applies_to_pending_tasks():
    state = fold([submitted(diamond())])
    assert apply(state, ev(E.TASK_SKIPPED, A)) is state  # A is READY


def fallback_wf() -> WorkflowDef:
    return wdef(td(A), td("ok_path", A), td("fallback", A, trigger="one_failed"))


def test_one_failed_fallback_runs_when_its_upstream_failed():
    run = run_after(fallback_wf(), fails(A))
    assert run.tasks["fallback"].status is S.READY
    assert set(run.ready) == {"fallback"}
    assert set(run.doomed) == {"ok_path"}


def test_one_failed_fallback_is_doomed_when_upstream_succeeds():
    run = run_after(fallback_wf(), completes(A))
    assert set(run.ready) == {"ok_path"}
    assert set(run.doomed) == {"fallback"}


def test_one_failed_fires_without_waiting_for_the_others():
    wf = wdef(td("x"), td("y"), td("alarm", "x", "y", trigger="one_failed"))
    run = run_after(wf, fails("x"))
    assert run.tasks["alarm"].status is S.READY


def test_all_done_runs_after_a_failure():
    wf = wdef(td("x"), td("y"), td("cleanup", "x", "y", trigger="all_done"))
    run = run_after(wf, fails("x"))
    assert run.tasks["cleanup"].status is S.PENDING and not run.doomed
    run = run_after(wf, fails("x"), completes("y"))
    assert run.tasks["cleanup"].status is S.READY


def test_all_done_runs_after_a_skip():
    wf = wdef(td("x"), td("y", "x"), td("cleanup", "y", trigger="all_done"))
    run = run_after(wf, fails("x"), ev(E.TASK_SKIPPED, "y"))
    assert run.tasks["cleanup"].status is S.READY


def test_none_failed():
    wf = wdef(
        td("bad"),
        td("good"),
        td("skipped", "bad"),
        td("tolerant", "good", "skipped", trigger="none_failed"),
        td("strict", "good", "bad", trigger="none_failed"),
    )
    run = run_after(wf, fails("bad"), completes("good"), ev(E.TASK_SKIPPED, "skipped"))
    assert run.tasks["tolerant"].status is S.READY
    assert set(run.doomed) == {"strict"}


# -- run outcome ------------------------------------------------------------------------------------


def test_run_outcome_completed():
    run = run_after(diamond(), completes(A), completes(B), completes(C), completes(D))
    assert run.all_tasks_done
    assert run_outcome(run) == (RunStatus.COMPLETED, "")


def test_run_outcome_failed_names_the_task():
    run = run_after(
        diamond(), fails(A, "disk full"), ev(E.TASK_SKIPPED, B), ev(E.TASK_SKIPPED, C), ev(E.TASK_SKIPPED, D)
    )
    status, reason = run_outcome(run)
    assert status is RunStatus.FAILED
    assert reason == "task 'a' failed: ValueError: disk full"


def test_run_outcome_counts_more_failures():
    wf = wdef(td("x"), td("y"))
    run = run_after(wf, fails("y", "first"), fails("x", "second"))
    status, reason = run_outcome(run)
    assert status is RunStatus.FAILED
    assert reason == "task 'y' failed: ValueError: first (and 1 more)"  # the earliest failure first


def test_failure_handled_by_a_fallback_that_completed():
    run = run_after(fallback_wf(), fails(A), completes("fallback"), ev(E.TASK_SKIPPED, "ok_path"))
    assert run.all_tasks_done
    assert run_outcome(run) == (RunStatus.COMPLETED, "")


def test_failure_handled_by_an_all_done_task_that_completed():
    wf = wdef(td("x"), td("cleanup", "x", trigger="all_done"))
    run = run_after(wf, fails("x"), completes("cleanup"))
    assert run.all_tasks_done
    assert run_outcome(run) == (RunStatus.COMPLETED, "")


def test_failure_not_handled_when_the_all_done_task_failed():
    wf = wdef(td("x"), td("y"), td("after", "y"), td("z", "x", "y", trigger="all_done"))
    run = run_after(wf, completes("y"), fails("x"), completes("after"), fails("z", "z broke"))
    status, reason = run_outcome(run)
    assert status is RunStatus.FAILED and reason.startswith("task 'x' failed")


def test_failure_not_handled_when_the_fallback_failed_too():
    run = run_after(fallback_wf(), fails(A), fails("fallback", "also broken"), ev(E.TASK_SKIPPED, "ok_path"))
    status, reason = run_outcome(run)
    assert status is RunStatus.FAILED
    assert "'a'" in reason and "(and 1 more)" in reason


def test_run_outcome_cancelled():
    run = run_after(diamond(), completes(A), ev(E.WORKFLOW_CANCEL_REQUESTED, reason="user asked"))
    assert run.cancel_requested
    assert run_outcome(run) == (RunStatus.CANCELLED, "user asked")


def test_workflow_end_events_are_final():
    state = fold([submitted(diamond()), ev(E.WORKFLOW_STARTED), ev(E.WORKFLOW_FAILED, ts=99.0, reason="why")])
    run = run_of(state)
    assert (run.status, run.reason, run.finished_at) == (RunStatus.FAILED, "why", 99.0)
    for later in (ev(E.WORKFLOW_COMPLETED), ev(E.WORKFLOW_CANCELLED), ev(E.WORKFLOW_CANCEL_REQUESTED)):
        assert apply(state, later) is state
    with pytest.raises(TaskFailedError, match="why"):
        run_result(run).raise_for_status()


# -- cancel -----------------------------------------------------------------------------------------


def test_cancel_requested_stops_new_work():
    state = fold(
        [
            submitted(diamond()),
            ev(E.TASK_DISPATCHED, A, 1),
            ev(E.TASK_STARTED, A, 1, worker="w1"),
            ev(E.WORKFLOW_CANCEL_REQUESTED, reason="stop"),
        ]
    )
    run = run_of(state)
    assert run.cancel_requested and run.reason == "stop"
    assert run.status is RunStatus.PENDING  # the scheduler finishes the cancel
    # A retry is refused once cancelled; a completion still counts but readies nothing.
    assert apply(state, ev(E.TASK_RETRYING, A, 1, next_attempt=2)) is state
    run = run_of(apply(state, ev(E.TASK_COMPLETED, A, 1, result=1)))
    assert run.tasks[A].status is S.COMPLETED
    assert set(run.ready) == set() and run.tasks[B].status is S.PENDING and run.tasks[B].ok == 1


def test_task_cancelled_and_workflow_cancelled():
    run = run_after(
        diamond(),
        completes(A),
        ev(E.WORKFLOW_CANCEL_REQUESTED),
        ev(E.TASK_CANCELLED, B, 1),
        ev(E.TASK_CANCELLED, C, 1),
        ev(E.TASK_CANCELLED, D, 1),
        ev(E.TASK_CANCELLED, A, 1),  # terminal already: ignored
        ev(E.WORKFLOW_CANCELLED, reason="cancelled"),
    )
    assert statuses(run) == {A: "COMPLETED", B: "CANCELLED", C: "CANCELLED", D: "CANCELLED"}
    assert run.status is RunStatus.CANCELLED
    assert run.tasks[B].reason == "cancelled"
    assert run.all_tasks_done


# -- duplicated dependencies on the wire ------------------------------------------------------------


def test_a_dependency_listed_twice_on_the_wire_still_counts_once():
    # A submitted definition (e.g. written by another client) that lists an upstream twice must not make
    # its dependent wait forever for a second completion that never comes.
    wire = {"name": "dup", "tasks": [{"id": "a", "fn": "f"}, {"id": "b", "fn": "f", "deps": ["a", "a"]}]}
    sub = Event(E.WORKFLOW_SUBMITTED, RUN, data={"workflow": wire}, ts=1.0)
    run = run_of(fold([sub, *completes(A)]))
    assert run.tasks["b"].status is S.READY
    assert set(run.ready) == {"b"}


# -- the projector, eviction ------------------------------------------------------------------------


def test_state_projector():
    proj = StateProjector()
    proj.add_projection("statuses", lambda st: statuses(run_of(st)))
    proj.apply(submitted(diamond()))
    proj.apply_all(completes(A))
    assert proj.project("statuses") == {A: "COMPLETED", B: "READY", C: "READY", D: "PENDING"}
    with pytest.raises(KeyError, match="statuses"):
        proj.project("nope")
    proj.reset()
    assert proj.state is EMPTY


def test_evict():
    state = fold([submitted(diamond()), submitted(diamond(), run_id="other")])
    assert set(evict(state, RUN).runs) == {"other"}


# -- the fold is insensitive to duplicates wherever they land ----------------------------------------


def _rich_log(seed: int) -> list[Event]:
    """The log of a simulated run of a small random DAG with failures, retries, lost workers, takeovers."""
    rng = random.Random(seed)
    definition = random_dag(14, rng, max_deps=3, window=6, triggers=True)
    ids = [t.id for t in definition.tasks]
    pick = lambda k: set(rng.sample(ids, k))  # noqa: E731
    sim = Sim(
        definition,
        rng,
        fail_first=pick(3),
        fail_always=pick(2),
        lose_first=pick(2),
        takeover=pick(2),
        retry_delay=0.5,
    )
    sim.run_to_end()
    assert not sim.violations
    return sim.log


def _with_duplicates(log: list[Event], picks: list[tuple[int, float]]) -> list[Event]:
    """Insert a copy of ``log[i]`` somewhere after the original, for each ``(i, where)``."""
    keyed = [(float(i), 0, e) for i, e in enumerate(log)]
    for n, (i, where) in enumerate(picks):
        i %= len(log)
        pos = i + 0.5 + where * (len(log) - i)  # strictly after the original, anywhere up to the end
        keyed.append((pos, n + 1, log[i]))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [e for _, _, e in keyed]


def test_duplicates_after_the_original_change_nothing_examples():
    log = _rich_log(3)
    clean = run_of(fold(log))
    assert clean.status.terminal
    rng = random.Random(11)
    for _ in range(20):
        picks = [(rng.randrange(len(log)), rng.random()) for _ in range(len(log))]
        noisy = _with_duplicates(log, picks)
        got = run_of(fold(noisy))
        assert got == clean
        assert run_result(got) == run_result(clean)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    given = None

if given is not None:

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        seed=st.integers(0, 2**16),
        picks=st.lists(st.tuples(st.integers(0, 10_000), st.floats(0, 1)), min_size=1, max_size=120),
    )
    def test_fold_is_insensitive_to_duplicates(seed, picks):
        log = _rich_log(seed)
        clean = run_of(fold(log))
        noisy = run_of(fold(_with_duplicates(log, picks)))
        assert noisy == clean
        assert run_result(noisy) == run_result(clean)
        assert statuses(noisy) == statuses(clean)


def test_replace_keeps_runstate_comparable():
    # The property tests compare whole RunStates; make sure equality sees a changed task.
    run = run_after(diamond())
    changed = run._replace(tasks=run.tasks.set(A, run.tasks[A]._replace(result=1)))
    assert changed != run
