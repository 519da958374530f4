"""The garbage drill (issue 13, point 7): while a real run of a few hundred tasks goes on, 10,000
garbage, near-valid and forged messages go into the Celery queues (raw kombu messages in the Redis
lists, as kombu stores them), the workers' hand-off lists, the scheduler's feed and the client intake.
The run completes with exactly the right results, each of its tasks ran once; the scheduler and every
worker process are alive and serve a second workflow; no other run is affected and no forged run
appears; every refused intake request that had a request id got its error reply; the logs hold
warnings, never a crash's traceback.

The garbage comes from ``tests/fuzzing.py`` (seeded, so a failure can be replayed with its seed:
``NERV_DRILL_SEED``). Besides garbage, the drill forges what a writer with access to Redis but without
the cluster's secrets could make, well-formed: jobs for the real run's live attempts signed with a wrong
key or not signed (on the queues and the hand-off lists), its attempts' TASK_STARTED and TASK_COMPLETED
on the feed without a claim token or with a wrong one, and WORKFLOW_SUBMITTED, WORKFLOW_COMPLETED and
LIMIT_SET entries on the feed (README.md#security, README.md#security).
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
from nerv_cluster.errors import MalformedEventError, MalformedJobError, NervError, WaitTimeoutError
from nerv_cluster.jobs import Job, parse_job
from nerv_cluster.model import Event, EventType
from nerv_cluster.requests import read_answer, request_id
from nerv_cluster.signing import Signer
from tests import fuzzing
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

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
_NAMES = [
    "nerv_testtasks.add",
    "nerv_testtasks.add_io",
    "nerv_testtasks.mul",
    "nerv_testtasks.total",
    "nerv_testtasks.counted",
]
#: Counted leaves of the real run (their executions are counted: a forged job run would show).
COUNTED = 20
#: A forger's key (the cluster signs with another, NERV_SIGNING_KEY).
WRONG = Signer(b"a forger's guess at the key")


def _workflow(name: str, n: int) -> tuple[Workflow, dict[str, Any]]:
    """``n`` fetch-like adds on cpu, each through io and back to cpu (the first ``COUNTED`` with a
    counted leaf), a cpu chain (hand-offs), one join. Returns the workflow and its expected results."""
    wf = Workflow(name)
    expected: dict[str, Any] = {}
    ends = []
    for i in range(n):
        a = wf.add(tt.add, i, i, id=f"a{i}")
        b = wf.add(tt.add_io, a, 1, id=f"b{i}")
        c = wf.add(tt.mul, b, 2, id=f"c{i}")
        expected.update({f"a{i}": 2 * i, f"b{i}": 2 * i + 1, f"c{i}": 4 * i + 2})
        ends.append(c)
        if i < COUNTED:
            wf.add(tt.counted, c, id=f"n{i}")
            expected[f"n{i}"] = [f"c{i}"]
    hop = wf.add(tt.add, 0, 1, id="h0")
    expected["h0"] = 1
    for j in range(1, 25):
        hop = wf.add(tt.add, hop, 1, id=f"h{j}")
        expected[f"h{j}"] = j + 1
    wf.add(tt.total, *ends, hop, id="join")
    expected["join"] = sum(4 * i + 2 for i in range(n)) + 25
    return wf, expected


# -- the garbage ------------------------------------------------------------------------------------


def _bad_job(rng: random.Random, run_id: str, task_id: str, signer: Signer) -> Any:
    """A job the worker must refuse: unsigned, signed with a wrong key, a signed one altered or
    truncated, or a body the cluster's key signed that ``parse_job`` refuses (a valid one mutated)."""
    valid = {"r": run_id, "k": task_id, "a": 1, "fn": rng.choice(_NAMES), "args": [1, 2]}
    k = rng.randrange(5)
    if k == 0:
        return fuzzing.near_valid(rng, valid) if rng.random() < 0.5 else valid
    if k == 1:
        return fuzzing.seal(valid, WRONG)
    if k == 2:
        wire = fuzzing.seal(valid, signer)
        cut = rng.randrange(len(wire))
        # Always a change: a "replacement" by the same character left a job the cluster's key signed,
        # without a claim token, which a worker ran (the drill hung on it: no forger has the key).
        other = rng.choice([ch for ch in "0aé{" if ch != wire[cut]])
        return wire[:cut] if rng.random() < 0.5 else wire[:cut] + other + wire[cut + 1 :]
    for _ in range(20):
        bad = fuzzing.near_valid(rng, valid)
        try:
            parse_job(bad)
        except MalformedJobError:
            return fuzzing.seal(bad, signer)
    return fuzzing.seal({**valid, "a": "1"}, signer)


def _forged_job(rng: random.Random, real: str, task_ids: list[str]) -> Any:
    """A well-formed job for one of the real run's live attempts (attempt 1 of one of its tasks, often a
    counted one), signed with a wrong key or not signed at all: only the signature tells it apart."""
    tid = f"n{rng.randrange(COUNTED)}" if rng.random() < 0.5 else rng.choice(task_ids)
    fn = "nerv_testtasks.counted" if tid.startswith("n") else rng.choice(_NAMES[:3])
    job = Job(real, tid, 1, fn, [-1000, 1] if not tid.startswith("n") else [], {}, workflow="real")
    if rng.random() < 0.5:
        return job.to_wire(WRONG, uuid.UUID(int=rng.getrandbits(128)).hex)
    return job.to_dict()


def _queue_message(
    rng: random.Random, real: str, task_ids: list[str], queue: str, signer: Signer
) -> str | bytes:
    """A Redis list entry for Celery queue ``queue``: bytes, broken JSON, JSON of another shape, a
    kombu envelope with a body that is no Celery body, with bad or forged jobs, for unknown tasks, or
    mutated."""
    k = rng.randrange(10)
    if k == 0:
        return fuzzing.garbage_bytes(rng, oversized=50_000)
    if k == 1:
        return json.dumps(fuzzing.random_json(rng))
    run_id = real if rng.random() < 0.5 else f"made-up-{rng.randrange(50)}"
    jobs = [
        _forged_job(rng, real, task_ids)
        if rng.random() < 0.4
        else _bad_job(rng, run_id, rng.choice(task_ids), signer)
        for _ in range(rng.randint(1, 3))
    ]
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


def _feed_entry(
    rng: random.Random, real: str, task_ids: list[str], token_of: Callable[[str, str, int], str]
) -> dict[str, Any]:
    """A feed entry: no event field, bytes, broken JSON, another shape, stale events of the real run,
    events of made-up runs, forged well-formed entries (:func:`_forged_feed_entry`)."""
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
    if k == 6:  # forged, well-formed: what only knowing who wrote it refuses
        return _forged_feed_entry(rng, real, task_ids, token_of)
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


def _forged_feed_entry(
    rng: random.Random, real: str, task_ids: list[str], token_of: Callable[[str, str, int], str]
) -> dict[str, Any]:
    """A well-formed feed entry no worker or scheduler wrote: TASK_STARTED or TASK_COMPLETED of one of
    the real run's live attempts without a claim token, with a made-up one or with another attempt's;
    or a WORKFLOW_SUBMITTED (a valid definition, a made-up run), WORKFLOW_COMPLETED (the real run) or
    LIMIT_SET, which only the scheduler writes, and not through the feed."""
    k = rng.randrange(5)
    now = time.time()
    if k < 3:
        tid = rng.choice(task_ids)
        if k == 0:
            ev = Event(
                EventType.TASK_COMPLETED,
                real,
                tid,
                1,
                {"result": -1, "worker": "evil"},
                now,
                source="worker:evil",
            )
        else:
            ev = Event(EventType.TASK_STARTED, real, tid, 1, {"worker": "evil"}, now, source="worker:evil")
        fields = {"e": ev.to_json()}
        how = rng.randrange(3)
        if how == 1:
            fields[constants.TOKEN_FIELD] = uuid.UUID(int=rng.getrandbits(128)).hex
        elif how == 2:  # a real token, of another attempt (another task's, or a later attempt)
            other = rng.choice([t for t in task_ids if t != tid])
            fields[constants.TOKEN_FIELD] = (
                token_of(real, other, 1) if rng.random() < 0.5 else token_of(real, tid, 2)
            )
        return fields
    if k == 3:
        kind = rng.choice([EventType.WORKFLOW_SUBMITTED, EventType.WORKFLOW_COMPLETED])
        if kind is EventType.WORKFLOW_SUBMITTED:
            definition = {"name": "forged", "tasks": [{"id": "a", "fn": "nerv_testtasks.counted"}]}
            ev = Event(
                kind, f"forged-{rng.randrange(50)}", data={"workflow": definition}, ts=now, source="client"
            )
        else:
            ev = Event(kind, real, data={}, ts=now, source="scheduler:evil")
        return {"e": ev.to_json()}
    ev = Event(
        EventType.LIMIT_SET,
        constants.LIMITS_RUN_ID,
        data={"key": rng.choice(["cpu", "forged"]), "limit": 0},
        ts=now,
        source="client",
    )
    return {"e": ev.to_json()}


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


def _handoff_entry(rng: random.Random, real: str, task_ids: list[str], signer: Signer) -> str | bytes:
    k = rng.randrange(4)
    if k == 0:
        return fuzzing.garbage_bytes(rng, oversized=20_000)
    if k == 1:
        return json.dumps(fuzzing.random_json(rng))
    job = (
        _forged_job(rng, real, task_ids)
        if k == 2
        else _bad_job(rng, real if rng.random() < 0.5 else "made-up-h", rng.choice(task_ids), signer)
    )
    return job if isinstance(job, str) else json.dumps(job)


_MADE_UP_REQUESTS = ["cancel", "signal", "rerun"]


def _made_up_request(rng: random.Random) -> dict[str, Any]:
    """A well-formed request about a run that does not exist (refused: no such run)."""
    rid = f"made-up-i{rng.randrange(100)}"
    op = rng.choice(_MADE_UP_REQUESTS)
    if op == "cancel":
        return {"op": op, "run_id": rid, "reason": "drill"}
    if op == "signal":
        return {"op": op, "run_id": rid, "name": "go", "payload": fuzzing.random_json(rng)}
    return {"op": op, "run_id": rid, "tasks": None}


def _invalid_definition(rng: random.Random, run_id: str) -> Any:
    """A definition the scheduler must refuse: a valid one mutated until ``intake.accept`` refuses it."""
    valid = {
        "name": "hostile",
        "tasks": [{"id": "a", "fn": _NAMES[0]}, {"id": "b", "fn": _NAMES[0], "deps": ["a"]}],
    }
    for _ in range(10):
        raw = fuzzing.near_valid(rng, valid)
        if not _acceptable(run_id, raw):
            return raw
    return {"name": "cycle", "tasks": [{"id": "a", "fn": _NAMES[0], "deps": ["a"]}]}


def _intake_entry(rng: random.Random) -> dict[str, Any]:
    """An intake entry (its fields): a random field map, garbage in a request with an id, a request
    about a made-up run (well-formed or mutated), a hostile submission of an invalid workflow, deep
    nesting. None of them may be applied: each is refused (answered, when it has an id)."""
    rid = uuid.UUID(int=rng.getrandbits(128)).hex
    k = rng.randrange(8)
    if k == 0:
        return {
            str(fuzzing.random_json(rng, 3))[:20] or "x": json.dumps(fuzzing.random_json(rng))
            for _ in range(rng.randint(1, 3))
        }
    if k == 1:
        return {
            constants.INTAKE_ID_FIELD: rid,
            constants.INTAKE_REQUEST_FIELD: fuzzing.garbage_bytes(rng, 20_000),
        }
    if k == 2:
        return {constants.INTAKE_ID_FIELD: rid, constants.INTAKE_REQUEST_FIELD: "[" * rng.randrange(1, 5_000)}
    if k in (3, 4):
        fields = {
            constants.INTAKE_ID_FIELD: rid,
            constants.INTAKE_REQUEST_FIELD: json.dumps(_made_up_request(rng)),
        }
        if k == 4:  # near-valid: the request mutated, now and then its id or fields too
            fields[constants.INTAKE_REQUEST_FIELD] = json.dumps(
                fuzzing.near_valid(rng, _made_up_request(rng))
            )
            if rng.random() < 0.2:
                fields = fuzzing.near_valid(rng, fields)
                fields = (
                    {str(a): b if isinstance(b, str) else json.dumps(b) for a, b in fields.items()}
                    if isinstance(fields, dict)
                    else {"x": json.dumps(fields)}
                )
        return fields or {"x": "{}"}  # an entry has at least one field (XADD)
    run_id = f"made-up-s{rng.randrange(100)}"
    request = {"op": "submit", "run_id": run_id, "idempotency_key": None}
    workflow = json.dumps(_invalid_definition(rng, run_id))
    if k == 7:
        workflow = rng.choice(["[" * 5_000, "{", "null", workflow[: len(workflow) // 2]])
    return {
        constants.INTAKE_ID_FIELD: rid,
        constants.INTAKE_REQUEST_FIELD: json.dumps(request),
        constants.INTAKE_WORKFLOW_FIELD: workflow,
    }


class Flood:
    """Pushes the garbage from a thread, in batches, while the real run goes on."""

    def __init__(self, c: Cluster, real: str, task_ids: list[str], workers: Callable[[], list[str]]) -> None:
        self.c, self.real, self.task_ids, self.workers = c, real, task_ids, workers
        self.rng = random.Random(SEED)
        self.signer = c.signer()
        self.sent: Counter[str] = Counter()
        #: The request ids of the intake entries that had one: each must get an error reply.
        self.requests: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="garbage-flood", daemon=True)
        self._tokens: dict[tuple[str, str, int], str] = {}

    def token_of(self, run_id: str, task_id: str, attempt: int) -> str:
        key = (run_id, task_id, attempt)
        if key not in self._tokens:
            self._tokens[key] = self.c.token(run_id, task_id, attempt)
        return self._tokens[key]

    def _run(self) -> None:
        try:
            k, rng, pushed = self.c.client.keys, self.rng, 0
            real, tids, signer = self.real, self.task_ids, self.signer
            while pushed < TOTAL:
                pipe = self.c.redis.pipeline(transaction=False)
                handoff_lists = [k.handoff(w) for w in self.workers()] or [k.handoff("made-up-worker")]
                for _ in range(min(500, TOTAL - pushed)):
                    where = rng.random()
                    if where < 0.40:
                        queue = rng.choice(constants.QUEUES)
                        pipe.lpush(k.queue(queue), _queue_message(rng, real, tids, queue, signer))
                        self.sent["queues"] += 1
                    elif where < 0.75:
                        pipe.xadd(k.feed, _feed_entry(rng, real, tids, self.token_of))  # type: ignore[arg-type]
                        self.sent["feed"] += 1
                    elif where < 0.85:
                        pipe.rpush(rng.choice(handoff_lists), _handoff_entry(rng, real, tids, signer))
                        self.sent["handoff"] += 1
                    else:
                        fields = _intake_entry(rng)
                        rid = request_id(fields)
                        if rid is not None:
                            self.requests.append(rid)
                        pipe.xadd(k.intake, fields)  # type: ignore[arg-type]
                        self.sent["intake"] += 1
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

    try:
        res = c.client.wait(run_id, timeout=120)
    except WaitTimeoutError:  # say what each unfinished task went through
        status = c.client.status(run_id)
        stuck = {t for t, ts in status.tasks.items() if not ts.status.terminal}
        events = [ev for ev in log_of(c.client, run_id) if ev.task_id in stuck]
        logs = {p.name: p.log_text() for p in c.procs}
        lines = [
            line
            for text in logs.values()
            for line in text.splitlines()
            if any(f"'{t}'" in line or f":{t}:" in line for t in stuck)
        ]
        raise AssertionError(
            f"stuck: {stuck}\n"
            + "\n".join(f"{ev.type.value} {ev.task_id} {ev.attempt} {dict(ev.data)}" for ev in events)
            + "\n"
            + "\n".join(lines[-60:])
        ) from None
    flood.thread.join(timeout=120)
    assert flood.error is None, f"the flood itself failed: {flood.error!r}"
    assert sum(flood.sent.values()) == TOTAL, flood.sent
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == expected
    assert all(t.attempts == 1 for t in res.tasks.values()), "a forged message made a task run again"
    assert c.execs(run_id) == {f"n{i}": 1 for i in range(COUNTED)}, "a forged job ran"
    events = log_of(c.client, run_id)
    assert not [ev for ev in events if "evil" in ev.source], "a forged event reached the real run's log"
    assert Counter(ev.task_id for ev in events if ev.type is EventType.TASK_COMPLETED) == dict.fromkeys(
        expected, 1
    )
    assert [ev.type for ev in events].count(EventType.WORKFLOW_COMPLETED) == 1
    other = c.client.wait(bystander_id, timeout=60)
    assert other.status is RunStatus.COMPLETED and other.results == bystander_expected

    # Every process still serves: wait for the queues to drain of garbage, then a second workflow.
    k = c.client.keys
    queues = [k.queue(q) for q in constants.QUEUES]
    deadline = time.monotonic() + 60
    while sum(c.redis.llen(q) for q in queues) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in (sched, cpu, io):
        assert proc.poll() is None, f"{proc.name} died:\n{c.tail(proc)}"
    left = sum(c.redis.llen(q) for q in queues)
    assert not left, f"the workers stopped taking messages ({left} left):\n{c.tail(cpu)}\n{c.tail(io)}"
    second, second_expected = _workflow("after", 20)
    second_id = c.client.submit(second)
    res2 = c.client.wait(second_id, timeout=60)
    assert res2.status is RunStatus.COMPLETED and res2.results == second_expected
    for proc in (sched, cpu, io):
        assert proc.poll() is None, f"{proc.name} died:\n{c.tail(proc)}"

    # Every intake request with an id got its error reply (the answer kept under its done key); the
    # intake is empty (every entry read and trimmed).
    assert len(flood.requests) > 500, flood.sent
    answers = c.redis.mget([k.intake_done(rid) for rid in flood.requests])
    unanswered = [rid for rid, a in zip(flood.requests, answers, strict=True) if a is None]
    assert not unanswered, f"{len(unanswered)} intake requests got no reply"
    for answer in answers:
        with pytest.raises(NervError):
            read_answer(answer)
    assert c.redis.xlen(k.intake) == 0, "intake entries were left unread"

    # No forged or made-up run exists (no log, not registered), nothing was recorded for them, and no
    # limit was set.
    made_up = [
        key for pattern in ("made-up-*", "forged-*") for key in c.redis.scan_iter(match=k.log(pattern))
    ]
    assert not made_up, made_up[:10]
    assert set(c.redis.zrange(k.runs, 0, -1)) == {bystander_id, run_id, second_id}
    assert not c.redis.exists(k.limits), "a forged LIMIT_SET was taken"

    logs = {p.name: p.log_text() for p in c.procs}
    for name, text in logs.items():
        assert "Traceback" not in text, (
            f"{name} logged a traceback:\n{text[text.index('Traceback') - 2000 :][:6000]}"
        )
    workers_log = logs[cpu.name] + logs[io.name]
    assert "refused job" in workers_log, "the workers refused no job: did the forged ones reach them?"
    assert "refused" in workers_log and "signature" in workers_log
    sched_log = logs[sched.name]
    assert "dropped feed entry" in sched_log and "intake entry" in sched_log
    print(f"drill: {flood.sent} in {time.monotonic() - t0:.1f}s")
