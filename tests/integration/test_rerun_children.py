"""Rerun from failure with child runs (issue 16 part 4, "child runs likewise"), through real Redis, a
real scheduler and real worker processes: a rerun of a parent whose task failed because its child run
failed reruns THAT child run (same id; its completed tasks never run again), recursively.

Counters in Redis (``test:execs:<run>``, one per task) prove what ran again and what did not.
"""

from __future__ import annotations

import signal
import time
import uuid

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, TaskStatus, Workflow
from nerv_cluster import rerun as reruns
from nerv_cluster.model import Event
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(150)


def _parent(flag: str, levels: int) -> Workflow:
    """``t`` returns a child run (``levels`` deep) whose deepest ``bad`` fails until ``flag`` is set;
    ``d`` takes ``t``'s result."""
    wf = Workflow("rerun-parent")
    t = wf.add(tt.spawn_broken_child, flag, levels, id="t")
    wf.add(tt.counted, t, id="d")
    return wf


def _reruns_in(c: Cluster, run_id: str) -> list[dict[str, object]]:
    return [ev.data for ev in log_of(c.client, run_id) if ev.type is EventType.WORKFLOW_RERUN_REQUESTED]


def _failed_tree(c: Cluster, flag: str, levels: int) -> tuple[str, list[str]]:
    """Submit the parent and wait for its failure; its id and its chain of child runs, top down."""
    run_id = c.client.submit(_parent(flag, levels))
    first = c.client.wait(run_id, timeout=60)
    assert first.status is RunStatus.FAILED, first.reason
    assert first.tasks["t"].status is TaskStatus.FAILED and first.tasks["d"].status is TaskStatus.SKIPPED
    chain = [str(first.tasks["t"].child)]
    for _ in range(levels - 1):
        chain.append(str(c.client.status(chain[-1]).tasks["down"].child))
    for cid in chain:
        assert c.client.status(cid).status is RunStatus.FAILED
    return run_id, chain


def _check_rerun(c: Cluster, run_id: str, chain: list[str]) -> None:
    """The rerun completed, through the same child runs, each task of the tree run as often as it must."""
    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.tasks["t"].child == chain[0], "the same child run, not a new one"
    assert res.results["t"] == "bad fixed", "the parent task completed with its child's output"
    assert res.results["d"] == ["t"]
    assert res.tasks["t"].attempts == 2
    assert c.execs(run_id) == {"t": 1, "d": 1}, "the parent task's function ran once"
    for depth, cid in enumerate(chain):
        child = c.client.status(cid)
        assert child.status is RunStatus.COMPLETED, (cid, child.reason)
        last = depth == len(chain) - 1
        if last:
            assert c.execs(cid) == {"ok": 1, "bad": 2}, "only the failed task ran again"
        else:
            assert c.execs(cid) == {"ok": 1, "down": 1}, cid
            assert child.tasks["down"].child == chain[depth + 1]
        # Rerun once, for the parent's new attempt, and the child says so.
        assert len(_reruns_in(c, cid)) == 1, (cid, _reruns_in(c, cid))
        assert child.parent is not None and child.parent.attempt == 2
    assert len(_reruns_in(c, run_id)) == 1


def test_a_rerun_reruns_the_failed_child_runs_not_the_task(cluster: Cluster) -> None:
    c = cluster
    flag = uuid.uuid4().hex
    run_id, chain = _failed_tree(c, flag, levels=2)
    assert c.execs(chain[-1]) == {"ok": 1, "bad": 1}
    c.redis.set(f"test:flag:{flag}", 1)
    c.client.rerun(run_id)
    _check_rerun(c, run_id, chain)


def test_a_scheduler_sigkilled_right_after_the_request_reruns_the_child_once(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    flag = uuid.uuid4().hex
    run_id, chain = _failed_tree(c, flag, levels=2)
    c.redis.set(f"test:flag:{flag}", 1)
    deadline = time.monotonic() + 10
    while c.redis.scard(c.client.keys.active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not c.redis.scard(c.client.keys.active), "the runs closed and forgotten"
    c.client.rerun(run_id)
    c.kill(sched, signal.SIGKILL)
    sched = c.scheduler()
    # And once more while the child runs are being rerun (wherever the first one left it).
    deadline = time.monotonic() + 10
    while not _reruns_in(c, chain[0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    c.kill(sched, signal.SIGKILL)
    c.scheduler()
    _check_rerun(c, run_id, chain)


def test_a_child_run_gone_meanwhile_gives_the_task_a_new_attempt(cluster: Cluster) -> None:
    c = cluster
    flag = uuid.uuid4().hex
    run_id, chain = _failed_tree(c, flag, levels=1)
    # As its retention time would: the child's keys are gone, and the runs index forgot it.
    k = c.client.keys
    c.redis.delete(*k.run_keys(chain[0]))
    c.redis.zrem(k.runs, chain[0])
    assert not c.redis.exists(k.log(chain[0]))
    c.redis.set(f"test:flag:{flag}", 1)
    c.client.rerun(run_id)
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(run_id) == {"t": 2, "d": 1}, "the task's function ran again"
    new = res.tasks["t"].child
    assert new is not None and new != chain[0], "a new child run"
    assert c.execs(new) == {"ok": 1, "bad": 1}
    assert res.results["t"] == "bad fixed"
    assert res.tasks["t"].attempts == 3  # 1: the failed child; 2: its rerun, refused; 3: the new one


def test_a_crash_between_the_childs_rerun_and_its_record_reruns_it_once(own_cluster: Cluster) -> None:
    """The room itself, the scheduler killed between its two writes: the child's rerun is in its log,
    the parent's CHILD_STARTED is not. A new leader (a fresh room over runs loaded from the logs)
    finds the child rerun already and only records it; the run then completes, nothing run twice."""
    from pyrsistent import pmap

    from nerv_cluster import children
    from nerv_cluster import state as st
    from scheduler.child_reruns import ChildReruns
    from scheduler.takeover import load_runs

    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    flag = uuid.uuid4().hex
    run_id, chain = _failed_tree(c, flag, levels=1)
    c.redis.set(f"test:flag:{flag}", 1)
    c.kill(sched, signal.SIGKILL)
    k, log = c.client.keys, c.client.log
    # The parent's rerun request as the intake writes it (the leader then dies before acting on it).
    last = log.last_entry(run_id)
    finished = load_runs(log, [run_id]).runs[run_id]
    data = reruns.event_data(finished, reruns.check(finished, None))
    log.rerun(Event(EventType.WORKFLOW_RERUN_REQUESTED, run_id, data=data, source="client"), str(last))
    c.redis.set(k.lease, "9-test")  # as the leader that is about to die
    for round_ in range(2):
        loaded = load_runs(log, [run_id])
        parent = loaded.runs[run_id]
        intents = children.child_reruns(parent)
        assert [(i.child_id, i.parent.task_id, i.parent.attempt) for i in intents] == [(chain[0], "t", 2)]
        recorded = ChildReruns(log).act(intents, st.State(runs=pmap(loaded.runs)), "9-test", 1.0, "test")
        # Each round records CHILD_STARTED (written by neither: the leader dies first); one rerun in all.
        assert [(e.type, e.data["child"]) for e in recorded] == [(EventType.CHILD_STARTED, chain[0])], round_
        assert [r["parent_attempt"] for r in _reruns_in(c, chain[0])] == [2], round_
    c.redis.delete(k.lease)
    c.scheduler()
    _check_rerun(c, run_id, chain)
