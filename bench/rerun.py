"""Rerun from failure (issue 16): what a rerun costs next to submitting the fixed workflow again.

``python -m bench.rerun`` prints two figures:

- cluster (real Redis, a scheduler, one prefork worker with ``--workers`` processes): a fan-out of
  ``--tasks`` noops, one more task that fails until it is fixed, and a join of all of them. The first run
  fails (the join is skipped); the task is fixed; then the clock runs from ``client.rerun`` to the run's
  new end (two tasks run: the fixed one and the join, with the scheduler taking the evicted run back from
  its log), against submitting the same workflow again (every task runs). The ratio is resubmit / rerun.
- core (no Redis, one core): the fold of the request on a ``--core-tasks`` run with one failed task and
  a skipped join, i.e. the pure reset (it scans the run for unfinished tasks, O(run)).

There is no peer row: Celery and Dask have no rerun of a finished workflow (Airflow's ``tasks clear``
is the closest, and is not in this harness).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench.__main__ import with_db
from bench.nerv_engine import NervEngine
from nerv_cluster import state as st
from nerv_cluster.model import Event, EventType, TaskDef, TaskStatus, WorkflowDef


def _workflow(n: int, key: str) -> Any:
    from bench.nerv_tasks import fails_until_fixed, noop
    from nerv_cluster import Workflow

    wf = Workflow(f"rerun-{n}")
    fan = [wf.add(noop, id=f"n{i}") for i in range(n)]
    broken = wf.add(fails_until_fixed, key, id="broken")
    wf.add(noop, id="join", dependencies=[*fan, broken])
    return wf


def cluster(redis_url: str, workers: int, n: int) -> dict[str, Any]:
    """The cluster figure: seconds of the first (failing) run, of the rerun, of a resubmit."""
    engine = NervEngine(timeout=600)
    engine.start(redis_url, workers)
    try:
        client = engine.client
        key = f"bench:rerun:fixed:{time.time()}"
        t0 = time.perf_counter()
        run_id = client.submit(_workflow(n, key))
        first = client.wait(run_id, timeout=600)
        first_s = time.perf_counter() - t0
        assert first.status.value == "FAILED", first.reason
        client.redis.set(key, 1)  # fixed
        t0 = time.perf_counter()
        client.rerun(run_id)
        res = client.wait(run_id, timeout=600)
        rerun_s = time.perf_counter() - t0
        res.raise_for_status()
        t0 = time.perf_counter()
        again = client.wait(client.submit(_workflow(n, key)), timeout=600)
        resubmit_s = time.perf_counter() - t0
        again.raise_for_status()
        events = [e for _, e in client.log.read_run(run_id)]
        since = next(i for i, e in enumerate(events) if e.type is EventType.WORKFLOW_RERUN_REQUESTED)
        ran = sum(1 for e in events[since:] if e.type is EventType.TASK_STARTED)
    finally:
        engine.stop()
    return {
        "tasks": n + 2,
        "first_s": first_s,
        "rerun_s": rerun_s,
        "resubmit_s": resubmit_s,
        "ratio": resubmit_s / rerun_s,
        "rerun_started": ran,
    }


def core(n: int) -> dict[str, Any]:
    """The core figure: seconds to fold the rerun request into a finished ``n``-task run."""
    tasks = [TaskDef(id=f"n{i}", fn="bench.noop") for i in range(n)]
    tasks.append(TaskDef(id="join", fn="bench.noop", dependencies=tuple(t.id for t in tasks)))
    definition = WorkflowDef(name="core-rerun", tasks=tuple(tasks))
    log = [Event(EventType.WORKFLOW_SUBMITTED, "run", data={"workflow": definition.to_dict()}, ts=0.0)]
    log.append(Event(EventType.WORKFLOW_STARTED, "run", ts=0.0))
    for i, t in enumerate(tasks[:-1]):
        log.append(Event(EventType.TASK_DISPATCHED, "run", t.id, 1, {"queue": "cpu"}, ts=0.0))
        log.append(Event(EventType.TASK_STARTED, "run", t.id, 1, {"worker": "w"}, ts=0.0))
        kind = EventType.TASK_FAILED if i == n // 2 else EventType.TASK_COMPLETED
        log.append(Event(kind, "run", t.id, 1, {}, ts=0.0))
    log += [
        Event(EventType.TASK_SKIPPED, "run", "join", ts=0.0),
        Event(EventType.WORKFLOW_FAILED, "run", ts=0.0),
    ]
    run = st.fold_run(None, log)
    assert run is not None and run.status.terminal
    request = Event(EventType.WORKFLOW_RERUN_REQUESTED, "run", data={"n": 1})
    t0 = time.perf_counter()
    after = st.apply_to_run(run, request)
    secs = time.perf_counter() - t0
    assert after is not None and after.count(TaskStatus.READY) == 1
    return {"tasks": n + 1, "seconds": secs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=13, help="database to use (flushed)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2_000, help="fan-out width of the cluster run")
    parser.add_argument("--core-tasks", type=int, default=100_000)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    out = {"core": core(args.core_tasks)}
    c = out["core"]
    print(f"core: the rerun request folded into a {c['tasks']:,}-task run in {1000 * c['seconds']:.1f} ms")
    out["cluster"] = cluster(with_db(args.redis_url, args.redis_db), args.workers, args.tasks)
    c = out["cluster"]
    print(
        f"cluster: {c['tasks']:,} tasks, one failing: first run {c['first_s']:.2f}s; after the fix, "
        f"rerun {c['rerun_s']:.3f}s ({c['rerun_started']} tasks ran) vs resubmit "
        f"{c['resubmit_s']:.2f}s: rerun {c['ratio']:.1f}x faster"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
