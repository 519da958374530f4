"""Fuzzing the intake (issue 13, point 7): whatever a client leaves on ``<prefix>:intake``, the
scheduler's parsing (``Request.parse``) gives a request or a clear error, and its intake room
(``IntakeRoom.take``, with every check it makes before writing) answers each entry with a request id
once, with a verdict or a clear nerv error, never raises another exception, and touches no run but the
one the request names.

The room runs against an in-memory stand-in for the event log that acts as ``intake.lua`` does (a
submission of a run whose log exists is refused, an append to a log that does not exist likewise)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

from hypothesis import example, given

from nerv_cluster import constants
from nerv_cluster import state as st
from nerv_cluster.errors import MalformedRequestError, NervError, PayloadTooLargeError
from nerv_cluster.model import Event, EventType
from nerv_cluster.requests import Bounds, Request, read_answer, request_id
from nerv_cluster.settings import Settings
from scheduler import intake as room_module
from scheduler.intake import IntakeRoom
from scheduler.takeover import Loaded
from tests import fuzzing

KEYS = constants.Keys("nerv")
#: The runs the scheduler holds: run-1 waits for signal s0, other is a bystander.
HELD = {
    "run-1": {
        "name": "w",
        "tasks": [
            {"id": "t0", "fn": fuzzing.FN},
            {"id": "s", "fn": constants.WAIT_FN, "wait": {"signal": "s0"}},
        ],
        "meta": {"signals": {"s0": "s"}},
    },
    "other": {"name": "o", "tasks": [{"id": "a", "fn": fuzzing.FN}]},
}


def _state() -> st.State:
    state = st.EMPTY
    for rid, definition in HELD.items():
        state = st.apply(state, Event(EventType.WORKFLOW_SUBMITTED, rid, data={"workflow": definition}))
    return state


STATE = _state()


class IntakeLog:
    """The event log as the intake room uses it: ``apply_request`` acts as ``intake.lua`` (which logs
    exist: the held runs'), and records every write."""

    def __init__(self) -> None:
        self.keys = KEYS
        #: (request id, what was written: an op or 'none', the answer given, the keys written).
        self.writes: list[tuple[str, str, str, list[str]]] = []
        self.trimmed: list[str] = []

    def apply_request(
        self,
        token: str,
        request_id: str,
        entry_id: str,
        op: str = "none",
        answer: str = "",
        other_answer: str = "",
        tail_keys: Sequence[str] = (),
        tail_args: Sequence[Any] = (),
    ) -> tuple[str, str]:
        logs = {KEYS.log(rid) for rid in HELD}
        status = "applied"
        exists = tail_keys[0] in logs if tail_keys else False
        if (op == "submit" and exists) or (op == "append" and tail_args[2] == "1" and not exists):
            status = "refused"
        given = other_answer if status == "refused" else answer
        self.writes.append((request_id, op if status == "applied" else "none", given, list(tail_keys)))
        return status, given

    def trim_intake(self, token: str, cursor: str) -> None:
        self.trimmed.append(cursor)

    def last_entry(self, run_id: str) -> str | None:
        return "1-0" if run_id in HELD else None


class Schedules:
    def __init__(self) -> None:
        self.schedules = {"nightly": object()}
        self.seen: list[Event] = []

    def observe(self, events: Sequence[Event], now: float) -> None:
        self.seen.extend(events)


class Limits:
    def observe(self, log: Any, entries: Sequence[Any]) -> None:
        pass


class Cache:
    def clear(self, task: str | None) -> int:
        return 0


def _room() -> tuple[IntakeRoom, IntakeLog]:
    log = IntakeLog()
    room = IntakeRoom(log, Settings.from_env({}), Schedules(), Limits(), Cache())  # type: ignore[arg-type]
    return room, log


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """The scheduler's warnings while the block runs."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign,assignment]
    logger = logging.getLogger("nerv.scheduler")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@fuzzing.examples(300)
@given(fuzzing.intake_requests())
@example(5)
@example(["i", "q"])
@example({"i": "0" * 32, "q": '{"op": "cancel", "run_id": "r", "reason": "x"}', "w": "{}"})
# Found by this fuzzer: deep nesting raised RecursionError out of Request.parse (the room answered it
# as "invalid request: RecursionError"), in ``w`` out of decode_workflow likewise.
@example({"i": "0" * 32, "q": "[" * 5_000})
def test_any_intake_entry_parses_to_a_request_or_a_clear_error(fields: Any) -> None:
    try:
        req = Request.parse(fields, Bounds())
    except (MalformedRequestError, PayloadTooLargeError) as exc:
        assert str(exc).strip()
        return
    assert req.id == request_id(fields) and req.op in fuzzing_ops()
    assert (req.workflow is not None) == (req.op == "submit")
    again = Request.parse(req.fields(), Bounds())
    assert (again.op, dict(again.body), again.workflow) == (req.op, dict(req.body), req.workflow)


def fuzzing_ops() -> tuple[str, ...]:
    from nerv_cluster.requests import OPS

    return OPS


def _keys_of(rid: str | None, keys: list[str]) -> bool:
    """Every per-run key a write names is of run ``rid``."""
    return all("{" not in k or (rid is not None and f"{{{rid}}}" in k) for k in keys)


@fuzzing.examples(300)
@given(fuzzing.intake_requests())
@example(
    {
        "i": "0" * 32,
        "q": json.dumps({"op": "submit", "run_id": "fresh", "idempotency_key": None}),
        "w": "[" * 5_000,
    }
)
@example({"i": "0" * 32, "q": json.dumps({"op": "signal", "run_id": "run-1", "name": "s0", "payload": 1})})
@example({"i": "0" * 32, "q": json.dumps({"op": "signal", "run_id": "other", "name": "s0", "payload": 1})})
@example({"i": "0" * 32, "q": json.dumps({"op": "cancel", "run_id": "a b", "reason": ""})})
@example({"i": "0" * 32, "q": json.dumps({"op": "rerun", "run_id": "run-1", "tasks": ["t0"]})})
@example({"i": "0" * 32, "q": json.dumps({"op": "set_limit", "key": "", "limit": -1})})
@example({"i": "0" * 32, "q": json.dumps({"op": "schedule_set", "spec": {"name": 5}})})
@example(
    {
        "i": "0" * 32,
        "q": json.dumps({"op": "submit", "run_id": "other", "idempotency_key": None}),
        "w": json.dumps(HELD["other"]),
    }
)
@example(
    {
        "i": "0" * 32,
        "q": json.dumps({"op": "submit", "run_id": "fresh", "idempotency_key": "k"}),
        "w": json.dumps(HELD["other"]),
    }
)
def test_the_intake_room_answers_every_entry_clearly_and_touches_no_other_run(fields: Any) -> None:
    if not isinstance(fields, dict):
        return  # an XREAD entry's fields are always a map
    room, log = _room()
    missing = Loaded(runs={}, positions={}, events=0, from_checkpoints=0)
    with (
        mock.patch.object(room_module, "load_runs", lambda *_a, **_k: missing),
        _warnings() as warned,
    ):
        out = room.take([("5-0", fields)], STATE, lambda: "token", 1000.0)
    # The room warns of a request refused by an exception that is no nerv error (an unclear answer).
    unclear = [m for m in warned if ") refused: " in m]
    assert not unclear, f"refused with an exception that is no nerv error: {unclear}"
    rid = request_id(fields)
    if rid is None:  # no one to answer: nothing written, the entry trimmed
        assert not log.writes and log.trimmed == ["5-0"]
        assert out.state is STATE and not out.events
        return
    assert [w[0] for w in log.writes] == [rid], "each entry with an id gets exactly one answer"
    _, op, answer, written = log.writes[0]
    try:
        req: Request | None = Request.parse(fields, room.bounds)
    except NervError:
        req = None
    try:
        read_answer(answer)
    except NervError as exc:  # a refusal: its error is one the client raises, with a message
        assert str(exc).strip()
        assert op == "none", "a refused request wrote something"
    if req is None:  # refused as it was read: the parse's own clear error is the answer
        assert op == "none"
        assert json.loads(answer)["error"]["type"] in ("MalformedRequestError", "PayloadTooLargeError")
    named = req.run_id if req else None
    if op != "none":
        assert _keys_of(named, written), ("a write outside the request's run", written)
    # Other runs untouched: every held run but the one the request names is the same object, and a
    # run appears only for an applied submission.
    for held_id, run in STATE.runs.items():
        if held_id != named or op == "none":
            assert out.state.runs.get(held_id) is run, f"request {op} of {named!r} changed run {held_id!r}"
    new = set(out.state.runs) - set(STATE.runs)
    assert new <= ({named} if req is not None and op == "submit" else set()), new
    if op == "none":
        assert out.state is STATE and not out.events
