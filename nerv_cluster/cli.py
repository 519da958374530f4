"""The ``nerv`` command line: run the services, submit and watch workflows, run the demo."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import typer
from rich.console import Console
from rich.table import Table

from nerv_cluster.errors import NervError
from nerv_cluster.logs import setup_logging
from nerv_cluster.settings import Settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="nerv-cluster: a distributed DAG workflow engine on Celery and Redis.",
)
console = Console()


def _settings(redis_url: str | None) -> Settings:
    return Settings.from_env(**({"redis_url": redis_url} if redis_url else {}))


RedisOpt = typer.Option(None, "--redis-url", envvar="NERV_REDIS_URL", help="Redis URL (default redis://127.0.0.1:6379/0).")


@app.command()
def scheduler(redis_url: str | None = RedisOpt) -> None:
    """Run the scheduler service (leader by lease; extra replicas wait as standby)."""
    from nerv_cluster.container import container_for

    settings = _settings(redis_url)
    setup_logging(settings.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    container_for(settings).scheduler().run(stop)


@app.command()
def worker(
    app_module: list[str] = typer.Option(
        [], "--app", "-A", help="Module(s) with @task functions (default: NERV_WORKER_MODULES)."
    ),
    queues: str = typer.Option("cpu", "--queues", "-Q", help="cpu, io or cpu,io"),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", help="Processes (cpu) or threads (io)."),
    redis_url: str | None = RedisOpt,
) -> None:
    """Run a Celery worker for the cpu and/or io queue."""
    from worker.main import run_worker

    settings = _settings(redis_url)
    setup_logging(settings.log_level)
    modules = [m for spec in app_module for m in spec.split(",") if m] or None
    # Let `nerv worker --app some_file_dir_module` find modules next to where it was started.
    sys.path.insert(0, str(Path.cwd()))
    run_worker(settings, [q.strip() for q in queues.split(",") if q.strip()], modules, concurrency)


@app.command()
def check(
    scheduler_lease: bool = typer.Option(False, "--scheduler", help="Also require a scheduler to hold the lease."),
    redis_url: str | None = RedisOpt,
) -> None:
    """Health probe: exit 0 when Redis answers (and, with --scheduler, a scheduler leads)."""
    import redis as redis_lib

    from nerv_cluster.client import connect

    settings = _settings(redis_url)
    try:
        client = connect(settings)
        client.ping()
        holder = client.get(settings.keys().lease)
    except redis_lib.RedisError as exc:
        console.print(f"[red]redis unreachable[/]: {exc}")
        raise typer.Exit(1) from None
    if scheduler_lease and holder is None:
        console.print("[red]no scheduler holds the lease[/]")
        raise typer.Exit(1)
    console.print(f"ok: redis answers; scheduler lease {'held by token ' + holder if holder else 'free'}")


def main() -> None:
    """Console-script entry point: NervError becomes a one-line message and exit code 2."""
    try:
        app()
    except NervError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


__all__ = ["Table", "app", "main"]
