"""The scheduler breaks: SIGKILL mid-run and restart; two replicas at once. Real processes, real kills."""

from __future__ import annotations

import signal
import time

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Workflow
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import assert_ran_once_in_order, log_of, random_dag

pytestmark = pytest.mark.timeout(180)


def _layered(levels: int, width: int, seconds: float) -> tuple[Workflow, dict[str, list[str]]]:
    """``levels`` layers of ``width`` slow tasks, each depending on the whole previous layer."""
    wf = Workflow("layers")
    parents: dict[str, list[str]] = {}
    prev: list = []
    for lv in range(levels):
        layer = []
        for i in range(width):
            h = wf.add(tt.slow, seconds, id=f"L{lv}-{i}", dependencies=prev)
            parents[h.id] = [p.id for p in prev]
            layer.append(h)
        prev = layer
    return wf, parents


def test_scheduler_sigkill_mid_run_then_restart_completes_without_rerunning(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf, parents = _layered(levels=6, width=4, seconds=0.15)
    run_id = c.client.submit(wf)

    # Kill the scheduler once some, but not all, of the work is done.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = sum(1 for ev in log_of(c.client, run_id) if ev.type is EventType.TASK_COMPLETED)
        if done >= 6:
            break
        time.sleep(0.05)
    c.kill(sched, signal.SIGKILL)
    assert sched.returncode == -signal.SIGKILL
    mid = c.client.status(run_id)
    assert mid.status is RunStatus.RUNNING, "the run must still be in flight when the scheduler dies"

    c.scheduler()
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(run_id) == dict.fromkeys(parents, 1), "a task ran twice or never"
    assert_ran_once_in_order(log_of(c.client, run_id), parents)


def test_two_schedulers_at_once_dispatch_each_task_once(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    c.worker("io", 4)
    wf = Workflow("two-schedulers")
    parents = random_dag(wf, 300, tt.counted, tt.counted_io, seed=5)
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    events = log_of(c.client, run_id)
    dispatched = [ev.task_id for ev in events if ev.type is EventType.TASK_DISPATCHED]
    assert sorted(dispatched) == sorted(parents), "each task is dispatched exactly once"
    assert len({ev.source for ev in events if ev.source.startswith("scheduler:")}) == 1
    assert c.execs(run_id) == dict.fromkeys(parents, 1)


def test_standby_takes_over_when_the_leader_is_killed(own_cluster: Cluster) -> None:
    c = own_cluster
    first, second = c.scheduler(), c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf, parents = _layered(levels=6, width=4, seconds=0.15)
    run_id = c.client.submit(wf)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(1 for ev in log_of(c.client, run_id) if ev.type is EventType.TASK_COMPLETED) >= 6:
            break
        time.sleep(0.05)
    token = c.redis.get(c.client.keys.lease)
    leader = next(p for p in (first, second) if f"leader (token {token})" in c.tail(p, 200))
    standby = second if leader is first else first
    killed_at = time.time()
    c.kill(leader, signal.SIGKILL)
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert standby.poll() is None, "the standby keeps running"
    sources = [ev.source for ev in log_of(c.client, run_id) if ev.source.startswith("scheduler:")]
    assert sources[0] == f"scheduler:{token}" and sources[-1] != f"scheduler:{token}", (
        "the standby finished it"
    )
    took_over = min(
        ev.ts for ev in log_of(c.client, run_id) if ev.source.startswith("scheduler:") and ev.ts > killed_at
    )
    lease_s = int(c.env["NERV_LEASE_TTL_MS"]) / 1000
    assert took_over - killed_at < lease_s + 2.0, "the standby takes over within the lease time"
    assert c.execs(run_id) == dict.fromkeys(parents, 1)


def test_restarted_scheduler_resumes_from_the_checkpoint_and_survives_a_bad_one(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_CHECKPOINT_EVENTS"] = "50"  # checkpoint once the log has gained as many entries as tasks
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf, parents = _layered(levels=40, width=20, seconds=0.04)  # 800 tasks, about 16 s on 2 processes
    run_id = c.client.submit(wf)
    c.kill_after_checkpoint(sched, run_id)
    assert c.client.status(run_id).status is RunStatus.RUNNING, "the run must still be in flight"

    # A new leader starts from the checkpoint and replays only the log after it.
    sched = c.scheduler()
    c.wait_log(sched, "(1 from a checkpoint)")
    time.sleep(0.5)
    c.kill(sched, signal.SIGKILL)
    assert c.client.status(run_id).status is RunStatus.RUNNING, "the run must still be in flight"

    # A checkpoint that cannot be read is ignored: the whole log is replayed.
    c.redis.set(c.client.keys.checkpoint(run_id), '{"upto": "0-0", "count": 0, "state": {"format": -1}}')
    sched = c.scheduler()
    c.wait_log(sched, "ignoring the checkpoint of run")
    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(run_id) == dict.fromkeys(parents, 1), "a task ran twice or never"
    assert_ran_once_in_order(log_of(c.client, run_id), parents)
