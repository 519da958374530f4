"""Our engine in the benchmark: a scheduler and one prefork worker with ``workers`` processes.

The clock runs from building the workflow to the client seeing the run end (``Client.wait`` follows
the run's event log). Per-hop latency, upstream finished -> downstream started, comes from the log.
"""

from __future__ import annotations

import os
import statistics
import tempfile
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

    def run(self, shape: Shape) -> Measurement:
        assert self.client is not None, "engine not started"
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
