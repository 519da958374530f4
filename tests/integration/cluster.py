"""Real processes for integration tests: a scheduler and workers against a test Redis database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from nerv_cluster import Client, Settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_LAUNCH = "from nerv_cluster.cli import main; main()"


class Cluster:
    """A scheduler and workers as subprocesses, all on one Redis database (broker and state)."""

    def __init__(self, redis_url: str, logdir: Path, **env: str) -> None:
        self.redis_url = redis_url
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "NERV_REDIS_URL": redis_url,
            "NERV_WORKER_MODULES": "nerv_testtasks",
            "NERV_LOG_LEVEL": "INFO",
            "NERV_LEASE_TTL_MS": "2000",
            "NERV_METRICS_PORT": "0",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **env,
        }
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.client = Client(settings=Settings.from_env(self.env))
        self._n = 0

    def flush(self) -> None:
        """Empty the database (before any process starts)."""
        self.redis.flushdb()

    def _spawn(self, name: str, *args: str, wrapper: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        self._n += 1
        log = open(self.logdir / f"{self._n:02d}-{name}.log", "wb")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(
            [*wrapper, sys.executable, "-c", _LAUNCH, *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,  # its own process group: killing it kills its pool children too
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def scheduler(self) -> subprocess.Popen[bytes]:
        """Start a scheduler replica."""
        return self._spawn("scheduler", "scheduler")

    def worker(
        self, queues: str = "cpu", concurrency: int = 2, wait: bool = True, wrapper: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """Start a worker and (by default) wait until it is ready. ``wrapper``: a command line the
        worker's command is appended to (e.g. ``faketime -f -45s``)."""
        proc = self._spawn(
            f"worker-{queues}",
            "worker",
            "--queues",
            queues,
            "--concurrency",
            str(concurrency),
            wrapper=wrapper,
        )
        if wait:
            self.wait_log(proc, "ready with", timeout=30)
        return proc

    def wait_log(self, proc: subprocess.Popen[bytes], text: str, timeout: float = 30) -> None:
        """Wait until ``text`` appears in the process's log."""
        deadline = time.monotonic() + timeout
        path = Path(proc.log_path)  # type: ignore[attr-defined]
        while time.monotonic() < deadline:
            if text in path.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{path.name}: {text!r} not seen; log tail:\n{self.tail(proc)}")

    def wait_leader(self, timeout: float = 15) -> None:
        """Wait until some scheduler holds the lease."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.redis.get(self.client.keys.lease):
                return
            time.sleep(0.05)
        raise AssertionError("no scheduler took the lease")

    @staticmethod
    def tail(proc: subprocess.Popen[bytes], lines: int = 40) -> str:
        """The last lines of a process's log."""
        text = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        return "\n".join(text.splitlines()[-lines:])

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal a process's whole group (a Celery worker and its pool children)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGKILL:
            proc.wait(timeout=10)

    def execs(self, run_id: str) -> dict[str, int]:
        """Task id -> number of times a counted task ran."""
        return {k: int(v) for k, v in self.redis.hgetall(f"test:execs:{run_id}").items()}

    def stop(self) -> None:
        """Stop everything: SIGTERM, then SIGKILL what is left."""
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            left = max(0.1, deadline - time.monotonic())
            try:
                proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                self.kill(proc, signal.SIGKILL)
        self.client.close()
        self.redis.close()
