"""Checks on a finished run's event log: every task ran once, never before its dependencies."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from nerv_cluster import Client, EventType, Workflow
from nerv_cluster.model import Event


def layered(name: str, levels: int, width: int, fn: Any, seconds: float) -> Workflow:
    """``levels`` levels of ``width`` tasks ``fn(seconds)``, each depending on every task of the level
    before (ids ``L<level>-<i>``)."""
    wf = Workflow(name)
    prev: list = []
    for lv in range(levels):
        prev = [wf.add(fn, seconds, id=f"L{lv}-{i}", dependencies=prev) for i in range(width)]
    return wf


def random_dag(
    wf: Workflow, n: int, fn: object, fn_io: object, seed: int = 7, max_parents: int = 4
) -> dict[str, list[str]]:
    """Add ``n`` tasks with up to ``max_parents`` random earlier parents; returns id -> parent ids."""
    rng = random.Random(seed)
    parents: dict[str, list[str]] = {}
    handles = []
    for i in range(n):
        k = rng.randint(0, min(max_parents, i))
        ps = rng.sample(handles, k) if k else []
        h = wf.add(fn_io if i % 3 == 0 else fn, *ps, id=f"t{i}")  # type: ignore[arg-type]
        parents[h.id] = [p.id for p in ps]
        handles.append(h)
    return parents


def log_of(client: Client, run_id: str) -> list[Event]:
    """Every event of a run, in log order."""
    return [ev for _, ev in client.log.read_run(run_id)]


def assert_ran_once_in_order(events: list[Event], parents: dict[str, list[str]]) -> None:
    """Exactly one STARTED and one COMPLETED per task, and each task started after its parents completed."""
    started = Counter(ev.task_id for ev in events if ev.type is EventType.TASK_STARTED)
    completed = Counter(ev.task_id for ev in events if ev.type is EventType.TASK_COMPLETED)
    assert set(started) == set(parents), f"tasks never started: {set(parents) - set(started)}"
    assert max(started.values()) == 1, f"started twice: {[t for t, c in started.items() if c > 1]}"
    assert completed == Counter(dict.fromkeys(parents, 1)), "each task must complete exactly once"
    # Positions in the log, not timestamps: a TASK_STARTED the scheduler writes for a handed-off job
    # carries the scheduler's clock (which follows Redis's) and a TASK_COMPLETED its worker's, and
    # those two may disagree by a few milliseconds under load; the log's order is causal.
    started_at = {ev.task_id: i for i, ev in enumerate(events) if ev.type is EventType.TASK_STARTED}
    done_at = {ev.task_id: i for i, ev in enumerate(events) if ev.type is EventType.TASK_COMPLETED}
    for tid, ps in parents.items():
        for p in ps:
            assert started_at[tid] >= done_at[p], f"{tid} started before its dependency {p} completed"
