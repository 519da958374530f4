"""The one launcher: nerv services (schedulers, workers) as subprocesses of this process.

``nerv demo``, ``nerv dev``, the benchmarks and the integration tests start their services through
:class:`LocalCluster` (``nerv demo`` and ``nerv dev`` through :class:`LocalStack`, Redis and the
standard services on it). What it guarantees:

- **Its own process group.** Every service runs in its own session, so its process group id is the
  pid of its main process (:attr:`Service.pid`). A Ctrl-C in the terminal reaches only the caller, which
  then stops the services in order; signalling the group reaches a Celery worker's pool children too.
- **A log per service**, ``<logdir>/<name>.log`` (stdout and stderr). Names are made unique
  (``worker-cpu``, ``worker-cpu-2``), so two services never share a log.
- **Stopped in order**: :meth:`LocalCluster.stop` sends SIGTERM to every service (warm shutdown: the
  service's own Python process, also under a wrapper that forks, such as ``faketime``), gives them one
  grace period together, then SIGKILLs every process group and reaps the main processes.
- **Nothing left behind**: ``stop`` returns only once no live process is left in any service's group.
  That covers a group whose main process is already gone but whose pool children live on (a SIGKILLed
  Celery main process); a process that outlives SIGKILL raises :class:`ServiceFailed`. If the caller
  itself is killed outright, the kernel SIGKILLs the main processes (the parent-death signal, Linux).
- **Ctrl-C safe**: an interrupt during ``stop``'s grace period still SIGKILLs and reaps everything
  before it propagates, and the ``with`` block stops everything however it is left.

What is out of reach: a process that leaves its service's group (``setsid``), and the children of a
forking wrapper when the caller is killed outright (the parent-death signal reaches only the main
process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from nerv_cluster.client import Client
from nerv_cluster.constants import (
    LAUNCH_REAP_TIMEOUT_S,
    LAUNCH_START_TIMEOUT_S,
    LAUNCH_STOP_TIMEOUT_S,
    UI_DEFAULT_HOST,
    UI_DEFAULT_PORT,
    WORKER_READY_LINE,
)
from nerv_cluster.embedded import EmbeddedRedis, parent_death_signal, tail
from nerv_cluster.errors import ServiceFailed

#: How a service is started: the ``nerv`` command line of the running interpreter.
NERV_COMMAND: tuple[str, ...] = (sys.executable, "-m", "nerv_cluster")
#: How often the waits below look again.
_POLL_S = 0.1
_REAP_POLL_S = 0.02


def parse_stat(raw: str) -> tuple[str, int, int]:
    """(state, parent pid, process group id) from the text of a ``/proc/<pid>/stat`` file."""
    # The command name (2nd field) is in parentheses and may itself hold spaces and parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group id) of a process, from ``/proc``; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    return parse_stat(raw)


def _live_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group id) of every live process (zombies excluded), from ``/proc``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        # Z: a zombie waits for its parent (init, for an orphan) to reap it; X: dead. Neither runs.
        if stat is not None and stat[0] not in ("Z", "X"):
            yield int(entry.name), stat[1], stat[2]


def group_members(pgid: int) -> set[int]:
    """The pids of the live processes in process group ``pgid``.

    Without ``/proc`` (not Linux) it only tells whether the group has any process at all, zombies
    included: ``{pgid}`` or the empty set.
    """
    if os.path.isdir("/proc/self"):
        return {pid for pid, _, group in _live_processes() if group == pgid}
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return set()
    except PermissionError:
        pass  # it exists, but is not ours to signal
    return {pgid}


def _app_args(app: Sequence[str]) -> tuple[str, ...]:
    """``--app a,b`` for a service command, nothing for no modules."""
    return ("--app", ",".join(app)) if app else ()


def _leftovers(services: Sequence[Service]) -> dict[Service, set[int]]:
    """Service -> the live processes of its group, for those of ``services`` that have any (a service
    whose main process is reaped and whose group is empty is marked ``gone``)."""
    found = {s: s.members() for s in services}
    for s, pids in found.items():
        if not pids and s.poll() is not None:
            s.gone = True
    return {s: pids for s, pids in found.items() if pids}


def _exe(pid: int) -> str | None:
    """The resolved path of the program a process runs, None if unknown."""
    try:
        return os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


@dataclass(eq=False)
class Service:
    """One service subprocess (leader of its own process group) and its log file.

    It answers like the :class:`subprocess.Popen` it wraps (``pid``, ``returncode``, ``poll``, ``wait``,
    ``send_signal``), so callers that held a ``Popen`` keep working.
    """

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    #: The command's program, resolved (how to find the service's own process under a wrapper).
    program: str
    #: True when a wrapper command (``faketime``, ``ip netns exec``, ...) runs in front of the program.
    wrapped: bool = False
    #: Set once the main process is reaped and its group seen empty: its pid may then be reused, so
    #: the group is never signalled again (a second ``stop`` must not hit somebody else's processes).
    gone: bool = False

    @property
    def pid(self) -> int:
        """The main process's pid, which is also the process group id."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The main process's exit code once reaped (negative: killed by that signal)."""
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        """True while the main process runs."""
        return self.proc.poll() is None

    def poll(self) -> int | None:
        """The main process's exit code, None while it runs."""
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the main process to exit; its exit code (``subprocess.TimeoutExpired`` on timeout)."""
        return self.proc.wait(timeout=timeout)

    def send_signal(self, sig: int) -> None:
        """Signal the main process only."""
        self.proc.send_signal(sig)

    def killpg(self, sig: int) -> None:
        """Signal the whole process group (a Celery worker and its pool children), unless gone."""
        if self.gone:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def members(self) -> set[int]:
        """The live processes of its group (the main process, pool children, a wrapper's children)."""
        return set() if self.gone else group_members(self.pid)

    def terminate(self, *, group: bool = False) -> None:
        """SIGTERM: to the service's own process (a Celery worker then shuts down warm, letting running
        tasks finish), or with ``group`` to every process of the group (pool children stop at once)."""
        if group:
            self.killpg(signal.SIGTERM)
            return
        for pid in self._service_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _service_pids(self) -> list[int]:
        """The process(es) that run the service's program itself.

        The main process, unless a wrapper runs in front that forks instead of exec-ing (``faketime``
        does): then the wrapper's children, which a SIGTERM to the wrapper would not reach.
        """
        if not self.wrapped or _exe(self.pid) in (self.program, None):
            return [self.pid]
        children = [
            pid for pid, parent, group in _live_processes() if parent == self.pid and group == self.pid
        ]
        return children or [self.pid]

    def log_text(self) -> str:
        """Its whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its log."""
        return tail(self.log_path, lines)

    def wait_log(self, text: str, timeout: float) -> None:
        """Wait until ``text`` appears in its log. Raises :class:`ServiceFailed` if the main process
        exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if not self.alive:
                if text in self.log_text():  # written just before it exited
                    return
                raise ServiceFailed(
                    f"{self.name} exited with code {self.returncode} before logging {text!r}", self
                )
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{self.name} did not log {text!r} within {timeout:.0f}s", self)
            time.sleep(_POLL_S)


class LocalCluster:
    """Schedulers and workers as subprocesses of this process, all on one Redis.

    Each service runs ``python -m nerv_cluster ...`` (or ``command``) in its own session, with the
    environment plus ``env``, in ``cwd`` (default: ``logdir``, so nothing in the caller's directory can
    shadow our imports), its output in ``<logdir>/<name>.log``. ``die_with_parent`` sets the parent-death
    signal (start services from the main thread then: the signal comes when the starting *thread* ends).
    See the module docstring for what it guarantees.
    """

    def __init__(
        self,
        redis_url: str,
        logdir: Path,
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        command: Sequence[str] = NERV_COMMAND,
        die_with_parent: bool = True,
    ) -> None:
        self.redis_url = redis_url
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd if cwd is not None else logdir
        self.command = tuple(command)
        self.die_with_parent = die_with_parent
        self.env = {
            **os.environ,
            "NERV_REDIS_URL": redis_url,
            "NERV_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.services: list[Service] = []

    def spawn(
        self,
        name: str,
        *args: str,
        wrapper: Sequence[str] = (),
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Service:
        """Start ``[*wrapper, *command, *args]`` (by default ``python -m nerv_cluster <args>``) as service
        ``name`` (made unique), with the cluster's environment plus ``env``."""
        program = [*(command if command is not None else self.command)]
        name = self._unique(name)
        log_path = self.logdir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*wrapper, *program, *args],
                env={**self.env, **(env or {})},
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGKILL) if self.die_with_parent else None,
            )
        resolved = os.path.realpath(shutil.which(program[0]) or program[0])
        service = Service(name, proc, log_path, program=resolved, wrapped=bool(wrapper))
        self.services.append(service)
        return service

    def _unique(self, name: str) -> str:
        taken = {s.name for s in self.services}
        n, candidate = 1, name
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def scheduler(self, *, wrapper: Sequence[str] = (), app: Sequence[str] = ()) -> Service:
        """Start a scheduler (``app``: modules it imports, as ``nerv scheduler --app``)."""
        return self.spawn("scheduler", "scheduler", *_app_args(app), wrapper=wrapper)

    def worker(
        self, queues: str, concurrency: int, *, wrapper: Sequence[str] = (), app: Sequence[str] = ()
    ) -> Service:
        """Start a worker for ``queues`` (``cpu``, ``io`` or ``cpu,io``), behind ``wrapper`` if given (a
        command prefix such as ``("faketime", "-f", "-45s")``), running the tasks of ``app`` (modules,
        as ``nerv worker --app``; default: ``NERV_WORKER_MODULES``)."""
        name = f"worker-{queues.replace(',', '-')}"
        args = ("worker", "--queues", queues, "--concurrency", str(concurrency), *_app_args(app))
        return self.spawn(name, *args, wrapper=wrapper)

    def console(self, host: str = UI_DEFAULT_HOST, port: int = UI_DEFAULT_PORT) -> Service:
        """Start the web console (``nerv ui``) on ``host:port``; :meth:`Service.wait_log` for
        :data:`~nerv_cluster.constants.UI_READY_LINE` tells when it listens."""
        return self.spawn("console", "ui", "--host", host, "--port", str(port))

    def workers(self) -> list[Service]:
        """The worker services."""
        return [s for s in self.services if s.name.startswith("worker")]

    def check_alive(self) -> None:
        """Raise :class:`ServiceFailed` if a service has exited."""
        for s in self.services:
            if not s.alive:
                raise ServiceFailed(f"{s.name} exited with code {s.returncode}", s)

    def wait_ready(
        self, client: Client, task_names: set[str], timeout: float = LAUNCH_START_TIMEOUT_S
    ) -> float:
        """Wait until every worker has registered its tasks and a scheduler holds the lease.

        Returns the seconds waited. Raises :class:`ServiceFailed` when a service exits or time runs out.
        """
        started = time.monotonic()
        deadline = started + timeout
        pending = {s.name for s in self.workers()}
        while True:
            self.check_alive()
            for s in self.workers():
                if s.name in pending and WORKER_READY_LINE in s.log_text():
                    pending.discard(s.name)
            registered = task_names <= client.registered_tasks().keys()
            leader = client.redis.get(client.keys.lease) is not None
            if not pending and registered and leader:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                laggard = next((s for s in self.services if s.name in pending), None)
                if laggard is None:
                    laggard = self.services[0]
                what = (
                    f"{laggard.name} not ready" if laggard.name in pending else "no scheduler took the lease"
                )
                raise ServiceFailed(f"{what} after {timeout:.0f}s", laggard)
            time.sleep(_POLL_S)

    def stop(self, timeout: float = LAUNCH_STOP_TIMEOUT_S, *, force: bool = False, warm: bool = True) -> None:
        """Stop every service and leave nothing behind. Idempotent.

        SIGTERM to each service (``warm``: its own process, so a worker lets running tasks finish; not
        ``warm``: its whole group, so pool children stop at once), one grace period of ``timeout`` for
        all, then SIGKILL to every process group; with ``force``, SIGKILL at once. Returns once no live
        process is left in any group; raises :class:`ServiceFailed` if one outlives SIGKILL.
        """
        self._stop(self.services, timeout, force=force, warm=warm)

    def stop_services(
        self,
        services: Sequence[Service],
        timeout: float = LAUNCH_STOP_TIMEOUT_S,
        *,
        force: bool = False,
        warm: bool = True,
    ) -> None:
        """Stop some of the services as :meth:`stop` stops them all, and forget them (``nerv dev``
        restarts its scheduler and workers so; their names, and log files, are free again)."""
        try:
            self._stop(list(services), timeout, force=force, warm=warm)
        finally:
            self.services = [s for s in self.services if s not in services or not s.gone]

    @staticmethod
    def _stop(services: Sequence[Service], timeout: float, *, force: bool, warm: bool) -> None:
        try:
            if not force:
                for s in services:
                    if s.alive:
                        s.terminate(group=not warm)
                deadline = time.monotonic() + timeout
                for s in services:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        s.wait(timeout=max(0.1, deadline - time.monotonic()))
        finally:
            # Also when interrupted: a Ctrl-C during the grace period makes the stop immediate.
            LocalCluster._kill_all(services)

    @staticmethod
    def _kill_all(services: Sequence[Service]) -> None:
        for s in services:
            s.killpg(signal.SIGKILL)  # also pool children a main process left (none, after a clean exit)
        for s in services:
            s.wait()
        # Orphaned group members are init's children, not ours: wait until the kernel has taken them.
        deadline = time.monotonic() + LAUNCH_REAP_TIMEOUT_S
        while left := _leftovers(services):
            if time.monotonic() > deadline:
                s, pids = next(iter(left.items()))
                raise ServiceFailed(f"processes {sorted(pids)} of {s.name}'s group outlived SIGKILL", s)
            for s in left:
                s.killpg(signal.SIGKILL)
            time.sleep(_REAP_POLL_S)

    def leftovers(self) -> dict[Service, set[int]]:
        """Service -> the live processes of its group, for every service that has any (a service whose
        main process is reaped and whose group is empty is marked ``gone``)."""
        return _leftovers(self.services)

    def __iter__(self) -> Iterator[Service]:
        return iter(self.services)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalStack:
    """A whole cluster on this machine: Redis (the embedded one unless ``redis_url`` is given) and a
    :class:`LocalCluster` on it running a scheduler, a ``cpu`` and an ``io`` worker for ``app``
    (modules; default: ``NERV_WORKER_MODULES``). What ``nerv demo`` and ``nerv dev`` bring up.

    :meth:`start` starts Redis, then the services; :meth:`restart_app` replaces the scheduler and the
    workers (new processes import the app's code afresh); :meth:`stop` stops every service, then
    Redis last, and a second Ctrl-C during it makes it immediate.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        app: Sequence[str] = (),
        redis_url: str | None = None,
        cpu: int = 2,
        io: int = 8,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.app = tuple(app)
        self.given_url = redis_url
        self.cpu, self.io = cpu, io
        self.env = dict(env or {})
        self.embedded: EmbeddedRedis | None = None
        self.cluster: LocalCluster | None = None
        #: The services :meth:`restart_app` replaces (others, e.g. a console, stay up).
        self.app_services: list[Service] = []

    @property
    def redis_url(self) -> str:
        """The URL of the Redis everything runs on."""
        if self.cluster is None:
            raise RuntimeError("the stack is not started")
        return self.cluster.redis_url

    @property
    def redis_desc(self) -> str:
        """The Redis URL and where it comes from, for people."""
        if self.embedded is not None:
            return f"{self.redis_url} (embedded, pid {self.embedded.pid})"
        return f"{self.redis_url} (given)"

    def start(self) -> LocalStack:
        """Start Redis (unless given) and the scheduler and workers (not waiting for them)."""
        env = dict(self.env)
        if self.given_url is None:
            self.embedded = EmbeddedRedis(dir=self.workdir / "redis", die_with_parent=True).start()
            url = self.embedded.url
            env["NERV_BROKER_URL"] = ""  # broker = this Redis, whatever the environment says
        else:
            url = self.given_url
        self.cluster = LocalCluster(url, self.workdir / "logs", env)
        self._start_app()
        return self

    def _start_app(self) -> None:
        assert self.cluster is not None
        c = self.cluster
        self.app_services = [
            c.scheduler(app=self.app),
            c.worker("cpu", self.cpu, app=self.app),
            c.worker("io", self.io, app=self.app),
        ]

    def restart_app(self, timeout: float = LAUNCH_STOP_TIMEOUT_S, *, warm: bool = True) -> None:
        """Stop the scheduler and the workers and start new ones. ``warm``: running tasks get
        ``timeout`` to finish; not ``warm``: they stop at once. Either way a task that did not finish
        runs again, as a new attempt on the new workers (the scheduler sees its worker gone)."""
        assert self.cluster is not None
        self.cluster.stop_services(self.app_services, timeout, warm=warm)
        self._start_app()

    def wait_ready(self, client: Client, task_names: Iterable[str] = ()) -> float:
        """Wait until the workers registered ``task_names`` and a scheduler leads (seconds waited)."""
        assert self.cluster is not None
        return self.cluster.wait_ready(client, set(task_names))

    def stop(self) -> None:
        """Stop every service, then Redis; a Ctrl-C meanwhile makes it immediate. Idempotent."""
        try:
            if self.cluster is not None:
                self.cluster.stop()
            if self.embedded is not None:
                self.embedded.stop()
        except KeyboardInterrupt:
            if self.cluster is not None:
                self.cluster.stop(force=True)
            if self.embedded is not None:
                self.embedded.kill()


__all__ = [
    "NERV_COMMAND",
    "LocalCluster",
    "LocalStack",
    "Service",
    "ServiceFailed",
    "group_members",
    "parse_stat",
]
