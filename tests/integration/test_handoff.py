"""Direct hand-off along chains (``nerv_cluster.handoff``): real Redis, real scheduler and workers.

The hand-off is a shortcut past Celery's delivery; these tests check that chains really take it, that
its Lua scripts decide every race between a worker that stops waiting and the scheduler one way, and
that a worker dying with a handed job loses nothing.
"""

from __future__ import annotations

import time

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Workflow, constants
from nerv_cluster.container import container_for
from nerv_cluster.errors import LeaseLostError
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event
from nerv_cluster.outcomes import claim_of, new_nonce
from nerv_cluster.scripts import Resign
from nerv_cluster.settings import Settings
from scheduler.lease import Lease
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(120)


def _handed(events: list[Event]) -> list[str]:
    """Tasks whose attempt the scheduler claimed for a waiting worker."""
    return [ev.task_id or "" for ev in events if ev.type is EventType.TASK_STARTED and ev.data.get("handoff")]


def test_chain_hops_are_handed_to_the_waiting_worker(cluster: Cluster) -> None:
    wf = Workflow("handoff-chain")
    prev = wf.add(tt.counted, id="c0")
    for i in range(1, 40):
        prev = wf.add(tt.counted, prev, id=f"c{i}")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["c39"] == ["c38"]
    assert cluster.execs(run_id) == {f"c{i}": 1 for i in range(40)}
    events = log_of(cluster.client, run_id)
    handed = _handed(events)
    # Each hop is handed over unless the worker gave up waiting (a loaded machine): most are.
    assert len(handed) >= 20, f"only {len(handed)} of 39 hops were handed over"
    assert "c0" not in handed  # a root has no predecessor to wait after it
    for tid in handed:
        (started,) = [ev for ev in events if ev.type is EventType.TASK_STARTED and ev.task_id == tid]
        (done,) = [ev for ev in events if ev.type is EventType.TASK_COMPLETED and ev.task_id == tid]
        # The worker that was handed the job ran it: the claim named it, and it finished it.
        assert started.data["worker"] == done.data["worker"]
        assert started.source.startswith("scheduler:")


def test_worker_dying_with_a_handed_job_loses_nothing(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("handoff-kill")
    a = wf.add(tt.add, 1, 2, id="a")
    s = wf.add(tt.suicide_once, a, id="s")  # handed to a's worker, which it kills on attempt 1
    wf.add(tt.add, s, 10, id="c")
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == {"a": 3, "s": 3, "c": 13}
    events = log_of(c.client, run_id)
    assert "s" in _handed(events), "attempt 1 of s was not handed over (the test would prove nothing)"
    assert res.tasks["s"].attempts == 2
    assert any(ev.type is EventType.TASK_PENDING and ev.task_id == "s" for ev in events)
    assert c.execs(run_id)["s"] == 2
    assert [ev.task_id for ev in events if ev.type is EventType.TASK_COMPLETED] == ["a", "s", "c"]


def test_handoff_scripts_settle_every_race_one_way(own_cluster: Cluster) -> None:
    """No workers here: the scheduler's and the worker's sides of the hand-off, called directly."""
    settings = Settings.from_env(own_cluster.env)
    container = container_for(settings)
    log, handoffs, keys = container.eventlog(), container.handoffs(), container.keys()
    r = own_cluster.redis
    lease = Lease(log, ttl_ms=10_000)
    assert lease.acquire()
    token = lease.token
    assert token is not None
    resign = Resign(r)
    signer = own_cluster.signer()

    claim = claim_of(new_nonce())

    def finished(worker: str, tid: str, waits_for: str = claim) -> None:
        data = {"result": 1, "worker": worker, constants.HANDOFF_CLAIM_KEY: waits_for}
        done = Event(EventType.TASK_COMPLETED, "run1", tid, 1, data)
        assert log.finish_attempts([done], waiting=worker) == [True]

    def offer(worker: str, tid: str, tok: str = token, offered: str = claim) -> list[bool]:
        data = {"worker": worker, "handoff": True, constants.CLAIM_KEY: offered}
        started = Event(EventType.TASK_STARTED, "run1", tid, 1, data)
        job = Job("run1", tid, 1, "nerv_testtasks.add", [1, 2], {})
        return log.append_fenced([], tok, [(started, job.to_wire(signer, "tok"))])

    # 1. The worker waits, the scheduler hands: the attempt is claimed for it, the job is on its list.
    finished("w1", "a")
    assert r.pttl(keys.handoff_waiting("w1")) > 0
    assert offer("w1", "b") == [True]
    assert r.hget(keys.claims("run1"), "b:1") == "w1"
    job = handoffs.take("w1", 1.0)
    assert job is not None and (job.task_id, job.args) == ("b", [1, 2])
    assert not r.exists(keys.handoff_waiting("w1"), keys.handoff("w1"))

    # 2. The worker stops waiting first: nothing is handed; the scheduler must send the job itself.
    finished("w2", "c")
    t0 = time.monotonic()
    assert handoffs.take("w2", constants.HANDOFF_WAIT_S) is None
    assert time.monotonic() - t0 >= constants.HANDOFF_WAIT_S * 0.9
    assert offer("w2", "d") == [False]
    assert r.hget(keys.claims("run1"), "d:1") is None and r.llen(keys.handoff("w2")) == 0

    # 3. The scheduler hands the job just as the worker's wait times out: resigning returns the job.
    finished("w3", "e")
    assert offer("w3", "f") == [True]
    raw = resign(waiting=keys.handoff_waiting("w3"), handoff_list=keys.handoff("w3"))
    assert raw is not None
    assert Job.from_wire(raw, signer).task_id == "f"
    assert not r.exists(keys.handoff_waiting("w3"), keys.handoff("w3"))

    # 4. A deposed scheduler hands nothing, and the worker's flag stays for the real leader.
    finished("w4", "g")
    with pytest.raises(LeaseLostError):
        offer("w4", "h", tok="not-the-token")
    assert r.exists(keys.handoff_waiting("w4")) and r.hget(keys.claims("run1"), "h:1") is None

    # 5. An outcome that was not recorded (a second one for the attempt) sets no waiting flag.
    again = Event(EventType.TASK_COMPLETED, "run1", "a", 1, {"result": 2, "worker": "w5"})
    assert log.finish_attempts([again], waiting="w5") == [False]
    assert not r.exists(keys.handoff_waiting("w5"))

    # 6. An offer for an earlier wait of a worker that now waits again (with another claim: the
    # scheduler had not read that outcome yet) hands nothing: only the claim's holder could finish it.
    finished("w6", "i", waits_for=claim_of(new_nonce()))
    assert offer("w6", "j") == [False]
    assert r.exists(keys.handoff_waiting("w6")) and r.hget(keys.claims("run1"), "j:1") is None


def test_cancel_terminates_a_handed_job_through_the_message_it_runs_in(cluster: Cluster) -> None:
    wf = Workflow("handoff-cancel")
    a = wf.add(tt.add, 1, 2, id="a")
    wf.add(tt.slow_marked, 4.0, dependencies=[a], id="long")  # handed over: runs in a's message
    run_id = cluster.client.submit(wf)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        events = log_of(cluster.client, run_id)
        if any(ev.type is EventType.TASK_STARTED and ev.task_id == "long" for ev in events):
            break
        time.sleep(0.05)
    assert "long" in _handed(events), "long was not handed over (the test would prove nothing)"
    (started,) = [ev for ev in events if ev.type is EventType.TASK_STARTED and ev.task_id == "long"]
    assert started.data["via"] == f"{run_id}:a:1"
    time.sleep(0.3)  # let it get into its sleep
    t0 = time.monotonic()
    cluster.client.cancel(run_id)
    res = cluster.client.wait(run_id, timeout=10)
    assert time.monotonic() - t0 <= 2.0
    assert res.status is RunStatus.CANCELLED
    time.sleep(4.5)  # longer than the task would have run
    assert cluster.redis.hgetall(f"test:marks:{run_id}") == {}, "the handed job must be terminated"


def test_with_handoff_off_every_job_travels_through_celery(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_HANDOFF"] = "false"
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("handoff-off")
    prev = wf.add(tt.counted, id="c0")
    for i in range(1, 10):
        prev = wf.add(tt.counted, prev, id=f"c{i}")
    res = c.client.wait(c.client.submit(wf), timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    events = log_of(c.client, res.run_id)
    assert _handed(events) == []
    started = [ev for ev in events if ev.type is EventType.TASK_STARTED]
    assert len(started) == 10 and all(ev.source.startswith("worker:") for ev in started)
    assert c.redis.keys(f"{c.client.keys.prefix}:handoff:*") == []
