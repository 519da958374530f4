"""Child runs (issue 16, part "child"): tasks that return workflows, through real Redis, a real
scheduler and real worker processes."""

from __future__ import annotations

import json
import signal
import time

import nerv_testtasks as tt
import pytest
from typer.testing import CliRunner

from nerv_cluster import EventType, RunStatus, TaskStatus, Workflow, progress
from nerv_cluster.children import child_run_id
from nerv_cluster.cli import app
from nerv_cluster.model import ParentRef
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(180)


def _runs_index(c: Cluster) -> list[str]:
    return list(c.redis.zrange(c.client.keys.runs, 0, -1))


def _children_of(c: Cluster, run_id: str) -> list[str]:
    return [str(ev.data["child"]) for ev in log_of(c.client, run_id) if ev.type is EventType.CHILD_STARTED]


def test_fib_12_by_child_runs_gives_144(cluster: Cluster) -> None:
    wf = Workflow("fib-12")
    wf.add(tt.fib, 12, id="fib")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=150)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["fib"] == 144
    assert res.output == 144
    (child,) = _children_of(cluster, run_id)
    assert child == child_run_id("fib-12", ParentRef(run_id, "fib", 1)), (
        "the child id derives from the attempt"
    )
    assert res.tasks["fib"].child == child
    sub = cluster.client.status(child)
    assert sub.status is RunStatus.COMPLETED
    assert sub.parent == ParentRef(run_id, "fib", 1) and sub.depth == 1
    assert sub.output == 144


def test_a_failing_child_fails_the_task_naming_the_child_and_its_failed_task(cluster: Cluster) -> None:
    wf = Workflow("failing-parent")
    wf.add(tt.spawn_failing, "no good", id="parent")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.FAILED
    err = res.tasks["parent"].error
    assert err is not None and err.type == "ChildRunFailedError"
    (child,) = _children_of(cluster, run_id)
    assert child in err.message and "'bad'" in err.message and "no good" in err.message, err.message
    assert cluster.client.status(child).status is RunStatus.FAILED
    assert cluster.execs(run_id) == {"parent": 1}


def test_a_retried_task_starts_a_new_child(cluster: Cluster) -> None:
    wf = Workflow("retried-parent")
    wf.add(tt.spawn_flaky_child, id="parent")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["parent"] == "ok"
    first, second = _children_of(cluster, run_id)
    assert first == child_run_id("flaky-child", ParentRef(run_id, "parent", 1))
    assert second == child_run_id("flaky-child", ParentRef(run_id, "parent", 2))
    assert cluster.client.status(first).status is RunStatus.FAILED
    assert cluster.client.status(second).status is RunStatus.COMPLETED
    assert cluster.execs(run_id) == {"parent": 2}
    assert cluster.execs(first) == {"step": 1} and cluster.execs(second) == {"step": 1}


def test_a_static_sub_workflow_runs_as_a_child_without_a_worker(cluster: Cluster) -> None:
    sub = Workflow("sub")
    a = sub.add(tt.add, 2, 3, id="a")
    sub.output(sub.add(tt.mul, a, 10, id="b"))
    wf = Workflow("embeds")
    first = wf.add(tt.add, 1, 1, id="first")
    inner = wf.add(sub, id="inner", dependencies=[first])
    wf.add(tt.add, inner, 1, id="after")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == {"first": 2, "inner": 50, "after": 51}
    starts = [ev for ev in log_of(cluster.client, run_id) if ev.task_id == "inner"]
    assert not [ev for ev in starts if ev.type in (EventType.TASK_DISPATCHED, EventType.TASK_STARTED)]
    (child,) = _children_of(cluster, run_id)
    assert cluster.client.status(child).parent == ParentRef(run_id, "inner", 1)

    # `nerv status --json` names the parent; `nerv runs` lists the child under it.
    url = cluster.client.settings.redis_url
    shown = CliRunner().invoke(app, ["status", child, "--json", "--redis-url", url])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["parent"] == {"run": run_id, "task": "inner", "attempt": 1}
    listed = CliRunner().invoke(app, ["runs", "-n", "500", "--json", "--redis-url", url])
    assert listed.exit_code == 0, listed.output
    rows = {r["run_id"]: r for r in json.loads(listed.output)}
    assert rows[child]["parent"]["run"] == run_id and rows[run_id]["parent"] is None
    nested = progress.nest_runs(
        [(rid, ts, cluster.client.status(rid)) for rid, ts in cluster.client.runs(500)]
    )
    levels = [(level, row[0]) for level, row in nested]
    at = levels.index((0, run_id))
    assert levels[at + 1] == (1, child), "the child is listed right under its parent"


def test_the_depth_bound_fails_the_task_past_it(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_MAX_CHILD_DEPTH"] = "3"
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    ok = c.client.submit(_nest(3))
    assert c.client.wait(ok, timeout=60).status is RunStatus.COMPLETED, "3 levels are allowed"
    too_deep = c.client.submit(_nest(4))
    res = c.client.wait(too_deep, timeout=60)
    assert res.status is RunStatus.FAILED
    # The error rises through every level: the deepest task names the bound.
    assert "NERV_MAX_CHILD_DEPTH" in res.reason and "the limit is 3" in res.reason, res.reason
    depths = sorted(c.client.status(r).depth for r in _runs_index(c))
    assert depths == [0, 0, 1, 1, 2, 2, 3, 3], "no run deeper than the bound was created"


def _nest(levels: int) -> Workflow:
    wf = Workflow(f"nest-root-{levels}")
    wf.add(tt.nest, levels, id="top")
    return wf


def test_cancelling_a_parent_cancels_its_children(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("cancel-parent")
    wf.add(tt.spawn_slow_nested, 0.5, 40, 3, id="parent")  # parent -> child -> grandchild of 40 tasks
    run_id = c.client.submit(wf)
    deadline = time.monotonic() + 30
    lineage = [run_id]
    while len(lineage) < 3 and time.monotonic() < deadline:
        below = _children_of(c, lineage[-1])
        if below:
            lineage.append(below[0])
        else:
            time.sleep(0.05)
    assert len(lineage) == 3, f"the grandchild was never created: {lineage}"
    grandchild = lineage[-1]
    while not c.execs(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    c.client.cancel(run_id, "stop it all")
    res = c.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.CANCELLED
    assert res.tasks["parent"].status is TaskStatus.CANCELLED
    for rid in lineage[1:]:  # recursively: the child, then the grandchild
        sub = c.client.wait(rid, timeout=30)
        assert sub.status is RunStatus.CANCELLED, (rid, sub.reason)
        assert "stop it all" in sub.reason, sub.reason
    assert lineage[1] in c.client.status(grandchild).reason, "the grandchild names its cancelled parent"
    ran = sum(c.execs(grandchild).values())
    assert ran < 40, "the grandchild's tasks stopped being started"
    time.sleep(1.5)
    assert sum(c.execs(grandchild).values()) == ran, "nothing of the grandchild starts after its cancel"


def test_scheduler_sigkill_mid_spawn_creates_no_child_twice(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("cfib-9")
    wf.add(tt.counted_fib, 9, id="fib")
    run_id = c.client.submit(wf)
    kills = 0
    deadline = time.monotonic() + 120
    # Kill the scheduler repeatedly while child runs are being created and ended.
    while kills < 3 and time.monotonic() < deadline:
        if len(_runs_index(c)) >= 1 + 12 * (kills + 1):
            c.kill(sched, signal.SIGKILL)
            kills += 1
            sched = c.scheduler()
        time.sleep(0.02)
    assert kills == 3, "the run ended before the scheduler could be killed three times"
    res = c.client.wait(run_id, timeout=150)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["fib"] == 34
    runs = _runs_index(c)
    # fib(9) makes 109 fib calls; every call with n >= 2 (54 of them) spawns exactly one child.
    assert len(runs) == 1 + 54, f"{len(runs)} runs: a child was created twice or never"
    assert len(set(runs)) == len(runs)
    assert int(c.redis.get("test:fibcalls") or 0) == 109, "a fib task ran twice"
    for rid in runs:
        r = c.client.status(rid)
        assert r.status is RunStatus.COMPLETED, (rid, r.reason)
        assert all(n == 1 for n in c.execs(rid).values()), (rid, c.execs(rid))
        if r.parent is not None:
            parent = c.client.status(r.parent.run_id)
            assert parent.tasks[r.parent.task_id].result == r.output, "the parent completed with its child"


def test_spawn_script_creates_each_child_once_and_refuses_a_taken_id(own_cluster: Cluster) -> None:
    """spawn.lua against real Redis: a child and its CHILD_STARTED at most once per parent attempt (a
    resent or repeated spawn writes nothing), a taken child id writes nothing, a lost lease neither."""
    from nerv_cluster.children import Spawn
    from nerv_cluster.errors import LeaseLostError
    from nerv_cluster.model import Event
    from scheduler.lease import Lease

    c = own_cluster
    log, keys = c.client.log, c.client.keys
    lease = Lease(log, ttl_ms=10_000)
    assert lease.acquire() and lease.token

    def spawn(task: str, child: str) -> Spawn:
        ref = ParentRef("parent-run", task, 1)
        sub = {"name": "kid", "tasks": [{"id": "a", "fn": "nerv_testtasks.add", "args": [1, 2]}]}
        return Spawn(
            ref,
            child,
            Event(EventType.WORKFLOW_SUBMITTED, child, data={"workflow": sub}, source="scheduler:t"),
            Event(EventType.CHILD_STARTED, "parent-run", task, 1, {"child": child}, source="scheduler:t"),
        )

    first = spawn("t", "kid-1")
    assert log.spawn_children([first], lease.token) == ["created"]
    assert log.spawn_children([first], lease.token) == ["done"], "a resent call creates nothing"
    assert c.redis.xlen(keys.log("kid-1")) == 1 and c.redis.xlen(keys.log("parent-run")) == 1
    assert c.redis.sismember(keys.active, "kid-1") and c.redis.zscore(keys.runs, "kid-1") is not None
    # Another attempt's spawn claiming the same child id: nothing written.
    assert log.spawn_children([spawn("u", "kid-1")], lease.token) == ["taken"]
    assert c.redis.xlen(keys.log("kid-1")) == 1 and c.redis.xlen(keys.log("parent-run")) == 1
    with pytest.raises(LeaseLostError):
        log.spawn_children([spawn("v", "kid-2")], "not-the-token")
    assert not c.redis.exists(keys.log("kid-2")) and c.redis.xlen(keys.log("parent-run")) == 1
