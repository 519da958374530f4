"""The scheduler knows which attempts each live worker process really holds (issue 10, points 2, 3,
5 and two of 8): through real Redis, real scheduler and worker processes.

- a process never runs one attempt twice at once (thread pools share a worker id);
- an attempt whose outcome never reached the log while its worker lives is re-dispatched;
- a packed batch claims each job as it starts (a loss and a time limit count per job);
- a worker process that dies with prefetched messages only has them resent (its queues only);
- a hand-off chain stops at a warm shutdown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, TaskStatus, Workflow
from nerv_cluster.celery_app import create_celery
from nerv_cluster.embedded import EmbeddedRedis
from nerv_cluster.jobs import Job, job_id
from nerv_cluster.model import Event
from nerv_cluster.settings import Settings
from scheduler.dispatch import Dispatcher
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(180)

#: Ports for the test's own Redis server (one that is killed on purpose).
_OWN_REDIS_PORT = 6493


def _wait(what: str, cond, timeout: float = 30, every: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _completed(events: list[Event]) -> Counter[str]:
    return Counter(ev.task_id or "" for ev in events if ev.type is EventType.TASK_COMPLETED)


def _wait_capacity(c: Cluster) -> None:
    """Wait until a worker announced its slots and the scheduler has read them (it packs only then)."""
    _wait("a capacity announcement", lambda: c.redis.hlen(c.client.keys.capacity) > 0)
    time.sleep(1.5)  # the scheduler refreshes capacity every watchdog sweep (0.5 s)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a prefork worker's pool)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


# -- point 3 -------------------------------------------------------------------------------------------


def test_io_worker_never_runs_a_copy_of_an_attempt_it_runs(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("io", 4)
    wf = Workflow("io-copy")
    wf.add(tt.slow_io, 3.0, id="slow")
    run_id = c.client.submit(wf)
    _wait("the io task running", lambda: c.execs(run_id).get("slow", 0) >= 1)
    # A copy of the same attempt's message, as a visibility-timeout redelivery or a new leader's
    # resend would bring it: same job, same Celery task id.
    copy = Job(run_id, "slow", 1, tt.slow_io.name, [3.0], {}, workflow="io-copy", context={})
    app = create_celery(Settings.from_env(c.env))
    try:
        Dispatcher(app).send([([copy], "io")])
        _wait(
            "the copy taken from the queue", lambda: c.redis.llen(c.client.keys.queue("io")) == 0, timeout=10
        )
    finally:
        app.close()
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    time.sleep(1.0)  # a copy that did run would still be counting by now
    assert c.execs(run_id) == {"slow": 1}, "one process ran the same attempt twice at once"
    assert _completed(log_of(c.client, run_id)) == {"slow": 1}


# -- point 2 -------------------------------------------------------------------------------------------


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    # fsync on every write: a SIGKILLed server loses nothing it acknowledged.
    (tmp_path / "redis").mkdir()
    server = EmbeddedRedis(
        port=_OWN_REDIS_PORT, appendonly=True, dir=tmp_path / "redis", extra_args=["--appendfsync", "always"]
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_outcome_lost_while_the_worker_lives_is_redispatched(
    aof_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    # A small retry budget: recording the outcome gives up while Redis is down, Celery acks the
    # message, and the live worker process no longer holds the attempt.
    c = Cluster(aof_redis.url, tmp_path, NERV_REDIS_RETRIES="2")
    try:
        c.scheduler()
        c.wait_leader()
        worker = c.worker("cpu", 1)
        wf = Workflow("outcome-lost")
        first = wf.add(tt.slow, 2.0, id="slow")
        wf.add(tt.counted, first, id="after")
        run_id = c.client.submit(wf)
        _wait("the slow task running", lambda: c.execs(run_id).get("slow", 0) >= 1)
        c.client.close()
        c.redis.close()
        aof_redis.kill()  # SIGKILL: a crash
        # Keep Redis down until the task finished and its outcome write failed past the budget.
        log_path = Path(worker.log_path)  # type: ignore[attr-defined]
        _wait(
            "the outcome write to fail",
            lambda: re.search(
                r"slow.*raised unexpected: .*ConnectionError", log_path.read_text(errors="replace")
            ),
            timeout=30,
            every=0.2,
        )
        time.sleep(0.5)
        aof_redis.start()
        res = c.client.wait(run_id, timeout=60)
        assert res.status is RunStatus.COMPLETED, res.reason
        events = log_of(c.client, run_id)
        assert _completed(events) == {"slow": 1, "after": 1}
        assert res.tasks["slow"].attempts == 2
        reasons = [ev.data.get("reason", "") for ev in events if ev.type is EventType.TASK_PENDING]
        assert any("no longer holds" in r for r in reasons), reasons
        assert c.execs(run_id)["slow"] == 2
    finally:
        c.stop()


# -- point 5 -------------------------------------------------------------------------------------------


def _packed(events: list[Event], run_id: str) -> list[str]:
    """Tasks that ran inside another job's message (a packed batch)."""
    return [
        ev.task_id or ""
        for ev in events
        if ev.type is EventType.TASK_STARTED
        and ev.data.get("via")
        and ev.data["via"] != job_id(run_id, ev.task_id or "", ev.attempt or 0)
        and not ev.data.get("handoff")
    ]


def test_a_packed_batch_counts_a_lost_worker_only_against_the_job_that_killed_it(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    c.env["NERV_MAX_REDELIVERIES"] = "1"  # one loss fails a task: an innocent one would fail at once
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    _wait_capacity(c)
    wf = Workflow("packed-poison")
    # Definition order is the dispatch order: the poison element leads the first batch.
    wf.add(tt.maybe_suicide, True, 0.05, id="poison")
    for i in range(11):
        wf.add(tt.maybe_suicide, False, 0.05, id=f"ok{i}")
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=90)
    events = log_of(c.client, run_id)
    assert _packed(events, run_id), "the fan-out was not packed: the test proves nothing"
    assert res.tasks["poison"].status is TaskStatus.FAILED
    err = res.tasks["poison"].error
    assert err is not None and err.type == "WorkerLostError", err
    innocent = {tid: t.status for tid, t in res.tasks.items() if tid != "poison"}
    assert set(innocent.values()) == {TaskStatus.COMPLETED}, innocent
    assert set(_completed(events).values()) == {1}


def test_each_job_of_a_fan_out_is_timed_from_its_own_start(own_cluster: Cluster) -> None:
    """A fan-out big enough to be packed, on a queue with a default time limit: its jobs travel alone
    (a batch is claimed as a whole, so a packed job's limit would count from the batch's start)."""
    c = own_cluster
    # Each job takes half the queue's default limit; a batch of 9 takes longer than limit plus grace.
    c.env["NERV_CPU_TIMEOUT"] = "1.0"
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    _wait_capacity(c)
    wf = Workflow("packed-timeout")
    for i in range(36):
        wf.add(tt.slow, 0.5, id=f"s{i}")
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=120)
    events = log_of(c.client, run_id)
    timed_out = [tid for tid, t in res.tasks.items() if t.status is not TaskStatus.COMPLETED]
    assert res.status is RunStatus.COMPLETED and not timed_out, (res.reason, timed_out)
    assert not _packed(events, run_id), "jobs of a queue with a time limit must travel alone"
    assert set(_completed(events).values()) == {1} and len(_completed(events)) == 36


# -- point 8 -------------------------------------------------------------------------------------------


def test_prefetched_jobs_of_a_dead_worker_are_resent_within_seconds(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    a = c.worker("cpu", 1)
    (child,) = _wait("worker A's pool child", lambda: _children(a.pid))
    # The child stops: the parent still prefetches, but nothing is claimed (no RUNNING task).
    os.kill(child, signal.SIGSTOP)
    wf = Workflow("prefetched")
    for i in range(3):
        wf.add(tt.counted, id=f"t{i}")
    run_id = c.client.submit(wf)
    unacked = c.client.keys.celery + "unacked"  # kombu's hash of messages a consumer reserved
    _wait(
        "worker A to reserve every message",
        lambda: c.redis.llen(c.client.keys.queue("cpu")) == 0 and c.redis.hlen(unacked) >= 3,
        timeout=20,
    )
    assert not any(ev.type is EventType.TASK_STARTED for ev in log_of(c.client, run_id))
    c.kill(a, signal.SIGKILL)  # the whole host: parent and (stopped) child
    t0 = time.monotonic()
    c.worker("cpu", 1)
    res = c.client.wait(run_id, timeout=45)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert time.monotonic() - t0 < 30, "resent within seconds, not after the visibility timeout"
    assert c.execs(run_id) == {"t0": 1, "t1": 1, "t2": 1}


def test_one_lost_worker_resends_only_the_queued_jobs_of_its_queues(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    a = c.worker("cpu", 1)
    # Queued io jobs with no io worker: a lost cpu worker must leave them alone.
    io_wf = Workflow("io-waits")
    for i in range(3):
        io_wf.add(tt.counted_io, id=f"io{i}")
    io_run = c.client.submit(io_wf)
    _wait("the io jobs queued", lambda: c.redis.llen(c.client.keys.queue("io")) == 3)
    wf = Workflow("cpu-victim")
    wf.add(tt.slow, 30.0, id="victim")
    run_id = c.client.submit(wf)
    _wait("the cpu task running", lambda: c.execs(run_id).get("victim", 0) >= 1)
    c.kill(a, signal.SIGKILL)  # a whole worker host lost, mid-task
    _wait(
        "the lost attempt re-dispatched",
        lambda: any(ev.type is EventType.TASK_PENDING for ev in log_of(c.client, run_id)),
        timeout=30,
    )
    time.sleep(2.0)  # a resend would be sent with the re-dispatch, in the same sweep
    assert c.redis.llen(c.client.keys.queue("io")) == 3, (
        "a lost cpu worker made the queued io jobs of another run be sent again"
    )
    c.worker("io", 2)
    assert c.client.wait(io_run, timeout=30).status is RunStatus.COMPLETED


def test_a_handoff_chain_stops_at_warm_shutdown(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    a = c.worker("cpu", 1)
    wf = Workflow("chain-shutdown")
    # Short hops (10 ms): the chain travels by hand-off from one worker process, about 8 s in all.
    n = 600
    prev = wf.add(tt.slow, 0.01, id="c0")
    for i in range(1, n):
        prev = wf.add(tt.slow, 0.01, id=f"c{i}", dependencies=[prev])
    run_id = c.client.submit(wf)
    _wait("the chain under way", lambda: len(c.execs(run_id)) >= 40, timeout=60)
    handed = [
        ev for ev in log_of(c.client, run_id) if ev.type is EventType.TASK_STARTED and ev.data.get("handoff")
    ]
    assert len(handed) >= 10, "the chain is not handed off: the test proves nothing"
    a.send_signal(signal.SIGTERM)  # to the main process only, as docker or Kubernetes stop it
    t0 = time.monotonic()
    try:
        a.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker did not stop within 60 s of SIGTERM")
    took = time.monotonic() - t0
    left = n - len(c.execs(run_id))
    assert took < 4.0, f"warm shutdown waited {took:.1f}s for the hand-off chain ({left} tasks left)"
    assert left > 0, "the chain finished before the worker stopped: the test proves nothing"
    c.worker("cpu", 1)
    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert set(c.execs(run_id).values()) == {1} and len(c.execs(run_id)) == n
    assert set(_completed(log_of(c.client, run_id)).values()) == {1}
