"""One clock for deadlines (issue 10, point 6): events read from the log carry Redis's time, the fold
dates starts and retry due times with it, the watchdog compares it with the scheduler's clock, which
follows Redis's ``TIME``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from nerv_cluster import constants
from nerv_cluster import state as st
from nerv_cluster.eventlog import _decode, logged_at
from nerv_cluster.model import Event, EventType, RetryPolicy
from nerv_cluster.settings import Settings
from scheduler.clock import RedisClock
from scheduler.watchdog import overdue
from tests.unit.helpers import RUN, ev, run_of, submitted, td, wdef

E = EventType
#: Redis's time in these tests, and a worker clock 45 s behind it.
NOW = 1_800_000_000.0
BEHIND = NOW - 45


def _logged(event: Event, at: float) -> Event:
    return replace(event, logged_at=at)


def test_a_read_event_carries_the_time_redis_logged_it() -> None:
    raw = Event(E.TASK_STARTED, RUN, "a", 1, {"worker": "w1"}, ts=BEHIND)
    assert logged_at("1800000000123-7") == pytest.approx(1_800_000_000.123)
    ((eid, got),) = _decode([("1800000000123-7", {constants.EVENT_FIELD: raw.to_json()})])
    assert eid == "1800000000123-7"
    assert got.logged_at == pytest.approx(1_800_000_000.123) and got.ts == BEHIND
    # Not part of the event: not on the wire, and not in its identity.
    assert "logged_at" not in raw.to_json() and got == raw
    assert Event.from_json(raw.to_json()).logged_at is None


def _running_a(started: Event) -> st.RunState:
    state = st.fold(
        [
            submitted(wdef(td("a", timeout=20.0, retry=RetryPolicy(max_retries=2, backoff=0.5)))),
            ev(E.WORKFLOW_STARTED),
            ev(E.TASK_DISPATCHED, "a", 1, queue="cpu"),
            started,
        ]
    )
    return run_of(state)


def test_the_fold_dates_a_start_by_the_log_not_by_the_worker() -> None:
    started = Event(E.TASK_STARTED, RUN, "a", 1, {"worker": "w1"}, ts=BEHIND)
    assert _running_a(_logged(started, NOW)).tasks["a"].started_at == NOW
    # Made in memory (no log time): its own ts, the only date it has.
    assert _running_a(started).tasks["a"].started_at == BEHIND


def test_a_takeover_is_ordered_by_the_log_clock() -> None:
    first = _logged(Event(E.TASK_STARTED, RUN, "a", 1, {"worker": "w1"}, ts=NOW), NOW)
    run = _running_a(first)
    # w2 took the attempt over later, though its clock says earlier.
    later = _logged(Event(E.TASK_STARTED, RUN, "a", 1, {"worker": "w2"}, ts=BEHIND), NOW + 5)
    ts = st.apply_to_run(run, later).tasks["a"]  # type: ignore[union-attr]
    assert (ts.worker, ts.started_at, ts.lost) == ("w2", NOW + 5, 1)


def test_a_retry_is_due_after_its_delay_on_the_log_clock() -> None:
    run = _running_a(_logged(Event(E.TASK_STARTED, RUN, "a", 1, {"worker": "w1"}, ts=NOW), NOW))
    ahead = NOW + 3600
    retrying = Event(
        E.TASK_RETRYING, RUN, "a", 1, {"next_attempt": 2, "delay": 0.5, "due_at": ahead + 0.5}, ts=ahead
    )
    logged = st.apply_to_run(run, _logged(retrying, NOW + 1))
    assert logged is not None and logged.tasks["a"].due_at == NOW + 1.5
    in_memory = st.apply_to_run(run, retrying)  # the scheduler's own, on its clock
    assert in_memory is not None and in_memory.tasks["a"].due_at == ahead + 0.5


def test_the_watchdog_times_a_task_from_its_logged_start() -> None:
    settings = Settings()
    run = _running_a(_logged(Event(E.TASK_STARTED, RUN, "a", 1, {"worker": "w1"}, ts=BEHIND), NOW))
    assert overdue(run, settings, NOW + 1, "scheduler:1") == []
    late = overdue(run, settings, NOW + 20 + constants.TIMEOUT_GRACE_S, "scheduler:1")
    assert [(v.task_id, v.event.type) for v in late] == [("a", E.TASK_RETRYING)]


class _FakeRedis:
    def __init__(self) -> None:
        self.now = NOW
        self.calls = 0
        self.down = False

    def time(self) -> tuple[int, int]:
        self.calls += 1
        if self.down:
            raise redis.ConnectionError("down")
        return int(self.now), round((self.now % 1) * 1e6)


def test_the_redis_clock_follows_redis_time_between_samples() -> None:
    server, mono = _FakeRedis(), [100.0]
    clock = RedisClock(server, period_s=5.0, monotonic=lambda: mono[0])
    assert clock() == NOW and server.calls == 1
    mono[0] += 2.0
    assert clock() == NOW + 2.0 and server.calls == 1  # advanced locally, no round trip
    # Redis's clock runs ahead of the local one: the next sample follows it.
    mono[0] += 3.0
    server.now = NOW + 5.5
    assert clock() == NOW + 5.5 and server.calls == 2
    # A sample behind the last reading never moves the clock back.
    mono[0] += 4.5
    assert clock() == NOW + 10.0 and server.calls == 2
    mono[0] += 0.5
    server.now = NOW + 9.0
    assert clock() == NOW + 10.0 and server.calls == 3
    # Redis away: the last sample goes on, advanced locally; it is tried again one period later.
    server.down = True
    mono[0] += 5.0
    assert clock() == NOW + 14.0 and server.calls == 4
    mono[0] += 1.0
    assert clock() == NOW + 15.0 and server.calls == 4


def test_the_redis_clock_needs_one_sample_to_start() -> None:
    server = _FakeRedis()
    server.down = True
    clock = RedisClock(server, monotonic=lambda: 1.0)
    with pytest.raises(redis.ConnectionError):
        clock()
    server.down = False
    assert clock() == NOW
