"""Fuzzing the worker's messages (issue 13, point 7): a Celery message body or a hand-off entry that is
not a job the scheduler signed (with the test key, ``fuzzing.SIGNING_KEY``) is refused with one warning:
a forged or altered message as unsigned, a signed body that is no job by ``parse_job``; the worker's task
path never raises for it; and nothing is recorded for any attempt but those of properly signed jobs."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import random
import string
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from celery import Celery
from hypothesis import example, given
from hypothesis import strategies as hst

from nerv_cluster import constants, handoff
from nerv_cluster.client import connect
from nerv_cluster.errors import JobSignatureError, MalformedJobError
from nerv_cluster.handoff import Handoffs
from nerv_cluster.jobs import Job, parse_job
from nerv_cluster.model import Event, EventType
from nerv_cluster.registry import Registry, TaskFunction, task
from nerv_cluster.settings import Settings
from nerv_cluster.signing import SIGNATURE_CHARS
from nerv_cluster.transport import check_message
from tests import fuzzing
from worker.app import UnknownTaskLine, _celery_task, _on_unknown
from worker.runner import TaskRunner

REG = Registry()


@task(name=fuzzing.FN, registry=REG)
def noop(*args: Any, **kwargs: Any) -> Any:
    return [len(args), sorted(kwargs)]


class RecordingLog:
    """The runner's event log, in memory: every claim is granted, every event kept."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        # What the runner's signer is read from: never used, the runner is given the key itself.
        self.redis = None
        self.keys = constants.Keys("nerv")

    def start_attempts(
        self,
        events: Sequence[Event],
        worker_id: str,
        max_takeovers: int,
        outcomes: Sequence[Event] = (),
        batch: bool = False,
    ) -> list[str]:
        self.events += [*outcomes, *events]
        return ["ok"] * len(events)

    def finish_attempts(self, events: Sequence[Event], waiting: str = "") -> list[bool]:
        self.events += events
        return [True] * len(events)


class Runtime:
    """What the Celery task asks its worker runtime for: this process's runner."""

    def __init__(self) -> None:
        self.log = RecordingLog()
        self._runner = TaskRunner(
            self.log,  # type: ignore[arg-type]
            REG,
            "w1",
            1 << 20,
            3,
            signing=fuzzing.SIGNING_KEY,
        )

    def runner(self) -> TaskRunner:
        return self._runner


def _typed(job: Job) -> None:
    assert isinstance(job.run_id, str) and isinstance(job.task_id, str) and isinstance(job.fn, str)
    assert type(job.attempt) is int and job.attempt >= 1 and type(job.first) is int
    assert isinstance(job.args, list) and isinstance(job.kwargs, dict)
    assert job.context is None or isinstance(job.context, dict)
    assert job.timeout is None or job.timeout > 0


@fuzzing.examples(60)
@given(fuzzing.jobs(), hst.text(string.hexdigits, max_size=32))
def test_the_schedulers_jobs_open_as_they_were_written(body: dict[str, Any], token: str) -> None:
    job = parse_job(body)
    same = json.dumps(job.to_dict())  # as text: NaN is not equal to itself
    assert same == json.dumps(Job.from_dict(body).to_dict())
    assert json.dumps(parse_job(json.loads(same)).to_dict()) == same
    opened = Job.from_wire(job.to_wire(fuzzing.SIGNER, token), fuzzing.SIGNER)
    assert opened.token == token
    assert json.dumps(opened.to_dict()) == json.dumps(dataclasses.replace(job, token=token).to_dict())


@fuzzing.examples(150)
@given(fuzzing.forged_wires())
# Found by this fuzzer: non-ASCII text where the signature goes raised TypeError out of compare_digest,
# a lone surrogate in the body UnicodeEncodeError: the worker logged both as "a signed message that is
# no job" (refused still, but taken for the scheduler's own).
@example("é" + fuzzing.seal({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN})[1:])
@example(fuzzing.seal({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN}) + "\ud800")
def test_a_job_message_the_scheduler_did_not_sign_is_refused_as_such(wire: Any) -> None:
    with pytest.raises(JobSignatureError):
        Job.from_wire(wire, fuzzing.SIGNER)


@fuzzing.examples(100)
@given(fuzzing.job_inputs())
# Found by this fuzzer: Job.from_dict took each of these (or raised a bare KeyError/TypeError, which
# Celery logged as a task crash with a traceback).
@example({"r": "run-1", "k": "t0", "a": "1", "fn": fuzzing.FN})  # an attempt as text became int("1")
@example({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN, "args": "abc"})  # list("abc"): 3 arguments
@example({"r": 5, "k": ["t0"], "a": 1, "fn": fuzzing.FN})  # ids made of whatever str() gives
@example({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN, "t": float("nan")})  # a NaN time limit
@example({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN, "retry": {"max_retries": "2"}})
@example({"r": "run-1", "k": "t0", "a": True, "fn": fuzzing.FN})
@example({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN, "tok": 5})
def test_any_job_parses_to_a_sound_job_or_is_refused(body: Any) -> None:
    """``parse_job`` on any body (a signed wire's JSON included: the body after its signature)."""
    if isinstance(body, str) and len(body) > SIGNATURE_CHARS:
        try:
            body = json.loads(body[SIGNATURE_CHARS:])
        except ValueError:
            return
    try:
        job = parse_job(body)
    except MalformedJobError as exc:
        assert str(exc)
        return
    _typed(job)


@fuzzing.examples(100)
@given(fuzzing.signed_malformed())
def test_a_signed_body_that_is_no_job_is_refused_by_parse_job(wire: str) -> None:
    """The signature passes (the scheduler's key), then the body meets ``parse_job``: a sound job or
    MalformedJobError (ValueError only for text that is no JSON, which a seal of JSON never is)."""
    try:
        job = Job.from_wire(wire, fuzzing.SIGNER)
    except MalformedJobError as exc:
        assert str(exc)
        return
    _typed(job)


@contextlib.contextmanager
def _warnings() -> Iterator[list[logging.LogRecord]]:
    """The worker's log records of WARNING and above while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("nerv.worker")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _app_and_task() -> tuple[Celery, Runtime]:
    app = Celery("fuzz", set_as_current=False)
    runtime = Runtime()
    tf = REG.get(fuzzing.FN)
    assert isinstance(tf, TaskFunction)
    _celery_task(app, tf, runtime, None)  # type: ignore[arg-type]
    return app, runtime


APP, RUNTIME = _app_and_task()


def _verdict(wire: Any) -> tuple[str, str | None]:
    """What the worker must make of one job of a message: ("job", its attempt as JSON text) for a job
    the scheduler signed, ("forged", None) for any other signature, ("malformed", None) for a signed
    body that is no job."""
    try:
        job = Job.from_wire(wire, fuzzing.SIGNER)
    except JobSignatureError:
        return "forged", None
    except (MalformedJobError, ValueError):
        return "malformed", None
    return "job", json.dumps([job.run_id, job.task_id, job.attempt])


def _recorded() -> list[str]:
    return [json.dumps([e.run_id, e.task_id, e.attempt]) for e in RUNTIME.log.events]


def _check_refusals(wires: list[Any], warned: list[logging.LogRecord]) -> set[str]:
    """One warning per refused job, saying why (never with a traceback); the attempts of the jobs the
    scheduler signed are returned."""
    verdicts = [_verdict(w) for w in wires]
    refusals = [r.getMessage() for r in warned if r.getMessage().startswith("refused job")]
    assert len(refusals) == sum(v != "job" for v, _ in verdicts), (verdicts, refusals)
    forged = sum(v == "forged" for v, _ in verdicts)
    assert sum("signed message that is no job" not in m for m in refusals) == forged, refusals
    assert all(r.exc_info is None for r in warned)
    return {a for v, a in verdicts if a is not None}


@fuzzing.examples(100)
@given(fuzzing.celery_bodies())
# Found by this fuzzer: both raised out of the task (TypeError), which Celery logs as a crash.
@example([[fuzzing.seal({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN}), 5], {}, {}])  # one bad
@example([[fuzzing.seal({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN})], {"x": 1}, {}])
@example([[{"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN}], {}, {}])  # unsigned, as before
def test_a_celery_message_of_any_body_runs_its_own_signed_jobs_or_nothing(body: Any) -> None:
    """Through the registered Celery task (as the worker's pool calls it): args are the message's
    jobs, kwargs its keyword arguments. A job not signed with the cluster's key, or altered, is refused
    with one warning and nothing recorded for it; a signed body that is no job likewise."""
    RUNTIME.log.events.clear()
    args = body[0] if isinstance(body, list) and len(body) == 3 and isinstance(body[0], list) else [body]
    kwargs = body[1] if isinstance(body, list) and len(body) == 3 and isinstance(body[1], dict) else {}
    with _warnings() as warned:
        result = APP.tasks[fuzzing.FN].apply(args=args, kwargs=kwargs, task_id="msg-1")
    assert result.successful(), result.traceback
    recorded = _recorded()
    if kwargs:  # not the scheduler's form: the whole message refused, one warning
        assert not recorded
        assert len(warned) == 1 and "refused a message" in warned[0].getMessage(), "refused without a word"
        assert warned[0].exc_info is None
        return
    signed = _check_refusals(list(args), warned)
    assert set(recorded) <= signed, "recorded an attempt the scheduler did not sign"
    if not signed:
        assert not recorded and warned, "refused without a word"


@fuzzing.examples(80)
@given(fuzzing.celery_bodies())
def test_a_message_for_an_unregistered_task_fails_only_the_signed_jobs_it_carries(body: Any) -> None:
    """``task_unknown``: each job the scheduler signed gets its failure recorded; a forged or malformed
    one is refused (one warning each); any other body is refused as a whole, with one warning."""

    class Message:
        def decode(self) -> Any:
            return body

    RUNTIME.log.events.clear()
    with _warnings() as warned:
        _on_unknown(RUNTIME, Message(), "no.such.task")  # type: ignore[arg-type]
    recorded = _recorded()
    if not (isinstance(body, list) and body and isinstance(body[0], list)):
        assert not recorded and len(warned) == 1 and "not a nerv job" in warned[0].getMessage()
        return
    signed = _check_refusals(list(body[0]), warned)
    assert sorted(set(recorded)) == sorted(signed)
    # Each claimed first (only a claim's holder records an outcome), then failed.
    kinds = {e.type for e in RUNTIME.log.events}
    assert kinds <= {EventType.TASK_STARTED, EventType.TASK_FAILED}
    started = {
        (e.run_id, e.task_id, e.attempt) for e in RUNTIME.log.events if e.type is EventType.TASK_STARTED
    }
    failed = {(e.run_id, e.task_id, e.attempt) for e in RUNTIME.log.events if e.type is EventType.TASK_FAILED}
    assert started == failed


class HandoffRedis:
    """The hand-off list and waiting flag of one worker, in memory (resign.lua's semantics)."""

    def __init__(self, entries: list[Any], waiting: bool) -> None:
        self.entries = list(entries)
        self.waiting = waiting
        self.popped = 0

    def register_script(self, source: str) -> Any:
        def resign(keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
            if self.waiting:
                self.waiting = False
                return None
            return self.lpop(keys[1])

        return resign

    def blpop(self, keys: Sequence[str], timeout: float) -> Any:
        return (keys[0], self.lpop(keys[0])) if self.entries else None

    def lpop(self, key: str) -> Any:
        if not self.entries:
            return None
        self.popped += 1
        return self.entries.pop(0)


def _handoffs(fake: HandoffRedis) -> Handoffs:
    return Handoffs(fake, constants.Keys("nerv"), signing=fuzzing.SIGNING_KEY)  # type: ignore[arg-type]


@fuzzing.examples(100)
@given(hst.lists(fuzzing.handoff_inputs(), max_size=4), hst.booleans(), hst.booleans())
# Found by this fuzzer: take() raised on any entry that was no job's JSON (out of the Celery task, as a
# crash with a traceback), and an empty entry hid the job handed after it.
@example([b"\xff"], True, False)
@example([""], False, True)
@example([json.dumps({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN})], True, True)  # unsigned
def test_a_handoff_entry_the_scheduler_did_not_sign_is_refused_and_the_wait_goes_on(
    entries: list[Any], waiting: bool, real: bool
) -> None:
    """Garbage, forged or signed-malformed entries on a worker's hand-off list never raise out of
    ``take``: each is refused with one warning, the wait goes on past it, and a job the scheduler
    handed after them is taken; with none handed the worker stops waiting (its flag deleted)."""
    job = Job("run-1", "t9", 2, fuzzing.FN, [1], {})
    if real:  # the scheduler handed a job after the garbage: it consumed the flag
        entries, waiting = [*entries, job.to_wire(fuzzing.SIGNER, "tok")], False
    fake = HandoffRedis(entries, waiting)
    with _warnings() as warned:
        got = _handoffs(fake).take("w1", 1.0)
    if got is None:
        assert not fake.waiting, "the worker still looks as if it waited for a hand-off"
    else:
        _typed(got)
    taken = entries[: fake.popped]
    signed = [w for w in taken if _verdict(w)[0] == "job"]
    assert len([r for r in warned if "refused job" in r.getMessage()]) == fake.popped - len(signed)
    if real:
        assert got is not None
        if not [w for w in entries[:-1] if _verdict(w)[0] == "job"]:  # the first signed one is taken
            assert (got.task_id, got.attempt, got.token) == ("t9", 2, "tok")


def test_a_flood_of_refused_handoff_entries_ends_the_wait_after_max_refused() -> None:
    """A forger filling a waiting worker's list cannot keep it from its queue: after ``MAX_REFUSED``
    refusals it stops waiting (its flag deleted) and goes back to its queue."""
    forged = fuzzing.seal({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN}, fuzzing.OTHER_SIGNER)
    fake = HandoffRedis([forged] * (handoff.MAX_REFUSED + 50), waiting=True)
    with _warnings() as warned:
        got = _handoffs(fake).take("w1", 30)
    assert got is None and not fake.waiting
    assert fake.popped == handoff.MAX_REFUSED
    assert len(warned) == handoff.MAX_REFUSED


@fuzzing.examples(150)
@given(fuzzing.kombu_entries())
# Found by the garbage drill: each made kombu or Celery raise out of the consumer loop, which Celery
# takes for an unrecoverable error (the worker exited): bytes that are no UTF-8 JSON, deep nesting, an
# envelope whose body is not base64 text.
@example(b"\xb3t\t\xb8")
@example("[" * 5_000)
@example(
    json.dumps({**fuzzing.kombu_envelope(b"[[], {}, {}]", fuzzing.FN, "cpu", random.Random(1)), "body": 5})
)
def test_a_queue_entry_is_a_message_nerv_could_have_sent_or_is_refused(entry: Any) -> None:
    try:
        msg = check_message(entry)
    except MalformedJobError as exc:
        assert str(exc)
        return
    body = json.loads(base64.b64decode(msg["body"]))
    assert isinstance(body[0], list) and msg["content-type"] == "application/json"
    assert msg["headers"].get("eta") is None and not any(body[2].get(k) for k in fuzzing.CELERY_EMBED)


def test_the_schedulers_own_message_passes_the_check() -> None:
    """A message as the scheduler's Celery app publishes it, read back raw from the list."""
    job = fuzzing.seal({"r": "run-1", "k": "a", "a": 1, "fn": fuzzing.FN})
    body = json.dumps([[job], {}, fuzzing.CELERY_EMBED])
    entry = json.dumps(fuzzing.kombu_envelope(body.encode(), fuzzing.FN, "cpu", random.Random(2)))
    assert check_message(entry)["headers"]["task"] == fuzzing.FN
    assert check_message(entry.encode())["properties"]["delivery_info"]["routing_key"] == "cpu"


def test_celerys_unregistered_task_report_becomes_one_warning_line() -> None:
    record = logging.LogRecord(
        "celery.worker.consumer.consumer",
        logging.ERROR,
        __file__,
        1,
        "Received unregistered task of type %s.\nThe full contents of the message body was:\n%s\n",
        (KeyError("evil.task"), "x" * 10_000),
        (KeyError, KeyError("evil.task"), None),
    )
    assert UnknownTaskLine().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "received a message for unregistered task 'evil.task': dropped"


def test_replies_holding_bytes_that_are_no_utf8_are_decoded_with_replacements() -> None:
    """Garbage bytes in one feed entry must not fail the whole XREAD (the scheduler refolded on each)."""
    client = connect(Settings.from_env({"NERV_REDIS_URL": "redis://127.0.0.1:1/0"}))
    assert client.connection_pool.connection_kwargs["encoding_errors"] == "replace"


def test_a_job_handed_behind_more_than_max_refused_entries_is_still_taken() -> None:
    """The scheduler handed a job (consuming the flag) behind more forged entries than one wait refuses:
    the worker, stopping its wait, took one more entry, refused it, and the handed job (its attempt
    claimed for this live worker) was never run: the run hung (fixed: ``Handoffs._stop_waiting``)."""
    forged = fuzzing.seal({"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN}, fuzzing.OTHER_SIGNER)
    handed = Job("run-1", "t9", 2, fuzzing.FN, [1], {}).to_wire(fuzzing.SIGNER, "tok")
    fake = HandoffRedis([forged] * (handoff.MAX_REFUSED + 50) + [handed, forged], waiting=False)
    with _warnings() as warned:
        got = _handoffs(fake).take("w1", 30)
    assert got is not None and (got.task_id, got.attempt, got.token) == ("t9", 2, "tok")
    assert len(warned) == handoff.MAX_REFUSED + 50 and fake.entries == [forged]
