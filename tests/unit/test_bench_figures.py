"""The benchmarks' pure computations (issue 14): percentiles, level latency from events, the ramp's
stop rule, /proc status parsing, CPU by role."""

from __future__ import annotations

import math

import pytest

from bench import latency, memwatch
from bench.engines import Measurement
from bench.harness import role_delta
from bench.load import BACKLOG, GENERATOR, OK, P99, ramp_rates, ramp_verdict
from nerv_cluster.model import Event, EventType


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert latency.percentile(values, 50) == 3.0
    assert latency.percentile(values, 100) == 5.0
    assert latency.percentile(values, 0) == 1.0
    assert latency.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # the lower middle, a measured value
    assert latency.percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert math.isnan(latency.percentile([], 50))
    with pytest.raises(ValueError):
        latency.percentile([1.0], 101)


def _submitted(deps: dict[str, list[str]]) -> Event:
    tasks = [{"id": t, "fn": "bench.noop", **({"deps": d} if d else {})} for t, d in deps.items()]
    return Event(EventType.WORKFLOW_SUBMITTED, "r", data={"workflow": {"name": "w", "tasks": tasks}}, ts=0.0)


def _ev(kind: EventType, task: str, ts: float | None, logged: float | None, attempt: int = 1) -> Event:
    """An event as read from a log: ``ts`` its writer's clock (None: unusable), ``logged`` Redis's."""
    return Event(kind, "r", task, attempt, ts=math.nan if ts is None else ts, logged_at=logged)


def test_level_latency_is_started_minus_the_latest_dependency_completed() -> None:
    events = [
        _submitted({"a": [], "b": [], "c": ["a", "b"], "d": ["c"]}),
        _ev(EventType.TASK_STARTED, "a", 1.0, 1.0),
        _ev(EventType.TASK_COMPLETED, "a", 1.010, 1.010),
        _ev(EventType.TASK_STARTED, "b", 1.0, 1.0),
        _ev(EventType.TASK_COMPLETED, "b", 1.020, 1.021),
        _ev(EventType.TASK_STARTED, "c", 1.023, 1.025),
        _ev(EventType.TASK_COMPLETED, "c", 1.030, 1.031),
        _ev(EventType.TASK_STARTED, "d", 1.032, 1.036),
    ]
    values, clock = latency.level_latencies(events)
    assert clock == latency.WRITER
    assert sorted(round(v, 6) for v in values) == [0.002, 0.003]  # d: 1.032 - 1.030; c: 1.023 - 1.020
    values, clock = latency.level_latencies(events, latency.REDIS)
    assert clock == latency.REDIS
    assert sorted(round(v, 6) for v in values) == [0.004, 0.005]
    summary = latency.level_summary(events)
    assert summary is not None and summary.count == 2 and summary.clock == latency.WRITER
    assert summary.p50_ms == pytest.approx(2.0) and summary.p99_ms == pytest.approx(3.0)


def test_level_latency_falls_back_to_redis_clock_per_pair_and_skips_unfinished() -> None:
    events = [
        _submitted({"a": [], "b": ["a"], "c": ["a"], "d": ["b"], "e": ["x"]}),
        _ev(EventType.TASK_COMPLETED, "a", 1.0, 1.0),
        _ev(EventType.TASK_STARTED, "b", None, 1.007),  # no usable writer time: this pair on Redis's
        _ev(EventType.TASK_STARTED, "c", 1.002, 1.009),
        # d started but b never completed; e depends on a task that never ran: both left out
        _ev(EventType.TASK_STARTED, "d", 1.5, 1.5),
    ]
    values, clock = latency.level_latencies(events)
    assert clock == "writer+redis"
    assert sorted(round(v, 6) for v in values) == [0.002, 0.007]


def test_level_latency_uses_the_start_of_the_attempt_that_completed() -> None:
    events = [
        _submitted({"a": [], "b": ["a"]}),
        _ev(EventType.TASK_COMPLETED, "a", 1.0, 1.0),
        _ev(EventType.TASK_STARTED, "b", 1.001, 1.001, attempt=1),
        _ev(EventType.TASK_STARTED, "b", 3.0, 3.0, attempt=2),
        _ev(EventType.TASK_COMPLETED, "b", 1.1, 1.1, attempt=1),
        _ev(EventType.TASK_COMPLETED, "a", 9.0, 9.0),  # a late duplicate: the first completion counts
    ]
    values, _ = latency.level_latencies(events)
    assert [round(v, 6) for v in values] == [0.001]
    assert latency.level_summary([_submitted({"a": []})]) is None


def test_ramp_verdict_stop_rule() -> None:
    assert ramp_verdict(200, 199, 50.0, 10, 0) == OK
    assert ramp_verdict(200, 150, 50.0, 10, 0) == GENERATOR  # the bench could not offer the load
    assert ramp_verdict(200, 200, 1500.0, 10, 0) == P99
    assert ramp_verdict(200, 200, 50.0, 201, 0) == BACKLOG  # more than a second's worth in flight
    assert ramp_verdict(200, 200, 50.0, 200, 0) == OK
    assert ramp_verdict(200, 200, 50.0, 0, 3) == BACKLOG  # unfinished after the drain
    assert ramp_verdict(200, 200, 150.0, 10, 0, p99_limit_ms=100) == P99


def test_ramp_rates_grow_by_the_factor_to_the_maximum() -> None:
    assert ramp_rates(100, 1.25, 250) == [100, 125, 156, 195, 244]
    assert ramp_rates(1, 1.1, 4) == [1, 2, 3, 4]  # at least one more run/s per step
    with pytest.raises(ValueError):
        ramp_rates(100, 1.0, 200)


def test_parse_status_reads_kb_fields_as_bytes() -> None:
    text = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t 1024 kB\nThreads:\t3\n"
    assert memwatch.parse_status(text) == {"VmHWM": 2048 * 1024, "VmRSS": 1024 * 1024}
    import os

    mine = memwatch.status(os.getpid())
    assert mine["VmHWM"] >= mine["VmRSS"] > 0
    assert memwatch.peak_rss(2**22 + 12345) is None  # no such process


def test_cpu_by_role_per_task() -> None:
    before = {"client": 1.0, "scheduler": 2.0}
    after = {"client": 1.5, "scheduler": 4.0, "workers": 3.0}
    roles = role_delta(before, after)
    assert roles == {"client": 0.5, "scheduler": 2.0, "workers": 3.0}
    m = Measurement("nerv", "fanout", 1000, 1.0, cpu_roles=roles)
    assert m.role_us_per_task("scheduler") == pytest.approx(2000.0)
    assert m.role_us_per_task("workers") == pytest.approx(3000.0)
    assert Measurement("x", "y", 10, 1.0).role_us_per_task("scheduler") is None
    assert role_delta(None, after) is None
