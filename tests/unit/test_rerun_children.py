"""Rerun with child runs (issue 16 part 4, "child runs likewise"), without Redis: the child hook of the
reset, the fold of the child's rerun (its new parent attempt), the scheduler's decisions and verdicts,
the parent's outcome after the rerun, refold and checkpoint equality; and the cache count of a reset."""

from __future__ import annotations

import functools
import json
from typing import Any

from pyrsistent import pmap

from nerv_cluster import checkpoint, children, rerun
from nerv_cluster.children import ChildRerun, Rerun
from nerv_cluster.model import Event, EventType, ParentRef, RetryPolicy, RunStatus, TaskStatus
from nerv_cluster.state import RunState, apply_to_run, fold_run, parent_of, run_result
from scheduler.decisions import Decisions, decide, decide_isolated
from tests.unit.helpers import RUN, completes, ev, submitted, td, wdef

E = EventType
CHILD_DEF = wdef(td("x"), td("y", "x"), name="child-wf").to_dict()


def _fold(events: list[Event], run: RunState | None = None) -> RunState:
    out = functools.reduce(apply_to_run, events, run)
    assert out is not None
    return out


def _in(run_id: str, events: list[Event]) -> list[Event]:
    return [Event(e.type, run_id, e.task_id, e.attempt, e.data, ts=e.ts) for e in events]


def _decide(run: RunState, *others: RunState) -> Decisions:
    out = Decisions()
    runs = pmap({r.run_id: r for r in (run, *others)})
    decide_isolated(run, 300.0, "scheduler:t", out, runs=runs)
    return out


def _failed_tree(retry: RetryPolicy | None = None) -> tuple[list[Event], list[Event]]:
    """The logs of a parent run (``a`` -> ``p`` -> ``q``; ``p`` returned a workflow) and of ``p``'s
    child run, whose ``x`` failed: both FAILED, ``q`` SKIPPED."""
    parent_log = [
        submitted(wdef(td("a"), td("p", "a", retry=retry), td("q", "p"), name="parent")),
        ev(E.WORKFLOW_STARTED),
        *completes("a", 1),
        ev(E.TASK_DISPATCHED, "p", 1, queue="cpu"),
        ev(E.TASK_STARTED, "p", 1, worker="w1"),
        ev(E.TASK_SPAWNED, "p", 1, workflow=CHILD_DEF, worker="w1"),
    ]
    parent = _fold(parent_log)
    out = Decisions()
    decide(parent, 100.0, "scheduler:t", out)
    (spawn,) = out.spawns
    cid = spawn.child_id
    parent_log.append(spawn.started)
    child_log = [
        spawn.submitted,
        ev(E.WORKFLOW_STARTED, run_id=cid),
        *_in(cid, [ev(E.TASK_DISPATCHED, "x", 1, queue="cpu"), ev(E.TASK_STARTED, "x", 1, worker="w1")]),
        ev(E.TASK_FAILED, "x", 1, run_id=cid, error={"type": "ValueError", "message": "bad x"}),
        ev(E.TASK_SKIPPED, "y", run_id=cid),
    ]
    ended = _decide(_fold(child_log), _fold(parent_log))
    outcome, end = ended.events
    assert (outcome.run_id, end.type) == (RUN, E.WORKFLOW_FAILED)
    assert outcome.type is (E.TASK_FAILED if retry is None else E.TASK_RETRYING)
    parent_log += [outcome, ev(E.TASK_SKIPPED, "q"), ev(E.WORKFLOW_FAILED, reason="p failed")]
    child_log.append(end)
    return parent_log, child_log


def _rerun(run: RunState, **data: Any) -> Event:
    return ev(E.WORKFLOW_RERUN_REQUESTED, run_id=run.run_id, **rerun.event_data(run, None), **data)


def test_a_rerun_waits_for_the_failed_child_run_instead_of_calling_the_task_again() -> None:
    parent_log, child_log = _failed_tree()
    parent = _fold(parent_log)
    cid = str(parent.tasks["p"].child)
    parent_log.append(_rerun(parent))
    parent = _fold(parent_log)
    ts = parent.tasks["p"]
    assert parent.status is RunStatus.RUNNING
    # A new attempt, no function call: RUNNING, waiting for its old child to be rerun, no worker.
    assert (ts.status, ts.attempt, ts.first, ts.child, ts.dispatched) == (TaskStatus.RUNNING, 2, 2, cid, True)
    assert children.awaits_rerun(ts) and "p" in parent.spawning and "p" not in parent.running
    assert parent.tasks["a"].status is TaskStatus.COMPLETED and parent.tasks["q"].status is TaskStatus.PENDING
    out = _decide(parent)
    assert out.child_reruns == [ChildRerun(ParentRef(RUN, "p", 2), cid)]
    assert not out.spawns and not out.jobs, "no new child, no job for p"

    # The scheduler's verdict from the child's log: rerun it, for attempt 2.
    child = _fold(child_log)
    (intent,) = out.child_reruns
    assert children.judge(intent, child) is Rerun.RERUN
    request = children.rerun_event(intent, child, 301.0, "scheduler:t")
    assert request.data == {"n": 1, "parent_attempt": 2}
    child_log.append(request)
    child = _fold(child_log)
    assert child.status is RunStatus.RUNNING and parent_of(child) == ParentRef(RUN, "p", 2)
    assert run_result(child).parent == ParentRef(RUN, "p", 2)
    assert child.tasks["x"].status is TaskStatus.READY and child.tasks["x"].attempt == 2
    # A new leader judging again (it died before recording the rerun) records it, never reruns twice.
    assert children.judge(intent, child) is Rerun.RECORD
    parent_log.append(children.rerun_recorded(intent, 302.0, "scheduler:t"))
    parent = _fold(parent_log)
    ts = parent.tasks["p"]
    assert (ts.status, ts.child, ts.spawn) == (TaskStatus.RUNNING, cid, None) and not parent.spawning
    assert not _decide(parent).child_reruns

    # The child ends again: the parent's new attempt completes with its output, before its end.
    child_log += _in(child.run_id, [*completes("x", 3, attempt=2), *completes("y", 8)])
    out = _decide(_fold(child_log), parent)
    outcome, end = out.events
    assert (outcome.run_id, outcome.type, outcome.attempt) == (RUN, E.TASK_COMPLETED, 2)
    assert outcome.data["result"] == 8 and end.type is E.WORKFLOW_COMPLETED
    parent = _fold([outcome], parent)
    assert parent.tasks["p"].status is TaskStatus.COMPLETED and "q" in parent.ready


def test_an_old_end_of_the_child_is_no_outcome_of_the_new_attempt() -> None:
    parent_log, child_log = _failed_tree()
    parent = _fold(parent_log)
    parent = _fold([_rerun(parent)], parent)
    child = _fold(child_log)
    # The child ending (again) without having been rerun for attempt 2: not p's outcome.
    assert children.parent_outcome(child, child_log[-1], {RUN: parent}, 10**6, 1.0, "s") is None
    # A child still going for the old attempt (its cancel not done, a rerun by hand): wait for it.
    (intent,) = children.child_reruns(parent)
    by_hand = _fold([_rerun(child)], child)
    assert children.judge(intent, by_hand) is Rerun.WAIT


def test_a_child_gone_or_refused_gives_the_task_a_new_attempt() -> None:
    parent_log, child_log = _failed_tree()
    parent = _fold(parent_log)
    parent = _fold([_rerun(parent)], parent)
    (intent,) = children.child_reruns(parent)
    assert children.judge(intent, None) is Rerun.ANEW
    assert children.judge(intent, _fold(child_log)._replace(rejected="bad")) is Rerun.ANEW
    other = _fold(child_log)._replace(definition=_fold(child_log).definition)
    assert children.judge(ChildRerun(ParentRef(RUN, "q", 2), other.run_id), other) is Rerun.ANEW
    anew = children.rerun_anew(intent, "its log is gone", 1.0, "s")
    parent = _fold([anew], parent)
    ts = parent.tasks["p"]
    assert (ts.status, ts.attempt, ts.first, ts.child, ts.spawn) == (TaskStatus.READY, 3, 3, None, None)
    assert not parent.spawning and "p" in parent.ready and ts.lost == 0
    assert _fold([anew], parent) is parent, "applied twice, it changes nothing"


def test_the_function_runs_again_when_its_arguments_may_change_or_it_completed() -> None:
    parent_log, _ = _failed_tree()
    parent = _fold(parent_log)
    # 'a' named: 'p' is its descendant, its argument may change: a new attempt calls it (a new child).
    named = _fold([_rerun(parent, tasks=["a"])], parent)
    ts = named.tasks["p"]
    assert (ts.status, ts.spawn, ts.child) == (TaskStatus.PENDING, None, None) and not named.spawning
    # A completed task with a child, named: it runs again, it is not rerun from its child.
    done = [*parent_log[:-3], ev(E.TASK_COMPLETED, "p", 1, result=1), *completes("q")]
    done.append(ev(E.WORKFLOW_COMPLETED))
    run = _fold(done)
    assert run.tasks["p"].child is not None
    again = _fold([_rerun(run, tasks=["p"])], run)
    assert again.tasks["p"].status is TaskStatus.READY and not again.spawning


def test_without_the_child_hook_the_task_would_be_called_again() -> None:
    """What the hook changes: the default reset makes the task READY, a new call and a new child."""
    parent = _fold(_failed_tree()[0])
    hooks = tuple(h for h in rerun.HOOKS if not isinstance(h, rerun.ChildHook))
    plain = rerun.requested(parent, _rerun(parent), hooks)
    hooked = rerun.requested(parent, _rerun(parent))
    assert plain.tasks["p"].status is TaskStatus.READY and plain.tasks["p"].child is None
    assert hooked.tasks["p"].status is TaskStatus.RUNNING and hooked.tasks["p"].child is not None


def test_the_retry_policy_of_a_rerun_task_starts_over_for_its_rerun_child() -> None:
    parent_log, child_log = _failed_tree(retry=RetryPolicy(max_retries=1, backoff=0))
    # In this log the child's failure was judged against attempt 1 of round 1: a retry.
    assert parent_log[-3].type is E.TASK_RETRYING
    # Exhausted: make attempt 1 the last of its round, then rerun; the rerun child fails again.
    parent_log[-3] = Event(E.TASK_FAILED, RUN, "p", 1, {"error": {"type": "X", "message": "m"}}, ts=1.0)
    parent = _fold(parent_log)
    parent = _fold([_rerun(parent)], parent)
    (intent,) = children.child_reruns(parent)
    child = _fold(child_log)
    child = _fold([children.rerun_event(intent, child, 2.0, "s")], child)
    parent = _fold([children.rerun_recorded(intent, 2.0, "s")], parent)
    child = _fold(
        _in(child.run_id, [ev(E.TASK_FAILED, "x", 2, error={"type": "ValueError", "message": "again"})]),
        child,
    )
    child = _fold([ev(E.TASK_SKIPPED, "y", run_id=child.run_id)], child)
    outcome = _decide(child, parent).events[0]
    # Attempt 2 is the first of the rerun's round: the policy's one retry is there again.
    assert (outcome.type, outcome.attempt, outcome.data["next_attempt"]) == (E.TASK_RETRYING, 2, 3)


def test_a_grandchild_is_rerun_recursively() -> None:
    """The child's own task whose child failed waits for that one: the same hook, one level down."""
    parent_log, child_log = _failed_tree()
    child = _fold(child_log)
    # Make the child's failed 'x' one that spawned a grandchild (as if 'x' had returned a workflow).
    child_log[-3] = ev(E.TASK_SPAWNED, "x", 1, run_id=child.run_id, workflow=CHILD_DEF)
    grand = "grand-000000000000"
    child_log[-2:-1] = [
        ev(E.CHILD_STARTED, "x", 1, run_id=child.run_id, child=grand),
        ev(E.TASK_FAILED, "x", 1, run_id=child.run_id, error={"type": "E", "message": "grandchild failed"}),
    ]
    child = _fold(child_log)
    assert child.tasks["x"].child == grand and child.status is RunStatus.FAILED
    parent = _fold([_rerun(_fold(parent_log))], _fold(parent_log))
    (intent,) = children.child_reruns(parent)
    child = _fold([children.rerun_event(intent, child, 2.0, "s")], child)
    assert children.child_reruns(child) == [ChildRerun(ParentRef(child.run_id, "x", 2), grand)]


def _whole_logs() -> tuple[list[Event], list[Event]]:
    parent_log, child_log = _failed_tree()
    parent = _fold(parent_log)
    parent_log.append(_rerun(parent))
    (intent,) = children.child_reruns(_fold(parent_log))
    child_log.append(children.rerun_event(intent, _fold(child_log), 301.0, "s"))
    parent_log.append(children.rerun_recorded(intent, 302.0, "s"))
    child_log += _in(child_log[0].run_id, [*completes("x", 3, attempt=2), *completes("y", 8)])
    out = _decide(_fold(child_log), _fold(parent_log))
    outcome, end = out.events
    child_log.append(end)
    parent_log += [outcome, *completes("q"), ev(E.WORKFLOW_COMPLETED)]
    return parent_log, child_log


def test_fold_run_equals_one_by_one_and_checkpoints_round_trip_through_a_child_rerun() -> None:
    for log in _whole_logs():
        for i in range(1, len(log) + 1):
            one = _fold(log[:i])
            bulk = fold_run(None, log[:i])
            assert bulk is not None
            back = checkpoint.decode(json.loads(json.dumps(checkpoint.encode(one))))
            for name in RunState._fields:
                assert getattr(bulk, name) == getattr(one, name), (i, name)
                assert getattr(back, name) == getattr(one, name), (i, name)
            assert fold_run(back, log[i:]) == _fold(log)
            assert _fold(log[i - 1 : i], one) == one, "each event applied twice changes nothing"
    parent_log, child_log = _whole_logs()
    assert _fold(parent_log).status is RunStatus.COMPLETED and _fold(child_log).parent_attempt == 2


def test_a_reset_of_tasks_completed_from_the_cache_keeps_the_cached_count_right() -> None:
    log = [
        submitted(wdef(td("c1"), td("c2"), td("bad", "c1"), name="cached")),
        ev(E.WORKFLOW_STARTED),
        ev(E.TASK_COMPLETED, "c1", 1, result=1, cached=True, cached_from="other/c1"),
        ev(E.TASK_COMPLETED, "c2", 1, result=2, cached=True, cached_from="other/c2"),
        *[Event(e.type, RUN, "bad", 1, e.data, ts=e.ts) for e in completes("bad")[:2]],
        ev(E.TASK_FAILED, "bad", 1, error={"type": "E", "message": "m"}),
        ev(E.WORKFLOW_FAILED, reason="bad"),
    ]
    run = _fold(log)
    assert run.cached == 2
    # 'bad' alone: nothing cached is reset.
    assert _fold([_rerun(run)], run).cached == 2
    # 'c1' named: it and 'bad' run again; c1 counts as cached no more (c2 still does).
    named = _fold([_rerun(run, tasks=["c1"])], run)
    assert named.cached == 1 and named.tasks["c1"].cached_from is None
    bulk = fold_run(None, [*log, _rerun(run, tasks=["c1"])])
    assert bulk is not None and bulk.cached == 1
    # Completed from the cache again: counted again, once.
    again = _fold([ev(E.TASK_COMPLETED, "c1", 1, result=1, cached=True, cached_from="o/c1")], named)
    assert again.cached == 2
