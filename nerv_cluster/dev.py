"""``nerv dev --app MODULE [--ui]``: a local cluster for your own tasks, reloaded when their code changes.

It brings up what ``nerv demo`` does, through the same :class:`nerv_cluster.launcher.LocalStack`: the
embedded Redis (unless ``--redis-url``), a scheduler (``--app MODULE``, for custom cache keys) and a
``cpu`` and an ``io`` worker running ``MODULE``'s tasks; with ``--ui``, the console (``nerv ui``) too.
It prints the Redis URL to submit to, then watches the module's files: when one changes (its
modification time or size; a package's ``.py`` files, added and removed ones included), the scheduler
and the workers are replaced by new processes, which import the new code (a task running old code is
stopped, and runs again as a new attempt on the new workers). A module that no longer
imports (a syntax error) leaves the services down with the error shown, until the next change. Ctrl-C
(or SIGTERM) stops the services, then Redis, and leaves nothing behind.

Polling, not inotify: a stat of a few files every :data:`~nerv_cluster.constants.DEV_POLL_S` costs
nothing, needs no dependency and works on every file system (network mounts, containers' bind mounts).
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console

from nerv_cluster import constants
from nerv_cluster.client import Client
from nerv_cluster.demo import services_table
from nerv_cluster.embedded import EmbeddedRedisError
from nerv_cluster.errors import ConfigurationError, ServiceFailed
from nerv_cluster.launcher import LocalStack, Service
from nerv_cluster.settings import Settings

#: A file's modification time (ns) and size: what tells that it changed.
Stamp = tuple[int, int]


@dataclass(frozen=True, slots=True)
class App:
    """The user's module: its import name, the ``sys.path`` entry it imports from, what to watch."""

    module: str
    root: Path
    #: The module's file, or a package's directory (every ``.py`` file under it is watched).
    path: Path
    package: bool

    def files(self) -> list[Path]:
        """The files whose change reloads the services."""
        if not self.package:
            return [self.path]
        return sorted(p for p in self.path.rglob("*.py") if "__pycache__" not in p.parts)

    def stamps(self) -> dict[Path, Stamp]:
        """Each watched file's stamp (a file that vanished meanwhile is left out: a change too)."""
        out: dict[Path, Stamp] = {}
        for p in self.files():
            try:
                st = p.stat()
            except OSError:
                continue
            out[p] = (st.st_mtime_ns, st.st_size)
        return out


def locate(spec: str, cwd: Path) -> App:
    """The :class:`App` for ``--app``: a module name importable from ``cwd`` (``flows``,
    ``pkg.tasks``) or the path of a ``.py`` file (imported under its stem, from its directory)."""
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.is_file():
        path = (cwd / path).resolve()
        if not path.is_file():
            raise ConfigurationError(f"--app {spec}: no such file")
        if not path.stem.isidentifier():
            raise ConfigurationError(f"--app {spec}: the file name must be a Python module name")
        return App(path.stem, path.parent, path, package=False)
    parts = spec.split(".")
    if not all(p.isidentifier() for p in parts):
        raise ConfigurationError(f"--app {spec!r} is neither a module name nor a .py file")
    # Found without importing it (only a dotted name's parent packages are imported to find it).
    search = [str(cwd), *sys.path]
    top = importlib.machinery.PathFinder.find_spec(parts[0], search)
    if top is None or top.origin is None:
        raise ConfigurationError(f"--app {spec}: no module {parts[0]!r} in {cwd} or on sys.path")
    root = Path(top.origin).parent.parent if top.submodule_search_locations else Path(top.origin).parent
    found = top
    for i in range(1, len(parts)):
        locations = found.submodule_search_locations
        if not locations:
            raise ConfigurationError(f"--app {spec}: {'.'.join(parts[:i])} is not a package")
        sub = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(locations))
        if sub is None:
            raise ConfigurationError(f"--app {spec}: no module {'.'.join(parts[: i + 1])!r}")
        found = sub
    if found.origin is None or found.origin in ("built-in", "frozen"):
        raise ConfigurationError(f"--app {spec}: not a module from a file")
    origin = Path(found.origin).resolve()
    if found.submodule_search_locations:
        return App(spec, root.resolve(), origin.parent, package=True)
    return App(spec, root.resolve(), origin, package=False)


class Watcher:
    """Tells when the app's files changed and then stayed put for ``settle`` seconds (an editor that
    saves in several writes reloads once)."""

    def __init__(self, app: App, settle: float = constants.DEV_SETTLE_S) -> None:
        self.app = app
        self.settle = settle
        self._seen = app.stamps()

    def changed(self) -> list[Path]:
        """The files that changed since the last call that returned some (empty: none did)."""
        now = self.app.stamps()
        if now == self._seen:
            return []
        while True:  # wait for the writes to settle
            time.sleep(self.settle)
            later = self.app.stamps()
            if later == now:
                break
            now = later
        changed = sorted(p for p in now.keys() | self._seen.keys() if now.get(p) != self._seen.get(p))
        self._seen = now
        return changed


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _pids(stack: LocalStack) -> str:
    """``name pid N`` of each service (tests and people read them to find the processes)."""
    assert stack.cluster is not None
    return ", ".join(f"{s.name} pid {s.pid}" for s in stack.cluster)


def _failure(console: Console, exc: ServiceFailed) -> None:
    console.print(f"[red]{exc}[/]; last lines of {exc.service.log_path}:", soft_wrap=True)
    console.print(exc.service.log_tail(20), markup=False, highlight=False, soft_wrap=True)
    console.print("[yellow]waiting for a change to the app's files[/]", soft_wrap=True)


def _ready(console: Console, stack: LocalStack, client: Client) -> bool:
    """Wait for the services; False (the failure shown) when one of them exited (the app broke)."""
    try:
        waited = stack.wait_ready(client)
    except ServiceFailed as exc:
        _failure(console, exc)
        return False
    console.print(f"ready after {waited:.1f}s: {_pids(stack)}", soft_wrap=True, highlight=False)
    return True


def run_dev(
    console: Console,
    spec: str,
    *,
    redis_url: str | None = None,
    ui_port: int | None = None,
    cpu: int = 2,
    io: int = 4,
    keep_logs: bool = False,
    cwd: Path | None = None,
    stop_when: Callable[[], bool] = lambda: False,
) -> int:
    """Run ``nerv dev`` until Ctrl-C (or ``stop_when()``); returns the exit code. ``ui_port``: also
    serve the console there (the caller checked that ``nerv ui`` exists)."""
    app = locate(spec, cwd or Path.cwd())
    workdir = Path(tempfile.mkdtemp(prefix="nerv-dev-"))
    pythonpath = os.pathsep.join(filter(None, [str(app.root), os.environ.get("PYTHONPATH")]))
    stack = LocalStack(workdir, app=(app.module,), redis_url=redis_url, cpu=cpu, io=io,
                       env={"PYTHONPATH": pythonpath})  # fmt: skip
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` shuts down as Ctrl-C does
    client: Client | None = None
    code = 0
    try:
        stack.start()
        assert stack.cluster is not None
        ui: Service | None = None
        if ui_port is not None:
            ui = stack.cluster.console(constants.UI_DEFAULT_HOST, ui_port)
        client = Client(settings=Settings.from_env(stack.cluster.env))
        url = stack.redis_url
        console.print(
            f"[bold]nerv dev[/]: {app.module} ({app.path}) on the cpu and io queues", soft_wrap=True
        )
        console.print(services_table(stack))
        console.print(f"NERV_REDIS_URL={url}", soft_wrap=True, highlight=False, markup=False)
        console.print(
            f"submit with:  NERV_REDIS_URL={url} nerv submit FILE.py --wait   (or Client({url!r}) in Python)",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        if ui is not None:
            ui.wait_log(constants.UI_READY_LINE, timeout=30)
            console.print(f"console: http://{constants.UI_DEFAULT_HOST}:{ui_port}/", soft_wrap=True)
        watcher = Watcher(app)
        watched = ", ".join(str(p) for p in app.files()[:5])
        console.print(f"watching {watched} for changes; Ctrl-C stops everything", soft_wrap=True)
        up = _ready(console, stack, client)
        while not stop_when():
            time.sleep(constants.DEV_POLL_S)
            changed = watcher.changed()
            if changed:
                names = ", ".join(p.name for p in changed[:5])
                console.print(f"{names} changed: reloading the scheduler and the workers", soft_wrap=True)
                # Not warm: a running task is old code; the new workers run it again (a new attempt).
                stack.restart_app(constants.DEV_RELOAD_STOP_TIMEOUT_S, warm=False)
                up = _ready(console, stack, client)
                if up:
                    console.print(constants.DEV_RELOADED_LINE, highlight=False)
            elif up:  # a service that dies later (the app's code crashed it) is shown once
                dead = next((s for s in stack.app_services if not s.alive), None)
                if dead is not None:
                    _failure(console, ServiceFailed(f"{dead.name} exited with code {dead.returncode}", dead))
                    up = False
            if ui is not None and not ui.alive:
                console.print(f"[red]the console exited with code {ui.returncode}[/]:")
                console.print(ui.log_tail(20), markup=False, highlight=False)
                ui = None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: shutting down")
    except EmbeddedRedisError as exc:
        console.print(f"[red]embedded Redis failed:[/] {exc}", highlight=False)
        code = 1
    finally:
        started = time.monotonic()
        if client is not None:
            client.close()
        stack.stop()
        n = len(stack.cluster.services) if stack.cluster is not None else 0
        console.print(
            f"stopped {n} services{' and Redis' if stack.embedded is not None else ''} "
            f"in {time.monotonic() - started:.1f}s",
            soft_wrap=True,
        )
        signal.signal(signal.SIGTERM, previous)
        if keep_logs:
            console.print(f"logs kept in {workdir / 'logs'}", soft_wrap=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


__all__ = ["App", "Watcher", "locate", "run_dev"]
