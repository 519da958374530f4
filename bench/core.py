"""Scheduler microbenchmarks: the pure core, no Redis, one core.

``python -m bench.core`` prints:

- fold + decide: events folded and dispatch decisions made per second, driving a run the way the
  scheduler does (decide -> fold its own events -> fold the workers' outcomes -> decide ...);
- planning: time and peak memory to plan a 100,000-task random DAG (up to 4 parents each);
- refold: time to rebuild the state from 1,000,000 events of one run (what a new leader does at worst),
  with ``state.fold``, which takes the bulk path (``state.fold_run``) for a run created by the events;
- restart: the same, from a checkpoint of the first 90% plus the last 10% of the log.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import tracemalloc
from typing import Any

from nerv_cluster import checkpoint
from nerv_cluster import state as st
from nerv_cluster.model import Event, EventType, TaskDef, WorkflowDef
from nerv_cluster.planner import plan
from scheduler.decisions import Decisions, decide


def random_dag(n: int, seed: int = 1, max_parents: int = 4) -> WorkflowDef:
    """``n`` tasks, each with up to ``max_parents`` parents among the 100 tasks before it."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        lo = max(0, i - 100)
        k = rng.randint(0, min(max_parents, i - lo))
        parents = rng.sample(range(lo, i), k) if k else []
        tasks.append(TaskDef(id=f"t{i}", fn="bench.noop", dependencies=tuple(f"t{p}" for p in parents)))
    return WorkflowDef(name="core", tasks=tuple(tasks))


def drive(definition: WorkflowDef) -> tuple[int, int, list[Event], float]:
    """Run a workflow through decide/fold with instant workers; returns (events folded, dispatch decisions,
    the log, seconds)."""
    t0 = time.perf_counter()
    submitted = Event(EventType.WORKFLOW_SUBMITTED, "run", data={"workflow": definition.to_dict()}, ts=0.0)
    state = st.apply(st.EMPTY, submitted)
    log = [submitted]
    folded, decisions, now = 1, 0, 1.0
    while True:
        run = state.runs["run"]
        out = Decisions()
        decide(run, now, "scheduler:1", out)
        if not out.events:
            break
        state = st.fold(out.events, state)
        log.extend(out.events)
        folded += len(out.events)
        decisions += len(out.jobs)
        outcomes = []
        for job, _ in out.jobs:
            outcomes.append(
                Event(EventType.TASK_STARTED, "run", job.task_id, job.attempt, {"worker": "w"}, ts=now)
            )
            outcomes.append(
                Event(EventType.TASK_COMPLETED, "run", job.task_id, job.attempt, {"result": None}, ts=now)
            )
        state = st.fold(outcomes, state)
        log.extend(outcomes)
        folded += len(outcomes)
        now += 0.001
        if state.runs["run"].status.terminal:
            break
    return folded, decisions, log, time.perf_counter() - t0


def replay_log(definition: WorkflowDef) -> list[Event]:
    """A complete, valid log of a run: each task dispatched, started and completed in definition order
    (every dependency comes earlier in ``random_dag``). Built directly, without ``decide``, so a long log
    is quick to make; the fold does the same work per event as for a log the scheduler wrote."""
    ts = 0.0
    log = [Event(EventType.WORKFLOW_SUBMITTED, "run", data={"workflow": definition.to_dict()}, ts=ts)]
    log.append(Event(EventType.WORKFLOW_STARTED, "run", ts=ts))
    for t in definition.tasks:
        ts += 0.001
        log.append(Event(EventType.TASK_DISPATCHED, "run", t.id, 1, {"queue": t.queue}, ts=ts))
        log.append(Event(EventType.TASK_STARTED, "run", t.id, 1, {"worker": "w"}, ts=ts))
        log.append(Event(EventType.TASK_COMPLETED, "run", t.id, 1, {"result": None}, ts=ts))
    log.append(Event(EventType.WORKFLOW_COMPLETED, "run", ts=ts))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks in the fold+decide run")
    parser.add_argument("--plan-tasks", type=int, default=100_000)
    parser.add_argument("--refold-events", type=int, default=1_000_000)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    out: dict[str, Any] = {}

    folded, decisions, _, secs = drive(random_dag(args.tasks, seed=2))
    out["fold_decide"] = {
        "events": folded,
        "dispatches": decisions,
        "seconds": secs,
        "events_per_s": folded / secs,
        "dispatches_per_s": decisions / secs,
    }
    print(
        f"fold+decide: {folded} events and {decisions} dispatches in {secs:.2f}s = "
        f"{folded / secs:,.0f} events/s, {decisions / secs:,.0f} dispatches/s (one core)"
    )

    big = random_dag(args.plan_tasks, seed=3)
    t0 = time.perf_counter()
    p = plan(big.tasks)
    secs = time.perf_counter() - t0
    tracemalloc.start()  # a second, traced run for memory: tracing slows it down several times
    plan(big.tasks)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    out["plan"] = {"tasks": args.plan_tasks, "seconds": secs, "peak_mb": peak, "levels": len(p.levels)}
    print(
        f"plan: {args.plan_tasks:,} tasks ({len(p.levels)} levels) in {secs:.2f}s, peak {peak:.0f} MB traced"
    )

    per_task = 3  # DISPATCHED, STARTED, COMPLETED per task (plus a few of the run's own events)
    n = max(1, args.refold_events // per_task)
    log = replay_log(random_dag(n, seed=4))[: args.refold_events]
    t0 = time.perf_counter()
    state = st.fold(log)
    secs = time.perf_counter() - t0
    assert state.runs["run"].total == n
    out["refold"] = {"events": len(log), "seconds": secs, "events_per_s": len(log) / secs}
    print(f"refold: {len(log):,} events of a {n:,}-task run in {secs:.2f}s = {len(log) / secs:,.0f} events/s")

    # A new leader with a checkpoint: decode it and fold only the log after it (here, the last 10%).
    cut = len(log) * 9 // 10
    at_cut = st.fold_run(None, log[:cut])
    assert at_cut is not None
    stored = json.dumps(checkpoint.encode(at_cut), separators=(",", ":"))
    t0 = time.perf_counter()
    resumed = st.fold_run(checkpoint.decode(json.loads(stored)), log[cut:])
    secs = time.perf_counter() - t0
    assert resumed == state.runs["run"]
    out["restart"] = {"checkpoint_mb": len(stored) / 1e6, "tail_events": len(log) - cut, "seconds": secs}
    print(
        f"restart from a checkpoint ({len(stored) / 1e6:.0f} MB of JSON) + the last {len(log) - cut:,} "
        f"events: {secs:.2f}s"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
