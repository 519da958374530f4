"""The Celery peers: canvas (group / chain / chord on a Redis result backend) and raw fire-and-forget.

Each drives its own real ``celery worker`` subprocess (prefork, ``workers`` children) on its own queue.
Canvas cannot express a general DAG: the lattice and the random DAG run as one group per dependency level
(a barrier between levels, more synchronisation than the shape asks for), labelled so, or are n/a
(``dag_mode``). The raw floor sends tasks with ``ignore_result`` and learns of completion through a Redis
counter; it runs fan-out, and chain / fan-in through tasks that send their successor themselves.

Import this module only after ``NERV_BENCH_REDIS_URL`` is set: ``bench.celery_peer`` reads it at import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeout

from bench import celery_peer
from bench.engines import BenchError, Engine, Measurement, ShapeUnsupported, Stopwatch
from bench.shapes import Shape

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
noop = celery_peer.noop


class CeleryWorker:
    """A ``celery -A bench.celery_peer worker`` subprocess in its own process group, log in a temp file."""

    def __init__(self, redis_url: str, concurrency: int, queue: str) -> None:
        self.redis_url = redis_url
        self.concurrency = concurrency
        self.queue = queue
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"{queue}-", suffix=".log")[1])

    def start(self) -> None:
        env = dict(os.environ)
        env[celery_peer.URL_ENV] = self.redis_url
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        cmd = [
            sys.executable, "-m", "celery", "-A", "bench.celery_peer", "worker",
            "--pool", "prefork", "--concurrency", str(self.concurrency), "-Q", self.queue,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning",
            "-n", f"{self.queue}-{os.getpid()}@%h",
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def check_alive(self) -> None:
        """Raise with the log's tail when the worker has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"celery worker exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Warm shutdown (SIGTERM); after ``STOP_TIMEOUT_S`` kill the worker's own process group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class _CeleryEngine(Engine):
    """Shared start / stop: one worker subprocess on ``queue``, ready once warm-up tasks came back."""

    queue = celery_peer.CANVAS_QUEUE

    def __init__(self, timeout: float = 300.0) -> None:
        super().__init__(timeout)
        self.worker: CeleryWorker | None = None
        self.redis: redis.Redis | None = None

    def start(self, redis_url: str, workers: int) -> None:
        if redis_url != celery_peer.URL:
            raise BenchError(f"bench.celery_peer was imported for {celery_peer.URL}, not {redis_url}; "
                             f"set {celery_peer.URL_ENV} before importing it")
        # No socket timeout: redis-py's default (5 s) would cut the client's long BRPOPs.
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=None)
        self.worker = CeleryWorker(redis_url, workers, self.queue)
        self.worker.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        results = [noop.apply_async(queue=self.queue) for _ in range(4 * workers)]
        for res in results:
            while True:
                self.worker.check_alive()
                try:
                    res.get(timeout=1.0, interval=0.05)
                    break
                except CeleryTimeout:
                    if time.monotonic() > deadline:
                        raise BenchError(f"celery worker not ready after {READY_TIMEOUT_S:.0f}s:\n"
                                         f"{self.worker.log_tail()}") from None
        self.warm_up(workers)

    def warm_up(self, workers: int) -> None:
        """Extra warm-up for the engine's own path (after the worker answered)."""

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.redis is not None:
            self.redis.close()
            self.redis = None


class CeleryCanvasEngine(_CeleryEngine):
    """Canvas: group for fan-out, chain for a chain, chord for fan-in; general DAGs per ``dag_mode``."""

    name = "celery-canvas"
    description = "Celery canvas, Redis broker + result backend"
    queue = celery_peer.CANVAS_QUEUE
    #: How a general DAG runs: "levels" = one group per dependency level, the client waiting for each
    #: level before sending the next; "chain" = one canvas, a chain of those groups (every message carries
    #: the rest of the chain, so the cost grows with the square of the depth); "none" = n/a.
    DAG_MODES = ("levels", "chain", "none")

    def __init__(self, timeout: float = 300.0, dag_mode: str = "levels", poll_interval: float = 0.5,
                 level_poll_interval: float = 0.01) -> None:
        super().__init__(timeout)
        self.dag_mode = dag_mode
        #: ``result.get(interval=...)`` for a whole canvas: Celery's default. Shorter intervals measured no
        #: faster on the big shapes and cost the client more CPU, which the workers need on two cores.
        self.poll_interval = poll_interval
        #: The same for each level's group in "levels" mode: the default would add up to 0.5 s per level.
        self.level_poll_interval = level_poll_interval

    def run(self, shape: Shape) -> Measurement:
        if shape.kind == "dag":
            return self._run_dag(shape)
        with Stopwatch() as sw:
            sig: Any
            if shape.kind == "independent":
                note, sig = "group", group(noop.si() for _ in range(shape.size))
            elif shape.kind == "chain":
                note, sig = "chain", chain(noop.si() for _ in range(shape.size))
            else:
                note, sig = "chord", chord((noop.si() for _ in range(shape.size - 1)), noop.s())
            sig.apply_async(queue=self.queue).get(timeout=self.timeout, interval=self.poll_interval)
        return Measurement(self.name, shape.name, shape.size, sw.seconds, note=note)

    def unsupported(self, shape: Shape) -> str | None:
        if shape.kind == "recursive":
            return _NO_RECURSION
        if shape.kind == "dag" and self.dag_mode == "none":
            return "canvas cannot express a general DAG"
        return None

    def _run_dag(self, shape: Shape) -> Measurement:
        if self.dag_mode not in self.DAG_MODES:
            raise ValueError(f"dag_mode {self.dag_mode!r} not in {self.DAG_MODES}")
        if reason := self.unsupported(shape):
            raise ShapeUnsupported(reason)
        layers = shape.layers()
        deadline = time.monotonic() + self.timeout
        with Stopwatch() as sw:
            if self.dag_mode == "chain":
                note = f"canvas chain of {len(layers)} groups, one per level (barriers)"
                sig = chain(group(noop.si() for _ in layer) for layer in layers)
                sig.apply_async(queue=self.queue).get(timeout=self.timeout, interval=self.poll_interval)
            else:
                note = f"{len(layers)} groups, one per level, client waits between (barriers)"
                for layer in layers:
                    res = group(noop.si() for _ in layer).apply_async(queue=self.queue)
                    res.get(timeout=max(0.0, deadline - time.monotonic()), interval=self.level_poll_interval)
        return Measurement(self.name, shape.name, shape.size, sw.seconds, note=note, approximate=True)


#: Why Celery has no ``recursive`` row: a task waiting on the subtasks it sent (``result.get()`` in a
#: task) is the deadlock Celery forbids, and a canvas cannot grow while it runs.
_NO_RECURSION = "a Celery task cannot wait on its subtasks (result.get() in a task deadlocks)"


class CeleryRawEngine(_CeleryEngine):
    """Raw Celery, no result backend: ``send_task`` with ``ignore_result``, completion via a Redis counter."""

    name = "celery-raw"
    description = "raw Celery fire-and-forget, no results"
    queue = celery_peer.RAW_QUEUE

    def warm_up(self, workers: int) -> None:
        self._fanout(4 * workers)
        self._chain(2)

    def unsupported(self, shape: Shape) -> str | None:
        if shape.kind == "recursive":
            return _NO_RECURSION
        return "fire-and-forget Celery has no dependencies" if shape.kind == "dag" else None

    def run(self, shape: Shape) -> Measurement:
        if reason := self.unsupported(shape):
            raise ShapeUnsupported(reason)
        if shape.kind == "independent":
            seconds, note = self._fanout(shape.size), "send_task x N, Redis INCR"
        elif shape.kind == "chain":
            seconds, note = self._chain(shape.size), "each task sends the next"
        else:
            seconds, note = self._fanout(shape.size - 1, then="bench.join"), "last INCR sends the join"
        return Measurement(self.name, shape.name, shape.size, seconds, note=note)

    def _new_run(self) -> tuple[redis.Redis, str]:
        assert self.redis is not None, "engine not started"
        run_key = f"nerv-bench:raw:{uuid.uuid4().hex}"
        self.redis.delete(run_key, celery_peer.done_key(run_key))
        return self.redis, run_key

    def _wait(self, r: redis.Redis, run_key: str, deadline: float) -> None:
        """Block until the run's done signal, checking once a second that the worker still lives."""
        while r.brpop([celery_peer.done_key(run_key)], timeout=1) is None:
            if self.worker is not None:
                self.worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw Celery run {run_key} did not finish in {self.timeout:.0f}s")

    def _fanout(self, n: int, then: str | None = None) -> float:
        app, queue = celery_peer.app, self.queue
        r, run_key = self._new_run()
        deadline = time.monotonic() + self.timeout
        with Stopwatch() as sw:
            with app.producer_or_acquire() as producer:
                for _ in range(n):
                    app.send_task("bench.count", args=(run_key, n, queue, then), queue=queue,
                                  ignore_result=True, producer=producer)
            self._wait(r, run_key, deadline)
        r.delete(run_key)
        return sw.seconds

    def _chain(self, n: int) -> float:
        app, queue = celery_peer.app, self.queue
        r, run_key = self._new_run()
        deadline = time.monotonic() + self.timeout
        with Stopwatch() as sw:
            app.send_task("bench.hop", args=(run_key, n, queue), queue=queue, ignore_result=True)
            self._wait(r, run_key, deadline)
        return sw.seconds
