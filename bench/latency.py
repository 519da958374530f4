"""Latency figures computed from a run's event log: pure functions over events, tested without Redis.

The level latency of a deep DAG (issue 14, goal 1) is, for each task with dependencies, its
TASK_STARTED minus the latest TASK_COMPLETED among its dependencies: how long the engine took from
an upstream result to the downstream start. Two clocks can time that pair:

- "writer": the events' own ``ts`` (the clock of the process that made them: for STARTED and
  COMPLETED a worker, whether the worker appended them to the log itself or a scheduler transcribed
  them later; for the STARTED of a job handed straight to a waiting worker, the scheduler, whose
  clock is Redis's time advanced by its monotonic clock, within a sampling error of a fraction of a
  millisecond of the workers' on one host: such a pair can come out slightly negative). Microsecond
  resolution; on one host every worker shares one clock.
- "redis": ``logged_at``, the millisecond of the stream entry id (Redis's clock when the event
  entered the run's log). Millisecond resolution only; when the scheduler transcribes worker events
  it is the transcription's time, so it adds the scheduler's delay to each end of the pair.

Both ends of a pair are always read on the same clock. ``level_latencies`` prefers the writer's clock
(finer, and the one that times the engine rather than its bookkeeping) and falls back to Redis's for an
event without a usable ``ts``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

WRITER, REDIS = "writer", "redis"
CLOCKS = (WRITER, REDIS)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by nearest rank (the value at rank
    ceil(q/100 * n), 1-based); NaN for no values. Nearest rank keeps every reported figure one that
    was measured: p100 is the maximum, p50 of an even count the lower middle."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} not in 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    """p50 / p99 / max and count of a set of latencies, in milliseconds, and the clock they used."""

    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    clock: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "clock": self.clock,
        }


def summarize(seconds: Sequence[float], clock: str = "") -> Summary | None:
    """The summary of latencies given in seconds; None for none."""
    if not seconds:
        return None
    ms = [1000 * s for s in seconds]
    return Summary(len(ms), percentile(ms, 50), percentile(ms, 99), max(ms), clock)


def _time(event: Any, clock: str) -> float | None:
    """The event's time on ``clock`` (None when it has none there)."""
    value = event.ts if clock == WRITER else event.logged_at
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def dependencies(events: Iterable[Any]) -> dict[str, list[str]]:
    """Task id -> its dependencies, from the run's WORKFLOW_SUBMITTED (the last one wins)."""
    from nerv_cluster.model import EventType

    deps: dict[str, list[str]] = {}
    for e in events:
        if e.type is EventType.WORKFLOW_SUBMITTED:
            deps = {t["id"]: list(t.get("deps", ())) for t in e.data["workflow"]["tasks"]}
    return deps


def level_latencies(events: Sequence[Any], clock: str = WRITER) -> tuple[list[float], str]:
    """Seconds from the latest dependency's TASK_COMPLETED to each dependent's TASK_STARTED, and the
    clock used: ``clock``, or "redis" for a pair with an event without a time on the writer's clock
    ("writer+redis" when some pairs were timed on each; each pair is on one clock).

    A task's COMPLETED is its first one in the log (a result is recorded once; a late duplicate of
    an old attempt changes nothing). Its STARTED is the one of the attempt that completed (a retried
    task's earlier attempts started before their dependencies' results could matter), else its last.
    Tasks that never started, or whose dependencies did not all complete, are left out.
    """
    from nerv_cluster.model import EventType

    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r} not in {CLOCKS}")
    completed: dict[str, Any] = {}
    started: dict[tuple[str, int | None], Any] = {}
    last_started: dict[str, Any] = {}
    for e in events:
        if e.task_id is None:
            continue
        if e.type is EventType.TASK_COMPLETED:
            completed.setdefault(e.task_id, e)
        elif e.type is EventType.TASK_STARTED:
            started[e.task_id, e.attempt] = e
            last_started[e.task_id] = e
    deps = dependencies(events)
    used: set[str] = set()
    out: list[float] = []
    for tid, ds in deps.items():
        if not ds or tid not in last_started or any(d not in completed for d in ds):
            continue
        done = completed.get(tid)
        start = started.get((tid, done.attempt)) if done is not None else None
        start = start or last_started[tid]
        pair = [start, *(completed[d] for d in ds)]
        on = clock
        times = [_time(e, on) for e in pair]
        if any(t is None for t in times):
            on = REDIS
            times = [_time(e, on) for e in pair]
            if any(t is None for t in times):
                continue
        used.add(on)
        out.append(times[0] - max(times[1:]))  # type: ignore[operator,type-var]
    return out, "+".join(c for c in CLOCKS if c in used) or clock


def level_summary(events: Sequence[Any], clock: str = WRITER) -> Summary | None:
    """:func:`level_latencies` summarised (None for a run without dependent tasks)."""
    values, used = level_latencies(events, clock)
    return summarize(values, used)
