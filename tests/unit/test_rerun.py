"""Rerun from failure, without Redis: the selection, the pure reset, the fold of the request, the
client's checks, the hooks, and whole simulated reruns through ``decide``."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable

import pytest

from nerv_cluster import checkpoint, rerun
from nerv_cluster.errors import RerunError, RunNotFinishedError
from nerv_cluster.failures import failure_outcome
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType, RetryPolicy, RunStatus, TaskError, TaskStatus, TriggerRule
from nerv_cluster.state import _STATUSES, RunState, TaskState, apply_to_run, fold_run
from scheduler.decisions import Decisions, decide
from tests.unit.helpers import (
    RUN,
    Sim,
    completes,
    diamond,
    ev,
    expected_results,
    fails,
    random_dag,
    submitted,
    td,
    wdef,
)

E = EventType
S = TaskStatus


def _fold(events: Iterable[Event]) -> RunState:
    run: RunState | None = None
    for e in events:
        run = apply_to_run(run, e)
    assert run is not None
    return run


def _rerun_event(n: int = 1, tasks: list[str] | None = None) -> Event:
    data: dict[str, object] = {"n": n}
    if tasks is not None:
        data["tasks"] = tasks
    return ev(E.WORKFLOW_RERUN_REQUESTED, **data)


def _consistent(run: RunState) -> None:
    """The derived sets, tally and dependency counts agree with the tasks' states."""
    tasks = run.tasks
    assert run.tally == tuple(sum(ts.status is s for ts in tasks.values()) for s in _STATUSES)
    assert set(run.ready) == {t for t, ts in tasks.items() if ts.status is S.READY and not ts.dispatched}
    assert set(run.queued) == {t for t, ts in tasks.items() if ts.status is S.READY and ts.dispatched}
    assert set(run.running) == {t for t, ts in tasks.items() if ts.status is S.RUNNING}
    for tid, ts in tasks.items():
        deps = [tasks[d].status for d in run.defs[tid].dependencies]
        assert ts.ok == sum(s is S.COMPLETED for s in deps), tid
        assert ts.failed == sum(s is S.FAILED for s in deps), tid
        assert ts.skipped == sum(s in (S.SKIPPED, S.CANCELLED) for s in deps), tid
        assert tid not in run.doomed or ts.status is S.PENDING


def _failed_diamond() -> RunState:
    """a -> (b, c) -> d plus e (alone): b failed, d skipped, the run failed."""
    definition = wdef(td("a"), td("b", "a"), td("c", "a"), td("d", "b", "c"), td("e"))
    log = [submitted(definition), ev(E.WORKFLOW_STARTED)]
    log += completes("a", 1) + fails("b") + completes("c", 3) + completes("e", 5)
    log += [ev(E.TASK_SKIPPED, "d", reason="upstream failed"), ev(E.WORKFLOW_FAILED, reason="b failed")]
    run = _fold(log)
    assert run.status is RunStatus.FAILED and run.tasks["d"].status is S.SKIPPED
    return run


# -- the selection and the reset ------------------------------------------------------------------------


def test_without_tasks_every_unfinished_task_is_reset_and_completed_ones_are_kept() -> None:
    before = _failed_diamond()
    after = rerun.reset(before, rerun.select(before, None))
    assert sorted(rerun.select(before, None)) == ["b", "d"]
    assert after.status is RunStatus.RUNNING and after.reruns == 1
    assert after.finished_at is None and after.reason == "" and not after.cancel_requested
    b, d = after.tasks["b"], after.tasks["d"]
    assert (b.status, b.attempt, b.first, b.ok, b.error, b.dispatched) == (S.READY, 2, 2, 1, None, False)
    # d never ran (skipped): its attempt number is free, and it waits for b again.
    assert (d.status, d.attempt, d.first, d.ok, d.failed, d.skipped) == (S.PENDING, 1, 1, 1, 0, 0)
    for tid in "ace":
        assert after.tasks[tid] is before.tasks[tid], "completed tasks are left as they were"
    assert set(after.ready) == {"b"} and not after.doomed
    _consistent(after)
    _consistent(before)


def test_named_tasks_take_their_descendants_whatever_their_status() -> None:
    run = _failed_diamond()
    assert sorted(rerun.select(run, ["c"])) == ["c", "d"]
    assert sorted(rerun.select(run, ["a"])) == ["a", "b", "c", "d"]
    assert rerun.select(run, ["e", "e"]) == ["e"]
    after = rerun.reset(run, rerun.select(run, ["a"]))
    assert after.tasks["a"].status is S.READY and after.tasks["a"].attempt == 2
    assert after.tasks["a"].result is None
    assert all(after.tasks[t].status is S.PENDING for t in "bcd")
    assert after.tasks["c"].attempt == 2 and after.tasks["c"].ok == 0
    assert after.tasks["e"] is run.tasks["e"]
    _consistent(after)


def test_a_reset_task_whose_kept_upstream_failed_is_doomed_again() -> None:
    run = _failed_diamond()
    after = rerun.reset(run, rerun.select(run, ["d"]))
    assert after.tasks["d"].status is S.PENDING and set(after.doomed) == {"d"}
    out = Decisions()
    decide(after, 100.0, "scheduler:1", out)
    assert [(e.type, e.task_id) for e in out.events] == [(E.TASK_SKIPPED, "d")]


def test_a_completed_fallback_outside_the_selection_gets_its_counts_recomputed() -> None:
    definition = wdef(td("a"), td("rescue", "a", trigger=TriggerRule.ONE_FAILED), td("b", "a"))
    log = [submitted(definition), ev(E.WORKFLOW_STARTED), *fails("a"), *completes("rescue", "saved")]
    log += [ev(E.TASK_SKIPPED, "b"), ev(E.WORKFLOW_FAILED, reason="b skipped")]
    run = _fold(log)
    assert run.tasks["rescue"].failed == 1
    after = rerun.reset(run, rerun.select(run, None))
    assert sorted(rerun.select(run, None)) == ["a", "b"]
    assert after.tasks["rescue"].status is S.COMPLETED and after.tasks["rescue"].result == "saved"
    assert after.tasks["rescue"].failed == 0, "a's new outcome is not counted twice"
    _consistent(after)


def test_a_run_that_failed_before_it_started_goes_back_to_pending() -> None:
    definition = wdef(td("a"), td("b", "a"))
    run = _fold([submitted(definition), ev(E.WORKFLOW_FAILED, reason="over a bound")])
    after = rerun.reset(run, rerun.select(run, None))
    assert after.status is RunStatus.PENDING, "the scheduler checks its bounds and starts it"
    assert after.tasks["a"].status is S.READY and after.tasks["b"].status is S.PENDING
    _consistent(after)


def test_dependents_never_count_a_task_twice_after_a_rerun_fails_again() -> None:
    run = _failed_diamond()
    log = [_rerun_event(), *fails("b", attempt=2), ev(E.TASK_SKIPPED, "d"), ev(E.WORKFLOW_FAILED, reason="b")]
    again = fold_run(run, log)
    assert again is not None and again.status is RunStatus.FAILED
    assert again.tasks["d"].failed == 1 and again.tasks["d"].ok == 1
    _consistent(again)


# -- the fold of the request ----------------------------------------------------------------------------


def test_the_request_applies_only_to_a_finished_run_and_only_as_its_next_rerun() -> None:
    run = _failed_diamond()
    first = _rerun_event(1)
    reopened = apply_to_run(run, first)
    assert reopened is not None and reopened.reruns == 1 and reopened.status is RunStatus.RUNNING
    assert apply_to_run(reopened, first) is reopened, "twice: no change"
    assert apply_to_run(reopened, _rerun_event(2)) is reopened, "a second request racing the first"
    for bad in (_rerun_event(2), _rerun_event(0), ev(E.WORKFLOW_RERUN_REQUESTED), _rerun_event(1, ["b", 3])):  # type: ignore[list-item]
        assert apply_to_run(run, bad) is run
    assert apply_to_run(run, ev(E.WORKFLOW_RERUN_REQUESTED, n=True)) is run
    # Finished again, then a stale copy of the first request: no change; the second one applies.
    ended = apply_to_run(reopened, ev(E.WORKFLOW_FAILED, reason="again"))
    assert ended is not None and ended.status is RunStatus.FAILED
    assert apply_to_run(ended, first) is ended
    second = apply_to_run(ended, _rerun_event(2, ["e"]))
    assert second is not None and second.reruns == 2 and second.tasks["e"].status is S.READY


def test_a_rejected_run_ignores_the_request() -> None:
    bad = ev(E.WORKFLOW_SUBMITTED, workflow={"name": "x", "tasks": [{"id": "a"}]})
    run = _fold([bad, ev(E.WORKFLOW_FAILED, reason="invalid")])
    assert run.rejected
    assert apply_to_run(run, _rerun_event()) is run
    with pytest.raises(RerunError, match="refused"):
        rerun.check(run, None)


# -- the client's checks --------------------------------------------------------------------------------


def test_check_refuses_what_cannot_be_rerun() -> None:
    run = _failed_diamond()
    assert rerun.check(run, None) is None
    assert rerun.check(run, ["b", "b", "c"]) == ["b", "c"]
    assert rerun.check(run, "e") == ["e"]  # type: ignore[arg-type]
    with pytest.raises(RerunError, match=r"no task 'ghost', 'x'"):
        rerun.check(run, ["a", "ghost", "x"])
    with pytest.raises(RerunError, match="no task named"):
        rerun.check(run, [])
    going = apply_to_run(run, _rerun_event())
    assert going is not None
    with pytest.raises(RunNotFinishedError, match="RUNNING"):
        rerun.check(going, None)
    done = _fold(
        [submitted(wdef(td("a"))), ev(E.WORKFLOW_STARTED), *completes("a"), ev(E.WORKFLOW_COMPLETED)]
    )
    with pytest.raises(RerunError, match="nothing to rerun"):
        rerun.check(done, None)
    assert rerun.check(done, ["a"]) == ["a"]
    assert rerun.event_data(done, ["a"]) == {"n": 1, "tasks": ["a"]}
    assert rerun.event_data(run, None) == {"n": 1}


# -- hooks ----------------------------------------------------------------------------------------------


class _WaitsForParts(rerun.Hook):
    """A stand-in for a run-time kind: ``d`` is made of ``b`` and ``c``; naming it reruns them, rerunning
    either reruns ``d``, and ``d`` goes back to RUNNING (waiting for its parts) instead of READY."""

    def named(self, run: RunState, tid: str) -> Iterable[str]:
        return ("b", "c") if tid == "d" else ()

    def downstream(self, run: RunState, tid: str) -> Iterable[str]:
        return ("e",) if tid == "c" else ()

    def reset(self, run: RunState, tid: str, old: TaskState, new: TaskState) -> TaskState:
        return new._replace(status=S.RUNNING) if tid == "d" else new


def test_hooks_widen_the_selection_and_choose_the_reset_state() -> None:
    run = _failed_diamond()
    hooks = (_WaitsForParts(),)
    assert sorted(rerun.select(run, ["d"], hooks)) == ["b", "c", "d", "e"]
    assert sorted(rerun.select(run, ["c"], hooks)) == ["c", "d", "e"]
    after = rerun.reset(run, rerun.select(run, None, hooks), hooks)
    assert after.tasks["d"].status is S.RUNNING and "d" in after.running
    after = rerun.requested(run, _rerun_event(1, ["c"]), hooks)
    assert after.tasks["e"].status is S.READY and after.tasks["e"].attempt == 2
    _consistent(after)


# -- attempts and the retry policy ----------------------------------------------------------------------


def test_the_retry_policy_counts_from_the_rounds_first_attempt() -> None:
    policy = RetryPolicy(max_retries=1, backoff=0.5)
    error = TaskError("ConnectionError", "down", types=("ConnectionError",))
    assert failure_outcome(policy, 2, error, 0.0)[0] is E.TASK_FAILED
    kind, data = failure_outcome(policy, 3, error, 0.0, first=3)
    assert kind is E.TASK_RETRYING and data["next_attempt"] == 4 and data["delay"] == 0.5
    assert failure_outcome(policy, 4, error, 0.0, first=3)[0] is E.TASK_FAILED


def test_the_job_of_a_rerun_task_carries_its_rounds_first_attempt() -> None:
    run = rerun.reset(_failed_diamond(), ["b"])
    out = Decisions()
    decide(run, 100.0, "scheduler:1", out)
    (job, _queue), *_ = out.jobs
    assert (job.task_id, job.attempt, job.first) == ("b", 2, 2)
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    assert "f" not in Job("r", "t", 1, "fn", [], {}).to_dict()


# -- whole simulated reruns -----------------------------------------------------------------------------


def _ran(sim: Sim, since: int) -> Counter[str]:
    return Counter(tid for tid, _ in sim.runs[since:])


@pytest.mark.parametrize("seed", range(12))
def test_a_simulated_rerun_runs_the_failed_part_once_and_gets_every_result_right(seed: int) -> None:
    rng = random.Random(seed)
    definition = random_dag(rng.randint(5, 60), rng)
    ids = [t.id for t in definition.tasks]
    broken = set(rng.sample(ids, rng.randint(1, 3)))
    sim = Sim(definition, rng, fail_always=broken, takeover=rng.sample(ids, 2))
    sim.run_to_end()
    assert sim.run.status is RunStatus.FAILED
    done_before = {t for t, ts in sim.run.tasks.items() if ts.status is S.COMPLETED}
    kept = {t: sim.run.tasks[t] for t in done_before}
    since = len(sim.runs)
    sim.fail_always.clear()  # fixed
    sim.emit([_rerun_event(1)])
    _consistent(sim.run)
    sim.run_to_end()
    run = sim.run
    assert run.status is RunStatus.COMPLETED, run.reason
    assert not sim.violations
    assert {t: ts.result for t, ts in run.tasks.items()} == expected_results(definition)
    again = _ran(sim, since)
    assert not set(again) & done_before, "a completed task ran again"
    assert set(again) == set(ids) - done_before and max(again.values()) == 1
    assert all(run.tasks[t] == kept[t] for t in done_before)
    _consistent(run)
    # The whole log, bulk or one by one, checkpointed or not, gives the same state.
    assert fold_run(None, sim.log) == _fold(sim.log) == run
    assert checkpoint.decode(json.loads(json.dumps(checkpoint.encode(run)))) == run


@pytest.mark.parametrize("seed", range(8))
def test_a_simulated_rerun_of_named_tasks_reruns_exactly_their_descendants(seed: int) -> None:
    rng = random.Random(100 + seed)
    definition = random_dag(rng.randint(5, 50), rng, triggers=seed % 2 == 1)
    sim = Sim(definition, rng)
    sim.run_to_end()
    named = rng.sample([t.id for t in definition.tasks], 2)
    since = len(sim.runs)
    before = sim.run
    sim.emit([_rerun_event(1, named)])
    chosen = set(rerun.select(before, named))
    # The closure over the plan, computed here another way: every task with a path from a named one.
    closure = set(named)
    for t in definition.tasks:  # definition order is topological
        if any(d in closure for d in t.dependencies):
            closure.add(t.id)
    assert chosen == closure
    sim.run_to_end()
    ran = _ran(sim, since)
    assert set(ran) <= chosen and max(ran.values(), default=1) == 1
    assert all(sim.run.tasks[t] == before.tasks[t] for t in set(before.tasks) - chosen)
    if seed % 2 == 0:  # all_success everywhere: every chosen task ran, with the same results again
        assert set(ran) == chosen
        assert {t: ts.result for t, ts in sim.run.tasks.items()} == expected_results(definition)
    assert fold_run(None, sim.log) == _fold(sim.log) == sim.run


def test_a_checkpoint_mid_rerun_round_trips() -> None:
    rng = random.Random(7)
    definition = random_dag(40, rng)
    sim = Sim(definition, rng, fail_always={"t3"})
    sim.run_to_end()
    sim.fail_always.clear()
    sim.emit([_rerun_event(1)])
    sim.schedule()
    sim.work(1)
    run = sim.run
    assert run.reruns == 1 and any(ts.first > 1 for ts in run.tasks.values())
    assert checkpoint.decode(json.loads(json.dumps(checkpoint.encode(run)))) == run


def test_a_run_ended_with_tasks_unfinished_resets_them() -> None:
    # Ended by the scheduler (here cancelled) before any task ran: every task is reset, roots READY.
    run = _fold([submitted(diamond()), ev(E.WORKFLOW_CANCELLED, reason="early")])
    after = rerun.reset(run, rerun.select(run, None))
    assert after.tasks["a"].status is S.READY and after.run_id == RUN
    _consistent(after)


def test_the_scheduler_takes_back_only_runs_it_does_not_hold() -> None:
    from pyrsistent import pmap

    from nerv_cluster.state import State
    from scheduler.reruns import reopened

    held = State(runs=pmap({RUN: _failed_diamond()}))
    events = [
        _rerun_event(),
        Event(E.WORKFLOW_RERUN_REQUESTED, "gone-1", data={"n": 1}),
        Event(E.TASK_COMPLETED, "gone-2", "a", 1),
        Event(E.WORKFLOW_RERUN_REQUESTED, "gone-1", data={"n": 1}),
    ]
    assert reopened(held, events) == ["gone-1"]
