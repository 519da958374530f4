"""The garbage drill (issue 13, point 7): while a real run of a few hundred tasks goes on, 10,000
garbage and near-valid messages go into the Celery queues (raw kombu messages in the Redis lists, as
kombu stores them), the workers' hand-off lists and the scheduler's feed. The run completes with
exactly the right results; the scheduler and every worker process are alive and serve a second
workflow; no other run is affected; the logs hold warnings, never a crash's traceback.

The garbage comes from ``tests/fuzzing.py`` (seeded, so a failure can be replayed with its seed:
``NERV_DRILL_SEED``). What the drill does not send: well-formed jobs and events that a writer with
access to Redis could forge for the real run's current attempts. Refusing those takes knowing who wrote
them (signed jobs, outcomes from workers only, the client intake: issue 13, points 1 and 3).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import nerv_testtasks as tt
import pytest

from nerv_cluster import RunStatus, Workflow, constants, intake
from nerv_cluster.errors import MalformedEventError, MalformedJobError, NervError
from nerv_cluster.jobs import parse_job
from nerv_cluster.model import Event, EventType
from tests import fuzzing
from tests.integration.cluster import Cluster

pytestmark = [pytest.mark.timeout(240), pytest.mark.fault_drill]

TOTAL = 10_000
SEED = int(os.environ.get("NERV_DRILL_SEED", "13"))
#: Task events whose handlers act only on the current attempt: with an attempt the real run never
#: reaches, each is near-valid but stale.
_STALE_TYPES = [
    "TASK_DISPATCHED",
    "TASK_STARTED",
    "TASK_COMPLETED",
    "TASK_FAILED",
    "TASK_RETRYING",
    "TASK_PENDING",
    "TASK_SPAWNED",
    "CHILD_STARTED",
    "TASK_WAITING",
    "TASK_HELD",
    "MAP_EXPANDED",
]
_NAMES = ["nerv_testtasks.add", "nerv_testtasks.add_io", "nerv_testtasks.mul", "nerv_testtasks.total"]


def _workflow(name: str, n: int) -> tuple[Workflow, dict[str, Any]]:
    """``n`` fetch-like adds on cpu, each through io and back to cpu, a cpu chain (hand-offs), one join.
    Returns the workflow and its expected results."""
    wf = Workflow(name)
    expected: dict[str, Any] = {}
    ends = []
    for i in range(n):
        a = wf.add(tt.add, i, i, id=f"a{i}")
        b = wf.add(tt.add_io, a, 1, id=f"b{i}")
        c = wf.add(tt.mul, b, 2, id=f"c{i}")
        expected.update({f"a{i}": 2 * i, f"b{i}": 2 * i + 1, f"c{i}": 4 * i + 2})
        ends.append(c)
    hop = wf.add(tt.add, 0, 1, id="h0")
    expected["h0"] = 1
    for j in range(1, 25):
        hop = wf.add(tt.add, hop, 1, id=f"h{j}")
        expected[f"h{j}"] = j + 1
    wf.add(tt.total, *ends, hop, id="join")
    expected["join"] = sum(4 * i + 2 for i in range(n)) + 25
    return wf, expected


# -- the garbage ------------------------------------------------------------------------------------


def _bad_job(rng: random.Random, run_id: str, task_id: str) -> Any:
    """A job the worker must refuse: a valid one mutated until ``parse_job`` refuses it."""
    valid = {"r": run_id, "k": task_id, "a": 1, "fn": rng.choice(_NAMES), "args": [1, 2]}
    for _ in range(20):
        bad = fuzzing.near_valid(rng, valid)
        try:
            parse_job(bad)
        except MalformedJobError:
            return bad
    return {**valid, "a": "1"}


def _queue_message(rng: random.Random, real: str, task_ids: list[str]) -> str | bytes:
    """A Redis list entry for a Celery queue: bytes, broken JSON, JSON of another shape, a kombu
    envelope with a body that is no Celery body, with near-valid jobs, for unknown tasks, or mutated."""
    queue = rng.choice(constants.QUEUES)
    k = rng.randrange(10)
    if k == 0:
        return fuzzing.garbage_bytes(rng, oversized=50_000)
    if k == 1:
        return json.dumps(fuzzing.random_json(rng))
    run_id = real if rng.random() < 0.5 else f"made-up-{rng.randrange(50)}"
    jobs = [_bad_job(rng, run_id, rng.choice(task_ids)) for _ in range(rng.randint(1, 3))]
    body = json.dumps([jobs, {}, fuzzing.CELERY_EMBED])
    if k == 2:
        env = fuzzing.kombu_envelope(
            fuzzing.garbage_bytes(rng, oversized=50_000), rng.choice(_NAMES), queue, rng
        )
    elif k == 3:  # for a task no worker has: the unknown-task path must refuse it too
        env = fuzzing.kombu_envelope(body.encode(), f"evil.{rng.randrange(5)}", queue, rng)
    elif k == 4:  # the envelope itself mutated (headers, properties, encodings)
        env = fuzzing.near_valid(rng, fuzzing.kombu_envelope(body.encode(), rng.choice(_NAMES), queue, rng))
    else:
        env = fuzzing.kombu_envelope(body.encode(), rng.choice(_NAMES), queue, rng)
    return json.dumps(env)


def _feed_entry(rng: random.Random, real: str, task_ids: list[str]) -> dict[str, Any]:
    """A feed entry: no event field, bytes, broken JSON, another shape, stale events of the real run,
    events of made-up runs (submissions with definitions no scheduler may accept among them)."""
    k = rng.randrange(10)
    if k == 0:
        return {"x": "no event field"}
    if k == 1:
        return {"e": fuzzing.garbage_bytes(rng, oversized=100_000)}
    if k == 2:
        return {"e": json.dumps(fuzzing.random_json(rng))}
    if k in (3, 4, 5):  # the real run: stale attempts of its tasks, data of any shape
        ev = {
            "i": uuid.UUID(int=rng.getrandbits(128)).hex,
            "t": rng.choice(_STALE_TYPES),
            "r": real,
            "k": rng.choice([*task_ids, "ghost"]),
            "a": rng.choice([0, 7, 99]),
            "ts": time.time(),
            "s": "worker:drill",
            "d": fuzzing.random_json(rng) if rng.random() < 0.5 else {"result": -1, "handoff": "nobody"},
        }
        if not isinstance(ev["d"], dict):
            ev["d"] = {"value": ev["d"]}
        if rng.random() < 0.5:  # mutated further: most no longer parse
            ev = fuzzing.near_valid(rng, ev)
            if _parses(ev) and not _stale(ev, real):
                return {"e": "{}"}  # mutated into something current: not what this drill sends
        return {"e": json.dumps(ev)}
    run_id = f"made-up-{rng.randrange(200)}"
    if k == 6:  # a submission no scheduler may accept: a rejected run, failed with its reason
        raw = fuzzing.near_valid(rng, {"name": "forged", "tasks": [{"id": "a", "fn": _NAMES[0]}]})
        if _acceptable(run_id, raw):
            raw = {"name": "forged", "tasks": []}
        ev = {
            "i": uuid.uuid4().hex,
            "t": "WORKFLOW_SUBMITTED",
            "r": run_id,
            "ts": time.time(),
            "d": {"workflow": raw},
        }
        return {"e": json.dumps(ev)}
    ev = {
        "i": uuid.uuid4().hex,
        "t": rng.choice([t.value for t in EventType if t is not EventType.WORKFLOW_SUBMITTED]),
        "r": run_id,
        "k": "a",
        "a": 1,
        "ts": time.time(),
        "d": {"worker": "w", "result": fuzzing.random_json(rng)},
    }
    return {"e": json.dumps(fuzzing.near_valid(rng, ev) if rng.random() < 0.5 else ev)}


def _parses(ev: Any) -> bool:
    try:
        Event.parse(json.dumps(ev))
    except MalformedEventError:
        return False
    return True


def _stale(ev: dict[str, Any], real: str) -> bool:
    """The event changes nothing of the real run: another run, a type acting only on the current
    attempt with an attempt the run never reaches."""
    return ev.get("r") != real or (ev.get("t") in _STALE_TYPES and ev.get("a") in (0, 7, 99))


def _acceptable(run_id: str, raw: Any) -> bool:
    try:
        intake.accept(run_id, raw)
    except NervError:
        return False
    return True


def _handoff_entry(rng: random.Random, real: str, task_ids: list[str]) -> str | bytes:
    k = rng.randrange(3)
    if k == 0:
        return fuzzing.garbage_bytes(rng, oversized=20_000)
    if k == 1:
        return json.dumps(fuzzing.random_json(rng))
    return json.dumps(_bad_job(rng, real if rng.random() < 0.5 else "made-up-h", rng.choice(task_ids)))


class Flood:
    """Pushes the garbage from a thread, in batches, while the real run goes on."""

    def __init__(self, c: Cluster, real: str, task_ids: list[str], workers: Callable[[], list[str]]) -> None:
        self.c, self.real, self.task_ids, self.workers = c, real, task_ids, workers
        self.rng = random.Random(SEED)
        self.sent: Counter[str] = Counter()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="garbage-flood", daemon=True)

    def _run(self) -> None:
        try:
            k, rng, pushed = self.c.client.keys, self.rng, 0
            while pushed < TOTAL:
                pipe = self.c.redis.pipeline(transaction=False)
                handoff_lists = [k.handoff(w) for w in self.workers()] or [k.handoff("made-up-worker")]
                for _ in range(min(500, TOTAL - pushed)):
                    where = rng.random()
                    if where < 0.45:
                        pipe.lpush(
                            rng.choice(constants.QUEUES), _queue_message(rng, self.real, self.task_ids)
                        )
                        self.sent["queues"] += 1
                    elif where < 0.9:
                        pipe.xadd(k.feed, _feed_entry(rng, self.real, self.task_ids))  # type: ignore[arg-type]
                        self.sent["feed"] += 1
                    else:
                        pipe.rpush(rng.choice(handoff_lists), _handoff_entry(rng, self.real, self.task_ids))
                        self.sent["handoff"] += 1
                    pushed += 1
                pipe.execute()
                time.sleep(0.1)
        except BaseException as exc:
            self.error = exc


def _worker_ids(c: Cluster) -> list[str]:
    """The worker processes' ids (their hand-off lists), from the workers hash they register in."""
    return list(c.redis.hkeys(c.client.keys.workers))


def test_ten_thousand_garbage_messages_leave_the_run_right_and_every_process_serving(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    cpu = c.worker("cpu", 2)
    io = c.worker("io", 4)
    # A bystander run, submitted first: it must end exactly as it would have without the flood.
    bystander, bystander_expected = _workflow("bystander", 10)
    bystander_id = c.client.submit(bystander)
    wf, expected = _workflow("real", 100)
    assert len(expected) > 300
    t0 = time.monotonic()
    run_id = c.client.submit(wf)
    flood = Flood(c, run_id, sorted(expected), lambda: _worker_ids(c))
    flood.thread.start()

    res = c.client.wait(run_id, timeout=120)
    flood.thread.join(timeout=120)
    assert flood.error is None, f"the flood itself failed: {flood.error!r}"
    assert sum(flood.sent.values()) == TOTAL, flood.sent
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == expected
    assert all(t.attempts == 1 for t in res.tasks.values()), "a forged message made a task run again"
    other = c.client.wait(bystander_id, timeout=60)
    assert other.status is RunStatus.COMPLETED and other.results == bystander_expected

    # Every process still serves: wait for the queues to drain of garbage, then a second workflow.
    deadline = time.monotonic() + 60
    while c.redis.llen("cpu") + c.redis.llen("io") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not c.redis.llen("cpu") + c.redis.llen("io"), "the workers stopped taking messages"
    second, second_expected = _workflow("after", 20)
    res2 = c.client.wait(c.client.submit(second), timeout=60)
    assert res2.status is RunStatus.COMPLETED and res2.results == second_expected
    for proc in (sched, cpu, io):
        assert proc.poll() is None, f"{proc.name} died:\n{c.tail(proc)}"

    # Nothing was recorded for the made-up runs but the scheduler's failing of the submissions it
    # could not accept (no worker claimed or finished an attempt of one).
    k = c.client.keys
    for key in c.redis.scan_iter(match=k.log("made-up-*"), count=1000):
        kinds = {json.loads(f["e"]).get("t") for _, f in c.redis.xrange(key)}
        assert kinds <= {"WORKFLOW_FAILED", "WORKFLOW_CANCELLED", "WORKFLOW_COMPLETED"}, (key, kinds)
    logs = {p.name: p.log_text() for p in c.procs}
    for name, text in logs.items():
        assert "Traceback" not in text, (
            f"{name} logged a traceback:\n{text[text.index('Traceback') - 2000 :][:6000]}"
        )
    workers_log = logs[cpu.name] + logs[io.name]
    assert "refused" in workers_log, "the workers refused nothing: did the garbage reach them?"
    assert "skipping malformed log entry" in logs[sched.name]
    print(f"drill: {flood.sent} in {time.monotonic() - t0:.1f}s")
