"""``nerv schedule add|list|pause|resume|trigger|delete`` (issue 11, idem): schedules from the shell.

A thin layer over :class:`~nerv_cluster.client.Client`'s schedule methods; errors are NervErrors,
which ``nerv``'s entry point prints as one red line.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from nerv_cluster.client import Client
from nerv_cluster.errors import RunNotFoundError, ScheduleError
from nerv_cluster.schedules import Schedule, next_slot
from nerv_cluster.settings import Settings

schedule_app = typer.Typer(no_args_is_help=True, help="Schedules: workflows fired by cron or interval.")
console = Console()

_RedisOpt = typer.Option(
    None, "--redis-url", envvar="NERV_REDIS_URL", help="Redis URL (default redis://127.0.0.1:6379/0)."
)
_NameArg = typer.Argument(..., help="The schedule's name.", show_default=False)


def _client(redis_url: str | None) -> Client:
    settings = Settings.from_env()
    return Client(settings=settings.with_(redis_url=redis_url) if redis_url else settings)


def _catchup(text: str) -> bool | int:
    low = text.strip().lower()
    if low in ("false", "no", "0"):
        return False
    if low in ("true", "yes", "all"):
        return True
    try:
        return int(low)
    except ValueError:
        raise ScheduleError(f"--catchup takes true, false or a number of slots, got {text!r}") from None


@schedule_app.command("add")
def add(
    name: str = _NameArg,
    factory: str = typer.Argument(..., help="The task returning the Workflow.", show_default=False),
    cron: str | None = typer.Option(None, "--cron", help="A cron expression, e.g. '0 2 * * *'."),
    every: float | None = typer.Option(None, "--every", help="An interval in seconds."),
    overlap: str = typer.Option("skip", "--overlap", help="skip, buffer_one or allow."),
    catchup: str = typer.Option("false", "--catchup", help="Missed slots: false, true or a number."),
    timezone: str = typer.Option("UTC", "--timezone", help="The time zone cron is read in."),
    kwargs: str = typer.Option("{}", "--kwargs", help="JSON object of keyword arguments for the factory."),
    redis_url: str | None = _RedisOpt,
) -> None:
    """Add (or replace) a schedule."""
    try:
        parsed = json.loads(kwargs)
    except ValueError as exc:
        raise ScheduleError(f"--kwargs is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ScheduleError("--kwargs must be a JSON object")
    client = _client(redis_url)
    try:
        client.schedule(
            name,
            factory,
            cron=cron,
            every=every,
            overlap=overlap,
            catchup=_catchup(catchup),
            timezone=timezone,
            kwargs=parsed,
        )
    finally:
        client.close()
    console.print(f"schedule [bold]{name}[/] added")


def _when(s: Schedule) -> str:
    return f"cron {s.spec.cron} ({s.spec.timezone})" if s.spec.cron else f"every {s.spec.every:g}s"


def _iso(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _rows(client: Client) -> list[dict[str, Any]]:
    seconds, micros = client.redis.time()
    now = int(seconds) + int(micros) / 1e6
    rows = []
    for name, s in sorted(client.schedules().items()):
        status = None
        if s.last_run is not None:
            try:
                status = client.status(s.last_run).status.value
            except RunNotFoundError:
                status = "EXPIRED"
        rows.append(
            {
                "name": name,
                "factory": s.spec.factory,
                "when": _when(s),
                "overlap": s.spec.overlap,
                "catchup": s.spec.catchup,
                "paused": s.paused,
                "next_fire": None if s.paused else next_slot(s.spec, max(s.since, now)),
                "last_slot": s.last_slot,
                "last_run": s.last_run,
                "last_status": status,
                "fired": s.fired,
                "skipped": s.skipped,
            }
        )
    return rows


@schedule_app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    redis_url: str | None = _RedisOpt,
) -> None:
    """Every schedule: its next fire time and its last run with that run's status."""
    client = _client(redis_url)
    try:
        rows = _rows(client)
    finally:
        client.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "when", "overlap", "next fire (UTC)", "last run", "status", "fired", "skipped")
    for r in rows:
        table.add_row(
            r["name"] + (" (paused)" if r["paused"] else ""),
            f"{r['when']} -> {r['factory']}",
            r["overlap"],
            _iso(r["next_fire"]),
            r["last_run"] or "-",
            r["last_status"] or "-",
            str(r["fired"]),
            str(r["skipped"]),
        )
    console.print(table)


@schedule_app.command("pause")
def pause(name: str = _NameArg, redis_url: str | None = _RedisOpt) -> None:
    """Pause a schedule: no slot fires until it is resumed."""
    client = _client(redis_url)
    try:
        client.pause_schedule(name)
    finally:
        client.close()
    console.print(f"schedule [bold]{name}[/] paused")


@schedule_app.command("resume")
def resume(name: str = _NameArg, redis_url: str | None = _RedisOpt) -> None:
    """Resume a paused schedule (the slots that passed meanwhile do not fire)."""
    client = _client(redis_url)
    try:
        client.resume_schedule(name)
    finally:
        client.close()
    console.print(f"schedule [bold]{name}[/] resumed")


@schedule_app.command("trigger")
def trigger(
    name: str = _NameArg,
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the run; exit 1 unless COMPLETED."),
    timeout: float = typer.Option(60.0, "--timeout", help="With --wait: give up after this many seconds."),
    redis_url: str | None = _RedisOpt,
) -> None:
    """Fire a schedule now, once; prints the fire's run id."""
    client = _client(redis_url)
    try:
        run_id = client.trigger_schedule(name)
        if wait:
            deadline = time.monotonic() + timeout
            while True:  # the run exists once the scheduler has read the trigger
                try:
                    result = client.wait(run_id, timeout=max(0.1, deadline - time.monotonic()))
                    break
                except RunNotFoundError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    finally:
        client.close()
    print(run_id)
    if wait and result.status.value != "COMPLETED":
        raise typer.Exit(1)


@schedule_app.command("delete")
def delete(name: str = _NameArg, redis_url: str | None = _RedisOpt) -> None:
    """Delete a schedule (runs it fired go on)."""
    client = _client(redis_url)
    try:
        client.delete_schedule(name)
    finally:
        client.close()
    console.print(f"schedule [bold]{name}[/] deleted")
