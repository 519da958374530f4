"""The ``nerv`` command line: run the services, submit and watch workflows, run the demo."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType, ModuleType
from typing import Annotated

import typer
from redis import exceptions as redis_errors
from rich.console import Console
from rich.markup import escape

from nerv_cluster import constants, history, progress
from nerv_cluster.client import Client
from nerv_cluster.errors import (
    ConfigurationError,
    NervError,
    RunNotFoundError,
    SerializationError,
    UnknownTaskError,
    WaitTimeoutError,
)
from nerv_cluster.logs import setup_logging
from nerv_cluster.model import RunStatus
from nerv_cluster.schedule_cli import schedule_app
from nerv_cluster.settings import Settings
from nerv_cluster.state import RunResult, RunState, run_result
from nerv_cluster.workflow import Workflow, nested_tasks

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="nerv-cluster: a distributed DAG workflow engine on Celery and Redis.",
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)

#: How long a stopping scheduler may take before it exits regardless (e.g. while Redis is down).
SCHEDULER_STOP_GRACE_S = 5.0


def _settings(redis_url: str | None) -> Settings:
    settings = Settings.from_env()
    return settings.with_(redis_url=redis_url) if redis_url else settings


RedisOpt = typer.Option(
    None, "--redis-url", envvar="NERV_REDIS_URL", help="Redis URL (default redis://127.0.0.1:6379/0)."
)


@app.command()
def scheduler(
    app_module: Annotated[
        list[str] | None,
        typer.Option(
            "--app",
            "-A",
            help="Module(s) with custom cache key functions (default: NERV_SCHEDULER_MODULES).",
        ),
    ] = None,
    redis_url: str | None = RedisOpt,
) -> None:
    """Run the scheduler service (leader by lease; extra replicas wait as standby)."""
    from nerv_cluster.container import container_for

    settings = _settings(redis_url)
    modules = [m for spec in app_module or [] for m in spec.split(",") if m]
    if modules:
        settings = settings.with_(scheduler_modules=tuple(modules))
        sys.path.insert(0, str(Path.cwd()))
    setup_logging(settings.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Stopping is always safe (the log is the truth), so it must not wait on an unreachable Redis:
        # a second signal, or the grace period running out, ends the process at once.
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()
        timer = threading.Timer(SCHEDULER_STOP_GRACE_S, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    container_for(settings).scheduler().run(stop)


@app.command()
def worker(
    app_module: Annotated[
        list[str] | None,
        typer.Option("--app", "-A", help="Module(s) with @task functions (default: NERV_WORKER_MODULES)."),
    ] = None,
    queues: str = typer.Option("cpu", "--queues", "-Q", help="cpu, io or cpu,io"),
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", help="Processes (cpu) or threads (io)."
    ),
    redis_url: str | None = RedisOpt,
) -> None:
    """Run a Celery worker for the cpu and/or io queue."""
    from worker.main import run_worker

    settings = _settings(redis_url)
    setup_logging(settings.log_level)
    modules = [m for spec in app_module or [] for m in spec.split(",") if m] or None
    # Let `nerv worker --app some_file_dir_module` find modules next to where it was started.
    sys.path.insert(0, str(Path.cwd()))
    run_worker(settings, [q.strip() for q in queues.split(",") if q.strip()], modules, concurrency)


@app.command()
def check(
    scheduler_lease: bool = typer.Option(
        False, "--scheduler", help="Also require a scheduler to hold the lease."
    ),
    redis_url: str | None = RedisOpt,
) -> None:
    """Health probe: exit 0 when Redis answers (and, with --scheduler, a scheduler leads)."""
    import redis as redis_lib

    from nerv_cluster.client import connect

    settings = _settings(redis_url)
    try:
        client = connect(settings, retries=0)  # a probe answers now, it does not ride out outages
        client.ping()
        raw = client.get(settings.keys().lease)
        holder = None if raw is None else str(raw)
    except redis_lib.RedisError as exc:
        console.print(f"[red]redis unreachable[/]: {exc}")
        raise typer.Exit(1) from None
    if scheduler_lease and holder is None:
        console.print("[red]no scheduler holds the lease[/]")
        raise typer.Exit(1)
    console.print(f"ok: redis answers; scheduler lease {'held by token ' + holder if holder else 'free'}")


# -- workflows from files ---------------------------------------------------------------------------------


def load_module(path: Path) -> ModuleType:
    """Import a Python file as a module named after its stem (``flows/etl.py`` -> ``etl``).

    Not as ``__main__``: its ``@task`` functions are registered as ``<stem>.<function>``, the names a
    worker started with ``nerv worker --app <stem>`` registers. The file's directory goes first on
    ``sys.path`` so it can import its neighbours.
    """
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigurationError(f"no such file: {path}")
    stem = path.stem
    if not stem.isidentifier():
        raise ConfigurationError(f"{path.name}: the file name must be a Python module name (got {stem!r})")
    existing = sys.modules.get(stem)
    if existing is not None:
        origin = getattr(existing, "__file__", None)
        if origin and Path(origin).resolve() == path:
            return existing
        raise ConfigurationError(
            f"{path.name}: a module named {stem!r} is already imported from {origin or 'a built-in'}; "
            "rename the file"
        )
    spec = importlib.util.spec_from_file_location(stem, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(stem, None)
        raise
    return module


def load_workflow(path: Path, var: str | None = None) -> tuple[Workflow, str]:
    """The Workflow a file defines, and the module name it was imported as.

    Takes ``--var NAME`` if given (a Workflow, or a function that returns one when called without
    arguments), else the module-level ``workflow``, else the only Workflow instance in the module.
    """
    module = load_module(path)
    name = module.__name__
    if var is not None:
        if not hasattr(module, var):
            raise ConfigurationError(f"{path.name} defines no {var!r}")
        obj = getattr(module, var)
        if not isinstance(obj, Workflow) and callable(obj):
            obj = obj()
        if not isinstance(obj, Workflow):
            raise ConfigurationError(f"{path.name}: {var!r} is a {type(obj).__name__}, not a Workflow")
        return obj, name
    found = getattr(module, "workflow", None)
    if isinstance(found, Workflow):
        return found, name
    candidates = {k: v for k, v in vars(module).items() if isinstance(v, Workflow)}
    if len(candidates) == 1:
        return next(iter(candidates.values())), name
    if not candidates:
        raise ConfigurationError(
            f"{path.name} defines no Workflow: set a module-level `workflow`, or use --var"
        )
    raise ConfigurationError(
        f"{path.name} defines {len(candidates)} Workflows: {', '.join(sorted(candidates))}; choose with --var"
    )


def _client(redis_url: str | None) -> Client:
    return Client(settings=_settings(redis_url))


def _finish(client: Client, run: RunState) -> None:
    """Print a finished run's summary and exit 0 when it COMPLETED, 1 otherwise."""
    result = run_result(run)
    console.print(progress.status_renderable(result, outputs=progress.outputs(run)))
    client.close()
    raise typer.Exit(0 if result.status is RunStatus.COMPLETED else 1)


def _watch(client: Client, run_id: str, timeout: float | None) -> None:
    try:
        run = progress.watch(client, run_id, console, timeout=timeout)
    except WaitTimeoutError as exc:
        console.print(f"[yellow]timeout:[/] {exc}")
        client.close()
        raise typer.Exit(1) from None
    _finish(client, run)


def _check_workers_know(client: Client, wf: Workflow, file: Path, module: str) -> None:
    """Refuse a workflow whose task names no worker registered (once any worker has registered).

    ``Client.submit`` also accepts names known to this process's registry, and importing the file
    registered all of its tasks here; only the workers' registry tells whether anyone can run them.
    """
    known = client.registered_tasks()
    if not known:
        return
    missing = sorted({t.fn for t in nested_tasks(wf.definition())} - known.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise UnknownTaskError(
            f"no worker has registered {shown}; {file.name} was imported as module {module!r}, so start "
            f"workers with `nerv worker --app {module}` (in {file.resolve().parent} or with it on PYTHONPATH)"
        )


# -- commands for users ---------------------------------------------------------------------------------

FileArg = typer.Argument(..., help="A Python file that defines a Workflow.", show_default=False)
VarOpt = typer.Option(
    None,
    "--var",
    help="The variable holding the Workflow (or a function returning one). Default: `workflow`.",
)
RunArg = typer.Argument(..., help="A run id (as printed by `nerv submit`).", show_default=False)


@app.command()
def submit(
    file: Path = FileArg,
    wait: bool = typer.Option(False, "--wait", "-w", help="Show live progress until the run ends."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="With --wait: give up after this many seconds."
    ),
    var: str | None = VarOpt,
    refresh_cache: bool = typer.Option(
        False, "--refresh-cache", help="Cached tasks compute; their results replace the cached ones."
    ),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="The same key gives the same run (while it is retained)."
    ),
    priority: str | None = typer.Option(
        None, "--priority", help="Run priority among the tenant's runs: low, medium, high, critical."
    ),
    tenant: str | None = typer.Option(
        None, "--tenant", help="Whose share of the workers the run takes (NERV_TENANT_WEIGHTS)."
    ),
    redis_url: str | None = RedisOpt,
) -> None:
    """Submit the workflow a Python file defines and print its run id.

    The file is imported as a module named after it (flows/etl.py -> etl), so its tasks are named
    etl.<function>: start workers with `nerv worker --app etl` (from that directory, or with it on
    PYTHONPATH). With --wait, exit 0 when the run COMPLETED and 1 otherwise.
    """
    wf, module = load_workflow(file, var)
    client = _client(redis_url)
    try:
        # Structural errors (a cycle, a bad argument) first: they matter more than a worker to start.
        wf.validate(max_payload_bytes=client.settings.max_payload_bytes, max_tasks=client.settings.max_tasks)
        _check_workers_know(client, wf, file, module)
        run_id = client.submit(
            wf,
            refresh_cache=refresh_cache,
            idempotency_key=idempotency_key,
            priority=priority,
            tenant=tenant,
        )
    except NervError:
        client.close()
        raise
    if not wait:
        print(run_id)
        client.close()
        return
    console.print(f"submitted [bold]{run_id}[/] ({len(wf)} tasks)")
    _watch(client, run_id, timeout)


@app.command()
def watch(
    run_id: str = RunArg,
    timeout: float | None = typer.Option(None, "--timeout", help="Give up after this many seconds."),
    redis_url: str | None = RedisOpt,
) -> None:
    """Show a run's progress live until it ends; exit 0 when it COMPLETED, 1 otherwise."""
    _watch(_client(redis_url), run_id, timeout)


@app.command()
def status(
    run_id: str = RunArg,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output, every task included."),
    at: str | None = typer.Option(
        None,
        "--at",
        help="Time travel: the state after the first N events of the run's log (or up to a cursor, "
        "a log entry id).",
    ),
    redis_url: str | None = RedisOpt,
) -> None:
    """A run's status: counts per task status, failed tasks with their errors, duration."""
    client = _client(redis_url)
    try:
        if at is None:
            run = progress.load_run(client, run_id)
        else:
            run = history.read_state(client.log, run_id, history.parse_position(at))
    finally:
        client.close()
    result = run_result(run)
    if as_json:
        print(json.dumps(progress.result_dict(result), indent=2, default=str))
        return
    console.print(progress.status_renderable(result, outputs=progress.outputs(run)))


@app.command()
def cancel(
    run_id: str = RunArg,
    reason: str = typer.Option("cancelled by user", "--reason", help="Recorded with the run."),
    redis_url: str | None = RedisOpt,
) -> None:
    """Cancel a run: nothing new starts, running tasks are revoked."""
    client = _client(redis_url)
    try:
        client.cancel(run_id, reason)
    finally:
        client.close()
    console.print(f"cancel requested for [bold]{run_id}[/] (follow it with `nerv watch {run_id}`)")


@app.command("signal")
def signal_cmd(
    run_id: str = RunArg,
    name: str = typer.Argument(..., help="The signal name a wait_for node of the run waits for."),
    data: str = typer.Option("null", "--data", "-d", help="The payload, as JSON (the node's result)."),
    redis_url: str | None = RedisOpt,
) -> None:
    """Send a signal to a run: its wait_for(NAME) node completes with the payload (now if it waits,
    else as soon as it is reached)."""
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise SerializationError(f"--data is not JSON: {exc}") from None
    client = _client(redis_url)
    try:
        first = client.signal(run_id, name, payload)
    finally:
        client.close()
    if first:
        console.print(f"signal [bold]{escape(name)}[/] sent to [bold]{run_id}[/]")
    else:
        console.print(
            f"signal [bold]{escape(name)}[/] was already received by [bold]{run_id}[/]: "
            "this one changes nothing"
        )


app.add_typer(schedule_app, name="schedule")  # idem (issue 11): nerv schedule add|list|...

acl_app = typer.Typer(no_args_is_help=True, help="Redis ACL users per role (README.md#security).")
app.add_typer(acl_app, name="acl")


@acl_app.command("render")
def acl_render(
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace",
            "-n",
            help="A namespace to render users for (repeatable; default NERV_NAMESPACE or nerv).",
        ),
    ] = None,
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="Render only these roles (repeatable; default all; admin always)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write here instead of standard output."),
    ] = None,
    mode: Annotated[
        str,
        typer.Option("--mode", help="The file's permissions, octal (644 for a compose bind mount)."),
    ] = "600",
) -> None:
    """Write users.acl for redis-server --aclfile, passwords from NERV_ACL_<ROLE>_PASSWORD (hashed)."""
    from nerv_cluster import acl

    namespaces = namespace or [Settings.from_env().namespace]
    try:
        text = acl.render(namespaces, os.environ, roles=role or (*acl.GLOBAL_ROLES, *acl.ROLES))
    except ConfigurationError as exc:
        err_console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    if output is None:
        sys.stdout.write(text)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(output, int(mode, 8))  # only hashes inside; a container's redis user may need to read it
    err_console.print(f"wrote {len(acl.users(text))} users to {output}")


cache_app = typer.Typer(no_args_is_help=True, help="The result cache of tasks with cache=Cache(...).")
app.add_typer(cache_app, name="cache")


@cache_app.command("clear")
def cache_clear(
    task: str | None = typer.Option(
        None, "--task", help="Only the entries of this task function (its registered name)."
    ),
    redis_url: str | None = RedisOpt,
) -> None:
    """Delete cached results (all, or one task function's): those tasks compute again next time."""
    client = _client(redis_url)
    try:
        n = client.clear_cache(task)
    finally:
        client.close()
    what = f" of {task}" if task else ""
    console.print(f"deleted {n} cache entr{'y' if n == 1 else 'ies'}{what}")


# -- limits (issue 11, part "limits") -----------------------------------------------------------------

limit_app = typer.Typer(no_args_is_help=True, help="Concurrency keys' limits, changed at run time.")
app.add_typer(limit_app, name="limit")


@limit_app.command("set")
def limit_set(
    key: str = typer.Argument(..., help="A resolved concurrency key, as 'crm-api' or 'tenant:acme'."),
    limit: int = typer.Argument(..., help="Attempts at most at once from now on (0 holds them all)."),
    redis_url: str | None = RedisOpt,
) -> None:
    """Set a concurrency key's limit cluster-wide (an event: it survives a scheduler restart)."""
    client = _client(redis_url)
    try:
        client.set_limit(key, limit)
    finally:
        client.close()
    console.print(f"limit of [bold]{escape(key)}[/] set to {limit}")


@limit_app.command("clear")
def limit_clear(
    key: str = typer.Argument(..., help="A concurrency key set with `nerv limit set`."),
    redis_url: str | None = RedisOpt,
) -> None:
    """Go back to the limit the key's tasks declare."""
    client = _client(redis_url)
    try:
        client.set_limit(key, None)
    finally:
        client.close()
    console.print(f"limit of [bold]{escape(key)}[/] back to the declared one")


@limit_app.command("list")
def limit_list(redis_url: str | None = RedisOpt) -> None:
    """The limits set at run time, by key."""
    client = _client(redis_url)
    try:
        limits = client.limits()
    finally:
        client.close()
    if not limits:
        console.print("no limits set at run time (tasks use the limits they declare)")
    for key, n in sorted(limits.items()):
        console.print(f"{escape(key)}\t{n}")


@app.command()
def rerun(
    run_id: str = RunArg,
    task_ids: Annotated[
        list[str] | None,
        typer.Option("--task", "-t", help="Rerun this task and its descendants (repeatable)."),
    ] = None,
    wait: bool = typer.Option(False, "--wait", "-w", help="Show live progress until the run ends again."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="With --wait: give up after this many seconds."
    ),
    redis_url: str | None = RedisOpt,
) -> None:
    """Rerun a finished run: every task that did not complete gets a new attempt (with --task: those
    tasks and their descendants); completed tasks keep their results. With --wait, exit 0 when the run
    COMPLETED and 1 otherwise."""
    client = _client(redis_url)
    try:
        client.rerun(run_id, tasks=task_ids or None)
    except NervError:
        client.close()
        raise
    if not wait:
        console.print(f"rerun requested for [bold]{run_id}[/] (follow it with `nerv watch {run_id}`)")
        client.close()
        return
    console.print(f"rerun requested for [bold]{run_id}[/]")
    _watch(client, run_id, timeout)


@app.command()
def plan(file: Path = FileArg, var: str | None = VarOpt) -> None:
    """Plan a workflow file locally (no Redis): dependency levels, width, critical path."""
    wf, _ = load_workflow(file, var)
    console.print(progress.plan_renderable(wf, wf.plan()))


@app.command()
def runs(
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many runs."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    redis_url: str | None = RedisOpt,
) -> None:
    """The most recent runs, newest first, with their status."""
    client = _client(redis_url)
    rows: list[tuple[str, float, RunResult | None]] = []
    try:
        for run_id, submitted in client.runs(limit):
            try:
                rows.append((run_id, submitted, client.status(run_id)))
            except RunNotFoundError:
                rows.append((run_id, submitted, None))
    finally:
        client.close()
    if as_json:
        out = [
            {
                "run_id": rid,
                "submitted_at": ts,
                **(progress.result_dict(r, tasks=False) if r else {"status": "EXPIRED"}),
            }
            for rid, ts, r in rows
        ]
        print(json.dumps(out, indent=2, default=str))
        return
    console.print(progress.runs_renderable(rows))


@app.command()
def ui(
    host: str = typer.Option(
        constants.UI_DEFAULT_HOST, "--host", help="Address to listen on (not loopback: needs auth)."
    ),
    port: int = typer.Option(
        constants.UI_DEFAULT_PORT, "--port", min=0, max=65535, help="Port to listen on."
    ),
    redis_url: str | None = RedisOpt,
) -> None:
    """Serve the web console: runs, their DAG live, a timeline, time travel, actions, a JSON API.

    Credentials come from NERV_UI_TOKEN (a bearer token) or NERV_UI_USER and NERV_UI_PASSWORD (basic
    auth); without them it listens on a loopback address only.
    """
    from nerv_cluster.console import serve

    setup_logging()
    console.print(f"nerv console on [bold]http://{host}:{port}/[/] (Ctrl-C to stop)")
    serve(host, port, settings=_settings(redis_url))


@app.command()
def demo(
    pages: int = typer.Option(200, "--pages", min=1, help="Pages to fetch and count (2 x pages + 1 tasks)."),
    keep_logs: bool = typer.Option(False, "--keep-logs", help="Keep the services' log files."),
    redis_url: str | None = typer.Option(
        None, "--redis-url", envvar="NERV_REDIS_URL", help="Use this Redis instead of an embedded one."
    ),
    ui: bool = typer.Option(
        False, "--ui", help="Also serve the web console, and keep everything up after the run until Ctrl-C."
    ),
    ui_port: int = typer.Option(
        constants.UI_DEFAULT_PORT, "--ui-port", help="The console's port (with --ui)."
    ),
    join: bool = typer.Option(
        False,
        "--join",
        help="Start nothing: run the workflow on the cluster already serving NERV_REDIS_URL (as a client).",
    ),
) -> None:
    """Run a word-count workflow on a throw-away local cluster: nothing to install beyond this package.

    Starts Redis (embedded, unless NERV_REDIS_URL is set), a scheduler, a cpu worker and an io worker,
    runs 2 x pages + 1 tasks with live progress, checks the answer, and shuts everything down. With
    --join it starts nothing and runs the workflow on the cluster already there (docker compose's demo).
    """
    from nerv_cluster.demo import join_demo, run_demo

    if join:
        raise typer.Exit(join_demo(console, pages=pages))
    raise typer.Exit(
        run_demo(console, pages=pages, keep_logs=keep_logs, redis_url=redis_url, ui=ui, ui_port=ui_port)
    )


def has_command(name: str) -> bool:
    """Whether this ``nerv`` has the command ``name`` (``nerv dev --ui`` needs the console's ``ui``)."""
    for info in app.registered_commands:
        callback = info.callback
        named = info.name or (callback.__name__.replace("_", "-") if callback is not None else None)
        if named == name:
            return True
    return False


@app.command()
def dev(
    app_module: str = typer.Option(
        ..., "--app", "-A", help="Your module with @task functions: a module name or a .py file."
    ),
    ui: bool = typer.Option(False, "--ui", help="Also serve the web console (nerv ui)."),
    ui_port: int = typer.Option(
        constants.UI_DEFAULT_PORT, "--ui-port", help="The console's port, with --ui."
    ),
    cpu: int = typer.Option(2, "--cpu", min=1, help="Processes of the cpu worker."),
    io: int = typer.Option(4, "--io", min=1, help="Threads of the io worker."),
    keep_logs: bool = typer.Option(False, "--keep-logs", help="Keep the services' log files."),
    redis_url: str | None = typer.Option(
        None, "--redis-url", help="Use this Redis instead of an embedded one."
    ),
) -> None:
    """A local cluster for your own tasks until Ctrl-C: Redis, a scheduler, cpu and io workers.

    Starts Redis (embedded unless --redis-url), a scheduler and a cpu and an io worker for the module,
    prints the Redis URL to submit to, and restarts the scheduler and the workers whenever the module's
    file changes. Ctrl-C stops everything, Redis last.
    """
    from nerv_cluster.dev import run_dev

    if ui and not has_command("ui"):
        console.print("[red]error:[/] the console is not installed: this nerv has no `nerv ui` command")
        raise typer.Exit(2)
    code = run_dev(
        console,
        app_module,
        redis_url=redis_url,
        ui_port=ui_port if ui else None,
        cpu=cpu,
        io=io,
        keep_logs=keep_logs,
    )
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point: NervError (and an unreachable Redis) become one red line and exit 2."""
    try:
        app(prog_name="nerv")
    except NervError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(2)
    except redis_errors.ConnectionError as exc:
        console.print(f"[red]error:[/] cannot reach Redis: {escape(str(exc))}")
        sys.exit(2)


__all__ = ["app", "has_command", "load_module", "load_workflow", "main"]
