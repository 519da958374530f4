"""Poison input through real processes (issue 10, points 1, 7 and 9): nothing written into Redis stops
the scheduler or another run, a stuck leader lets its lease go, and the job-size bound fails its task.

Poison is written straight into Redis, as an old or buggy client (or a corrupted entry) would leave it,
the way ``nerv_cluster/lua/submit.lua`` writes a submission: the run's log, the feed, the run indexes.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import nerv_testtasks as tt
import pytest

from nerv_cluster import RunStatus, TaskStatus, Workflow
from nerv_cluster.errors import InvalidIdError
from nerv_cluster.eventlog import EventLog
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(240)


def _entry(kind: str, run_id: str, data: dict[str, Any] | None = None, **more: Any) -> str:
    body: dict[str, Any] = {"i": uuid.uuid4().hex, "t": kind, "r": run_id, "ts": time.time(), "s": "client"}
    if data:
        body["d"] = data
    body.update(more)
    return json.dumps(body)


def _raw_submit(c: Cluster, run_id: str, tasks: list[dict[str, Any]]) -> None:
    """A WORKFLOW_SUBMITTED written as submit.lua writes it, but with no validation at all."""
    k = c.client.keys
    raw = _entry("WORKFLOW_SUBMITTED", run_id, {"workflow": {"name": "poison", "tasks": tasks}})
    c.redis.sadd(k.active, run_id)
    c.redis.zadd(k.runs, {run_id: time.time()})
    c.redis.xadd(k.log(run_id), {"e": raw})
    c.redis.xadd(k.feed, {"e": raw})


def _raw_append(c: Cluster, run_id: str, fields: dict[str, str]) -> None:
    """An entry appended to a run's log and the feed as it is (whatever it holds)."""
    c.redis.xadd(c.client.keys.log(run_id), fields)  # type: ignore[arg-type]
    c.redis.xadd(c.client.keys.feed, fields)  # type: ignore[arg-type]


def _task(tid: str, *deps: str) -> dict[str, Any]:
    out: dict[str, Any] = {"id": tid, "fn": "nerv_testtasks.add", "args": [1, 2]}
    if deps:
        out["deps"] = list(deps)
    return out


def _valid(name: str) -> Workflow:
    wf = Workflow(name)
    a = wf.add(tt.add, 1, 2, id="a")
    wf.add(tt.add, a, 10, id="b")
    return wf


def test_poison_in_the_log_fails_its_own_run_and_every_other_run_completes(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    # Settle the scheduler on a first run, so the poison arrives at a running loop.
    first = c.client.submit(_valid("before"))
    assert c.client.wait(first, timeout=60).status is RunStatus.COMPLETED

    poison = {
        "poison-cycle": ([_task("a", "b"), _task("b", "a")], "dependency cycle"),
        "poison-unknown-dep": ([_task("a", "ghost")], "unknown task 'ghost'"),
        "poison-colon-task": ([_task("load:users")], "invalid task id 'load:users'"),
        "poison-newline-task": ([_task("x\ninjected log line")], "invalid task id"),
        "poison\nnewline-run": ([_task("a")], "invalid run id"),
        "poison-no-fn": ([{"id": "a"}], "a task needs an id and a fn"),
        # A queue no worker serves: its job could never be sent (Celery has no such queue).
        "poison-gpu-queue": ([{**_task("a"), "queue": "gpu"}], "unknown queue 'gpu'"),
    }
    for run_id, (tasks, _) in poison.items():
        _raw_submit(c, run_id, tasks)
    # An event type from a newer version, a malformed entry, an entry without the event field.
    _raw_append(c, first, {"e": _entry("TASK_TELEPORTED", first, task_id="a")})
    _raw_append(c, "poison-cycle", {"e": "{this is not json"})
    _raw_append(c, "poison-cycle", {"x": "no event field"})
    _raw_append(c, first, {"e": json.dumps({"t": "TASK_STARTED", "r": first, "k": "a", "a": "one"})})
    # Only the scheduler writes run logs now (issue 13): what a writer with direct access to Redis
    # (an older version, a corruption) left in logs and the active set, the live leader drops from the
    # feed; the next leader refolds the active runs from their logs, and must fail each poisoned one
    # with its reason and go on.
    c.kill(sched)
    second = c.scheduler()
    c.wait_leader(timeout=30)

    after = c.client.submit(_valid("after"))
    res = c.client.wait(after, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == {"a": 3, "b": 13}

    for run_id, (_, why) in poison.items():
        deadline = time.monotonic() + 30
        status = c.client.status(run_id)
        while status.status is not RunStatus.FAILED and time.monotonic() < deadline:
            time.sleep(0.1)
            status = c.client.status(run_id)
        assert status.status is RunStatus.FAILED, (run_id, status.status)
        assert why in status.reason, (run_id, status.reason)
        # Closed like any finished run: out of the active set, its keys expiring.
        assert not c.redis.sismember(c.client.keys.active, run_id)
        assert c.redis.ttl(c.client.keys.log(run_id)) > 0

    # Each leader warns once about what it read (the first one may be killed before it reads the
    # feed's last entries; the second reads the feed again from the position transcribed).
    texts = [Path(p.log_path).read_text() for p in (sched, second)]
    assert all(t.count("TASK_TELEPORTED") <= 1 for t in texts), "the unknown type is warned about once"
    log_text = "\n".join(texts)
    assert "TASK_TELEPORTED" in log_text
    assert "written by a newer version" in log_text
    assert "skipping malformed log entry" in log_text
    assert "\ninjected log line" not in log_text, "an id must never inject a log line"
    assert "\nnewline-run" not in log_text, "an id must never inject a log line"


def test_an_active_run_whose_submission_cannot_be_read_is_closed_by_the_next_leader(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    k = c.client.keys
    # Registered as active, as submit.lua does, but its submission is no event at all (a corrupted
    # entry): no state can be built for it, and left active it would be read by every refold for ever.
    c.redis.sadd(k.active, "poison-unreadable")
    c.redis.zadd(k.runs, {"poison-unreadable": time.time()})
    c.redis.xadd(k.log("poison-unreadable"), {"e": "{this is no submission"})
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    run_id = c.client.submit(_valid("beside"))
    assert c.client.wait(run_id, timeout=60).status is RunStatus.COMPLETED
    deadline = time.monotonic() + 10
    while c.redis.sismember(k.active, "poison-unreadable") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not c.redis.sismember(k.active, "poison-unreadable"), "the unreadable run is still active"
    assert c.redis.ttl(k.log("poison-unreadable")) > 0, "its keys expire like a finished run's"
    assert "submission cannot be read" in c.procs[0].log_text()


def test_the_client_refuses_bad_ids_and_writes_nothing(own_cluster: Cluster) -> None:
    c = own_cluster
    wf = Workflow("ids")
    with pytest.raises(InvalidIdError, match="invalid task id 'load:users'"):
        wf.add(tt.add, 1, 2, id="load:users")
    with pytest.raises(InvalidIdError, match="invalid task id"):
        wf.add(tt.add, 1, 2, id="a\nb")
    wf.add(tt.add, 1, 2, id="ok")
    before = c.redis.dbsize()
    for run_id in ("load:users", "a\nb", "x{y}"):
        with pytest.raises(InvalidIdError, match="invalid run id"):
            c.client.submit(wf, run_id=run_id, check_names=False)
    assert c.redis.dbsize() == before == 0, "nothing may be written for a refused submission"


def test_a_fan_in_over_the_job_size_bound_fails_the_join_with_the_sizes(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_MAX_JOB_BYTES"] = "20000"
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("too-big")
    parts = [wf.add(tt.blob, 8_000, id=f"part{i}") for i in range(3)]
    wf.add(tt.counted, *parts, id="join")
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.FAILED, res.status
    join = res.tasks["join"]
    assert join.status is TaskStatus.FAILED
    assert join.error is not None and join.error.type == "PayloadTooLargeError"
    assert "the limit is 20000 (NERV_MAX_JOB_BYTES)" in join.error.message
    assert "bytes of JSON with its upstream results" in join.error.message
    assert "join" in res.reason
    assert c.execs(run_id).get("join", 0) == 0, "the oversized job must never run"
    # A job under the bound in the same cluster still runs.
    ok = Workflow("small")
    small = [ok.add(tt.blob, 100, id=f"p{i}") for i in range(3)]
    ok.add(tt.counted, *small, id="join")
    assert c.client.wait(c.client.submit(ok), timeout=60).status is RunStatus.COMPLETED


def test_a_leader_whose_loop_cannot_progress_lets_a_standby_take_over(own_cluster: Cluster) -> None:
    c = own_cluster
    # The first scheduler cannot reach its broker: every step with a job to send raises. It keeps
    # iterating (and used to keep renewing), but completes no step.
    stuck = c.scheduler(NERV_BROKER_URL="redis://127.0.0.1:1/0", NERV_LOOP_STALL_S="3")
    c.wait_leader()
    c.wait_log(stuck, "leader (token", timeout=30)
    holder = c.redis.get(c.client.keys.lease)
    standby = c.scheduler(NERV_LOOP_STALL_S="3")
    c.worker("cpu", 2)
    run_id = c.client.submit(_valid("stuck-leader"))
    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert c.redis.get(c.client.keys.lease) != holder, "the lease must have moved to the standby"
    c.wait_log(stuck, "letting the lease lapse", timeout=5)
    c.wait_log(standby, "leader (token", timeout=5)


def test_closing_trims_the_index_and_stale_capacity_and_registry_entries_go(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    log = EventLog(c.client.redis, c.client.keys)
    k = c.client.keys
    now = float(c.redis.time()[0])
    c.redis.zadd(k.runs, {"old-run": now - 1_000, "new-run": now - 10})
    log.close_runs(["new-run"], retention_seconds=100, now=now)
    assert c.redis.zrange(k.runs, 0, -1) == ["new-run"]

    log.announce_capacity("live-node", ["cpu"], 2, {"mod.fn": "cpu"})
    c.redis.hset(
        k.capacity, "dead-node", json.dumps({"queues": ["cpu"], "concurrency": 9, "at": now - 3_600})
    )
    assert log.capacity() == {"cpu": 2}
    assert c.redis.hkeys(k.capacity) == ["live-node"]

    c.redis.hset(k.registry, mapping={"gone.fn": "io", "legacy.fn": "cpu"})
    c.redis.hset(k.registry_seen, "gone.fn", repr(now - 3_600))
    assert c.client.registered_tasks() == {"mod.fn": "cpu"}
    assert len(c.redis.hgetall(k.registry)) == 3, "a client only reads the registry (issue 13)"
    # The leader drops the stale names (in its sweep, every REGISTRY_PRUNE_S).
    assert log.registered_tasks(prune=True) == {"mod.fn": "cpu"}
    assert c.redis.hgetall(k.registry) == {"mod.fn": "cpu"}
    assert list(c.redis.hgetall(k.registry_seen)) == ["mod.fn"]
