"""The Dask distributed peer: a ``LocalCluster`` of single-threaded worker processes, graphs built with
``client.submit`` where a future passed as an argument is a dependency.

Dask keeps its state in its own scheduler process, not in Redis; ``redis_url`` is accepted and unused.
"""

from __future__ import annotations

import logging
from typing import Any

from bench.engines import SCHEDULER, Engine, EngineUnavailable, Measurement, Stopwatch
from bench.shapes import Shape


def noop(*args: Any) -> None:
    """Do nothing (module level so workers import it by reference instead of unpickling a closure)."""
    return None


class DaskEngine(Engine):
    """``LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)``; every shape is supported."""

    name = "dask"
    description = "Dask distributed LocalCluster, processes"
    #: LocalCluster runs the scheduler in this process, beside the client: its CPU is the scheduler's
    #: column (the client's share is in it); the nannies and worker processes are the workers.
    own_role = SCHEDULER

    def __init__(self, timeout: float = 300.0) -> None:
        super().__init__(timeout)
        self.cluster: Any = None
        self.client: Any = None
        self._runs = 0

    def start(self, redis_url: str, workers: int) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise EngineUnavailable(f"dask[distributed] not installed ({exc})") from exc
        self.cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        )
        self.client = Client(self.cluster)
        self.client.wait_for_workers(workers, timeout=60)
        # Warm-up: every worker imports this module and runs one task.
        self.client.gather(self.client.map(noop, range(4 * workers), pure=False))

    def run(self, shape: Shape) -> Measurement:
        from distributed import wait

        assert self.client is not None, "engine not started"
        self._runs += 1
        if shape.kind == "recursive":
            return self._recursive(shape)
        prefix = f"r{self._runs}-"
        submit = self.client.submit
        futures: list[Any] = []
        with Stopwatch() as sw:
            for i, parents in enumerate(shape.parents):
                futures.append(submit(noop, *[futures[p] for p in parents], key=f"{prefix}{i}", pure=False))
            wait(futures, timeout=self.timeout)
        for f in futures:
            if f.status != "finished":
                raise RuntimeError(f"dask task {f.key} ended {f.status}")
        del futures
        return Measurement(self.name, shape.name, shape.size, sw.seconds, note="client.submit")

    def _recursive(self, shape: Shape) -> Measurement:
        """fib(n) with ``worker_client`` (bench/recursive.py)."""
        from bench.recursive import dask_fib, fib_value

        n = shape.params["n"]
        with Stopwatch() as sw:
            value = self.client.submit(dask_fib, n, pure=False).result(timeout=self.timeout)
        if value != fib_value(n):
            raise RuntimeError(f"fib({n}) gave {value}, expected {fib_value(n)}")
        return Measurement(self.name, shape.name, shape.size, sw.seconds, note="worker_client")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
