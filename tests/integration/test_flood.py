"""A flood of 10,000 submissions: every run completes and the scheduler's memory stays bounded."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, Workflow
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(600)

RUNS = 10_000
#: Threads submitting at once.
SUBMITTERS = 32
#: Peak resident memory the scheduler may reach during the flood.
MAX_SCHEDULER_RSS_MB = 300


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_ten_thousand_runs_in_a_burst_all_complete_with_bounded_memory(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("flood")
    wf.add(tt.add, 1, 2, id="only")
    t0 = time.monotonic()
    # A burst: many clients at once (each submit waits for the scheduler's answer to its request, so
    # one client submitting in a loop would be a trickle, not a flood).
    with ThreadPoolExecutor(SUBMITTERS) as pool:
        run_ids = list(pool.map(lambda _: c.client.submit(wf), range(RUNS)))
    submitted = time.monotonic() - t0
    deadline = time.monotonic() + 420
    while c.redis.scard(c.client.keys.active) and time.monotonic() < deadline:
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    assert c.redis.scard(c.client.keys.active) == 0, "runs still active after the deadline"
    peak = _peak_rss_mb(sched.pid)
    print(
        f"\n{RUNS} runs: submitted in {submitted:.1f}s, all done in {elapsed:.1f}s; "
        f"scheduler peak RSS {peak:.0f} MB"
    )
    pipe = c.redis.pipeline(transaction=False)
    for rid in run_ids:
        pipe.xrevrange(c.client.keys.log(rid), count=1)
    last = [entries[0][1]["e"] for entries in pipe.execute()]
    assert all(f'"t":"{EventType.WORKFLOW_COMPLETED.value}"' in raw for raw in last)
    assert peak < MAX_SCHEDULER_RSS_MB
    assert c.redis.xlen(c.client.keys.feed) < RUNS, "the leader trims the feed it has processed"
