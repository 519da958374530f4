"""Rerun from failure (issue 16) through real Redis, a real scheduler and real worker processes.

Counters in Redis (``test:execs:<run>``, one per task) prove what ran again and what did not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import nerv_testtasks as tt
import pytest

from nerv_cluster import (
    EventType,
    RerunError,
    RetryPolicy,
    RunNotFinishedError,
    RunStatus,
    TaskStatus,
    Workflow,
)
from nerv_cluster.constants import EVENT_FIELD
from nerv_cluster.errors import LeaseLostError, RunNotFoundError
from nerv_cluster.model import Event
from tests.integration.cluster import ROOT, Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(120)


def _fix(c: Cluster, run_id: str, *task_ids: str) -> None:
    """Mark ``broken_until_fixed`` tasks fixed: their next execution succeeds."""
    c.redis.hset(f"test:fixed:{run_id}", mapping=dict.fromkeys(task_ids, 1))


def _broken_pipeline() -> Workflow:
    """a -> bad -> after -> last, a -> side, alone: ``bad`` fails until fixed."""
    wf = Workflow("rerun-pipeline")
    a = wf.add(tt.counted, id="a")
    bad = wf.add(tt.broken_until_fixed, a, id="bad")
    after = wf.add(tt.counted, bad, id="after")
    wf.add(tt.counted, after, id="last")
    wf.add(tt.counted, a, id="side")
    wf.add(tt.counted, id="alone")
    return wf


def test_a_rerun_after_a_failure_runs_only_the_failed_part(cluster: Cluster) -> None:
    c = cluster
    run_id = c.client.submit(_broken_pipeline())
    first = c.client.wait(run_id, timeout=60)
    assert first.status is RunStatus.FAILED and "bad" in first.reason
    assert first.tasks["after"].status is TaskStatus.SKIPPED
    assert first.tasks["last"].status is TaskStatus.SKIPPED
    assert c.execs(run_id) == {"a": 1, "bad": 1, "side": 1, "alone": 1}
    kept = {tid: first.results[tid] for tid in ("a", "side", "alone")}

    _fix(c, run_id, "bad")
    assert c.client.rerun(run_id) == run_id
    # The request is in the log at once: wait waits for the new end, not the old one.
    assert c.client.status(run_id).status is RunStatus.RUNNING
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(run_id) == {"a": 1, "bad": 2, "after": 1, "last": 1, "side": 1, "alone": 1}
    assert {tid: res.results[tid] for tid in kept} == kept, "completed tasks keep their results"
    assert res.results["bad"] == "bad fixed"
    assert res.results["last"] == ["after"]
    assert res.tasks["bad"].attempts == 2 and res.tasks["bad"].error is None
    assert res.tasks["a"].attempts == 1
    events = log_of(c.client, run_id)
    assert [e.type for e in events].count(EventType.WORKFLOW_RERUN_REQUESTED) == 1
    # client.events goes on past the first end, to the rerun's end.
    kinds = [e.type for e in c.client.events(run_id)]
    assert kinds[-1] is EventType.WORKFLOW_COMPLETED and EventType.WORKFLOW_FAILED in kinds
    assert [e.type for e in events].count(EventType.WORKFLOW_STARTED) == 1, "the same run went on"
    # Closing follows the end it is decided on (the scheduler's next step): not before wait returns.
    deadline = time.monotonic() + 10
    while c.redis.sismember(c.client.keys.active, run_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not c.redis.sismember(c.client.keys.active, run_id), "closed again once finished"
    assert c.redis.ttl(c.client.keys.log(run_id)) > 0, "its keys expire again"


def test_rerun_of_named_tasks_reruns_them_and_their_descendants(cluster: Cluster) -> None:
    c = cluster
    wf = Workflow("rerun-named")
    a = wf.add(tt.counted, id="a")
    b = wf.add(tt.counted, a, id="b")
    wf.add(tt.counted, b, id="c")
    wf.add(tt.counted, a, id="d")
    run_id = c.client.submit(wf)
    assert c.client.wait(run_id, timeout=60).status is RunStatus.COMPLETED
    assert c.execs(run_id) == dict.fromkeys("abcd", 1)

    c.client.rerun(run_id, tasks=["b"])
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(run_id) == {"a": 1, "b": 2, "c": 2, "d": 1}
    assert res.tasks["b"].attempts == 2 and res.tasks["c"].attempts == 2 and res.tasks["d"].attempts == 1

    # Twice more, through the CLI: `nerv rerun RUN --task ID --wait` exits 0 once the run completed.
    env = {
        **os.environ,
        **c.env,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "nerv_cluster", "rerun", run_id, "--task", "c", "--task", "d", "--wait"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert c.execs(run_id) == {"a": 1, "b": 2, "c": 3, "d": 2}


def test_a_rerun_restarts_each_tasks_retry_policy(cluster: Cluster) -> None:
    c = cluster
    wf = Workflow("rerun-retries")
    # Fails its first three executions; one retry per round: the first round fails (executions 1, 2),
    # the rerun's round fails once more (3) and succeeds on its own retry (4).
    wf.add(tt.fails_first_runs, 3, id="flaky", retry=RetryPolicy(max_retries=1, backoff=0.05))
    run_id = c.client.submit(wf)
    assert c.client.wait(run_id, timeout=60).status is RunStatus.FAILED
    assert c.execs(run_id) == {"flaky": 2}
    c.client.rerun(run_id)
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["flaky"] == 4 and res.tasks["flaky"].attempts == 4
    assert c.execs(run_id) == {"flaky": 4}


def test_a_cancelled_run_reruns_its_cancelled_tasks(cluster: Cluster) -> None:
    c = cluster
    wf = Workflow("rerun-cancelled")
    first = wf.add(tt.counted, id="first")
    slow = wf.add(tt.slow, 1.5, id="slow", dependencies=[first])
    wf.add(tt.counted, slow, id="after")
    run_id = c.client.submit(wf)
    deadline = time.monotonic() + 30
    while c.execs(run_id).get("slow") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.client.cancel(run_id)
    assert c.client.wait(run_id, timeout=30).status is RunStatus.CANCELLED
    c.client.rerun(run_id)
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(run_id) == {"first": 1, "slow": 2, "after": 1}


def test_refused_reruns_write_nothing(cluster: Cluster) -> None:
    c = cluster
    k = c.client.keys
    with pytest.raises(RunNotFoundError):
        c.client.rerun("no-such-run")
    assert not c.redis.exists(k.log("no-such-run"))

    wf = Workflow("rerun-refused")
    wf.add(tt.slow, 2.0, id="slow")
    running = c.client.submit(wf)
    with pytest.raises(RunNotFinishedError, match=r"RUNNING|PENDING"):
        c.client.rerun(running)

    done_wf = Workflow("rerun-done")
    done_wf.add(tt.counted, id="x")
    done = c.client.submit(done_wf)
    assert c.client.wait(done, timeout=60).status is RunStatus.COMPLETED
    # The feed is every run's: other runs (``running`` among them) may write to it meanwhile.
    feed_end = (c.redis.xrevrange(k.feed, count=1) or [("0-0", {})])[0][0]
    done_length = c.redis.xlen(k.log(done))
    with pytest.raises(RerunError, match="nothing to rerun"):
        c.client.rerun(done)
    with pytest.raises(RerunError, match="no task 'ghost'"):
        c.client.rerun(done, tasks=["x", "ghost"])
    with pytest.raises(RerunError, match="no task named"):
        c.client.rerun(done, tasks=[])
    assert c.redis.xlen(k.log(done)) == done_length
    since = [Event.from_json(f[EVENT_FIELD]) for _, f in c.redis.xrange(k.feed, min=f"({feed_end}")]
    assert [e for e in since if e.run_id == done] == [], "a refused rerun wrote to the feed"
    assert not c.redis.sismember(k.active, done) and c.redis.ttl(k.log(done)) > 0, "still closed"
    assert c.client.wait(running, timeout=60).status is RunStatus.COMPLETED
    assert EventType.WORKFLOW_RERUN_REQUESTED not in [e.type for e in log_of(c.client, running)]


def test_a_scheduler_sigkilled_around_the_request_still_completes_the_rerun(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    one = c.client.submit(_broken_pipeline())
    two = c.client.submit(_broken_pipeline())
    for rid in (one, two):
        assert c.client.wait(rid, timeout=60).status is RunStatus.FAILED
        _fix(c, rid, "bad")
    deadline = time.monotonic() + 10
    while c.redis.scard(c.client.keys.active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not c.redis.scard(c.client.keys.active), "both runs closed and forgotten"

    # Requested while no scheduler runs: the request waits in the intake, and the next leader applies
    # it and answers (the client still waiting), then runs it.
    c.kill(sched, signal.SIGKILL)
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(c.client.rerun, one)
        deadline = time.monotonic() + 10
        while not c.redis.xlen(c.client.keys.intake) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not c.redis.sismember(c.client.keys.active, one), "only the scheduler reopens a run"
        second = c.scheduler()
        assert asked.result(timeout=30) == one
    assert c.redis.sismember(c.client.keys.active, one)
    assert c.client.wait(one, timeout=60).status is RunStatus.COMPLETED
    # Requested, and the scheduler killed at once, before or after it took the run back.
    c.client.rerun(two)
    c.kill(second, signal.SIGKILL)
    c.scheduler()
    res = c.client.wait(two, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    for rid in (one, two):
        assert c.execs(rid) == {"a": 1, "bad": 2, "after": 1, "last": 1, "side": 1, "alone": 1}, rid


def test_an_expired_run_cannot_be_rerun(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_RETENTION_SECONDS"] = "1"
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    wf = Workflow("rerun-expired")
    wf.add(tt.boom, "gone", id="bad")
    run_id = c.client.submit(wf)
    assert c.client.wait(run_id, timeout=60).status is RunStatus.FAILED
    deadline = time.monotonic() + 10
    while c.redis.exists(c.client.keys.log(run_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(RunNotFoundError, match="expired"):
        c.client.rerun(run_id)
    assert not c.redis.exists(c.client.keys.log(run_id))


# -- the scripts, against Redis alone -------------------------------------------------------------------


def _closed_run(c: Cluster, run_id: str) -> str:
    """A run log with a submission and an end, closed as the scheduler closes it; its last entry id."""
    log = c.client.log
    log.submit(Event(EventType.WORKFLOW_SUBMITTED, run_id, data={"workflow": {"name": "x", "tasks": []}}))
    log.append([Event(EventType.WORKFLOW_FAILED, run_id, data={"reason": "test"})])
    assert log.close_runs([run_id], retention_seconds=600) == [True]
    return str(c.redis.xrevrange(c.client.keys.log(run_id), count=1)[0][0])


def test_the_rerun_script_reopens_once_and_close_respects_a_later_rerun(own_cluster: Cluster) -> None:
    c = own_cluster
    k, log = c.client.keys, c.client.log
    last = _closed_run(c, "scripted")
    assert c.redis.ttl(k.log("scripted")) > 0
    request = Event(EventType.WORKFLOW_RERUN_REQUESTED, "scripted", data={"n": 1}, source="client")
    log.rerun(request, last)
    assert c.redis.sismember(k.active, "scripted")
    assert all(c.redis.ttl(key) == -1 for key in k.run_keys("scripted") if c.redis.exists(key))
    assert c.redis.get(k.reruns("scripted")) == "1"
    # The same call again (redis-py resends a call whose reply was lost): success, nothing appended.
    log.rerun(request, last)
    assert [e.id for e in log_of(c.client, "scripted")].count(request.id) == 1
    # Another request judged on the old log: refused, nothing appended.
    from nerv_cluster.errors import RunMovedError

    with pytest.raises(RunMovedError):
        log.rerun(Event(EventType.WORKFLOW_RERUN_REQUESTED, "scripted", data={"n": 1}), last)
    assert c.redis.xlen(k.log("scripted")) == 3
    assert json.loads(c.redis.xrevrange(k.feed, count=1)[0][1]["e"])["i"] == request.id
    # A scheduler closing the run for the end it folded before that rerun leaves it open...
    assert log.close_runs(["scripted"], retention_seconds=600, reruns={"scripted": 0}) == [False]
    assert c.redis.sismember(k.active, "scripted") and c.redis.ttl(k.log("scripted")) == -1
    # ...and closes it once it folded the rerun and its new end.
    assert log.close_runs(["scripted"], retention_seconds=600, reruns={"scripted": 1}) == [True]
    assert not c.redis.sismember(k.active, "scripted")
    assert all(c.redis.ttl(key) > 0 for key in k.run_keys("scripted") if c.redis.exists(key))
    with pytest.raises(RunNotFoundError):
        log.rerun(Event(EventType.WORKFLOW_RERUN_REQUESTED, "never", data={"n": 1}), "0-1")
    # The scheduler's own rerun (a child run for its parent task) is fenced by its lease token.
    last = str(c.redis.xrevrange(k.log("scripted"), count=1)[0][0])
    c.redis.set(k.lease, "7-holder")
    with pytest.raises(LeaseLostError):
        log.rerun(Event(EventType.WORKFLOW_RERUN_REQUESTED, "scripted", data={"n": 2}), last, token="6-old")
    assert c.redis.xlen(k.log("scripted")) == 3 and c.redis.get(k.reruns("scripted")) == "1"
    log.rerun(Event(EventType.WORKFLOW_RERUN_REQUESTED, "scripted", data={"n": 2}), last, token="7-holder")
    assert c.redis.get(k.reruns("scripted")) == "2" and c.redis.sismember(k.active, "scripted")


def _until_intake_holds(c: Cluster, n: int) -> None:
    deadline = time.monotonic() + 10
    while c.redis.xlen(c.client.keys.intake) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.redis.xlen(c.client.keys.intake) >= n


def test_a_cancel_request_logged_before_the_rerun_does_not_cancel_it(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    run_id = c.client.submit(_broken_pipeline())
    assert c.client.wait(run_id, timeout=60).status is RunStatus.FAILED
    _fix(c, run_id, "bad")
    # A cancel of the finished run (the fold ignores it), then the rerun, read by the scheduler in one
    # batch (it is paused meanwhile): the run it loads back from the log must not take the stale cancel.
    # Both requests wait in the intake until it goes on (each client waits for its answer).
    c.kill(sched, signal.SIGSTOP)
    with ThreadPoolExecutor(2) as pool:
        try:
            cancelled = pool.submit(c.client.cancel, run_id, "too late")
            _until_intake_holds(c, 1)
            rerun = pool.submit(c.client.rerun, run_id)
            _until_intake_holds(c, 2)
        finally:
            c.kill(sched, signal.SIGCONT)
        cancelled.result(timeout=30)
        assert rerun.result(timeout=30) == run_id
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.execs(run_id) == {"a": 1, "bad": 2, "after": 1, "last": 1, "side": 1, "alone": 1}
