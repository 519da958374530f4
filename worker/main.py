"""Starting a worker: queues, pool and concurrency chosen per queue kind."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from nerv_cluster import constants
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.settings import Settings
from worker.app import create_worker_app

#: Threads per core for an io worker: its tasks mostly wait.
IO_THREADS_PER_CORE = 8


def worker_argv(
    settings: Settings, queues: Sequence[str], concurrency: int | None, loglevel: str
) -> list[str]:
    """The Celery worker command line for these queues.

    A worker that serves ``cpu`` uses processes (one per core by default); an io-only worker uses
    threads (several per core).
    """
    bad = [q for q in queues if q not in constants.QUEUES]
    if bad or not queues:
        raise ConfigurationError(
            f"unknown queue(s) {bad or queues}; expected some of {', '.join(constants.QUEUES)}"
        )
    cores = os.cpu_count() or 1
    if "cpu" in queues:
        pool, default = "prefork", settings.cpu_concurrency or cores
    else:
        pool, default = "threads", settings.io_concurrency or cores * IO_THREADS_PER_CORE
    name = "-".join(queues)
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--pool={pool}",
        f"--concurrency={concurrency or default}",
        f"--hostname={name}@{socket.gethostname()}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if settings.task_events:
        argv.append("--task-events")
    return argv


def run_worker(
    settings: Settings,
    queues: Sequence[str],
    modules: Sequence[str] | None = None,
    concurrency: int | None = None,
) -> None:
    """Run a worker in this process until it is told to stop (SIGTERM: warm shutdown)."""
    app = create_worker_app(settings, modules)
    app.worker_main(worker_argv(settings, queues, concurrency, settings.log_level))
