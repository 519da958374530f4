"""Real processes for integration tests: a scheduler and workers against a test Redis database.

A thin test layer over the library's launcher (:class:`nerv_cluster.launcher.LocalCluster`): the test
environment (the ``nerv_testtasks`` module on ``PYTHONPATH``, a short lease, no metrics port), a Redis
connection and a client, ``flush`` and ``execs``, and failures raised as ``AssertionError`` with the
log's tail.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from nerv_cluster import Client, Settings
from nerv_cluster.client import connect
from nerv_cluster.constants import WORKER_READY_LINE
from nerv_cluster.errors import ServiceFailed
from nerv_cluster.launcher import LocalCluster, Service
from nerv_cluster.outcomes import AttemptTokens, claim_secret
from nerv_cluster.sentinel import is_sentinel
from nerv_cluster.signing import Signer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


class Cluster(LocalCluster):
    """A scheduler and workers as subprocesses, all on one Redis database (broker and state)."""

    def __init__(self, redis_url: str, logdir: Path, **env: str) -> None:
        test_env = {
            "NERV_WORKER_MODULES": "nerv_testtasks",
            "NERV_LEASE_TTL_MS": "2000",
            "NERV_METRICS_PORT": "0",
            # The production path (a configured key), not the per-cluster key in Redis.
            "NERV_SIGNING_KEY": secrets.token_hex(32),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **env,
        }
        super().__init__(redis_url, logdir, test_env, cwd=ROOT)
        settings = Settings.from_env(self.env)
        # Behind Sentinel: a client of whichever server is the primary now (it follows a failover);
        # rediss://: nerv's TLS options (NERV_REDIS_TLS_CA_CERTS).
        self.redis = (
            connect(settings)
            if is_sentinel(redis_url) or redis_url.startswith("rediss://")
            else redis.Redis.from_url(redis_url, decode_responses=True)
        )
        self.client = Client(settings=settings)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def procs(self) -> list[Service]:
        """Every service started so far, in order (the scheduler first, where a test starts it first)."""
        return self.services

    def signer(self) -> Signer:
        """What the cluster's scheduler signs jobs with (a test making up jobs as the scheduler would)."""
        return Signer(self.env["NERV_SIGNING_KEY"].encode())

    def token(self, run_id: str, task_id: str, attempt: int) -> str:
        """The claim token of one attempt, as the scheduler mints it (a test acting as a worker; the
        claim secret exists once a scheduler led, or is created here as the first leader would)."""
        keys = Settings.from_env(self.env).keys()
        return AttemptTokens(claim_secret(self.redis, keys.claim_secret)).mint(run_id, task_id, attempt)

    def flush(self) -> None:
        """Empty the database (before any process starts)."""
        self.redis.flushdb()

    def scheduler(self, *, wrapper: Sequence[str] = (), **env: str) -> Service:
        """Start a scheduler replica (``env``: variables for it alone)."""
        return self.spawn("scheduler", "scheduler", wrapper=wrapper, env=env)

    def worker(  # type: ignore[override]  # the tests' defaults, and a wait for readiness
        self, queues: str = "cpu", concurrency: int = 2, wait: bool = True, wrapper: Sequence[str] = ()
    ) -> Service:
        """Start a worker (behind ``wrapper``, a command prefix such as ``faketime -f -45s``, if given)
        and (by default) wait until it is ready."""
        proc = super().worker(queues, concurrency, wrapper=wrapper)
        if wait:
            self.wait_log(proc, WORKER_READY_LINE, timeout=30)
        return proc

    def wait_log(self, proc: Service, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` appears in the service's log."""
        try:
            proc.wait_log(text, timeout)
        except ServiceFailed as exc:
            raise AssertionError(f"{exc}; log tail:\n{self.tail(proc)}") from None

    def wait_leader(self, timeout: float = 15) -> None:
        """Wait until some scheduler holds the lease."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.redis.get(self.client.keys.lease):
                return
            time.sleep(0.05)
        raise AssertionError("no scheduler took the lease")

    @staticmethod
    def tail(proc: Service, lines: int = 40) -> str:
        """The last lines of a service's log."""
        return proc.log_tail(lines)

    @staticmethod
    def kill(proc: Service, sig: int = signal.SIGKILL) -> None:
        """Signal a service's whole group (a Celery worker and its pool children)."""
        proc.killpg(sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=10)

    def kill_after_checkpoint(self, sched: Service, run_id: str, timeout: float = 30) -> None:
        """Wait until ``sched`` wrote a checkpoint of ``run_id``, then SIGKILL it (the run is still in
        flight: the next leader must start from that checkpoint)."""
        key = self.client.keys.checkpoint(run_id)
        deadline = time.monotonic() + timeout
        while not self.redis.exists(key) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.redis.exists(key), f"no checkpoint was written; scheduler log:\n{self.tail(sched)}"
        self.kill(sched, signal.SIGKILL)

    def ask_later(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Make a client request while no scheduler runs (issue 13: the client waits for the scheduler's
        answer): ``call(*args, **kwargs)`` in a thread, returned once one more request waits in the
        intake; the future's result is the call's, once a scheduler answered."""
        before = self.redis.xlen(self.client.keys.intake)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(4)
        future = self._pool.submit(call, *args, **kwargs)
        deadline = time.monotonic() + 10
        while self.redis.xlen(self.client.keys.intake) <= before and not future.done():
            assert time.monotonic() < deadline, "the request never reached the intake"
            time.sleep(0.01)
        return future

    def execs(self, run_id: str) -> dict[str, int]:
        """Task id -> number of times a counted task ran."""
        return {k: int(v) for k, v in self.redis.hgetall(f"test:execs:{run_id}").items()}

    def stop(self, timeout: float = 10, *, force: bool = False, warm: bool = False) -> None:
        """Stop everything and leave nothing behind: SIGTERM to every group (not warm by default: a test
        that is over need not let its tasks finish), then SIGKILL; close the connections."""
        try:
            super().stop(timeout, force=force, warm=warm)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self.client.close()
            self.redis.close()
