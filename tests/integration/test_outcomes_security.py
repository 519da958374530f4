"""Workers write only their attempts' claims and outcomes; jobs are signed (README.md#security).

Real processes: forged feed entries, unsigned and altered jobs (on a Celery queue and on a waiting
worker's hand-off list), a worker presenting another attempt's token, and a scheduler killed while
workers' outcomes wait on the feed untranscribed.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import nerv_testtasks as tt
import pytest
from celery import Celery

from nerv_cluster import EventType, RunStatus, Workflow
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event
from nerv_cluster.outcomes import claim_of, new_nonce
from nerv_cluster.signing import Signer
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(120)


def _wait(what: str, done, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _logged(c: Cluster, run_id: str, kind: EventType, task_id: str | None = None) -> list[Event]:
    return [
        ev
        for ev in log_of(c.client, run_id)
        if ev.type is kind and (task_id is None or ev.task_id == task_id)
    ]


def _logs(c: Cluster) -> str:
    return "".join(Path(p.log_path).read_text(errors="replace") for p in c.procs)  # type: ignore[attr-defined]


def _xadd(c: Cluster, ev: Event, token: str | None = None) -> None:
    fields = {"e": ev.to_json()}
    if token is not None:
        fields["t"] = token
    c.redis.xadd(c.client.keys.feed, fields)


def test_forged_feed_entries_are_dropped_and_the_run_completes_with_its_own_results(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("forged")
    a = wf.add(tt.slow, 1.5, id="a")
    wf.add(tt.slow, 1.5, dependencies=[a], id="b")
    run_id = c.client.submit(wf)
    _wait("a to start", lambda: _logged(c, run_id, EventType.TASK_STARTED, "a"))
    forged = [
        # no token, a made-up token, another attempt's token, a run's outcome, an attempt never sent
        (Event(EventType.TASK_COMPLETED, run_id, "a", 1, {"result": 666}, source="worker:evil"), None),
        (Event(EventType.TASK_COMPLETED, run_id, "a", 1, {"result": 667}, source="worker:evil"), "0" * 32),
        (Event(EventType.TASK_FAILED, run_id, "a", 1, {"error": {}}), c.token(run_id, "b", 1)),
        (Event(EventType.WORKFLOW_COMPLETED, run_id, data={}, source="scheduler:evil"), None),
        (Event(EventType.TASK_STARTED, run_id, "b", 3, {"worker": "evil"}), c.token(run_id, "b", 3)),
        (Event(EventType.TASK_COMPLETED, "no-such-run", "a", 1, {"result": 1}), None),
    ]
    for ev, token in forged:
        _xadd(c, ev, token)
    # A copy of a's real completion (its own token), once b runs: a second outcome of a, dropped.
    _wait("b to start", lambda: _logged(c, run_id, EventType.TASK_STARTED, "b"))
    feed = c.redis.xrange(c.client.keys.feed)
    own = c.token(run_id, "a", 1)
    real = next(
        f
        for _, f in feed
        if f.get("t", "").startswith(f"{own}.") and Event.from_json(f["e"]).type is EventType.TASK_COMPLETED
    )
    copy = Event.from_json(real["e"])
    _xadd(c, Event(copy.type, run_id, "a", 1, {"result": 668}, source=copy.source), real["t"])

    res = c.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == {"a": 1.5, "b": 1.5}
    events = log_of(c.client, run_id)
    ids = {ev.id for ev, _ in forged}
    assert not [ev for ev in events if ev.id in ids], "a forged event reached the log"
    completed = Counter(ev.task_id for ev in events if ev.type is EventType.TASK_COMPLETED)
    assert completed == {"a": 1, "b": 1}
    assert [ev.type for ev in events].count(EventType.WORKFLOW_COMPLETED) == 1
    assert c.execs(run_id) == {"a": 1, "b": 1}
    logs = _logs(c)
    assert logs.count("dropped feed entry") >= len(forged) + 1, logs[-3000:]  # each once, the copy too
    assert "WORKFLOW_COMPLETED is not written to the feed" in logs
    assert "no valid claim token" in logs and "not one the scheduler runs" in logs
    assert "attempt 3 of 'b' was never dispatched" in logs and "has its outcome already" in logs
    # No token ever reaches a log (it is a credential for its attempt).
    assert all("tok" not in ev.data for ev in events)


def test_unsigned_and_altered_jobs_are_refused_on_queues_and_hand_offs(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    keys = c.client.keys
    # 1. Through Celery: an unsigned job, and a signed one whose arguments were changed on the way.
    evil = Celery("evil", broker=c.redis_url, set_as_current=False)
    # Into the namespace's queues (kombu's key prefix, as the cluster's own Celery app uses it).
    evil.conf.broker_transport_options = {"global_keyprefix": keys.celery}
    plain = {"r": "injected", "k": "x", "a": 1, "fn": "nerv_testtasks.counted"}
    evil.send_task("nerv_testtasks.counted", args=[plain], queue="cpu", routing_key="cpu")
    wire = Job("injected", "y", 1, "nerv_testtasks.counted", [1], {}).to_wire(c.signer(), "tok")
    altered = wire.replace('"args":[1]', '"args":[2]')
    assert altered != wire
    evil.send_task("nerv_testtasks.counted", args=[altered], queue="cpu", routing_key="cpu")
    forged_key = Signer(b"not the cluster's key").seal(json.dumps({**plain, "k": "z"}))
    evil.send_task("nerv_testtasks.counted", args=[forged_key], queue="cpu", routing_key="cpu")
    _wait("the refusals", lambda: _logs(c).count("refused job injected:") >= 3)
    logs = _logs(c)
    assert "injected:x:1" in logs and "injected:y:1" in logs and "injected:z:1" in logs
    refusals = [line for line in logs.splitlines() if "refused job" in line]
    assert not [line for line in refusals if "args" in line], "a refusal never logs the job's arguments"

    # 2. On the hand-off list of a worker that is about to wait for its chain's next job.
    wf = Workflow("learn-worker")
    wf.add(tt.add, 1, 2, id="one")
    first = c.client.submit(wf)
    assert c.client.wait(first, timeout=30).results == {"one": 3}
    worker = str(_logged(c, first, EventType.TASK_STARTED)[0].data["worker"])
    bad = Job("injected", "h", 1, "nerv_testtasks.counted", [], {}).to_wire(c.signer(), "tok")
    c.redis.rpush(
        keys.handoff(worker), bad.replace('"fn":"nerv_testtasks.counted"', '"fn":"nerv_testtasks.add"')
    )
    chain = Workflow("handed")
    x = chain.add(tt.add, 1, 1, id="x")
    chain.add(tt.add, x, 1, id="y")  # handed to x's worker, which first pops the altered job
    run_id = c.client.submit(chain)
    res = c.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.COMPLETED and res.results == {"x": 2, "y": 3}
    _wait("the hand-off refusal", lambda: "refused job injected:h:1 handed to" in _logs(c))
    assert c.execs("injected") == {}, "a refused job must never run"
    # Nothing recorded for the injected run: no claim, no outcome, no feed entry.
    assert not c.redis.exists(keys.claims("injected"), keys.outcomes("injected"), keys.log("injected"))
    assert not [f for _, f in c.redis.xrange(keys.feed) if '"r":"injected"' in f["e"]]


def test_another_attempts_token_gets_a_worker_nothing(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    log = c.client.log
    wf = Workflow("stolen-token")
    wf.add(tt.add, 1, 2, id="a")
    wf.add(tt.add, 3, 4, id="b")
    run_id = c.client.submit(wf)  # no workers yet: both wait, dispatched
    _wait("both dispatched", lambda: len(_logged(c, run_id, EventType.TASK_DISPATCHED)) == 2)
    stolen = c.token(run_id, "a", 1)  # a worker given a's job presents its token for b
    started = Event(EventType.TASK_STARTED, run_id, "b", 1, {"worker": "evil", "tok": stolen})
    assert log.start_attempts([started], "evil", 3) == ["ok"]  # a claim: the worker's own business
    done = Event(EventType.TASK_COMPLETED, run_id, "b", 1, {"result": 99, "worker": "evil", "tok": stolen})
    assert log.finish_attempts([done]) == [True]
    _wait("the warnings", lambda: _logs(c).count("no valid claim token for attempt 1 of 'b'") >= 2)
    assert not _logged(c, run_id, EventType.TASK_STARTED), "nothing is logged for b"
    assert not _logged(c, run_id, EventType.TASK_COMPLETED)
    status = c.client.status(run_id)
    assert status.tasks["b"].result is None and status.status is RunStatus.RUNNING
    # a's own token works: a's real worker completes it.
    c.worker("cpu", 1)
    _wait("a to complete", lambda: _logged(c, run_id, EventType.TASK_COMPLETED, "a"))
    assert [ev.data["result"] for ev in _logged(c, run_id, EventType.TASK_COMPLETED)] == [3]
    c.client.cancel(run_id)  # b's outcome slot is the forger's: it cannot complete (README.md#security)


def test_a_running_attempts_token_read_off_the_feed_completes_nothing(own_cluster: Cluster) -> None:
    """Every worker can read the queues and the feed, which carry attempts' tokens: the token alone must
    not let one worker complete, or claim away, an attempt another live worker runs."""
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    wf = Workflow("read-token")
    wf.add(tt.slow, 3.0, id="a")
    run_id = c.client.submit(wf)
    _wait("a to start", lambda: _logged(c, run_id, EventType.TASK_STARTED, "a"))
    real = _logged(c, run_id, EventType.TASK_STARTED, "a")[0]
    holder, claim = str(real.data["worker"]), str(real.data["claim"])
    token = next(
        f["t"]
        for _, f in c.redis.xrange(c.client.keys.feed)
        if "t" in f and Event.from_json(f["e"]).type is EventType.TASK_STARTED
    )
    assert token == c.token(run_id, "a", 1)
    mine = new_nonce()
    forged = [
        # the token alone, a made-up nonce, the claim itself (the hash, readable in the log)
        (Event(EventType.TASK_COMPLETED, run_id, "a", 1, {"result": 666, "worker": "evil"}), token),
        (Event(EventType.TASK_COMPLETED, run_id, "a", 1, {"result": 667}), f"{token}.{new_nonce()}"),
        (Event(EventType.TASK_FAILED, run_id, "a", 1, {"error": {}}), f"{token}.{claim}"),
        # a takeover of the live holder's attempt, then an outcome with the thief's own nonce
        (
            Event(EventType.TASK_STARTED, run_id, "a", 1, {"worker": "evil", "claim": claim_of(mine)}),
            token,
        ),
        (Event(EventType.TASK_COMPLETED, run_id, "a", 1, {"result": 668}), f"{token}.{mine}"),
        # a start in the holder's own name (a copy: dropped), then the thief's nonce again
        (
            Event(EventType.TASK_STARTED, run_id, "a", 1, {"worker": holder, "claim": claim_of(mine)}),
            token,
        ),
        (Event(EventType.TASK_COMPLETED, run_id, "a", 1, {"result": 669}), f"{token}.{mine}"),
    ]
    for ev, presented in forged:
        _xadd(c, ev, presented)
    res = c.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == {"a": 3.0}
    events = log_of(c.client, run_id)
    ids = {ev.id for ev, _ in forged}
    assert not [ev for ev in events if ev.id in ids], "a forged event reached the log"
    assert [ev.data["worker"] for ev in events if ev.type is EventType.TASK_STARTED] == [holder]
    assert c.execs(run_id) == {"a": 1}
    logs = _logs(c)
    assert logs.count("no nonce of the claim on attempt 1 of 'a'") >= 5, logs[-3000:]
    assert f"attempt 1 of 'a' is running on {holder}, which is alive" in logs
    # Neither a token nor a nonce ever reaches a log (credentials of their attempt).
    assert all("tok" not in ev.data and "nonce" not in ev.data for ev in events)


def test_a_scheduler_killed_before_transcribing_loses_no_outcome(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 4)
    wf = Workflow("untranscribed")
    legs = [wf.add(tt.slow, 1.5, id=f"leg{i}") for i in range(4)]
    wf.add(tt.counted, *legs, id="join")
    run_id = c.client.submit(wf)
    outcomes = c.client.keys.outcomes(run_id)
    _wait("every leg to run", lambda: sum(c.execs(run_id).values()) == 4)
    c.kill(sched, signal.SIGSTOP)  # the leader hears nothing more: the legs' outcomes wait on the feed
    _wait("every leg's outcome", lambda: len([f for f in c.redis.hkeys(outcomes) if "#" not in f]) == 4)
    assert not _logged(c, run_id, EventType.TASK_COMPLETED), "the frozen leader transcribed nothing"
    c.kill(sched, signal.SIGKILL)
    c.scheduler()
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["join"] == [f"leg{i}" for i in range(4)]
    events = log_of(c.client, run_id)
    completed = Counter(ev.task_id for ev in events if ev.type is EventType.TASK_COMPLETED)
    assert completed == {**{f"leg{i}": 1 for i in range(4)}, "join": 1}, "each outcome logged once"
    assert c.execs(run_id) == {**{f"leg{i}": 1 for i in range(4)}, "join": 1}, "nothing ran again"
    # Cause before effect: every leg's completion is logged before the join is dispatched.
    order = [(ev.type, ev.task_id) for ev in events]
    join_sent = order.index((EventType.TASK_DISPATCHED, "join"))
    assert all(order.index((EventType.TASK_COMPLETED, f"leg{i}")) < join_sent for i in range(4))


def test_a_transcription_is_written_once_with_the_feed_position(own_cluster: Cluster) -> None:
    """The fenced write itself: an outcome transcribed twice (a new leader reading the feed again) is
    logged once, a TASK_STARTED is not guarded (the check drops its copies), the position is recorded."""
    from scheduler.lease import Lease

    c = own_cluster
    log, keys = c.client.log, c.client.keys
    lease = Lease(log, ttl_ms=10_000)
    assert lease.acquire() and lease.token is not None
    done = Event(EventType.TASK_COMPLETED, "run1", "a", 1, {"result": 1, "worker": "w1"}).to_json()
    for position in ("5-0", "6-0"):
        log.append_fenced([], lease.token, transcripts=[("run1", "a:1", done)], position=position)
    logged = [f["e"] for _, f in c.redis.xrange(keys.log("run1"))]
    assert logged == [done]
    assert c.redis.get(keys.transcribed) == "6-0" and log.transcribed_position() == "6-0"
    assert c.redis.hget(keys.outcomes("run1"), "a:1#t") == "1"


def test_the_first_leader_records_the_feed_position_it_starts_from(own_cluster: Cluster) -> None:
    """Before any worker event: a leader that died after reading some and before its first write must
    not leave the next one only the feed's tail (past what it read)."""
    c = own_cluster
    c.redis.xadd(c.client.keys.feed, {"e": "an entry before the cluster's first leader"})
    tail = c.redis.xrevrange(c.client.keys.feed, count=1)[0][0]
    assert c.client.log.transcribed_position() is None
    c.scheduler()
    c.wait_leader()
    _wait("the position recorded", lambda: c.client.log.transcribed_position() is not None, timeout=10)
    assert c.client.log.transcribed_position() == tail
