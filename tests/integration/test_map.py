"""Map through real processes: ``Workflow.map`` over run-time lists, element-wise maps over maps, empty
and bad lists, and the scheduler SIGKILLed mid-map. Counters in Redis prove each element ran once."""

from __future__ import annotations

import signal
import time

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RetryPolicy, RunStatus, TaskStatus, Workflow
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(120)


def _types(events: list, task_id: str) -> list[EventType]:
    return [ev.type for ev in events if ev.task_id == task_id]


def test_a_map_over_a_run_time_list_runs_each_element_once(cluster: Cluster) -> None:
    wf = Workflow("map-ok")
    src = wf.add(tt.numbers, 8, id="src")
    sq = wf.map(tt.square, src, id="sq")
    wf.add(tt.sum_list, sq, id="total")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["total"] == sum(i * i for i in range(8))
    assert res.tasks["sq"].result == [i * i for i in range(8)]  # the map's result: its elements', in order
    assert [res.tasks[f"sq[{i}]"].result for i in range(8)] == [i * i for i in range(8)]
    assert cluster.execs(run_id) == {f"sq[{i}]": 1 for i in range(8)}
    events = log_of(cluster.client, run_id)
    assert _types(events, "sq") == [EventType.MAP_EXPANDED, EventType.TASK_COMPLETED]  # never dispatched
    expanded = next(ev for ev in events if ev.type is EventType.MAP_EXPANDED)
    assert dict(expanded.data) == {"width": 8}
    assert _types(events, "sq[3]") == [
        EventType.TASK_DISPATCHED,
        EventType.TASK_STARTED,
        EventType.TASK_COMPLETED,
    ]


def test_a_map_with_retries_and_one_failing_element(cluster: Cluster) -> None:
    wf = Workflow("map-fail")
    src = wf.add(tt.numbers, 6, id="src")
    retry = RetryPolicy(max_retries=2, backoff=0.05, retry_on=(ConnectionError,))
    sq = wf.map(tt.square, src, kwargs={"fail_on": 4, "flaky_below": 2}, retry=retry, id="sq")
    wf.add(tt.sum_list, sq, id="total")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.FAILED
    assert "map 'sq': element 'sq[4]' is FAILED: ValueError: element 4 is bad" in res.reason
    statuses = {tid: t.status for tid, t in res.tasks.items()}
    assert statuses["sq[4]"] is TaskStatus.FAILED and statuses["sq"] is TaskStatus.FAILED
    assert statuses["total"] is TaskStatus.SKIPPED
    assert all(statuses[f"sq[{i}]"] is TaskStatus.COMPLETED for i in (0, 1, 2, 3, 5))
    # Elements 0 and 1 failed their first attempt and were retried; 4 failed for good (not retried:
    # ValueError is not in retry_on); every other element ran once.
    assert cluster.execs(run_id) == {"sq[0]": 2, "sq[1]": 2, "sq[2]": 1, "sq[3]": 1, "sq[4]": 1, "sq[5]": 1}
    assert res.tasks["sq[1]"].attempts == 2 and res.tasks["sq[1]"].result == 1
    assert res.tasks["sq"].result == [0, 1, 4, 9, None, 25]


def test_a_map_over_a_map_goes_element_wise(cluster: Cluster) -> None:
    wf = Workflow("map-of-map")
    durations = wf.add(tt.echo, [1.5, 0.05, 0.05, 0.05], id="durations")
    naps = wf.map(tt.slow, durations, id="naps")
    more = wf.map(tt.plus, naps, kwargs={"y": 10}, id="more")
    wf.add(tt.sum_list, more, id="total")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.tasks["more"].result == [11.5, 10.05, 10.05, 10.05]
    assert res.results["total"] == pytest.approx(41.65)
    events = log_of(cluster.client, run_id)
    at = {(ev.type, ev.task_id): ev.ts for ev in events}
    # more[1] ran as soon as naps[1] had: long before the slow naps[0], and so all of naps, ended.
    assert at[(EventType.TASK_STARTED, "more[1]")] < at[(EventType.TASK_COMPLETED, "naps[0]")]
    assert at[(EventType.MAP_EXPANDED, "more")] < at[(EventType.TASK_COMPLETED, "naps")]
    execs = cluster.execs(run_id)
    assert execs == {**{f"naps[{i}]": 1 for i in range(4)}, **{f"more[{i}]": 1 for i in range(4)}}


def test_an_empty_map_gives_an_empty_list_downstream(cluster: Cluster) -> None:
    wf = Workflow("map-empty")
    src = wf.add(tt.numbers, 0, id="src")
    sq = wf.map(tt.square, src, id="sq")
    wf.add(tt.echo, sq, id="after")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["after"] == [] and res.tasks["sq"].result == []
    assert set(res.tasks) == {"src", "sq", "after"}
    assert cluster.execs(run_id) == {}


def test_a_map_over_something_that_is_no_list_fails_clearly(cluster: Cluster) -> None:
    wf = Workflow("map-bad")
    src = wf.add(tt.echo, {"not": "a list"}, id="src")
    sq = wf.map(tt.square, src, id="sq")
    wf.add(tt.sum_list, sq, id="total")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.FAILED
    err = res.tasks["sq"].error
    assert err is not None and err.type == "MapError"
    assert err.message == "map 'sq' maps over the result of 'src', which is dict, not a list"
    assert res.tasks["total"].status is TaskStatus.SKIPPED
    assert cluster.execs(run_id) == {}


def test_a_map_wider_than_the_limit_fails_clearly(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler(NERV_MAX_MAP_WIDTH="5")
    c.wait_leader()
    c.worker("cpu", 1)
    wf = Workflow("map-wide")
    sq = wf.map(tt.square, wf.add(tt.numbers, 6, id="src"), id="sq")
    wf.add(tt.sum_list, sq, id="total")
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.FAILED
    err = res.tasks["sq"].error
    assert err is not None and err.message == "map 'sq' has 6 elements; the limit is 5 (NERV_MAX_MAP_WIDTH)"
    assert c.execs(run_id) == {}


@pytest.mark.timeout(180)
def test_scheduler_sigkill_mid_map_runs_no_element_twice(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("map-kill")
    durations = wf.add(tt.echo, [0.1] * 40, id="durations")
    naps = wf.map(tt.slow, durations, id="naps")
    more = wf.map(tt.plus, naps, id="more")
    wf.add(tt.sum_list, more, id="total")
    run_id = c.client.submit(wf)

    # Kill the scheduler once the maps expanded and some, not all, elements are done.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = log_of(c.client, run_id)
        done = sum(1 for ev in events if ev.type is EventType.TASK_COMPLETED)
        if sum(ev.type is EventType.MAP_EXPANDED for ev in events) == 2 and done >= 12:
            break
        time.sleep(0.05)
    c.kill(sched, signal.SIGKILL)
    mid = c.client.status(run_id)
    assert mid.status is RunStatus.RUNNING, "the run must still be in flight when the scheduler dies"
    assert mid.tasks["naps"].status is TaskStatus.RUNNING or mid.tasks["more"].status is TaskStatus.RUNNING

    c.scheduler()
    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["total"] == pytest.approx(40 * 1.1)
    want = {**{f"naps[{i}]": 1 for i in range(40)}, **{f"more[{i}]": 1 for i in range(40)}}
    assert c.execs(run_id) == want, "an element ran twice or never"
    events = log_of(c.client, run_id)
    assert sum(ev.type is EventType.MAP_EXPANDED for ev in events) == 2, "each map expanded once"
    started = [ev.task_id for ev in events if ev.type is EventType.TASK_STARTED]
    assert sorted(started) == sorted([*want, "durations", "total"]), "each task started once"


@pytest.mark.timeout(180)
def test_a_restarted_scheduler_resumes_a_map_from_its_checkpoint(own_cluster: Cluster) -> None:
    """The checkpoint of a run with expanded maps (one following the other element-wise) is decoded by
    the new leader, which grows the maps again from it: the run completes, each element ran once."""
    c = own_cluster
    c.env["NERV_CHECKPOINT_EVENTS"] = "50"  # checkpoint once the log has gained as many entries as tasks
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("map-checkpoint")
    naps = wf.map(tt.slow, wf.add(tt.echo, [0.25] * 80, id="durations"), id="naps")
    wf.add(tt.sum_list, wf.map(tt.plus, naps, id="more"), id="total")
    run_id = c.client.submit(wf)
    c.kill_after_checkpoint(sched, run_id)
    assert c.client.status(run_id).status is RunStatus.RUNNING, "the run must still be in flight"

    sched = c.scheduler()
    c.wait_log(sched, "(1 from a checkpoint)")
    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["total"] == pytest.approx(80 * 1.25)
    want = {**{f"naps[{i}]": 1 for i in range(80)}, **{f"more[{i}]": 1 for i in range(80)}}
    assert c.execs(run_id) == want, "an element ran twice or never"


def test_a_rerun_runs_only_a_maps_failed_element_and_what_follows(cluster: Cluster) -> None:
    wf = Workflow("map-rerun")
    src = wf.add(tt.numbers, 5, id="src")
    tens = wf.map(tt.fragile, src, kwargs={"bad": 3}, id="tens")
    more = wf.map(tt.plus, tens, id="more")
    wf.add(tt.sum_list, more, id="total")
    run_id = cluster.client.submit(wf)
    first = cluster.client.wait(run_id, timeout=60)
    assert first.status is RunStatus.FAILED and "element 'tens[3]' is FAILED" in first.reason
    assert first.tasks["more[3]"].status is TaskStatus.SKIPPED
    ran = {**{f"tens[{i}]": 1 for i in range(5)}, **{f"more[{i}]": 1 for i in (0, 1, 2, 4)}}
    assert cluster.execs(run_id) == ran

    cluster.redis.hset(f"test:fixed:{run_id}", "tens[3]", 1)
    assert cluster.client.rerun(run_id) == run_id
    res = cluster.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.tasks["tens"].result == [0, 10, 20, 30, 40]
    assert res.results["total"] == sum(10 * i + 1 for i in range(5))
    # Only the failed element and what follows it ran again; the map did not expand again.
    assert cluster.execs(run_id) == {**ran, "tens[3]": 2, "more[3]": 1}
    events = log_of(cluster.client, run_id)
    assert sum(ev.type is EventType.MAP_EXPANDED for ev in events) == 2
    assert res.tasks["tens"].status is TaskStatus.COMPLETED and res.tasks["tens[3]"].attempts == 2


# -- with the other parts of issue 16 ------------------------------------------------------------------


def test_map_elements_that_return_workflows_run_as_child_runs(cluster: Cluster) -> None:
    wf = Workflow("map-fib")
    fibs = wf.map(tt.fib, wf.add(tt.echo, [1, 5, 8], id="ns"), id="fibs")
    wf.add(tt.sum_list, fibs, id="total")
    run_id = cluster.client.submit(wf)
    res = cluster.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.tasks["fibs"].result == [1, 5, 21]  # each element completed with its child's output
    assert res.results["total"] == 27


def test_a_cached_map_computes_each_element_once_across_runs(cluster: Cluster) -> None:
    labels = [f"map-cache-{time.time_ns()}-{i}" for i in range(3)]

    def submit() -> str:
        wf = Workflow("map-cache")
        counted = wf.map(tt.cached_count, wf.add(tt.echo, labels, id="labels"), args=[7], id="counted")
        wf.add(tt.echo, counted, id="after")
        return cluster.client.submit(wf)

    first = cluster.client.wait(submit(), timeout=60)
    second = cluster.client.wait(submit(), timeout=60)
    assert first.status is second.status is RunStatus.COMPLETED, (first.reason, second.reason)
    assert second.results["after"] == first.results["after"]
    assert [r["execution"] for r in second.results["after"]] == [1, 1, 1]
    assert all(second.tasks[f"counted[{i}]"].cached for i in range(3)), "the elements came from the cache"
    assert [int(cluster.redis.get(f"test:cache:{label}") or 0) for label in labels] == [1, 1, 1]
