"""Races between the scheduler's writes and what happens around them, against a real Redis (issue 10,
point 8): a fenced write whose reply is lost and resent by redis-py, a checkpoint written after its run
was closed, and a cancel that meets a worker finishing the same attempt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.connection import AbstractConnection

from nerv_cluster import EventType, Settings
from nerv_cluster.client import connect
from nerv_cluster.eventlog import EventLog
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event
from nerv_cluster.outcomes import claim_of, new_nonce
from scheduler.lease import Lease
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def parts(own_cluster: Cluster) -> Iterator[tuple[Settings, EventLog, Lease, Any]]:
    """The settings, an event log on a client that retries like every nerv process's, and a held lease."""
    settings = Settings.from_env(own_cluster.env)
    client = connect(settings)
    log = EventLog(client, settings.keys())
    lease = Lease(log, ttl_ms=30_000)
    assert lease.acquire()
    try:
        yield settings, log, lease, client
    finally:
        client.close()


def _lose_next_reply(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the next reply read from Redis raise a connection error after the server ran the command,
    as when the connection drops just then: redis-py's retry resends the command. Returns a list that
    holds a 1 once the reply was dropped."""
    real = AbstractConnection.read_response
    dropped: list[int] = []

    def read_response(self: AbstractConnection, *args: Any, **kwargs: Any) -> Any:
        reply = real(self, *args, **kwargs)
        if not dropped:
            dropped.append(1)
            raise redis.ConnectionError("the reply was lost (test)")
        return reply

    monkeypatch.setattr(AbstractConnection, "read_response", read_response)
    return dropped


def test_a_resent_fenced_append_with_a_handoff_is_applied_once(
    parts: tuple[Settings, EventLog, Lease, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, log, lease, client = parts
    keys = log.keys
    token = lease.token
    assert token is not None
    claim = claim_of(new_nonce())
    done = Event(
        EventType.TASK_COMPLETED, "run1", "a", 1, {"result": 3, "worker": "w1", "handoff_claim": claim}
    )
    assert log.finish_attempts([done], waiting="w1") == [True]  # w1 now waits for a hand-off
    dispatched = Event(EventType.TASK_DISPATCHED, "run1", "b", 1, {"queue": "cpu"})
    started = Event(EventType.TASK_STARTED, "run1", "b", 1, {"worker": "w1", "handoff": True, "claim": claim})
    job = Job("run1", "b", 1, "nerv_testtasks.add", [1, 2], {})
    client.script_load(log.scripts.fenced_append.source)  # so the one call below is the script itself
    before = client.xlen(keys.log("run1"))

    dropped = _lose_next_reply(monkeypatch)
    handed = log.append_fenced([dispatched], token, [(started, json.dumps(job.to_dict()))])
    monkeypatch.undo()

    assert dropped == [1], "no reply was lost: the test proves nothing"
    assert handed == [True], "the hand-off was made, so the scheduler must not also send the job"
    written = [Event.from_json(f["e"]).id for _, f in client.xrange(keys.log("run1"))][before:]
    assert written == [dispatched.id, started.id], "each event is written once"
    assert client.lrange(keys.handoff("w1"), 0, -1) == [json.dumps(job.to_dict())]
    assert client.hget(keys.claims("run1"), "b:1") == "w1"


def test_a_checkpoint_written_after_its_run_was_closed_expires_with_it(
    parts: tuple[Settings, EventLog, Lease, Any],
) -> None:
    _, log, _, client = parts
    keys = log.keys
    checkpoint = {"upto": "1-0", "count": 1, "state": {}}
    for rid in ("open", "done", "late"):
        client.xadd(keys.log(rid), {"e": "{}"})  # each run's log, as submit.lua leaves it
    log.write_checkpoint("open", checkpoint)
    assert client.ttl(keys.checkpoint("open")) == -1, "an active run's checkpoint is kept"
    log.write_checkpoint("done", checkpoint)
    log.close_runs(["done", "late"], retention_seconds=600)
    assert 0 < client.ttl(keys.checkpoint("done")) <= 600
    # The checkpointer thread is late: the runs were closed meanwhile.
    log.write_checkpoint("done", checkpoint)
    log.write_checkpoint("late", checkpoint)
    assert client.ttl(keys.checkpoint("done")) > 0, "a closed run's checkpoint never expires"
    assert client.ttl(keys.checkpoint("late")) != -1, "a closed run's checkpoint never expires"
    assert json.loads(client.get(keys.checkpoint("open"))) == checkpoint
    assert log.write_checkpoint("open", checkpoint) is True
    assert log.write_checkpoint("late", checkpoint) is False


class _Dispatcher:
    """Stands in for Celery: records what the scheduler would send and revoke."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.revoked: list[str] = []

    def send(self, messages: list[tuple[list[Job], str]]) -> None:
        self.sent.extend(job.id for jobs, _ in messages for job in jobs)

    def revoke(self, job_ids: list[str]) -> None:
        self.revoked.extend(job_ids)


_OUTCOMES = {
    EventType.TASK_COMPLETED,
    EventType.TASK_FAILED,
    EventType.TASK_RETRYING,
    EventType.TASK_CANCELLED,
}


def test_cancel_meeting_a_completion_keeps_log_and_outcomes_in_agreement(
    parts: tuple[Settings, EventLog, Lease, Any], own_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler has read the cancel request; a worker records the completion of one running
    attempt before the scheduler acts on it. That attempt keeps its completion, in the log as in the
    outcomes hash; the other running attempt is cancelled, and its worker can no longer record one."""
    import nerv_testtasks as tt

    from nerv_cluster import RunStatus, TaskStatus, Workflow
    from scheduler.service import SchedulerService

    settings, log, lease, client = parts
    keys = log.keys
    service = SchedulerService(settings, log, lease, _Dispatcher())  # type: ignore[arg-type]
    service.become_leader()
    wf = Workflow("cancel-race")
    wf.add(tt.add, 1, 2, id="a")
    wf.add(tt.add, 3, 4, id="b")
    # The client waits for this service's answer (issue 13), which it gives as it steps.
    submitted = own_cluster.ask_later(
        own_cluster.client.submit, wf, run_id="cancel-race-1", check_names=False
    )
    run_id = "cancel-race-1"

    def step_until(done: Any) -> None:
        for _ in range(50):
            service.step()
            if done(service.state.runs.get(run_id)):
                return
        raise AssertionError(f"the scheduler never got there: {service.state.runs.get(run_id)}")

    step_until(lambda run: run is not None and len(run.queued) == 2)
    assert submitted.result(timeout=10) == run_id
    tok = {t: own_cluster.token(run_id, t, 1) for t in "ab"}
    nonce = {t: new_nonce() for t in "ab"}  # the worker's claims: only it can finish the attempts
    started = [
        Event(
            EventType.TASK_STARTED, run_id, t, 1, {"worker": "w1", "tok": tok[t], "claim": claim_of(nonce[t])}
        )
        for t in "ab"
    ]
    assert log.start_attempts(started, "w1", 3) == ["ok", "ok"]
    step_until(lambda run: run is not None and len(run.running) == 2)

    real_read = log.read_feed
    done = {"result": 3, "worker": "w1", "tok": tok["a"], "nonce": nonce["a"]}
    completed = Event(EventType.TASK_COMPLETED, run_id, "a", 1, done)

    def read_then_complete(
        after: str, count: int, block_ms: int | None, intake_after: str | None = None
    ) -> Any:
        entries = real_read(after, count, block_ms, intake_after)
        if any(json.loads(fields["q"])["op"] == "cancel" for _, fields in entries.intake):
            # The worker finishes a after the scheduler read the cancel, before it acts on it.
            assert log.finish_attempt(completed)
        return entries

    monkeypatch.setattr(log, "read_feed", read_then_complete)
    cancelled = own_cluster.ask_later(own_cluster.client.cancel, run_id, "stop")
    step_until(lambda run: run is None)  # finished and closed
    cancelled.result(timeout=10)
    monkeypatch.undo()
    late = Event(
        EventType.TASK_COMPLETED,
        run_id,
        "b",
        1,
        {"result": 7, "worker": "w1", "tok": tok["b"], "nonce": nonce["b"]},
    )
    assert not log.finish_attempt(late), "b was cancelled: its worker records nothing"

    # (field#t: the scheduler's mark that it transcribed that outcome into the log)
    outcomes = {f: v for f, v in client.hgetall(keys.outcomes(run_id)).items() if "#" not in f}
    logged: dict[str, list[str]] = {}
    for _, ev in log.read_run(run_id):
        if ev.type in _OUTCOMES and ev.task_id is not None:
            logged.setdefault(f"{ev.task_id}:{ev.attempt}", []).append(ev.type.value)
    assert logged == {"a:1": ["TASK_COMPLETED"], "b:1": ["TASK_CANCELLED"]}, "log and outcomes differ"
    assert outcomes == {"a:1": "TASK_COMPLETED", "b:1": "TASK_CANCELLED"}
    res = own_cluster.client.status(run_id)
    assert res.status is RunStatus.CANCELLED
    assert res.tasks["a"].status is TaskStatus.COMPLETED and res.tasks["a"].result == 3
    assert res.tasks["b"].status is TaskStatus.CANCELLED
    # (a's message may be revoked twice: the run is decided again until a's completion is read)
    revoked = sorted(set(service.effects.dispatcher.revoked))  # type: ignore[attr-defined]
    assert revoked == [f"{run_id}:a:1", f"{run_id}:b:1"]
