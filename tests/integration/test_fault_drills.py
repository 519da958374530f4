"""The fault drills: each breaks something real (kills processes, floods, injects bad messages)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import nerv_testtasks as tt
import pytest
from celery import Celery

from nerv_cluster import EventType, RetryPolicy, RunStatus, TaskStatus, Workflow
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(180)


def _wait_event(c: Cluster, run_id: str, kind: EventType, timeout: float = 30, count: int = 1) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [ev for ev in log_of(c.client, run_id) if ev.type is kind]
        if len(got) >= count:
            return got
        time.sleep(0.05)
    raise AssertionError(f"no {kind.value} in run {run_id} after {timeout}s")


def _wait_running(c: Cluster, run_id: str, task_id: str, timeout: float = 30) -> None:
    """Wait until the task's function itself is running (past the claim that records TASK_STARTED)."""
    deadline = time.monotonic() + timeout
    while c.execs(run_id).get(task_id, 0) < 1:
        assert time.monotonic() < deadline, f"{task_id} never started running"
        time.sleep(0.02)


def _owner(c: Cluster, worker_id: str):
    """The worker Popen whose process group contains the pid in a nerv worker id (host:pid:rand)."""
    import os

    pid = int(worker_id.split(":")[1])
    pgid = os.getpgid(pid)
    return next(p for p in c.procs if p.pid == pgid)


def test_sigkill_whole_worker_mid_task_reruns_elsewhere_recorded_once(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    c.worker("cpu", 1)
    wf = Workflow("kill-worker")
    victim = wf.add(tt.slow, 4.0, id="victim")
    wf.add(tt.add, victim, 1, id="after")
    run_id = c.client.submit(wf)
    started = _wait_event(c, run_id, EventType.TASK_STARTED)[0]
    _wait_running(c, run_id, "victim")
    t0 = time.monotonic()
    c.kill(_owner(c, started.data["worker"]), signal.SIGKILL)  # the host dies: parent and pool child
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    events = log_of(c.client, run_id)
    assert [ev.task_id for ev in events if ev.type is EventType.TASK_COMPLETED].count("victim") == 1
    assert res.tasks["victim"].attempts == 2 and res.tasks["victim"].worker != started.data["worker"]
    assert any(ev.type is EventType.TASK_PENDING and "lost" in ev.data["reason"] for ev in events)
    assert c.execs(run_id)["victim"] == 2
    assert time.monotonic() - t0 < 20, "re-dispatch must come within seconds, not the visibility timeout"


def test_sigkill_pool_child_redelivers_to_another_process(own_cluster: Cluster) -> None:
    import os

    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("kill-child")
    wf.add(tt.slow, 3.0, id="victim")
    run_id = c.client.submit(wf)
    started = _wait_event(c, run_id, EventType.TASK_STARTED)[0]
    _wait_running(c, run_id, "victim")
    os.kill(int(started.data["worker"].split(":")[1]), signal.SIGKILL)
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    completed = [ev for ev in log_of(c.client, run_id) if ev.type is EventType.TASK_COMPLETED]
    assert len(completed) == 1 and completed[0].data["worker"] != started.data["worker"]
    assert c.execs(run_id)["victim"] == 2


def test_poison_task_is_bounded_then_failed_and_worker_keeps_serving(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_MAX_REDELIVERIES"] = "2"
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("poison")
    wf.add(tt.suicide, id="poison")
    res = c.client.wait(c.client.submit(wf), timeout=90)
    assert res.status is RunStatus.FAILED
    err = res.tasks["poison"].error
    assert err is not None and err.type == "WorkerLostError", err
    assert 2 <= c.execs(res.run_id)["poison"] <= 3
    ok = Workflow("after-poison")
    ok.add(tt.add, 2, 2, id="fine")
    assert c.client.wait(c.client.submit(ok), timeout=30).results == {"fine": 4}


def test_task_longer_than_visibility_timeout_runs_and_records_once(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_VISIBILITY_TIMEOUT"] = "1"
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    c.worker("cpu", 1)
    wf = Workflow("visibility")
    wf.add(tt.slow, 13.0, id="long")  # kombu restores unacked messages every 10 s
    res = c.client.wait(c.client.submit(wf), timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(res.run_id) == {"long": 1}, "the redelivered copy must not run"
    kinds = [ev.type for ev in log_of(c.client, res.run_id) if ev.task_id == "long"]
    assert kinds.count(EventType.TASK_COMPLETED) == 1 and kinds.count(EventType.TASK_STARTED) == 1


def test_fan_in_member_failing_skips_join_promptly_or_runs_fallback(cluster: Cluster) -> None:
    wf = Workflow("fan-in-fail")
    members = [wf.add(tt.add, i, 1, id=f"m{i}") for i in range(30)]
    members[7] = wf.add(tt.boom, "member 7 broke", id="m-bad")
    join = wf.add(tt.total, *members, id="join")
    wf.add(tt.add, join, 1, id="after-join")
    t0 = time.monotonic()
    res = cluster.client.wait(cluster.client.submit(wf), timeout=30)
    assert time.monotonic() - t0 < 10
    assert res.status is RunStatus.FAILED and "m-bad" in res.reason and "member 7 broke" in res.reason
    assert res.tasks["join"].status is TaskStatus.SKIPPED and "m-bad" in res.tasks["join"].reason
    assert res.tasks["after-join"].status is TaskStatus.SKIPPED

    wf2 = Workflow("fan-in-fallback")
    ok = [wf2.add(tt.add, i, 1, id=f"m{i}") for i in range(5)]
    bad = wf2.add(tt.boom, "broke", id="m-bad")
    join2 = wf2.add(tt.total, *ok, bad, id="join")
    wf2.add(
        tt.fallback, dependencies=[join2, bad], trigger="one_failed", id="plan-b"
    )  # the one-line fallback
    res2 = cluster.client.wait(cluster.client.submit(wf2), timeout=30)
    assert res2.status is RunStatus.COMPLETED, res2.reason
    assert res2.tasks["join"].status is TaskStatus.SKIPPED
    assert res2.results["plan-b"].startswith("fallback ran")


def test_retries_follow_the_backoff_policy(cluster: Cluster) -> None:
    wf = Workflow("retries")
    policy = RetryPolicy(max_retries=3, backoff=0.4, factor=2.0, retry_on=(ConnectionError,))
    wf.add(tt.flaky, 3, id="flaky", retry=policy)
    wf.add(tt.boom, "not retried", id="wrong-kind", retry=RetryPolicy(max_retries=3, retry_on=(KeyError,)))
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.tasks["flaky"].status is TaskStatus.COMPLETED and res.results["flaky"] == 3
    assert res.tasks["flaky"].attempts == 3
    assert res.tasks["wrong-kind"].status is TaskStatus.FAILED and res.tasks["wrong-kind"].attempts == 1
    events = [ev for ev in log_of(cluster.client, run_id) if ev.task_id == "flaky"]
    retrying = [ev for ev in events if ev.type is EventType.TASK_RETRYING]
    starts = [ev for ev in events if ev.type is EventType.TASK_STARTED]
    assert [ev.data["delay"] for ev in retrying] == [0.4, 0.8]
    for ev, nxt in zip(retrying, starts[1:], strict=True):
        gap = nxt.ts - ev.ts
        assert ev.data["delay"] - 0.05 <= gap <= ev.data["delay"] + 1.0, (ev.data["delay"], gap)


def test_hard_timeout_kills_the_task_and_the_worker_keeps_serving(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    c.worker("io", 2)
    wf = Workflow("timeouts")
    wf.add(tt.slow, 30.0, id="soft", timeout=1)
    wf.add(tt.stubborn, 30.0, id="hard", timeout=1)
    wf.add(tt.slow_io, 30.0, id="io", timeout=1)
    t0 = time.monotonic()
    res = c.client.wait(c.client.submit(wf), timeout=60)
    assert time.monotonic() - t0 < 20
    for tid in ("soft", "hard", "io"):
        assert res.tasks[tid].status is TaskStatus.FAILED, tid
        err = res.tasks[tid].error
        assert err is not None and err.type == "TaskTimeoutError", (tid, err)
    after = Workflow("after-timeouts")
    after.add(tt.add, 1, 1, id="cpu-ok")
    after.add(tt.add_io, 1, 2, id="io-ok")
    assert c.client.wait(c.client.submit(after), timeout=30).results == {"cpu-ok": 2, "io-ok": 3}


def test_cancel_mid_run_stops_running_tasks_within_two_seconds(cluster: Cluster) -> None:
    wf = Workflow("cancel-mid-run")
    first = [wf.add(tt.slow_marked, 4.0, id=f"first-{i}") for i in range(2)]
    wf.add(tt.slow_marked, 0.1, *first, id="second")
    run_id = cluster.client.submit(wf)
    _wait_event(cluster, run_id, EventType.TASK_STARTED, count=2)
    t0 = time.monotonic()
    cluster.client.cancel(run_id)
    res = cluster.client.wait(run_id, timeout=10)
    assert time.monotonic() - t0 <= 2.0
    assert res.status is RunStatus.CANCELLED
    assert {t.status for t in res.tasks.values()} == {TaskStatus.CANCELLED}
    time.sleep(5)  # longer than the tasks would have run
    assert cluster.redis.hgetall(f"test:marks:{run_id}") == {}, "running tasks must be terminated"
    assert [
        ev
        for ev in log_of(cluster.client, run_id)
        if ev.type is EventType.TASK_STARTED and ev.task_id == "second"
    ] == []


def test_pickle_and_unknown_messages_are_refused_and_the_worker_keeps_serving(cluster: Cluster) -> None:
    evil = Celery("evil", broker=cluster.redis_url, set_as_current=False)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    # Into the workers' own queue: kombu's keys of the cluster's namespace (nerv_cluster.celery_app).
    evil.conf.broker_transport_options = {"global_keyprefix": cluster.client.keys.celery}
    run_id = "injected-run"
    job = {"r": run_id, "k": "x", "a": 1, "fn": "nerv_testtasks.counted"}
    evil.send_task("nerv_testtasks.counted", args=[job], queue="cpu", routing_key="cpu", serializer="pickle")
    evil.send_task(
        "evil.unknown_task", args=[{"not": "a job"}], queue="cpu", routing_key="cpu", serializer="json"
    )
    time.sleep(2)
    assert cluster.execs(run_id) == {}, "a pickled message must never run"
    logs = "".join(Path(p.log_path).read_text(errors="replace") for p in cluster.procs)  # type: ignore[attr-defined]
    assert "pickle" in logs.lower() and "evil.unknown_task" in logs
    wf = Workflow("after-injection")
    wf.add(tt.add, 20, 22, id="answer")
    assert cluster.client.wait(cluster.client.submit(wf), timeout=30).results == {"answer": 42}
