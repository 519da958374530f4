"""``python -m bench.map_row``: the ``map 10,000`` row (issue 16), ours and the peers in one run.

A task returns a list of ``n`` (10,000), a noop is mapped over it, a reduce takes the results:

- **nerv map**: ``wf.map(noop, numbers(n))`` then ``count(map)``: the elements are made at run time.
- **nerv static**: the same graph built before submit, ``n`` noops each depending on ``numbers`` and
  a ``count`` over all of them: what the map costs on top of the static fan-out it becomes.
- **dask**: ``submit(numbers)``, gather the list, ``client.map(noop, list)``, gather (the Dask way to
  map over a run-time list from a client; Dask has no graph that grows by itself).

Goals (issue 16): nerv map at least 2x Dask and at least 0.8x our static fan-out. Each variant runs
``--repeat`` times (median kept), the nerv ones alternating on one cluster, then Dask alone (an idle
engine taxes the running one). Besides wall time, the scheduler's CPU seconds per task (psutil), the
figure machine noise moves least. The same Redis rules as ``python -m bench`` (database 13, flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.__main__ import DEFAULT_DB, with_db
from bench.engines import Stopwatch

N = 10_000
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "map_row.json"


def _scheduler_cpu(engine: Any) -> float | None:
    """CPU seconds the nerv scheduler process has used so far (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    proc = next(s for s in engine.cluster.services if s.name.startswith("scheduler"))
    t = psutil.Process(proc.pid).cpu_times()
    return float(t.user + t.system)


def nerv_once(engine: Any, n: int, static: bool, timeout: float) -> tuple[float, float | None]:
    """One nerv run (map or static); wall seconds and scheduler CPU seconds."""
    from bench.nerv_tasks import count, noop, numbers
    from nerv_cluster import Workflow

    client = engine.client
    cpu0 = _scheduler_cpu(engine)
    with Stopwatch() as sw:
        wf = Workflow("map-static" if static else "map")
        src = wf.add(numbers, n, id="src")
        if static:
            handles = [wf.add(noop, i, id=f"e{i}", dependencies=[src]) for i in range(n)]
            wf.add(count, *handles, id="reduce")
        else:
            wf.add(count, wf.map(noop, src, id="m"), id="reduce")
        res = client.wait(client.submit(wf), timeout=timeout)
    res.raise_for_status()
    assert res.results["reduce"] == n, res.results["reduce"]
    cpu1 = _scheduler_cpu(engine)
    return sw.seconds, None if cpu0 is None or cpu1 is None else cpu1 - cpu0


def dask_once(client: Any, n: int, run: int) -> float:
    """One Dask run: submit the list task, gather it, map the noop over it, gather."""
    from bench.dask_engine import noop

    with Stopwatch() as sw:
        items = client.submit(_numbers, n, key=f"numbers-{run}", pure=False).result()
        futures = client.map(noop, items, key=[f"e-{run}-{i}" for i in range(len(items))], pure=False)
        results = client.gather(futures)
    assert len(results) == n
    return sw.seconds


def _numbers(n: int) -> list[int]:
    return list(range(n))


def _definition(n: int, static: bool) -> Any:
    from nerv_cluster import Workflow

    wf = Workflow("map-static" if static else "map")
    src = wf.add("bench.numbers", n, id="src")
    if static:
        wf.add("bench.count", *[wf.add("bench.noop", i, id=f"e{i}", dependencies=[src]) for i in range(n)])
    else:
        wf.add("bench.count", wf.map("bench.noop", src, id="m"))
    return wf.definition()


def core_once(n: int, static: bool, batch: int = 64) -> float:
    """CPU seconds of the scheduler's pure core (fold + decide, no Redis) for one whole run, workers
    simulated: jobs complete ``batch`` at a time, their events folded one by one as the feed brings
    them, then a decision. The figure machine load moves least."""
    from nerv_cluster import state as st
    from nerv_cluster.model import Event, EventType
    from scheduler.decisions import Decisions, decide

    rid = "bench-core"
    definition = _definition(n, static).to_dict()
    sub = Event(EventType.WORKFLOW_SUBMITTED, rid, data={"workflow": definition}, ts=1.0)
    started = time.process_time()
    state = st.fold([sub])
    pending: list[Any] = []
    while not state.runs[rid].status.terminal:
        out = Decisions()
        decide(state.runs[rid], 2.0, "scheduler:bench", out)
        state = st.fold(out.events, state)
        pending.extend(job for job, _ in out.jobs)
        done, pending = pending[:batch], pending[batch:]
        for job in done:
            if job.fn == "bench.numbers":
                result: Any = list(range(job.args[0]))
            elif job.fn == "bench.count":
                result = len(job.args[0]) if len(job.args) == 1 else len(job.args)
            else:
                result = None
            done_data = {"result": result}
            steps = ((EventType.TASK_STARTED, {"worker": "w"}), (EventType.TASK_COMPLETED, done_data))
            for kind, data in steps:
                state = st.apply(state, Event(kind, rid, job.task_id, job.attempt, data, ts=2.0))
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.map_row", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=N, help=f"list length (default {N})")
    p.add_argument("--workers", type=int, default=2, help="worker processes per engine (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is kept (default 3)")
    p.add_argument("--redis-url", default=os.environ.get("NERV_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=DEFAULT_DB)
    p.add_argument("--no-dask", action="store_true", help="only our two variants")
    p.add_argument("--core", action="store_true",
                   help="also the scheduler's pure core (fold + decide, no Redis), CPU seconds per run")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    url = with_db(args.redis_url, args.redis_db)

    from bench.nerv_engine import NervEngine

    samples: dict[str, list[float]] = {"nerv map": [], "nerv static": [], "dask": []}
    cpu: dict[str, list[float]] = {"nerv map": [], "nerv static": []}
    engine = NervEngine(args.timeout)
    print(f"[map_row] nerv on {url}, {args.workers} workers, n={args.n}", file=sys.stderr)
    engine.start(url, args.workers)
    try:
        for r in range(args.repeat):
            for static in (r % 2 == 1, r % 2 == 0):  # alternate which goes first
                name = "nerv static" if static else "nerv map"
                time.sleep(0.5)
                wall, used = nerv_once(engine, args.n, static, args.timeout)
                samples[name].append(wall)
                if used is not None:
                    cpu[name].append(used)
                print(f"[map_row] {name}: {wall:.2f}s (scheduler CPU {used}s)", file=sys.stderr)
    finally:
        engine.stop()
    if not args.no_dask:
        import logging

        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
        try:
            client.wait_for_workers(args.workers, timeout=60)
            from bench.dask_engine import noop

            client.gather(client.map(noop, range(4 * args.workers), pure=False))  # warm-up
            for r in range(args.repeat):
                time.sleep(0.5)
                wall = dask_once(client, args.n, r)
                samples["dask"].append(wall)
                print(f"[map_row] dask: {wall:.2f}s", file=sys.stderr)
        finally:
            client.close()
            cluster.close()

    core: dict[str, list[float]] = {"core map": [], "core static": []}
    if args.core:
        for r in range(args.repeat):
            for static in (r % 2 == 1, r % 2 == 0):
                name = "core static" if static else "core map"
                core[name].append(core_once(args.n, static))
                print(f"[map_row] {name}: {core[name][-1]:.2f} CPU s", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in samples.items() if v}
    tasks = args.n + 2
    print(f"\nmap {args.n:,} ({args.workers} workers, median of {args.repeat})")
    print(f"{'variant':<12} {'wall s':>8} {'tasks/s':>9} {'sched CPU ms/task':>18}")
    for k, v in med.items():
        c = f"{1000 * statistics.median(cpu[k]) / tasks:.3f}" if cpu.get(k) else "-"
        print(f"{k:<12} {v:>8.2f} {tasks / v:>9.0f} {c:>18}")
    ratios: dict[str, float] = {}
    if "dask" in med:
        ratios["map vs dask"] = med["dask"] / med["nerv map"]
    ratios["map vs static"] = med["nerv static"] / med["nerv map"]
    if args.core:
        cm, cs = statistics.median(core["core map"]), statistics.median(core["core static"])
        print(f"pure core (fold + decide, no Redis): map {1e6 * cm / tasks:.0f} us/task, "
              f"static {1e6 * cs / tasks:.0f} us/task")
        ratios["core map vs static"] = cs / cm
    for k, v in ratios.items():
        goal = {"map vs dask": 2.0}.get(k, 0.8)
        print(f"{k}: {v:.2f}x (goal >= {goal}x){'' if v >= goal else '  BELOW GOAL'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "n": args.n, "workers": args.workers, "repeat": args.repeat, "samples": samples,
        "scheduler_cpu_s": cpu, "core_cpu_s": core, "median_s": med, "ratios": ratios,
        "loadavg": os.getloadavg(),
    }, indent=2))
    print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
