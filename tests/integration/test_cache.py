"""Result caching (issue 16, part "cache") end to end: real Redis, a real scheduler, real workers.

Every cached test task counts its executions in Redis under a label of the test's own (``test:cache:
<label>``), across runs: "ran once" is that counter staying 1.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import nerv_testtasks as tt
import pytest
from typer.testing import CliRunner

from nerv_cluster import Cache, EventType, RunStatus, TaskStatus, Workflow
from nerv_cluster.cli import app
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(120)


def _label() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def _count(cluster: Cluster, label: str) -> int:
    return int(cluster.redis.get(f"test:cache:{label}") or 0)


def _kinds(cluster: Cluster, run_id: str, task_id: str) -> list[EventType]:
    return [ev.type for ev in cluster.client.events(run_id, follow=False) if ev.task_id == task_id]


def test_a_hit_completes_without_a_worker_and_is_marked_cached(cluster: Cluster) -> None:
    label = _label()

    def flow() -> Workflow:
        wf = Workflow("cache-hit")
        first = wf.add(tt.cached_count, label, 7, id="first")
        wf.add(tt.total, 1, dependencies=[first], id="after")
        return wf

    one = cluster.client.wait(cluster.client.submit(flow()), timeout=60)
    assert one.status is RunStatus.COMPLETED, one.reason
    assert one.results["first"] == {"value": 7, "execution": 1}
    assert not one.tasks["first"].cached
    two_id = cluster.client.submit(flow())
    two = cluster.client.wait(two_id, timeout=60)
    assert two.status is RunStatus.COMPLETED, two.reason
    assert _count(cluster, label) == 1  # the second run never called it
    t = two.tasks["first"]
    assert t.result == {"value": 7, "execution": 1} and t.status is TaskStatus.COMPLETED
    assert t.cached and t.cached_from == f"{one.run_id}/first" and t.attempts == 0 and t.worker is None
    assert two.results["after"] == 1  # dependents of a hit run as usual
    # No job at all: the task went from READY to COMPLETED, marked in its event.
    assert _kinds(cluster, two_id, "first") == [EventType.TASK_COMPLETED]
    done = next(ev for ev in cluster.client.events(two_id, follow=False) if ev.task_id == "first")
    assert done.data["cached"] is True and done.data["cached_from"] == f"{one.run_id}/first"
    # Other arguments are another key: computed.
    wf = Workflow("cache-other-args")
    wf.add(tt.cached_count, label, 8, id="first")
    three = cluster.client.wait(cluster.client.submit(wf), timeout=60)
    assert three.results["first"] == {"value": 8, "execution": 2} and not three.tasks["first"].cached


def test_upstream_results_are_part_of_the_key(cluster: Cluster) -> None:
    label = _label()

    def flow(x: int) -> Workflow:
        wf = Workflow("cache-upstream")
        up = wf.add(tt.add, x, 0)
        wf.add(tt.cached_count, label, up, id="down")
        return wf

    runs = [cluster.client.wait(cluster.client.submit(flow(x)), timeout=60) for x in (1, 2, 1)]
    assert [r.results["down"]["execution"] for r in runs] == [1, 2, 1]
    assert [r.tasks["down"].cached for r in runs] == [False, False, True]
    assert _count(cluster, label) == 2


def test_an_entry_past_its_ttl_is_a_miss(cluster: Cluster) -> None:
    label = _label()

    def run() -> tuple[int, bool]:
        wf = Workflow("cache-ttl")
        wf.add(tt.cached_count, label, 1, id="t", cache=Cache(ttl=1.0))
        res = cluster.client.wait(cluster.client.submit(wf), timeout=60)
        assert res.status is RunStatus.COMPLETED, res.reason
        return res.results["t"]["execution"], res.tasks["t"].cached

    assert run() == (1, False)
    assert run() == (1, True)
    time.sleep(1.3)  # Redis expires the entry on its own clock
    assert run() == (2, False)
    assert _count(cluster, label) == 2


def test_single_flight_in_one_run(cluster: Cluster) -> None:
    label = _label()
    wf = Workflow("cache-flight-one-run")
    for i in range(4):
        wf.add(tt.cached_slow, label, 0.5, id=f"same-{i}")
    res = cluster.client.wait(cluster.client.submit(wf), timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert _count(cluster, label) == 1
    assert {t.result for t in res.tasks.values()} == {1}
    assert sorted(t.cached for t in res.tasks.values()) == [False, True, True, True]


def test_single_flight_across_runs_and_the_next_runs_when_the_first_fails(cluster: Cluster) -> None:
    label = _label()

    def flow() -> Workflow:
        wf = Workflow("cache-flight-runs")
        wf.add(tt.cached_slow, label, 1.0, id="t")
        return wf

    ids = [cluster.client.submit(flow()) for _ in range(3)]
    results = [cluster.client.wait(rid, timeout=60) for rid in ids]
    assert all(r.status is RunStatus.COMPLETED for r in results), [r.reason for r in results]
    assert _count(cluster, label) == 1
    assert [r.results["t"] for r in results] == [1, 1, 1]
    assert [r.tasks["t"].cached for r in results] == [False, True, True]
    # The held ones took no worker slot: their logs hold no dispatch of the task.
    for rid in ids[1:]:
        assert _kinds(cluster, rid, "t") == [EventType.TASK_COMPLETED]

    # The first computation fails: exactly one of the held ones runs, and the last takes its result.
    label = _label()
    first = Workflow("cache-flight-fails")
    first.add(tt.cached_fails_first, label, 1.0, id="t")
    ids = [cluster.client.submit(first) for _ in range(3)]
    results = [cluster.client.wait(rid, timeout=60) for rid in ids]
    assert results[0].status is RunStatus.FAILED and "first execution" in results[0].reason
    assert [r.status for r in results[1:]] == [RunStatus.COMPLETED, RunStatus.COMPLETED]
    assert _count(cluster, label) == 2
    assert sorted((r.results["t"], r.tasks["t"].cached) for r in results[1:]) == [(2, False), (2, True)]


def test_refresh_recomputes_and_replaces_the_entry(cluster: Cluster, tmp_path: Path) -> None:
    label = _label()

    def flow() -> Workflow:
        wf = Workflow("cache-refresh")
        wf.add(tt.cached_count, label, 3, id="t")
        return wf

    one = cluster.client.wait(cluster.client.submit(flow()), timeout=60)
    two = cluster.client.wait(cluster.client.submit(flow(), refresh_cache=True), timeout=60)
    three = cluster.client.wait(cluster.client.submit(flow()), timeout=60)
    assert one.results["t"]["execution"] == 1 and not one.tasks["t"].cached
    assert two.results["t"]["execution"] == 2 and not two.tasks["t"].cached
    assert three.results["t"]["execution"] == 2 and three.tasks["t"].cached
    assert three.tasks["t"].cached_from == f"{two.run_id}/t"
    assert _count(cluster, label) == 2
    # The same from the command line: nerv submit --refresh-cache.
    flow_file = tmp_path / "cache_refresh_flow.py"
    flow_file.write_text(
        "import nerv_testtasks as tt\n"
        "from nerv_cluster import Workflow\n"
        "workflow = Workflow('cache-refresh')\n"
        f"workflow.add(tt.cached_count, {label!r}, 3, id='t')\n"
    )
    url = cluster.client.settings.redis_url
    out = CliRunner().invoke(app, ["submit", str(flow_file), "--refresh-cache", "--redis-url", url])
    assert out.exit_code == 0, out.output
    four = cluster.client.wait(out.output.strip().splitlines()[-1], timeout=60)
    assert four.results["t"]["execution"] == 3 and not four.tasks["t"].cached


def test_cache_clear_by_task_and_all(cluster: Cluster) -> None:
    label = _label()

    def run() -> int:
        wf = Workflow("cache-clear")
        wf.add(tt.cached_count, label, 5, id="t")
        wf.add(tt.cached_slow, label + "-slow", 0.0, id="s")
        res = cluster.client.wait(cluster.client.submit(wf), timeout=60)
        assert res.status is RunStatus.COMPLETED, res.reason
        return int(res.results["t"]["execution"])

    assert run() == 1
    assert run() == 1
    assert cluster.client.clear_cache(tt.cached_count) >= 1
    assert run() == 2  # recomputed; the other function's entry was kept
    assert _count(cluster, label + "-slow") == 1
    runner = CliRunner()
    url = cluster.client.settings.redis_url
    out = runner.invoke(app, ["cache", "clear", "--redis-url", url])
    assert out.exit_code == 0 and "deleted" in out.output, out.output
    assert cluster.redis.keys(f"{cluster.client.keys.prefix}:cache:*") == []
    assert run() == 3
    assert _count(cluster, label + "-slow") == 2


def test_a_key_function_the_scheduler_lacks_fails_the_task_clearly(cluster: Cluster) -> None:
    # The shared cluster's scheduler imports no modules: the custom key cannot be computed.
    wf = Workflow("cache-no-key-fn")
    wf.add(tt.cached_by_label, _label(), 1, id="t")
    res = cluster.client.wait(cluster.client.submit(wf), timeout=60)
    assert res.status is RunStatus.FAILED
    err = res.tasks["t"].error
    assert err is not None and err.type == "CacheKeyError"
    assert "nerv_testtasks.first_arg_key" in err.message and "--app" in err.message


def test_a_custom_key_and_a_new_leader_keeps_single_flight(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler(NERV_SCHEDULER_MODULES="nerv_testtasks")
    c.wait_leader()
    c.worker("cpu", 2)
    label = _label()

    def keyed(noise: int) -> Workflow:
        wf = Workflow("cache-custom-key")
        wf.add(tt.cached_by_label, label, noise, id="t")
        return wf

    runs = [c.client.wait(c.client.submit(keyed(n)), timeout=60) for n in (1, 2)]
    assert [r.results["t"] for r in runs] == [1, 1]  # noise is not part of the key
    assert [r.tasks["t"].cached for r in runs] == [False, True]

    # A slow computation in flight; the scheduler is SIGKILLed; a second run of the same key arrives;
    # the new leader rebuilds the in-flight map from the log and holds it: computed once.
    slow = _label()
    wf = Workflow("cache-takeover")
    wf.add(tt.cached_slow, slow, 8.0, id="t")  # still running when the new leader decides
    first = c.client.submit(wf)
    deadline = time.monotonic() + 20
    while _count(c, slow) == 0:
        assert time.monotonic() < deadline, "the slow task never started"
        time.sleep(0.05)
    c.kill(sched, signal.SIGKILL)
    asked = c.ask_later(c.client.submit, wf)  # waits in the intake for the next leader
    c.scheduler(NERV_SCHEDULER_MODULES="nerv_testtasks")
    second = asked.result(timeout=30)
    a, b = c.client.wait(first, timeout=60), c.client.wait(second, timeout=60)
    assert a.status is RunStatus.COMPLETED and b.status is RunStatus.COMPLETED, (a.reason, b.reason)
    assert _count(c, slow) == 1
    assert (a.results["t"], b.results["t"], b.tasks["t"].cached) == (1, 1, True)
