"""``worker.runner.TaskRunner`` against an in-memory event log: when attempts are claimed, recorded,
held and given up (no Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from nerv_cluster import constants
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType
from nerv_cluster.outcomes import claim_of
from nerv_cluster.registry import Registry, task
from worker.held import HeldAttempts
from worker.runner import TaskRunner

REG = Registry()


class FakeLog:
    """Records every call the runner makes; claims say 'ok' unless told otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], list[str]]] = []
        self.verdicts: dict[str, str] = {}
        self.fail_finish = False

    def start_attempts(
        self,
        events: Sequence[Event],
        worker_id: str,
        max_takeovers: int,
        outcomes: Sequence[Event] = (),
        batch: bool = False,
    ) -> list[str]:
        kind = "start-batch" if batch else "start"
        self.calls.append((kind, [e.task_id or "" for e in events], [o.task_id or "" for o in outcomes]))
        if batch:
            assert all(e.data.get("batch") for e in events), "a batch claim marks its TASK_STARTED events"
        verdicts = [self.verdicts.get(e.task_id or "", "ok") for e in events]
        if not batch:  # a job claimed alone after its batch claim said so is claimed now
            verdicts = ["ok" if v == "strict" else v for v in verdicts]
        return verdicts

    def finish_attempts(self, events: Sequence[Event], waiting: str = "") -> list[bool]:
        if events:
            self.calls.append(("finish", [], [e.task_id or "" for e in events]))
        if self.fail_finish and events:
            raise ConnectionError("redis is away")
        return [True] * len(events)


@task(name="u.noop", registry=REG)
def noop(x: Any = None) -> Any:
    return x


def _runner(log: FakeLog, held: HeldAttempts | None = None, **kw: Any) -> TaskRunner:
    return TaskRunner(log, REG, "w1", 1 << 20, 3, held=held, **kw)  # type: ignore[arg-type]


def _job(tid: str, attempt: int = 1) -> Job:
    return Job("r", tid, attempt, "u.noop", [tid], {})


def test_a_packed_batch_is_claimed_in_one_round_trip_and_its_outcomes_recorded_together():
    log = FakeLog()
    outcomes = _runner(log).run_batch([_job("a"), _job("b"), _job("c")])
    assert outcomes == [EventType.TASK_COMPLETED] * 3
    assert log.calls == [("start-batch", ["a", "b", "c"], []), ("finish", [], ["a", "b", "c"])]


def test_a_batch_job_whose_holder_died_is_claimed_alone_right_before_it_runs():
    log = FakeLog()
    log.verdicts = {"b": "strict"}
    held = HeldAttempts()
    outcomes = _runner(log, held).run_batch([_job("a"), _job("b"), _job("c")])
    assert outcomes == [EventType.TASK_COMPLETED] * 3
    assert log.calls == [
        ("start-batch", ["a", "b", "c"], []),
        ("start", ["b"], ["a"]),  # b claimed alone, in the round trip that records a's outcome
        ("finish", [], ["b", "c"]),
    ]
    assert held.snapshot() == []


def test_a_lone_job_is_claimed_as_it_starts():
    log = FakeLog()
    assert _runner(log).run(_job("a")) is EventType.TASK_COMPLETED
    assert log.calls == [("start", ["a"], []), ("finish", [], ["a"])]


def test_a_refused_claim_is_skipped_and_the_batch_goes_on():
    log = FakeLog()
    log.verdicts = {"b": "done"}
    held = HeldAttempts()
    assert _runner(log, held).run_batch([_job("a"), _job("b"), _job("c")]) == [EventType.TASK_COMPLETED] * 2
    assert log.calls[-1] == ("finish", [], ["a", "c"])
    assert held.snapshot() == [], "nothing stays held once the batch is over"


def test_a_copy_of_an_attempt_this_process_holds_is_refused_without_asking_redis():
    log = FakeLog()
    held = HeldAttempts()
    held.acquire(_job("a").id)  # another thread of this process runs it
    assert _runner(log, held).run(_job("a")) is None
    assert log.calls == []
    assert held.snapshot() == [_job("a").id], "the first copy still holds it"


def test_an_attempt_whose_outcome_cannot_be_recorded_is_given_up():
    log = FakeLog()
    log.fail_finish = True
    held = HeldAttempts()
    with pytest.raises(ConnectionError):
        _runner(log, held).run(_job("a"))
    assert held.snapshot() == [], "a process that could not record the outcome no longer holds it"


class ClaimLog(FakeLog):
    """Keeps the events: the claims TASK_STARTED names and the nonces outcomes present."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def start_attempts(self, events: Sequence[Event], *args: Any, **kw: Any) -> list[str]:
        self.events += [*kw.get("outcomes", ()), *events]
        return super().start_attempts(events, *args, **kw)

    def finish_attempts(self, events: Sequence[Event], waiting: str = "") -> list[bool]:
        self.events += events
        return super().finish_attempts(events, waiting)


def test_an_outcome_presents_the_nonce_of_its_claim_and_a_second_claim_names_the_same_one():
    """The scheduler takes an outcome only with the nonce of the claim it folded; a process that claims
    an attempt again (its job resent after the outcome could not be recorded) must name that claim."""
    log = ClaimLog()
    log.fail_finish = True
    runner = _runner(log)
    with pytest.raises(ConnectionError):
        runner.run(_job("a"))
    log.fail_finish = False
    assert runner.run(_job("a")) is EventType.TASK_COMPLETED
    starts = [e for e in log.events if e.type is EventType.TASK_STARTED]
    outcomes = [e for e in log.events if e.type is EventType.TASK_COMPLETED]
    assert len(starts) == 2 and len(outcomes) == 2
    claims = {e.data[constants.CLAIM_KEY] for e in starts}
    nonces = {e.data[constants.NONCE_KEY] for e in outcomes}
    assert len(claims) == 1 and {claim_of(n) for n in nonces} == claims
    # Another attempt, another claim.
    runner.run(_job("a", 2))
    assert log.events[-2].data[constants.CLAIM_KEY] not in claims


def test_jobs_are_held_while_they_run():
    seen: list[list[str]] = []
    held = HeldAttempts()

    @task(name="u.peek", registry=REG)
    def peek() -> None:
        seen.append(held.snapshot())

    log = FakeLog()
    _runner(log, held).run_batch([Job("r", "p1", 1, "u.peek", [], {}), Job("r", "p2", 1, "u.peek", [], {})])
    assert seen == [["r:p1:1", "r:p2:1"]] * 2, "a batch holds what it claimed until it is recorded"
    assert held.snapshot() == []


def test_no_handoff_wait_once_shutdown_began():
    class Handoffs:
        taken = 0

        def take(self, worker_id: str, timeout: float) -> None:
            Handoffs.taken += 1

    log = FakeLog()
    job = Job("r", "a", 1, "u.noop", [], {}, handoff=True)
    runner = _runner(log, handoffs=Handoffs(), stopping=lambda: True)  # type: ignore[arg-type]
    assert runner.serve([job]) == 1
    assert Handoffs.taken == 0
    runner = _runner(log, handoffs=Handoffs(), stopping=lambda: False)  # type: ignore[arg-type]
    assert runner.serve([job]) == 1
    assert Handoffs.taken == 1


def test_no_handoff_wait_when_shutdown_began_during_the_job():
    """SIGTERM while a job runs (``docker stop`` mid-task): its outcome offers this process no hand-off."""

    class Handoffs:
        taken = 0

        def take(self, worker_id: str, timeout: float) -> None:
            Handoffs.taken += 1

    stopping = [False]

    @task(name="u.sigterm_midway", registry=REG)
    def sigterm_midway() -> int:
        stopping[0] = True
        return 1

    class WaitingLog(FakeLog):
        waiting: list[str] = []

        def finish_attempts(self, events: Sequence[Event], waiting: str = "") -> list[bool]:
            self.waiting.append(waiting)
            return super().finish_attempts(events, waiting)

    log = WaitingLog()
    job = Job("r", "a", 1, "u.sigterm_midway", [], {}, handoff=True)
    runner = _runner(log, handoffs=Handoffs(), stopping=lambda: stopping[0])  # type: ignore[arg-type]
    assert runner.serve([job]) == 1
    assert Handoffs.taken == 0 and set(log.waiting) == {""}, "a stopping worker waited for a hand-off"
