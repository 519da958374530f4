"""The intake (issue 13): clients ask, the scheduler decides. Real Redis, real scheduler and workers.

A client writes only the intake and its own reply lists; the scheduler checks every request again (a
client may be hostile), applies it fenced and answers it in one step, once per request, and a new
leader picks up what an old one read but never answered.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nerv_testtasks as tt
import pytest
import redis

from nerv_cluster import Client, EventType, RunStatus, Workflow
from nerv_cluster.errors import (
    CycleError,
    IntakeTimeoutError,
    InvalidIdError,
    MalformedRequestError,
    NervError,
    PayloadTooLargeError,
    RunNotFoundError,
    UnknownSignalError,
    WorkflowError,
)
from nerv_cluster.jsonform import compact
from nerv_cluster.requests import Request, read_answer
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(180)


def _raw(c: Cluster, fields: dict[str, str], timeout: float = 10) -> str:
    """Append intake fields as a hostile client would (no client-side checks); the answer's text."""
    c.redis.xadd(c.client.keys.intake, fields)  # type: ignore[arg-type]
    got = c.redis.blpop([c.client.keys.intake_reply(fields["i"])], timeout=timeout)
    assert got, "no answer"
    return str(got[1])


def _submission(run_id: str, definition: dict[str, Any]) -> Request:
    return Request.make("submit", compact(definition), run_id=run_id, idempotency_key=None)


def _intake_drained(c: Cluster, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while c.redis.xlen(c.client.keys.intake) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.redis.xlen(c.client.keys.intake) == 0, "the leader trims what it answered"


def test_a_hostile_submission_is_refused_with_the_clear_error_and_writes_no_run_log(cluster: Cluster) -> None:
    c = cluster
    task = {"fn": tt.add.name, "args": [1, 2], "queue": "cpu"}
    cyclic = {
        "name": "evil",
        "tasks": [{**task, "id": "a", "deps": ["b"]}, {**task, "id": "b", "deps": ["a"]}],
    }
    with pytest.raises(CycleError, match="cycle") as info:
        read_answer(_raw(c, _submission("evil-cycle", cyclic).fields()))
    assert sorted(info.value.cycle) == ["a", "b"]
    ok_def = {"name": "evil", "tasks": [{**task, "id": "a"}]}
    with pytest.raises(InvalidIdError, match="run id"):
        read_answer(_raw(c, _submission("bad id{x}", ok_def).fields()))
    big_arg = {"name": "evil", "tasks": [{**task, "id": "a", "args": ["x" * (1024 * 1024 + 10)]}]}
    with pytest.raises(PayloadTooLargeError, match="arguments are"):
        read_answer(_raw(c, _submission("evil-big-arg", big_arg).fields()))
    bad_queue = {"name": "evil", "tasks": [{**task, "id": "a", "queue": "gpu"}]}
    with pytest.raises(WorkflowError, match="unknown queue"):
        read_answer(_raw(c, _submission("evil-queue", bad_queue).fields()))
    garbage = Request.make("submit", "{not json", run_id="evil-garbage", idempotency_key=None)
    with pytest.raises(WorkflowError, match="not JSON"):
        read_answer(_raw(c, garbage.fields()))
    # An idempotency key that does not name the run id it came with.
    keyed = Request.make("submit", compact(ok_def), run_id="evil-keyed", idempotency_key="k1")
    with pytest.raises(NervError, match="idempotency key"):
        read_answer(_raw(c, keyed.fields()))
    for rid in ("evil-cycle", "evil-big-arg", "evil-queue", "evil-garbage", "evil-keyed"):
        assert not c.redis.exists(c.client.keys.log(rid)), f"{rid}: a refused submission left a log"
    _intake_drained(c)
    # The client raises the same classes for the same mistakes, before any round trip.
    wf = Workflow("client-side")
    wf.add(tt.add, 1, 2, id="a", dependencies=["b"])
    wf.add(tt.add, 1, 2, id="b", dependencies=["a"])
    with pytest.raises(CycleError):
        c.client.submit(wf)


def test_malformed_entries_are_skipped_and_never_stop_the_scheduler(cluster: Cluster) -> None:
    c = cluster
    k = c.client.keys
    c.redis.xadd(k.intake, {"x": "no id at all"})
    c.redis.xadd(k.intake, {"i": "not-hex", "q": "{}"})
    c.redis.xadd(k.intake, {b"i": b"\xff\xfe", b"q": b"\xc3\x28 no utf-8"})  # type: ignore[dict-item]
    binary = Request.make("cancel", run_id="r", reason="x")
    with pytest.raises(MalformedRequestError, match="not JSON"):
        read_answer(_raw(c, {"i": binary.id, "q": b"\xff{"}))  # type: ignore[dict-item]
    rid = Request.make("cancel", run_id="r", reason="x").id
    with pytest.raises(MalformedRequestError, match="not JSON"):
        read_answer(_raw(c, {"i": rid, "q": "{garbage"}))
    wrong = Request("signal", {"run_id": 5, "name": "go", "payload": None})
    with pytest.raises(MalformedRequestError, match="run_id must be str"):
        read_answer(_raw(c, wrong.fields()))
    unknown = Request("launch_missiles", {})
    with pytest.raises(MalformedRequestError, match="unknown operation"):
        read_answer(_raw(c, unknown.fields()))
    huge = Request.make("cancel", run_id="r", reason="y" * (2 * 1024 * 1024))
    with pytest.raises(MalformedRequestError, match="the limit is"):
        read_answer(_raw(c, huge.fields()))
    # The scheduler goes on: a valid submission through the client runs.
    wf = Workflow("after-garbage")
    wf.add(tt.add, 2, 3, id="sum")
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=30)
    assert res.status is RunStatus.COMPLETED and res.results["sum"] == 5
    _intake_drained(c)


def test_a_resent_request_is_applied_once_and_answered_each_time(cluster: Cluster) -> None:
    c = cluster
    wf = Workflow("resent")
    wf.wait_for("go", id="gate")
    request = _submission("resent-run", wf.definition().to_dict())
    # A client's XADD retried after a lost reply: the same request twice in the intake.
    c.redis.xadd(c.client.keys.intake, request.fields())  # type: ignore[arg-type]
    first = _raw(c, request.fields())
    got = c.redis.blpop([c.client.keys.intake_reply(request.id)], timeout=10)
    assert got, "the second copy is answered too"
    second = str(got[1])
    assert json.loads(first) == json.loads(second) == {"ok": True, "run_id": "resent-run", "created": True}
    signal_req = Request.make("signal", run_id="resent-run", name="go", payload={"n": 1})
    c.redis.xadd(c.client.keys.intake, signal_req.fields())  # type: ignore[arg-type]
    answers = [json.loads(_raw(c, signal_req.fields()))]
    again = c.redis.blpop([c.client.keys.intake_reply(signal_req.id)], timeout=10)
    assert again
    answers.append(json.loads(again[1]))
    assert answers == [{"ok": True, "first": True}] * 2, "the copy gets the first one's answer"
    res = c.client.wait("resent-run", timeout=30)
    assert res.status is RunStatus.COMPLETED and res.results["gate"] == {"n": 1}
    kinds = Counter(ev.type for ev in log_of(c.client, "resent-run"))
    assert kinds[EventType.WORKFLOW_SUBMITTED] == 1 and kinds[EventType.SIGNAL_RECEIVED] == 1
    _intake_drained(c)


def test_every_write_goes_through_the_intake_and_a_client_writes_nothing_else(cluster: Cluster) -> None:
    """A client whose Redis user may write only the intake and its reply lists (and read everything)
    does every kind of request."""
    c = cluster
    prefix = c.client.keys.prefix
    user, password = "intake-client", "intake-secret"
    c.redis.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", "%R~*", f"%W~{prefix}:intake",
        f"~{prefix}:intake:reply:*", "&*", "+@read", "+xadd", "+blpop", "+ping", "+hello", "+auth",
        "+select", "+time", "+subscribe", "+psubscribe",
    )  # fmt: skip
    try:
        url = c.client.settings.redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
        with Client(url, settings=c.client.settings) as client:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.redis.xadd(c.client.keys.feed, {"e": "{}"})  # the user is really confined
            wf = Workflow("confined")
            wf.wait_for("go", id="gate")
            wf.add(tt.boom, "fails once", id="bad", dependencies=["gate"])
            key = f"confined-{time.time_ns()}"
            run_id = client.submit(wf, idempotency_key=key, priority="high")
            assert client.submit(wf, idempotency_key=key) == run_id, "the same key, the same run"
            assert client.signal(run_id, "go", 1) is True
            assert client.signal(run_id, "go", 2) is False
            with pytest.raises(UnknownSignalError):
                client.signal(run_id, "nope")
            assert client.wait(run_id, timeout=30).status is RunStatus.FAILED
            assert client.rerun(run_id, tasks=["bad"]) == run_id
            assert client.wait(run_id, timeout=30).status is RunStatus.FAILED
            client.set_limit("intake-key", 3)
            assert client.limits()["intake-key"] == 3
            client.set_limit("intake-key", None)
            assert "intake-key" not in client.limits()
            name = f"intake-sched-{os.getpid()}"
            client.schedule(name, tt.add.name, every=3600, kwargs={})
            client.pause_schedule(name)
            assert client.schedules()[name].paused
            client.resume_schedule(name)
            fired = client.trigger_schedule(name)
            assert fired.startswith(name)
            client.delete_schedule(name)
            assert name not in client.schedules()
            assert client.clear_cache("no-such-task") == 0
            slow = Workflow("confined-cancel")
            slow.add(tt.slow, 5.0, id="s")
            sid = client.submit(slow)
            client.cancel(sid, "enough")
            assert client.wait(sid, timeout=30).status is RunStatus.CANCELLED
            with pytest.raises(RunNotFoundError):
                client.cancel("never-submitted-run")
    finally:
        c.redis.execute_command("ACL", "DELUSER", user)


def test_submit_is_answered_in_one_loop_not_after_the_read_block(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_BLOCK_MS"] = "3000"  # an idle scheduler waits this long on its one XREAD
    c.scheduler()
    c.wait_leader()
    wf = Workflow("quick")
    wf.wait_for("never", id="w")
    took = []
    for _ in range(5):
        time.sleep(0.2)  # the scheduler is idle, blocked in its read
        t0 = time.monotonic()
        c.client.submit(wf, check_names=False)
        took.append(time.monotonic() - t0)
    assert max(took) < 1.5, f"a submission waited for the read block: {took}"


def test_a_scheduler_killed_after_reading_a_request_leaves_it_to_the_next_leader(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    wf = Workflow("orphan")
    wf.add(tt.add, 20, 22, id="sum")
    # Frozen in its blocking read: Redis hands it the request, which it never gets to answer.
    os.kill(sched.pid, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(c.client.submit, wf, run_id="orphan-run")
        deadline = time.monotonic() + 10
        while not c.redis.xlen(c.client.keys.intake) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert not c.redis.exists(c.client.keys.log("orphan-run"))
        c.kill(sched, signal.SIGKILL)
        c.scheduler()
        assert asked.result(timeout=60) == "orphan-run"
    res = c.client.wait("orphan-run", timeout=30)
    assert res.status is RunStatus.COMPLETED and res.results["sum"] == 42
    kinds = Counter(ev.type for ev in log_of(c.client, "orphan-run"))
    assert kinds[EventType.WORKFLOW_SUBMITTED] == 1
    _intake_drained(c)


def test_without_a_scheduler_a_request_times_out_clearly_in_bounded_time(own_cluster: Cluster) -> None:
    c = own_cluster
    client = Client(settings=c.client.settings.with_(intake_timeout=1.0))
    try:
        wf = Workflow("nobody-home")
        wf.add(tt.add, 1, 1, id="a")
        t0 = time.monotonic()
        with pytest.raises(IntakeTimeoutError, match="may still be applied") as info:
            client.submit(wf, run_id="nobody-home-1", check_names=False)
        assert time.monotonic() - t0 < 3
        assert "nobody-home-1" in str(info.value) and isinstance(info.value, TimeoutError)
        assert not c.redis.exists(c.client.keys.log("nobody-home-1")), "only a scheduler writes a run log"
        # It is still there: a scheduler that comes later applies it.
        c.scheduler()
        c.worker("cpu", 1)
        assert c.client.wait("nobody-home-1", timeout=30).status is RunStatus.COMPLETED
    finally:
        client.close()


def test_a_sixty_megabyte_workflow_goes_through(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1)
    wf = Workflow("sixty-mb")
    chunk = "x" * (1024 * 1024 - 1024)  # each task's arguments just under the per-task bound
    for i in range(60):
        wf.add(tt.counted, chunk, id=f"carry{i}")
    t0 = time.monotonic()
    run_id = c.client.submit(wf, check_names=False)
    took = time.monotonic() - t0
    res = c.client.wait(run_id, timeout=120)
    assert res.status is RunStatus.COMPLETED, res.reason
    first = c.redis.xrange(c.client.keys.log(run_id), count=1)[0][1]["e"]
    assert len(first) > 60_000_000
    print(f"\n60 MB submission answered in {took:.2f}s")
