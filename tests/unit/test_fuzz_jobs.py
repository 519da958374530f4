"""Fuzzing the worker's messages (issue 13, point 7): a Celery message body or a hand-off entry that is
not the scheduler's form is refused with one warning; the worker's task path never raises for it; and
nothing is recorded for any attempt but those the message itself names."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

from celery import Celery
from hypothesis import example, given
from hypothesis import strategies as hst

from nerv_cluster import constants
from nerv_cluster.client import connect
from nerv_cluster.errors import MalformedJobError
from nerv_cluster.handoff import Handoffs
from nerv_cluster.jobs import Job, parse_job
from nerv_cluster.model import Event
from nerv_cluster.registry import Registry, TaskFunction, task
from nerv_cluster.settings import Settings
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
        self._runner = TaskRunner(self.log, REG, "w1", 1 << 20, 3)  # type: ignore[arg-type]

    def runner(self) -> TaskRunner:
        return self._runner


def _typed(job: Job) -> None:
    assert isinstance(job.run_id, str) and isinstance(job.task_id, str) and isinstance(job.fn, str)
    assert type(job.attempt) is int and job.attempt >= 1 and type(job.first) is int
    assert isinstance(job.args, list) and isinstance(job.kwargs, dict)
    assert job.context is None or isinstance(job.context, dict)
    assert job.timeout is None or job.timeout > 0


@fuzzing.examples(60)
@given(fuzzing.jobs())
def test_the_schedulers_jobs_parse_as_they_were_written(body: dict[str, Any]) -> None:
    job = parse_job(body)
    same = json.dumps(job.to_dict())  # as text: NaN is not equal to itself
    assert same == json.dumps(Job.from_dict(body).to_dict())
    assert json.dumps(parse_job(json.loads(same)).to_dict()) == same


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
def test_any_job_parses_to_a_sound_job_or_is_refused(body: Any) -> None:
    try:
        job = parse_job(body)
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


def _named(body: Any) -> set[str]:
    """The attempts a message body names, as far as it names any (as JSON text: any value may be there)."""
    out = set()
    for job in body[0] if isinstance(body, list) and body and isinstance(body[0], list) else []:
        if isinstance(job, dict):
            out.add(json.dumps([job.get("r"), job.get("k"), job.get("a")]))
    return out


def _recorded() -> set[str]:
    return {json.dumps([e.run_id, e.task_id, e.attempt]) for e in RUNTIME.log.events}


@fuzzing.examples(100)
@given(fuzzing.celery_bodies())
# Found by this fuzzer: both raised out of the task (TypeError), which Celery logs as a crash.
@example([[{"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN}, 5], {}, {}])  # a packed batch, one bad
@example([[{"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN, "kwargs": {"x": 1}}], {"x": 1}, {}])
def test_a_celery_message_of_any_body_runs_its_own_jobs_or_nothing(body: Any) -> None:
    """Through the registered Celery task (as the worker's pool calls it): args are the message's
    jobs, kwargs its keyword arguments."""
    RUNTIME.log.events.clear()
    args = body[0] if isinstance(body, list) and len(body) == 3 and isinstance(body[0], list) else [body]
    kwargs = body[1] if isinstance(body, list) and len(body) == 3 and isinstance(body[1], dict) else {}
    with _warnings() as warned:
        result = APP.tasks[fuzzing.FN].apply(args=args, kwargs=kwargs, task_id="msg-1")
    assert result.successful(), result.traceback
    recorded = _recorded()
    if not recorded:
        assert len(warned) == 1 and "refused a message" in warned[0].getMessage(), "refused without a word"
        assert warned[0].exc_info is None
    else:
        assert recorded <= _named([args, kwargs, {}]), "recorded an attempt the message does not name"


@fuzzing.examples(60)
@given(fuzzing.celery_bodies())
def test_a_message_for_an_unregistered_task_fails_only_the_attempts_it_names(body: Any) -> None:
    """``task_unknown``: a message of a nerv form fails its own attempts; any other body is refused."""

    class Message:
        def decode(self) -> Any:
            return body

    RUNTIME.log.events.clear()
    _on_unknown(RUNTIME, Message(), "no.such.task")  # type: ignore[arg-type]
    assert _recorded() <= _named(body)


class HandoffRedis:
    """The hand-off list and waiting flag of one worker, in memory (resign.lua's semantics)."""

    def __init__(self, entries: list[Any], waiting: bool) -> None:
        self.entries = list(entries)
        self.waiting = waiting

    def register_script(self, source: str) -> Any:
        def resign(keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
            if self.waiting:
                self.waiting = False
                return None
            return self.lpop(keys[1])

        return resign

    def blpop(self, keys: Sequence[str], timeout: float) -> Any:
        return (keys[0], self.entries.pop(0)) if self.entries else None

    def lpop(self, key: str) -> Any:
        return self.entries.pop(0) if self.entries else None


@fuzzing.examples(80)
@given(hst.lists(fuzzing.handoff_inputs(), max_size=4), hst.booleans(), hst.booleans())
# Found by this fuzzer: take() raised on any entry that was no job's JSON (out of the Celery task, as a
# crash with a traceback), and an empty entry hid the job handed after it.
@example([b"\xff"], True, False)
@example([""], False, True)
def test_a_handoff_entry_that_is_no_job_is_refused_and_the_wait_ends_cleanly(
    entries: list[Any], waiting: bool, real: bool
) -> None:
    """Garbage on a worker's hand-off list never raises out of ``take``: it is refused, the worker
    stops waiting (its flag deleted), and a job the scheduler handed meanwhile is still taken."""
    job = {"r": "run-1", "k": "t0", "a": 1, "fn": fuzzing.FN}
    if real:  # the scheduler handed a job after the garbage: it consumed the flag
        entries, waiting = [*entries, json.dumps(job)], False
    fake = HandoffRedis(entries, waiting)
    got = Handoffs(fake, constants.Keys("nerv")).take("w1", 0.01)  # type: ignore[arg-type]
    if got is None:
        assert not fake.waiting, "the worker still looks as if it waited for a hand-off"
    else:
        _typed(got)
    if real:
        assert got is not None


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
    body = json.dumps([[{"r": "run-1", "k": "a", "a": 1, "fn": fuzzing.FN}], {}, fuzzing.CELERY_EMBED])
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
