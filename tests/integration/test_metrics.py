"""The scheduler's Prometheus metrics, scraped over HTTP while and after a run."""

from __future__ import annotations

import re
import time
import urllib.request

import nerv_testtasks as tt
import pytest

from nerv_cluster import RunStatus, Workflow
from nerv_cluster.embedded import free_port
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(120)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(nerv_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_count_dispatches_outcomes_runs_and_the_next_wave(own_cluster: Cluster) -> None:
    c = own_cluster
    port = free_port()
    c.env["NERV_METRICS_PORT"] = str(port)
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("metrics")
    first = [wf.add(tt.slow, 2.0, id=f"first-{i}") for i in range(2)]
    second = [wf.add(tt.add, i, 1, id=f"second-{i}", dependencies=first) for i in range(5)]
    wf.add(tt.total, *second, id="last", queue="io")
    run_id = c.client.submit(wf)
    deadline = time.monotonic() + 20
    soon = 0.0
    while time.monotonic() < deadline and soon < 5:
        soon = _scrape(port).get('nerv_tasks_ready_soon{queue="cpu"}', 0.0)
        time.sleep(0.2)
    assert soon == 5, "while the first layer runs, the whole second layer is the next wave"
    c.worker("io", 2)
    assert c.client.wait(run_id, timeout=60).status is RunStatus.COMPLETED
    time.sleep(1)  # the gauges refresh every watchdog sweep
    m = _scrape(port)
    assert m["nerv_scheduler_leader"] == 1
    assert m['nerv_tasks_dispatched_total{queue="cpu"}'] >= 7
    assert m['nerv_tasks_dispatched_total{queue="io"}'] >= 1
    assert m['nerv_task_outcomes_total{outcome="completed",queue="cpu"}'] >= 7
    assert m['nerv_runs_finished_total{status="COMPLETED"}'] >= 1
    assert m["nerv_dispatch_latency_seconds_count"] >= 8
    assert m['nerv_tasks_ready_soon{queue="cpu"}'] == 0 and m["nerv_runs_active"] == 0
