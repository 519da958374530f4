"""Flower against a real cluster: its authenticated HTTP API lists our workers and a finished run's tasks.

Flower 2.x serves its ``/api/*`` only when auth is configured (``--basic-auth`` or OAuth); without it the
API answers 401 unless ``FLOWER_UNAUTHENTICATED_API`` is set, which we never do. ``/metrics`` (Prometheus)
is not behind auth in Flower: the deployment keeps it inside the cluster network.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nerv_testtasks as tt
import pytest

from nerv_cluster import RunStatus, Workflow
from nerv_cluster.embedded import EmbeddedRedis, free_port
from tests.integration.cluster import ROOT, Cluster

pytestmark = pytest.mark.timeout(120)

USER, PASSWORD = "user", "pass"
_AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class Flower:
    """A Flower subprocess (own process group) and an HTTP helper."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / "flower.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives with the process
        argv = [sys.executable, "-m", "celery", "--app", "worker.app:app", "flower"]
        argv += [f"--port={self.port}", "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"]
        self.proc = subprocess.Popen(
            argv,
            env={k: v for k, v in env.items() if k != "FLOWER_UNAUTHENTICATED_API"},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        log.close()

    def get(self, path: str, auth: str | None = _AUTH) -> tuple[int, bytes]:
        """GET ``path`` with this Authorization header (None: none): (status, body)."""
        req = urllib.request.Request(self.base + path, headers={"Authorization": auth} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def api(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass


def _poll(what: str, probe: Callable[[], Any], timeout: float, flower: Flower) -> Any:
    """Call ``probe`` until it returns something truthy; fail with the last value and Flower's log."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        assert flower.proc.poll() is None, f"flower exited:\n{flower.tail()}"
        try:
            last = probe()
        except (AssertionError, OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"{what}: not seen within {timeout}s (last: {last!r})\nflower log:\n{flower.tail()}")


@pytest.fixture
def flower_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, Flower]]:
    """A private Redis, a scheduler, a cpu worker and Flower watching them."""
    with EmbeddedRedis() as server:
        c = Cluster(server.url, tmp_path)
        flower: Flower | None = None
        try:
            c.scheduler()
            c.wait_leader()
            c.worker("cpu", 2)
            flower = Flower(c.env, tmp_path)
            yield c, flower
        finally:
            if flower is not None:
                flower.stop()
            c.stop()


def _metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in body for k, v in labels.items()):
            total += float(value)
    return total


def test_flower_api_lists_workers_and_tasks_of_a_finished_run(
    flower_cluster: tuple[Cluster, Flower],
) -> None:
    c, flower = flower_cluster
    _poll("flower answering", lambda: flower.get("/healthcheck", auth=None)[0] == 200, 30, flower)

    # The API is off without credentials: 401, with wrong ones too.
    wrong = "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()
    for path in ("/api/workers", "/api/tasks", "/api/task/info/x"):
        assert flower.get(path, auth=None)[0] == 401, path
        assert flower.get(path, auth=wrong)[0] == 401, path

    # Flower's event receiver is live once it has seen our worker's heartbeat events: from then on it
    # sees every task event (Redis fanout is pub/sub, so events sent before it subscribed are gone).
    def worker_alive() -> list[str]:
        return [name for name, alive in flower.api("/api/workers?status=true").items() if alive]

    alive = _poll("worker alive in flower (events)", worker_alive, 30, flower)
    assert all(name.startswith("cpu@") for name in alive), alive

    wf = Workflow("flower-watched")
    a = wf.add(tt.add, 1, 2, id="a")
    b = wf.add(tt.mul, a, 10, id="b")
    s = [wf.add(tt.add, b, i, id=f"s{i}") for i in range(3)]
    wf.add(tt.total, *s, id="sum")
    res = c.client.wait(c.client.submit(wf), timeout=30)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["sum"] == 93
    run_id = res.run_id
    expected = {
        f"{run_id}:a:1": "nerv_testtasks.add",
        f"{run_id}:b:1": "nerv_testtasks.mul",
        **{f"{run_id}:s{i}:1": "nerv_testtasks.add" for i in range(3)},
        f"{run_id}:sum:1": "nerv_testtasks.total",
    }

    # /api/workers (refresh: Flower inspects the workers over the broker's control channel).
    workers = flower.api("/api/workers?refresh=true")
    ours = [name for name in workers if name.startswith("cpu@")]
    assert ours, f"no cpu@ worker in {list(workers)}"
    info = workers[ours[0]]
    assert "nerv_testtasks.add" in info["registered"], info.get("registered")
    assert {q["name"] for q in info["active_queues"]} == {"cpu"}

    # /api/tasks: every task of the run, under its own Celery name, SUCCESS, run by our worker.
    def run_tasks() -> dict[str, Any]:
        tasks = flower.api("/api/tasks")
        mine = {tid: t for tid, t in tasks.items() if tid.startswith(f"{run_id}:")}
        done = set(mine) == set(expected) and all(t["state"] == "SUCCESS" for t in mine.values())
        return mine if done else {}

    tasks = _poll("the run's tasks SUCCESS in /api/tasks", run_tasks, 30, flower)
    assert {tid: t["name"] for tid, t in tasks.items()} == expected
    assert {t["worker"] for t in tasks.values()} <= set(ours)
    assert {t["routing_key"] for t in tasks.values()} == {"cpu"}
    assert all(t["sent"] and t["received"] and t["started"] and t["succeeded"] for t in tasks.values())
    by_name = flower.api("/api/tasks?taskname=nerv_testtasks.total&state=SUCCESS")
    assert f"{run_id}:sum:1" in by_name

    # /metrics: Prometheus counters of the task events, per task name.
    def metrics() -> str:
        status, body = flower.get("/metrics")
        text = body.decode()
        ok = (
            status == 200
            and _metric_total(text, "flower_events_total", type="task-succeeded", task="nerv_testtasks.add")
            >= 4
        )
        return text if ok else ""

    text = _poll("task-succeeded counted in /metrics", metrics, 30, flower)
    succeeded = {
        name: _metric_total(text, "flower_events_total", type="task-succeeded", task=name)
        for name in ("nerv_testtasks.add", "nerv_testtasks.mul", "nerv_testtasks.total")
    }
    assert succeeded == {"nerv_testtasks.add": 4, "nerv_testtasks.mul": 1, "nerv_testtasks.total": 1}
    for kind in ("task-sent", "task-received", "task-started"):  # task-sent: the scheduler's events
        assert _metric_total(text, "flower_events_total", type=kind) >= 6, kind
    assert _metric_total(text, "flower_task_runtime_seconds_count", task="nerv_testtasks.add") == 4
    online = [line for line in text.splitlines() if line.startswith('flower_worker_online{worker="cpu@')]
    assert online and online[0].endswith(" 1.0"), online
