"""deploy/Dockerfile and docker-compose.yml under a real Docker engine.

One test, in the order a user meets them: the image builds (``conftest.image``) and runs ``nerv demo``
as its non-root user; ``docker compose up`` brings every service to healthy; the ``demo`` profile runs
against the stack; ``--scale worker-cpu=3`` adds workers that a run spreads over; Flower's API answers
with the compose credentials and refuses without them; a cpu worker stopped (SIGTERM, as ``docker
stop`` and a scale-down send it) in the middle of a task finishes it first, so the run completes with
that task recorded once; ``docker compose down -v`` leaves no container or volume behind.

The stack is the compose file as it is, with one override file for what a test on a shared host needs:
the Redis and Flower ports published on free loopback ports (not 5555), and a task module of the test's
bind-mounted into the nerv services' ``/app`` (the image's place for your own ``@task`` modules, named by
``NERV_WORKER_MODULES``), for tasks long enough to spread and to interrupt.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nerv_cluster import Client, RunStatus, Settings, Workflow
from nerv_cluster.model import EventType
from tests.docker import nerv_dockertasks as tasks
from tests.docker.conftest import COMPOSE_FILE, IMAGE_TAG, Image
from tests.docker.engine import CommandFailed, Engine, run
from tests.integration.cluster import ROOT

# Cold (stand-ins and the image built from nothing) takes minutes; warm about two.
pytestmark = pytest.mark.timeout(1500)

#: The non-root user the image runs as (numeric, for Kubernetes' runAsNonRoot).
IMAGE_USER = "10001:10001"
UP_TIMEOUT_S = 240
SCALE = 3
SPREAD_TASKS, SPREAD_NAP_S = 24, 0.5
LONG_NAP_S = 6.0
RUN_TIMEOUT_S = 120.0


class Compose:
    """``docker compose`` for one project: the repository's compose file plus the test's override."""

    def __init__(self, engine: Engine, tmp: Path) -> None:
        self.engine = engine
        self.project = f"nerv-test-{os.getpid()}-{secrets.token_hex(2)}"
        self.password = f"pw-{secrets.token_hex(8)}"
        self.flower_user, self.flower_password = "ops", f"fl-{secrets.token_hex(8)}"
        self.ui_user, self.ui_password = "viewer", f"ui-{secrets.token_hex(8)}"
        module = tmp / f"{tasks.MODULE}.py"
        shutil.copyfile(Path(tasks.__file__), module)
        module.chmod(0o644)  # the image's user (10001) reads it
        override = tmp / "docker-compose.test.yml"
        mount = f'    volumes: ["{module}:/app/{tasks.MODULE}.py:ro"]\n'
        override.write_text(
            "services:\n"
            '  redis:\n    ports: ["127.0.0.1::6379"]\n'
            # Any free port: 5555 may be taken on a shared host. NERV_WORKER_MODULES is every nerv
            # service's (x-nerv-env), so each of them gets the module.
            f'  flower:\n    ports: !override ["127.0.0.1::5555"]\n{mount}'
            '  console:\n    ports: !override ["127.0.0.1::8765"]\n'
            + "".join(f"  {svc}:\n{mount}" for svc in ("scheduler", "worker-cpu", "worker-io", "demo"))
        )
        self.files = [COMPOSE_FILE, override]
        # What the compose file reads from the environment; nothing NERV_/FLOWER_ of the test's own.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("NERV_", "FLOWER_"))}
        self.env.update(
            REDIS_PASSWORD=self.password,
            FLOWER_USER=self.flower_user,
            FLOWER_PASSWORD=self.flower_password,
            NERV_UI_USER=self.ui_user,
            NERV_UI_PASSWORD=self.ui_password,
            NERV_IMAGE_TAG=IMAGE_TAG,
            NERV_WORKER_MODULES=f"nerv_cluster.examples.wordcount,{tasks.MODULE}",
        )

    def expected(self) -> dict[str, tuple[int, bool]]:
        """Service -> (replicas, has a healthcheck), for the services ``up`` starts (those of no profile)."""
        services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
        return {
            name: (int((spec.get("deploy") or {}).get("replicas", 1)), "healthcheck" in spec)
            for name, spec in services.items()
            if not spec.get("profiles")
        }

    def argv(self, *args: str) -> list[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        return [*self.engine.compose, "-p", self.project, "--project-directory", str(ROOT), *files, *args]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), timeout=timeout, env=self.env, check=check)

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """``compose ps -a`` rows (one JSON object a line in Compose v2)."""
        out = self("ps", "-a", "--format", "json", *([service] if service else [])).stdout
        rows: list[dict[str, Any]] = []
        for line in out.splitlines():
            line = line.strip()
            if line:
                got = json.loads(line)
                rows.extend(got if isinstance(got, list) else [got])
        return rows

    def port(self, service: str, port: int) -> int:
        out = self("port", service, str(port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def logs(self) -> str:
        try:
            return self("logs", "--no-color", "--tail", "60", timeout=60, check=False).stdout
        except subprocess.TimeoutExpired:
            return "(compose logs timed out)"


class Flower:
    """HTTP with basic auth to a service of the stack on its published port (Flower, the console)."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def get(self, path: str, auth: str | None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, headers={"Authorization": auth} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def workers(self) -> dict[str, Any]:
        status, body = self.get("/api/workers?refresh=1", self.auth)
        assert status == 200, (status, body[:500])
        got: dict[str, Any] = json.loads(body)
        return got


@pytest.fixture
def stack(engine: Engine, image: Image, tmp_path: Path) -> Iterator[Compose]:
    """The compose project; taken down with its volumes at the end, whatever happened."""
    compose = Compose(engine, tmp_path)
    try:
        yield compose
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=180, check=False)


def _wait(what: str, pred: Any, timeout: float, context: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s\n{context()}"
        time.sleep(0.3)


def _host(worker: str | None) -> str:
    """The host part of a worker id (``host:pid:rand``): the container's hostname."""
    assert worker, "a task that ran names no worker"
    return worker.split(":", 1)[0]


def test_docker_stack(engine: Engine, image: Image, stack: Compose) -> None:
    steps = image.steps
    docker = engine.docker
    config = json.loads(engine("image", "inspect", "--format", "{{json .Config}}", image.ref).stdout)
    assert config["User"] == IMAGE_USER, f"the image runs as {config['User']!r}, not {IMAGE_USER}"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "nerv"], config["Entrypoint"]

    # `docker run nerv-cluster demo`, as its own user, side by side with the stack coming up.
    demo_name = f"{stack.project}-image-demo"
    image_demo = subprocess.Popen(
        [docker, "run", "--rm", "--name", demo_name, image.ref, "demo", "--pages", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ok = False
    try:
        stack(
            "up",
            "-d",
            "--no-build",
            "--pull",
            "never",
            "--wait",
            "--wait-timeout",
            str(UP_TIMEOUT_S),
            timeout=UP_TIMEOUT_S + 60,
        )
        rows = stack.containers()
        health = {r["Name"]: (r["Service"], r.get("Health") or r["State"]) for r in rows}
        want = stack.expected()
        got = {svc: sum(s == svc for s, _ in health.values()) for svc in {s for s, _ in health.values()}}
        assert got == {svc: n for svc, (n, _) in want.items()}, f"containers per service: {got}, want {want}"
        for name, (svc, state) in health.items():
            assert state == ("healthy" if want[svc][1] else "running"), f"{name} is {state}: {health}"
        steps.done(f"compose up --wait: {len(rows)} containers healthy")

        out, _ = image_demo.communicate(timeout=300)
        assert image_demo.returncode == 0, (
            f"docker run {image.ref} demo exited {image_demo.returncode}:\n{out}"
        )
        assert "✓ correct" in out, out
        steps.done("docker run nerv-cluster demo --pages 20 (user 10001)")

        demo = stack("--profile", "demo", "run", "--rm", "-T", "demo", timeout=300, check=False)
        assert demo.returncode == 0, (
            f"compose --profile demo run demo exited {demo.returncode}:\n{demo.stdout}\n{demo.stderr}"
        )
        assert "✓ correct" in demo.stdout, demo.stdout
        steps.done("compose --profile demo run --rm demo")

        flower = Flower(stack.port("flower", 5555), stack.flower_user, stack.flower_password)
        for auth in (None, "Basic " + base64.b64encode(f"{stack.flower_user}:wrong".encode()).decode()):
            status, _ = flower.get("/api/workers", auth)
            assert status == 401, (
                f"Flower's API answered {status} to {'no' if auth is None else 'wrong'} credentials"
            )
        status, _ = flower.get("/healthcheck", None)
        assert status == 200, status
        # The console: its API behind basic auth, the demo's run in it.
        ui = Flower(stack.port("console", 8765), stack.ui_user, stack.ui_password)
        assert ui.get("/api/runs", None)[0] == 401, "the console answered without credentials"
        status, body = ui.get("/api/runs", ui.auth)
        assert status == 200 and any(r["name"] == "word-count" for r in json.loads(body)["runs"]), body[:500]
        steps.done("the console: 401 without credentials, the demo's run with them")

        stack("up", "-d", "--no-build", "--pull", "never", "--scale", f"worker-cpu={SCALE}", timeout=120)
        cpu_hosts = {
            engine("inspect", "--format", "{{.Config.Hostname}}", r["ID"]).stdout.strip(): r["ID"]
            for r in stack.containers("worker-cpu")
        }
        assert len(cpu_hosts) == SCALE, cpu_hosts
        # Flower (with the credentials) sees every cpu worker: cpu@<container hostname>.
        _wait(
            f"Flower lists the {SCALE} cpu workers",
            lambda: {f"cpu@{h}" for h in cpu_hosts} <= set(flower.workers()),
            90,
            stack.logs,
        )
        steps.done(f"--scale worker-cpu={SCALE}: Flower's API lists {SCALE} cpu workers")

        # As a client: the stack's Redis loads deploy/redis/users.acl (its dev-only passwords, the
        # compose file's defaults), where a client's user may only read runs and ask the intake.
        url = f"redis://nerv-client:dev-only-insecure-client@127.0.0.1:{stack.port('redis', 6379)}/0"
        with Client(settings=Settings.from_env({"NERV_REDIS_URL": url})) as client:
            wf = Workflow("docker-spread")
            for i in range(SPREAD_TASKS):
                wf.add(tasks.nap, SPREAD_NAP_S, id=f"nap-{i}")
            result = client.wait(client.submit(wf), timeout=RUN_TIMEOUT_S)
            assert result.status is RunStatus.COMPLETED, result
            ran_on = {tid: _host(t.worker) for tid, t in result.tasks.items()}
            assert set(ran_on.values()) == set(cpu_hosts), (
                f"{SPREAD_TASKS} tasks ran on {sorted(set(ran_on.values()))}, not all of {sorted(cpu_hosts)}"
            )
            assert result.results == ran_on  # nap returns its hostname
            steps.done(f"a run of {SPREAD_TASKS} tasks spread over the {SCALE} cpu workers")

            # A worker stopped mid-task: SIGTERM (docker stop, the compose stop_grace_period as timeout).
            wf = Workflow("docker-warm-shutdown")
            long = wf.add(tasks.nap, LONG_NAP_S, id="long")
            wf.add(tasks.nap, 0.1, long, id="after")
            run_id = client.submit(wf)
            running = _wait(
                "the long task starts",
                lambda: (t := client.status(run_id).tasks["long"]).started_at and t.worker and t,
                60,
                stack.logs,
            )
            host = _host(running.worker)
            assert host in cpu_hosts, (host, cpu_hosts)
            stopping, sigterm_at = time.monotonic(), time.time()
            engine("stop", cpu_hosts[host], timeout=LONG_NAP_S + 120)
            stop_s = time.monotonic() - stopping
            state = json.loads(engine("inspect", "--format", "{{json .State}}", cpu_hosts[host]).stdout)
            assert state["ExitCode"] == 0, f"the stopped worker exited {state['ExitCode']} (137: killed)"
            result = client.wait(run_id, timeout=RUN_TIMEOUT_S)
            assert result.status is RunStatus.COMPLETED, result
            long_result = result.tasks["long"]
            assert long_result.attempts == 1 and _host(long_result.worker) == host, long_result
            # Mid-task: it finished after the SIGTERM (one kernel clock: host and containers agree).
            assert long_result.finished_at is not None and long_result.finished_at > sigterm_at, long_result
            assert _host(result.tasks["after"].worker) != host, "the stopped worker took a new task"
            kinds = [ev.type for ev in client.events(run_id, follow=False) if ev.task_id == "long"]
            assert kinds.count(EventType.TASK_COMPLETED) == 1, kinds
            assert kinds.count(EventType.TASK_STARTED) == 1, kinds
            assert EventType.TASK_PENDING not in kinds, kinds  # never reset for a lost worker
            steps.done(f"SIGTERM mid-task: the worker finished it and exited 0 after {stop_s:.1f}s")

        stack("down", "-v", "--remove-orphans", "--timeout", "30", timeout=180)
        assert stack.containers() == []
        left = engine("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={stack.project}")
        assert left.stdout.strip() == "", f"volumes left after down -v: {left.stdout}"
        steps.done("compose down -v: no container, no volume left")
        ok = True
    except (AssertionError, CommandFailed, subprocess.TimeoutExpired):
        print(f"--- compose logs of {stack.project} ---\n{stack.logs()}")
        raise
    finally:
        if image_demo.poll() is None:
            engine("rm", "-f", demo_name, check=False)
            image_demo.kill()
        image_demo.wait(timeout=30)
        for what, seconds in steps.times:
            print(f"[docker] {seconds:6.1f}s  {what}")
        print(f"[docker] {'passed' if ok else 'FAILED'} after {time.monotonic() - steps.started:.1f}s")
