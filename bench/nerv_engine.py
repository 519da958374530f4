"""Our engine in the benchmark: a scheduler and one prefork worker with ``workers`` processes.

The clock runs from building the workflow to the client seeing the run end (``Client.wait`` follows
the run's event log). Per-hop latency, upstream finished -> downstream started, comes from the log.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engines import Engine, EngineUnavailable, Measurement, Stopwatch
from bench.shapes import Shape, node_id

REPO_ROOT = Path(__file__).resolve().parent.parent


def hop_latencies(events: list) -> list[float]:
    """Seconds from each dependency's TASK_COMPLETED to its dependent's TASK_STARTED (the slowest parent)."""
    from nerv_cluster.model import EventType

    done = {e.task_id: e.ts for e in events if e.type is EventType.TASK_COMPLETED}
    started = {e.task_id: e.ts for e in events if e.type is EventType.TASK_STARTED}
    deps: dict[str, list[str]] = {}
    for e in events:
        if e.type is EventType.WORKFLOW_SUBMITTED:
            deps = {t["id"]: t.get("deps", []) for t in e.data["workflow"]["tasks"]}
    return [started[t] - max(done[d] for d in ds) for t, ds in deps.items() if ds and t in started]


class NervEngine(Engine):
    """nerv-cluster: submit, then ``Client.wait`` on the run's event log."""

    name = "nerv"
    description = "nerv-cluster (ours)"
    is_ours = True

    def __init__(self, timeout: float = 300.0) -> None:
        super().__init__(timeout)
        self.cluster: Any = None
        self.client: Any = None
        #: (first, second) wall seconds of each repeat of the cached shape, for its note.
        self._cached_runs: list[tuple[float, float]] = []
        #: (client, scheduler) CPU seconds of each repeat's second run: on a shared machine the wall
        #: clock also counts the other processes' turns, the CPU seconds only ours.
        self._cached_cpu: list[tuple[float, float | None]] = []
        self._logdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self, redis_url: str, workers: int) -> None:
        try:
            from nerv_cluster import Client, Settings
            from nerv_cluster.launcher import LocalCluster
        except ImportError as exc:
            raise EngineUnavailable(f"cannot import nerv_cluster ({exc})") from exc
        # Register bench.noop, bench.fib and bench.add in this process too.
        import bench.nerv_tasks
        import bench.recursive  # noqa: F401

        self._logdir = tempfile.TemporaryDirectory(prefix="nerv-bench-")
        env = {
            "NERV_WORKER_MODULES": "bench.nerv_tasks,bench.recursive",
            "NERV_LOG_LEVEL": "INFO",
            # The peers' workers run without Celery task events (no -E); ours too, for a like-for-like run.
            "NERV_TASK_EVENTS": "false",
            "NERV_METRICS_PORT": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.cluster = LocalCluster(redis_url, Path(self._logdir.name), env)
        self.client = Client(settings=Settings.from_env(redis_url=redis_url))
        self.client.redis.flushdb()
        self.cluster.scheduler()
        self.cluster.worker("cpu", workers)
        self.cluster.wait_ready(self.client, {"bench.noop", "bench.fib", "bench.add"})
        warm = self._workflow(Shape("warm-up", "warm-up", tuple(() for _ in range(4 * workers))))
        self.client.wait(self.client.submit(warm), timeout=60).raise_for_status()

    @staticmethod
    def _workflow(shape: Shape) -> Any:
        from bench.nerv_tasks import noop
        from nerv_cluster import Workflow

        wf = Workflow(shape.name)
        for i, parents in enumerate(shape.parents):
            wf.add(noop, id=node_id(i), dependencies=[node_id(p) for p in parents])
        return wf

    def _run_cached(self, shape: Shape) -> Measurement:
        """The ``cached`` shape: the same fan-out of a cached noop twice, from an empty cache; the
        measurement is the second run (every task from the cache), the note says against the first."""
        from bench.nerv_tasks import cached_noop
        from nerv_cluster import Workflow

        assert self.client is not None, "engine not started"
        self.client.clear_cache(cached_noop)
        seconds = []
        for _ in range(2):
            cpu0, sched0 = time.process_time(), self._scheduler_cpu()
            with Stopwatch() as sw:
                wf = Workflow(shape.name)
                for i in range(shape.size):
                    wf.add(cached_noop, i, id=node_id(i))
                res = self.client.wait(self.client.submit(wf), timeout=self.timeout)
            cpu, sched1 = time.process_time() - cpu0, self._scheduler_cpu()
            res.raise_for_status()
            seconds.append(sw.seconds)
        self._cached_cpu.append((cpu, None if sched0 is None or sched1 is None else sched1 - sched0))
        hits = sum(t.cached for t in res.tasks.values())
        if hits != shape.size:
            raise RuntimeError(f"the second run took {hits} of {shape.size} results from the cache")
        self._cached_runs.append((seconds[0], seconds[1]))
        first = statistics.median(f for f, _ in self._cached_runs)
        second = statistics.median(s for _, s in self._cached_runs)
        note = (f"2nd run, all from the cache; the 1st (computed): {first:.3f}s = {shape.size / first:.0f} "
                f"tasks/s; 2nd {first / second:.1f}x faster (medians of {len(self._cached_runs)})")
        client_cpu = statistics.median(c for c, _ in self._cached_cpu)
        sched_cpu = [s for _, s in self._cached_cpu if s is not None]
        note += f"; 2nd run CPU s: client {client_cpu:.3f}"
        if sched_cpu:
            note += f", scheduler {statistics.median(sched_cpu):.3f}"
        return Measurement("nerv", shape.name, shape.size, seconds[1], note=note)

    def _scheduler_cpu(self) -> float | None:
        """CPU seconds the scheduler process has used so far (None without psutil or a scheduler)."""
        try:
            import psutil
        except ImportError:
            return None
        procs = [s for s in self.cluster.services if s.name.startswith("scheduler")]
        if not procs:
            return None
        try:
            t = psutil.Process(procs[0].pid).cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def run(self, shape: Shape) -> Measurement:
        assert self.client is not None, "engine not started"
        if shape.name == "cached":
            return self._run_cached(shape)
        if shape.kind == "recursive":
            return self._recursive(shape)
        with Stopwatch() as sw:
            wf = self._workflow(shape)
            run_id = self.client.submit(wf)
            res = self.client.wait(run_id, timeout=self.timeout)
        res.raise_for_status()
        events = [ev for _, ev in self.client.log.read_run(run_id)]
        hops = sorted(hop_latencies(events))
        note = ""
        if hops:
            p99 = hops[min(len(hops) - 1, int(0.99 * len(hops)))]
            note = f"hop p50 {1000 * statistics.median(hops):.2f} ms, p99 {1000 * p99:.2f} ms"
        return Measurement("nerv", shape.name, shape.size, sw.seconds, note=note)

    def _recursive(self, shape: Shape) -> Measurement:
        """fib(n) by child runs; counts the fib calls (the ``add`` tasks are extra work of ours)."""
        from bench.recursive import fib_value, nerv_workflow

        n = shape.params["n"]
        runs_before = self.client.redis.zcard(self.client.keys.runs)
        with Stopwatch() as sw:
            run_id = self.client.submit(nerv_workflow(n))
            res = self.client.wait(run_id, timeout=self.timeout)
        res.raise_for_status()
        if res.results["fib"] != fib_value(n):
            raise RuntimeError(f"fib({n}) gave {res.results['fib']}, expected {fib_value(n)}")
        children = self.client.redis.zcard(self.client.keys.runs) - runs_before - 1
        return Measurement("nerv", shape.name, shape.size, sw.seconds, note=f"{children} child runs")

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None
