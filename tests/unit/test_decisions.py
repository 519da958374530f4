"""``scheduler.decisions.decide``: events out and jobs to send, as a pure function of a run's state."""

from __future__ import annotations

import random
from collections import Counter

from nerv_cluster.jobs import Job, build_job, job_id
from nerv_cluster.model import EventType, RetryPolicy, RunStatus, TaskPriority, TaskStatus
from nerv_cluster.registry import Registry, task
from nerv_cluster.state import RunState, fold, results
from nerv_cluster.workflow import Workflow
from scheduler.decisions import Decisions, decide, in_flight, readies_successor, settle_cancels
from tests.unit.helpers import (
    RUN,
    Sim,
    completes,
    diamond,
    ev,
    expected_results,
    fails,
    random_dag,
    run_of,
    submitted,
    td,
    wdef,
)

E = EventType
REG = Registry()
SOURCE = "scheduler:7"


@task(name="d.add", registry=REG)
def add(*xs, **named):
    return sum(xs)


@task(name="d.io", queue="io", registry=REG)
def fetch(url):
    return url


@task(name="d.ctx", registry=REG)
def with_ctx(ctx, x):
    return x


def decided(run: RunState, now: float = 100.0) -> Decisions:
    out = Decisions()
    decide(run, now, SOURCE, out)
    return out


def kinds(out: Decisions) -> list[tuple[str, str | None]]:
    return [(e.type.value, e.task_id) for e in out.events]


def roots_workflow() -> Workflow:
    wf = Workflow("roots", registry=REG)
    low = wf.add(add, 1, id="low", priority=TaskPriority.LOW)
    crit = wf.add(add, 2, id="crit", priority="critical")
    med = wf.add(fetch, "http://x", id="med")
    wf.add(add, low, crit, kwargs={"named": [med, {"deep": crit}]}, id="join")
    wf.add(with_ctx, crit, id="ctx")
    return wf


def test_fresh_run_starts_and_dispatches_roots_in_rank_order():
    wf = roots_workflow()
    run = run_of(fold([submitted(wf.definition())]))
    out = decided(run, now=100.0)
    assert kinds(out) == [
        ("WORKFLOW_STARTED", None),
        ("TASK_DISPATCHED", "crit"),
        ("TASK_DISPATCHED", "med"),
        ("TASK_DISPATCHED", "low"),
    ]
    started = out.events[0]
    assert dict(started.data) == {"tasks": 5, "levels": 2, "width": 3, "critical_path": 2}
    for e in out.events:
        assert (e.run_id, e.ts, e.source) == (RUN, 100.0, SOURCE)
    for e in out.events[1:]:
        assert e.attempt == 1
    assert [dict(e.data) for e in out.events[1:]] == [{"queue": "cpu"}, {"queue": "io"}, {"queue": "cpu"}]
    assert [(job.task_id, queue) for job, queue in out.jobs] == [
        ("crit", "cpu"),
        ("med", "io"),
        ("low", "cpu"),
    ]
    crit_job = out.jobs[0][0]
    # ``ctx`` depends on ``crit`` alone, on the same queue: its worker waits for it to be handed over.
    assert crit_job == Job(
        run_id=RUN, task_id="crit", attempt=1, fn="d.add", args=[2], kwargs={}, workflow="roots", handoff=True
    )
    assert [job.handoff for job, _ in out.jobs] == [True, False, False]
    assert crit_job.id == job_id(RUN, "crit", 1) == f"{RUN}:crit:1"
    assert out.delayed == [] and out.revoke == [] and out.finished == []


def test_ready_tasks_are_dispatched_in_plan_rank_order():
    # Ten roots: priority first, then definition order, whatever order the ready set iterates in.
    wf = Workflow("many-roots", registry=REG)
    prios = [TaskPriority(i % 4) for i in range(10)]
    for i, prio in enumerate(prios):
        wf.add(add, i, id=f"r{i}", priority=prio)
    run = run_of(fold([submitted(wf.definition())]))
    out = decided(run)
    dispatched = [e.task_id for e in out.events if e.type is E.TASK_DISPATCHED]
    expected = [f"r{i}" for i in sorted(range(10), key=lambda i: (-prios[i], i))]
    assert dispatched == expected == list(run.plan.order)
    assert [job.task_id for job, _ in out.jobs] == expected


def test_deciding_again_after_folding_does_nothing_new():
    run = run_of(fold([submitted(roots_workflow().definition())]))
    out = decided(run)
    run2 = run_of(fold(out.events, fold([submitted(roots_workflow().definition())])))
    assert run2.status is RunStatus.RUNNING
    assert set(run2.ready) == set()
    again = decided(run2)
    assert again.events == [] and again.jobs == []
    # Dispatched but not started: a new leader would resend exactly these.
    assert sorted(job.task_id for job, _ in in_flight(run2)) == ["crit", "low", "med"]


def test_jobs_carry_upstream_results():
    definition = roots_workflow().definition()
    state = fold(
        [submitted(definition), *completes("low", 10), *completes("crit", 20), *completes("med", "page")]
    )
    run = run_of(state)
    out = decided(run)
    jobs = {job.task_id: job for job, _ in out.jobs}
    assert set(jobs) == {"join", "ctx"}
    join = jobs["join"]
    assert join.args == [10, 20]
    assert join.kwargs == {"named": ["page", {"deep": 20}]}
    assert join.context is None
    ctx = jobs["ctx"]
    assert ctx.args == [20] and ctx.context == {"crit": 20}
    assert build_job(run, "join") == join
    # The wire form of a job round-trips.
    assert Job.from_dict(join.to_dict()) == join


def test_job_carries_retry_and_timeout():
    wf = Workflow("opts", registry=REG)
    wf.add(add, 1, id="x", retry=RetryPolicy(max_retries=2), timeout=3.0)
    run = run_of(fold([submitted(wf.definition())]))
    ((job, _queue),) = decided(run).jobs
    assert job.retry == RetryPolicy(max_retries=2) and job.timeout == 3.0
    assert Job.from_dict(job.to_dict()) == job


def test_doomed_tasks_are_skipped_with_a_reason_naming_the_upstream():
    state = fold([submitted(diamond()), ev(E.WORKFLOW_STARTED), *fails("a", "boom")])
    out = decided(run_of(state))
    assert sorted(kinds(out)) == [("TASK_SKIPPED", "b"), ("TASK_SKIPPED", "c")]
    reasons = {e.task_id: e.data["reason"] for e in out.events}
    assert reasons["b"] == "trigger rule all_success cannot be met: upstream a is FAILED"
    assert out.jobs == []

    state = fold(out.events, state)
    out = decided(run_of(state))
    assert kinds(out) == [("TASK_SKIPPED", "d")]
    reason = out.events[0].data["reason"]
    assert "upstream b, c did not succeed" in reason

    state = fold(out.events, state)
    out = decided(run_of(state))
    assert kinds(out) == [("WORKFLOW_FAILED", None)]
    assert out.events[0].data["reason"] == "task 'a' failed: ValueError: boom"
    state = fold(out.events, state)
    assert run_of(state).status is RunStatus.FAILED
    assert decided(run_of(state)).finished == [RUN]


def test_all_done_completes_the_workflow():
    state = fold(
        [submitted(diamond()), ev(E.WORKFLOW_STARTED), *completes("a"), *completes("b"), *completes("c")]
    )
    out = decided(run_of(state))
    assert kinds(out) == [("TASK_DISPATCHED", "d")]
    state = fold([*out.events, ev(E.TASK_STARTED, "d", 1), ev(E.TASK_COMPLETED, "d", 1, result=4)], state)
    out = decided(run_of(state), now=500.0)
    assert kinds(out) == [("WORKFLOW_COMPLETED", None)]
    assert dict(out.events[0].data) == {}
    state = fold(out.events, state)
    run = run_of(state)
    assert run.status is RunStatus.COMPLETED and run.finished_at == 500.0
    out = decided(run)
    assert out.events == [] and out.finished == [RUN]


def test_delayed_retry_waits_for_its_due_time():
    state = fold(
        [
            submitted(diamond()),
            ev(E.WORKFLOW_STARTED),
            ev(E.TASK_DISPATCHED, "a", 1),
            ev(E.TASK_STARTED, "a", 1),
            ev(E.TASK_RETRYING, "a", 1, next_attempt=2, due_at=150.0),
        ]
    )
    early = decided(run_of(state), now=100.0)
    assert early.events == [] and early.jobs == []
    assert early.delayed == [(150.0, RUN, "a", 2)]
    due = decided(run_of(state), now=150.0)
    assert kinds(due) == [("TASK_DISPATCHED", "a")]
    assert due.events[0].attempt == 2
    ((job, _),) = due.jobs
    assert job.attempt == 2 and job.id == f"{RUN}:a:2"
    assert due.delayed == []


def test_cancel_cancels_every_open_task_and_revokes_dispatched_ones():
    state = fold(
        [
            submitted(diamond()),
            ev(E.WORKFLOW_STARTED),
            *completes("a"),
            ev(E.TASK_DISPATCHED, "b", 1),
            ev(E.TASK_DISPATCHED, "c", 1),
            ev(E.TASK_STARTED, "c", 1, worker="w1"),
            ev(E.WORKFLOW_CANCEL_REQUESTED, reason="user said stop"),
        ]
    )
    out = decided(run_of(state))
    assert sorted(kinds(out)[:-1]) == [
        ("TASK_CANCELLED", "b"),
        ("TASK_CANCELLED", "c"),
        ("TASK_CANCELLED", "d"),
    ]
    assert kinds(out)[-1] == ("WORKFLOW_CANCELLED", None)
    assert all(e.data["reason"] == "user said stop" for e in out.events)
    assert sorted(out.revoke) == [f"{RUN}:b:1", f"{RUN}:c:1"]
    assert out.jobs == []
    state = fold(out.events, state)
    run = run_of(state)
    assert run.status is RunStatus.CANCELLED
    assert {k: v.status.value for k, v in run.tasks.items()} == {
        "a": "COMPLETED",
        "b": "CANCELLED",
        "c": "CANCELLED",
        "d": "CANCELLED",
    }
    assert decided(run).finished == [RUN]


def _cancel_with_three_live_attempts() -> tuple[Decisions, object]:
    state = fold(
        [
            submitted(diamond()),
            ev(E.WORKFLOW_STARTED),
            *completes("a"),
            ev(E.TASK_DISPATCHED, "b", 1),
            ev(E.TASK_DISPATCHED, "c", 1),
            ev(E.TASK_STARTED, "c", 1, worker="w1"),
            ev(E.WORKFLOW_CANCEL_REQUESTED, reason="stop"),
        ]
    )
    return decided(run_of(state)), state


def test_cancel_names_the_attempts_whose_outcome_slots_it_must_take_first():
    out, _ = _cancel_with_three_live_attempts()
    # d never ran: no slot to take. b (queued) and c (running) may be in a worker's hands.
    assert sorted(out.cancelled_attempts()) == [(RUN, "b", 1), (RUN, "c", 1)]
    assert all(e in out.events for e in out.cancels)


def test_settle_cancels_keeps_an_outcome_a_worker_recorded_first():
    out, state = _cancel_with_three_live_attempts()
    by_task = {e.task_id: e for e in out.cancels}
    holders = ["TASK_COMPLETED" if e.task_id == "c" else "TASK_CANCELLED" for e in out.cancels]
    settle_cancels(out, holders)
    assert out.cancels == []
    # The run does not end yet: c's completion is on the feed, to be logged before the run's end.
    assert sorted(kinds(out)) == [("TASK_CANCELLED", "b"), ("TASK_CANCELLED", "d")]
    assert by_task["b"] in out.events and by_task["c"] not in out.events
    # The completion, folded after the cancel decisions, still ends c as COMPLETED.
    state = fold([*out.events, ev(E.TASK_COMPLETED, "c", 1, result=5)], state)
    run = run_of(state)
    assert {k: v.status.value for k, v in run.tasks.items()} == {
        "a": "COMPLETED",
        "b": "CANCELLED",
        "c": "COMPLETED",
        "d": "CANCELLED",
    }
    # Then the next decision ends the run, after the completion.
    again = decided(run)
    assert kinds(again) == [("WORKFLOW_CANCELLED", None)] and again.cancels == []
    assert run_of(fold(again.events, state)).status is RunStatus.CANCELLED


def test_settle_cancels_after_a_recorded_retry_cancels_the_next_attempt():
    out, _ = _cancel_with_three_live_attempts()
    holders = {"b": "SUPERSEDED", "c": "TASK_RETRYING"}
    settle_cancels(out, [holders[str(e.task_id)] for e in out.cancels])
    cancels = {e.task_id: e.attempt for e in out.events if e.type is E.TASK_CANCELLED}
    # b's slot is the scheduler's (a mark of its own): cancelled; c's attempt 1 keeps its RETRYING.
    assert cancels == {"b": 1, "c": 2, "d": 1}


def test_cancel_before_start():
    state = fold([submitted(diamond()), ev(E.WORKFLOW_CANCEL_REQUESTED)])
    out = decided(run_of(state))
    assert kinds(out)[0] == ("WORKFLOW_STARTED", None)
    assert sorted(k for k in kinds(out) if k[0] == "TASK_CANCELLED") == [
        ("TASK_CANCELLED", t) for t in "abcd"
    ]
    assert kinds(out)[-1] == ("WORKFLOW_CANCELLED", None)
    assert out.revoke == [] and out.jobs == []
    assert run_of(fold(out.events, state)).status is RunStatus.CANCELLED


# -- a simulated scheduler loop ----------------------------------------------------------------------


def test_simulated_500_task_dag_runs_every_task_once_in_order():
    rng = random.Random(2024)
    definition = random_dag(500, rng)
    sim = Sim(definition, rng)
    sim.run_to_end()
    run = sim.run
    assert run.status is RunStatus.COMPLETED, run.reason
    assert sim.violations == []
    counts = Counter(tid for tid, _attempt in sim.runs)
    assert set(counts) == {t.id for t in definition.tasks}
    assert set(counts.values()) == {1}
    assert len({job.id for job in sim.jobs}) == len(sim.jobs) == 500  # never dispatched twice
    # Every job got its upstream results in its arguments: the values match a direct computation.
    assert results(run) == expected_results(definition)
    # The log ends with exactly one WORKFLOW_COMPLETED.
    ends = [e for e in sim.log if e.type in (E.WORKFLOW_COMPLETED, E.WORKFLOW_FAILED, E.WORKFLOW_CANCELLED)]
    assert ends == [sim.log[-1]] and ends[0].type is E.WORKFLOW_COMPLETED
    # Refolding the log from scratch gives the same state (the scheduler restarts this way).
    assert run_of(fold(sim.log)) == run


def test_simulated_dag_with_retries_lost_workers_and_takeovers():
    rng = random.Random(7)
    definition = random_dag(200, rng)
    ids = [t.id for t in definition.tasks]
    flaky, lost, taken = set(ids[::7]), set(ids[3::11]) - set(ids[::7]), set(ids[5::13])
    sim = Sim(definition, rng, fail_first=flaky, lose_first=lost, takeover=taken, retry_delay=0.25)
    sim.run_to_end()
    run = sim.run
    assert run.status is RunStatus.COMPLETED, run.reason
    assert sim.violations == []
    counts = Counter(tid for tid, _ in sim.runs)
    for tid in ids:
        assert counts[tid] == (2 if tid in flaky | lost else 1), tid
        assert run.tasks[tid].attempt == (2 if tid in flaky | lost else 1)
        # a re-dispatch after a lost worker and a takeover by another process both count as a loss
        assert run.tasks[tid].lost == (tid in lost) + (tid in taken), tid
    assert results(run) == expected_results(definition)
    assert run_of(fold(sim.log)) == run


def test_simulated_dag_with_failures_and_trigger_rules_ends_cleanly():
    for seed in range(5):
        rng = random.Random(seed)
        definition = random_dag(120, rng, triggers=True)
        ids = [t.id for t in definition.tasks]
        sim = Sim(definition, rng, fail_always=set(rng.sample(ids, 6)))
        sim.run_to_end()
        run = sim.run
        assert sim.violations == []
        assert run.all_tasks_done and not run.ready and not run.doomed
        failed = {t for t, ts in run.tasks.items() if ts.status is TaskStatus.FAILED}
        assert failed <= sim.fail_always
        assert all(run.tasks[t].status in (TaskStatus.FAILED, TaskStatus.SKIPPED) for t in sim.fail_always)
        assert run.status in (RunStatus.COMPLETED, RunStatus.FAILED)
        if run.status is RunStatus.FAILED:
            assert "failed" in run.reason
        assert run_of(fold(sim.log)) == run


def test_handoff_marks_jobs_whose_success_alone_readies_a_dependent_on_their_queue():
    definition = wdef(
        td("a"),
        td("b", "a"),  # a chain hop: a's success alone readies b
        td("c", "b", "x"),  # a join: b alone does not ready it until x is done
        td("x"),
        td("io", "x", queue="io"),  # another queue: its worker would wait on the wrong queue
        td("t"),
        td("after_t", "t", timeout=5.0),  # time limits are per Celery message: never handed over
        td("u", timeout=5.0),
        td("after_u", "u"),
        td("f"),
        td("on_fail", "f", trigger="one_failed"),  # f's success dooms it instead
    )
    run = run_of(fold([submitted(definition)]))
    marks = {tid: readies_successor(run, tid) for tid in ("a", "b", "x", "t", "u", "f", "c")}
    assert marks == {"a": True, "b": False, "x": False, "t": False, "u": False, "f": False, "c": False}
    # Once x is done, b's success alone readies c.
    run = run_of(fold([submitted(definition), *completes("x", 1)]))
    assert readies_successor(run, "b") is True
    out = decided(run_of(fold([submitted(definition), *completes("x", 1), *completes("a", 1)])))
    assert {job.task_id: job.handoff for job, _ in out.jobs} == {
        "b": True,
        "io": False,
        "t": False,
        "u": False,
        "f": False,
    }
    # The mark travels on the wire.
    job = next(job for job, _ in out.jobs if job.task_id == "b")
    assert job.to_dict()["h"] == 1 and Job.from_dict(job.to_dict()) == job


def test_no_job_is_marked_for_handoff_when_it_is_off():
    definition = wdef(td("a"), td("b", "a"))
    run = run_of(fold([submitted(definition)]))
    out = Decisions()
    decide(run, 100.0, SOURCE, out, handoff=False)
    assert [(job.task_id, job.handoff) for job, _ in out.jobs] == [("a", False)]
