"""The engine end to end: real Redis, a real scheduler process, real Celery workers on cpu and io."""

from __future__ import annotations

import threading

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, TaskStatus, Workflow
from nerv_cluster.errors import CycleError, PayloadTooLargeError, SerializationError, UnknownTaskError
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import assert_ran_once_in_order, log_of, random_dag

pytestmark = pytest.mark.timeout(120)


def test_diamond_on_both_queues_passes_results_down(cluster: Cluster) -> None:
    wf = Workflow("diamond")
    a = wf.add(tt.add, args=(1, 2))
    b = wf.add(tt.add_io, args=(a, 10), name="b", priority="high", timeout=30)
    c = wf.add(tt.mul, a, 3, queue="io")
    d = wf.add(tt.total, b, c, kwargs={}, name="d")
    e = wf.add(tt.total, args=([1, 2] and a,), dependencies=[d])
    run_id = cluster.client.submit(wf)
    assert isinstance(run_id, str)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == {a.id: 3, b.id: 13, c.id: 9, d.id: 22, e.id: 3}
    info = res.tasks[b.id]
    assert info.status is TaskStatus.COMPLETED and info.attempts == 1 and info.error is None
    assert info.started_at is not None and info.finished_at is not None and info.execution_time is not None
    assert info.worker and info.worker.split(":")[0]
    assert res.duration is not None and res.duration > 0
    # the same run, read again, is the same fold
    assert cluster.client.status(run_id).results == res.results


def test_handles_nested_in_lists_and_dicts_and_context_style(cluster: Cluster) -> None:
    wf = Workflow("nested")
    a = wf.add(tt.add, 2, 3)
    b = wf.add(tt.add, 4, 5)
    s = wf.add(tt.total, *[a, b])
    ctx_task = wf.add("nerv_testtasks.counted", args=({"first": a, "more": [b, {"deep": s}]},))
    explicit = wf.add(tt.counted, dependencies=[a.id, "add-2"])
    res = cluster.client.wait(cluster.client.submit(wf), timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results[s.id] == 14
    assert res.results[ctx_task.id] == sorted([a.id, b.id, s.id])
    assert res.results[explicit.id] == sorted([a.id, b.id])


def test_random_dag_of_500_runs_each_task_once_in_dependency_order(cluster: Cluster) -> None:
    wf = Workflow("random-500")
    parents = random_dag(wf, 500, tt.counted, tt.counted_io, seed=11)
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert_ran_once_in_order(log_of(cluster.client, run_id), parents)
    assert cluster.execs(run_id) == dict.fromkeys(parents, 1)
    for tid, ps in parents.items():
        assert res.results[tid] == sorted(set(ps))


def test_failing_task_skips_descendants_and_fails_the_run(cluster: Cluster) -> None:
    wf = Workflow("failing")
    ok = wf.add(tt.add, 1, 1)
    bad = wf.add(tt.boom, "kaput", id="bad")
    child = wf.add(tt.total, ok, bad, id="child")
    grandchild = wf.add(tt.total, child, id="grandchild")
    side = wf.add(tt.add, ok, 1, id="side")
    res = cluster.client.wait(cluster.client.submit(wf), timeout=60)
    assert res.status is RunStatus.FAILED
    assert "bad" in res.reason and "kaput" in res.reason
    t = res.tasks
    assert t[bad.id].status is TaskStatus.FAILED
    assert t[bad.id].error is not None and t[bad.id].error.type == "ValueError"
    assert "kaput" in t[bad.id].error.message and "Traceback" in t[bad.id].error.traceback
    assert t[child.id].status is TaskStatus.SKIPPED and "bad" in t[child.id].reason
    assert t[grandchild.id].status is TaskStatus.SKIPPED
    assert t[side.id].status is TaskStatus.COMPLETED and res.results[side.id] == 3


def _footprint(cluster: Cluster) -> tuple[int, int, int, int]:
    """What a submit would change: the feed, the run index, the active set, the Celery queues."""
    k = cluster.client.keys
    r = cluster.redis
    return r.xlen(k.feed), r.zcard(k.runs), r.scard(k.active), r.llen(k.queue("cpu")) + r.llen(k.queue("io"))


def test_validation_errors_write_nothing(cluster: Cluster) -> None:
    before = _footprint(cluster)
    wf = Workflow("bad-json")
    wf_cycle = Workflow("cycle")
    a = wf_cycle.add(tt.add, 1, 2, id="a", dependencies=["c"])
    b = wf_cycle.add(tt.add, a, 1, id="b")
    wf_cycle.add(tt.add, b, 1, id="c")
    with pytest.raises(CycleError) as info:
        cluster.client.submit(wf_cycle)
    assert set(info.value.cycle) == {"a", "b", "c"}
    with pytest.raises(SerializationError):
        wf.add(tt.add, {1, 2}, 3)
    big = Workflow("big")
    big.add(tt.total, "x" * (2 * 1024 * 1024))
    with pytest.raises(PayloadTooLargeError):
        cluster.client.submit(big)
    unknown = Workflow("unknown")
    unknown.add("nerv_testtasks.no_such_task", 1)
    with pytest.raises(UnknownTaskError):
        cluster.client.submit(unknown)
    assert _footprint(cluster) == before


def test_unregistered_task_fails_clearly(cluster: Cluster) -> None:
    wf = Workflow("unregistered")
    wf.add("nerv_testtasks.no_such_task", 1, id="ghost")
    res = cluster.client.wait(cluster.client.submit(wf, check_names=False), timeout=30)
    assert res.status is RunStatus.FAILED
    err = res.tasks["ghost"].error
    assert err is not None and err.type == "NotRegisteredError" and "no_such_task" in err.message


def test_events_subscribe_and_cancel(cluster: Cluster) -> None:
    wf = Workflow("observed")
    a = wf.add(tt.add, 1, 2)
    wf.add(tt.add, a, 3)
    seen: list[str] = []
    done = threading.Event()

    def on_completed(event: object) -> None:
        seen.append(event.task_id)  # type: ignore[attr-defined]
        if len(seen) == 2:
            done.set()

    run_id = "observed-fixed-id-1"
    unsubscribe = cluster.client.subscribe("TASK_COMPLETED", on_completed, sender=run_id)
    other_runs: list[str] = []
    cluster.client.subscribe("TASK_COMPLETED", lambda e: other_runs.append(e.run_id), sender="someone-else")
    cluster.client.submit(wf, run_id=run_id)
    assert done.wait(30), f"saw only {seen}"
    unsubscribe()
    assert sorted(seen) == sorted([a.id, "add-2"]) and other_runs == []
    kinds = [ev.type for ev in cluster.client.events(run_id)]
    assert kinds[0] is EventType.WORKFLOW_SUBMITTED and kinds[-1] is EventType.WORKFLOW_COMPLETED
    assert kinds.count(EventType.TASK_COMPLETED) == 2 and EventType.TASK_DISPATCHED in kinds

    slow = Workflow("to-cancel")
    first = slow.add(tt.slow, 5.0)
    slow.add(tt.add, first, 1)
    run2 = cluster.client.submit(slow)
    cluster.client.cancel(run2)
    res = cluster.client.wait(run2, timeout=20)
    assert res.status is RunStatus.CANCELLED
    assert all(t.status is TaskStatus.CANCELLED for t in res.tasks.values())
