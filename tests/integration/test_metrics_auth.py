"""Who may read the metrics (issue 13, point 5), by real HTTP requests.

1. The scheduler's ``/metrics`` binds to loopback unless ``NERV_METRICS_HOST`` says otherwise, and with
   ``NERV_METRICS_TOKEN`` answers 401 without ``Authorization: Bearer <token>`` (a real scheduler).
2. Flower's ``--basic-auth`` covers its pages and API but NOT its ``/metrics`` (Flower 2.2): this test
   holds that down, which is why the deploy files keep Flower's port internal (compose publishes it on
   127.0.0.1 only; README.md#security).
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nerv_cluster import Settings
from nerv_cluster.embedded import EmbeddedRedis, free_port
from scheduler.metrics import SchedulerMetrics
from tests.integration.cluster import ROOT, Cluster

pytestmark = pytest.mark.timeout(90)

TOKEN = "metrics-token-for-the-test"


def get(url: str, auth: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            get(url)
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing answers at {url}"
            time.sleep(0.2)


def an_address_not_loopback() -> str | None:
    """One of this host's addresses that is not 127.x (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: only picks the outgoing address
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_metrics_bind_loopback_by_default() -> None:
    assert Settings.from_env({}).metrics_host == "127.0.0.1"
    m = SchedulerMetrics()
    port = free_port()
    assert m.serve(port)
    assert m.server is not None and m.server.server_address[0] == "127.0.0.1"
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # no token asked: none configured
    other = an_address_not_loopback()
    if other is not None:  # the host's own address is refused: nothing listens there
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{other}:{port}/metrics", timeout=2)
    m.server.shutdown()


@pytest.fixture
def scheduler_with_token(tmp_path: Path) -> Iterator[tuple[Cluster, int]]:
    with EmbeddedRedis() as server:
        port = free_port()
        c = Cluster(server.url, tmp_path, NERV_METRICS_PORT=str(port), NERV_METRICS_TOKEN=TOKEN)
        try:
            c.scheduler()
            c.wait_leader()
            wait_http(f"http://127.0.0.1:{port}/metrics")
            yield c, port
        finally:
            c.stop()


def test_scheduler_metrics_want_the_bearer_token(scheduler_with_token: tuple[Cluster, int]) -> None:
    _, port = scheduler_with_token
    url = f"http://127.0.0.1:{port}/metrics"
    status, body = get(url)
    assert status == 401 and "nerv_" not in body
    assert get(url, "Bearer wrong-token")[0] == 401
    assert get(url, f"Basic {base64.b64encode(TOKEN.encode()).decode()}")[0] == 401
    status, body = get(url, f"Bearer {TOKEN}")
    assert status == 200 and "nerv_scheduler_leader " in body


def test_flower_basic_auth_does_not_cover_its_metrics(tmp_path: Path) -> None:
    with EmbeddedRedis() as server:
        c = Cluster(server.url, tmp_path)
        port = free_port()
        log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - lives with the process
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "--app", "worker.app:app", "flower", f"--port={port}",
             "--address=127.0.0.1", "--basic-auth=ops:secret"],
            env=c.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/healthcheck")
            auth = "Basic " + base64.b64encode(b"ops:secret").decode()
            assert get(base + "/api/workers")[0] == 401
            assert get(base + "/api/workers", auth)[0] == 200
            assert get(base + "/")[0] == 401
            # /metrics answers anyone: keep Flower's port off any network a stranger reaches.
            status, body = get(base + "/metrics")
            assert status == 200 and "flower_" in body
        finally:
            flower.terminate()
            flower.wait(timeout=10)
            c.stop()
