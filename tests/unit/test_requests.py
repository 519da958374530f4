"""The intake's wire form (issue 13): requests parsed strictly, answers raised as the client's errors."""

from __future__ import annotations

import json

import pytest

from nerv_cluster import constants
from nerv_cluster.errors import (
    CycleError,
    MalformedRequestError,
    NervError,
    PayloadTooLargeError,
    RunNotFoundError,
    StoreFullError,
    UnknownSignalError,
    WorkflowError,
)
from nerv_cluster.model import Event, EventType
from nerv_cluster.requests import (
    OPS,
    Bounds,
    Request,
    decode_workflow,
    ok,
    read_answer,
    refusal,
    request_id,
    submitted_json,
)
from nerv_cluster.settings import Settings

_BODIES = {
    "submit": {"run_id": "r1", "idempotency_key": None},
    "cancel": {"run_id": "r1", "reason": "enough"},
    "rerun": {"run_id": "r1", "tasks": ["a"]},
    "signal": {"run_id": "r1", "name": "go", "payload": {"any": ["json", 1, None]}},
    "set_limit": {"key": "crm", "limit": 3},
    "schedule_set": {"spec": {"name": "s"}},
    "schedule_pause": {"name": "s"},
    "schedule_resume": {"name": "s"},
    "schedule_trigger": {"name": "s"},
    "schedule_delete": {"name": "s"},
    "clear_cache": {"task": None},
}


def test_every_operation_round_trips_through_its_stream_fields() -> None:
    assert set(_BODIES) == set(OPS)
    for op, body in _BODIES.items():
        req = Request.make(op, '{"name":"w","tasks":[]}' if op == "submit" else None, **body)
        back = Request.parse(req.fields())
        assert back == req, op


def test_request_ids_are_fresh_hex_and_anything_else_has_none() -> None:
    a, b = Request.make("cancel", run_id="r", reason=""), Request.make("cancel", run_id="r", reason="")
    assert a.id != b.id and request_id(a.fields()) == a.id
    for bad in ({}, {"i": "ABC"}, {"i": "x" * 32}, {"i": 5}, "no mapping", {"i": a.id + "0"}):
        assert request_id(bad) is None
    with pytest.raises(MalformedRequestError, match="no request id"):
        Request.parse({"q": "{}"})


@pytest.mark.parametrize(
    ("q", "match"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"op": "launch"}', "unknown operation"),
        ('{"run_id": "r"}', "unknown operation"),
        ('{"op": "cancel", "run_id": "r"}', "missing fields"),
        ('{"op": "cancel", "run_id": "r", "reason": "", "extra": 1}', "unknown fields"),
        ('{"op": "cancel", "run_id": 5, "reason": ""}', "run_id must be str"),
        ('{"op": "set_limit", "key": "k", "limit": true}', "limit must be int or null"),
        ('{"op": "set_limit", "key": "k", "limit": 1.5}', "limit must be int or null"),
        ('{"op": "rerun", "run_id": "r", "tasks": "a"}', "tasks must be list or null"),
        ('{"op": "schedule_set", "spec": []}', "spec must be dict"),
    ],
)
def test_malformed_requests_are_refused_clearly(q: str, match: str) -> None:
    fields = {"i": Request.make("cancel", run_id="r", reason="").id, "q": q}
    with pytest.raises(MalformedRequestError, match=match):
        Request.parse(fields)


def test_fields_beyond_the_wire_form_and_misplaced_workflows_are_refused() -> None:
    req = Request.make("cancel", run_id="r", reason="")
    with pytest.raises(MalformedRequestError, match="unknown fields"):
        Request.parse({**req.fields(), "z": "1"})
    with pytest.raises(MalformedRequestError, match="only goes with a submit"):
        Request.parse({**req.fields(), constants.INTAKE_WORKFLOW_FIELD: "{}"})
    sub = Request.make("submit", None, run_id="r", idempotency_key=None)
    with pytest.raises(MalformedRequestError, match="no workflow definition"):
        Request.parse(sub.fields())


def test_sizes_are_bounded_before_anything_is_decoded() -> None:
    bounds = Bounds(max_request_bytes=100, max_submission_bytes=1000)
    long = Request.make("cancel", run_id="r", reason="x" * 200)
    with pytest.raises(MalformedRequestError, match="the limit is 100"):
        Request.parse(long.fields(), bounds)
    big = Request.make("submit", "{" + " " * 2000 + "}", run_id="r", idempotency_key=None)
    with pytest.raises(PayloadTooLargeError, match="NERV_MAX_SUBMISSION_BYTES"):
        Request.parse(big.fields(), bounds)
    # Not decoded: a too-large text that is no JSON at all is refused for its size.
    garbage = Request.make("submit", "x" * 2000, run_id="r", idempotency_key=None)
    with pytest.raises(PayloadTooLargeError):
        Request.parse(garbage.fields(), bounds)


def test_bounds_follow_the_settings() -> None:
    s = Settings(max_payload_bytes=10, max_signal_bytes=5000, max_submission_bytes=77)
    b = Bounds.of(s)
    assert b.max_request_bytes == 5000 + constants.INTAKE_REQUEST_OVERHEAD_BYTES
    assert b.max_submission_bytes == 77


def test_a_submission_is_written_with_the_definition_text_as_it_came() -> None:
    text = '{"name":"w","tasks":[{"id":"a","fn":"m.f","args":["é",1.5]}]}'
    raw = decode_workflow(text)
    ev = Event(EventType.WORKFLOW_SUBMITTED, "r1", data={"workflow": raw}, ts=12.5, source="client")
    written = submitted_json({"i": ev.id, "t": ev.type.value, "r": "r1", "ts": 12.5}, text, "client")
    assert text in written
    assert Event.parse(written) == ev
    assert json.loads(written) == json.loads(ev.to_json())
    with pytest.raises(WorkflowError, match="not JSON"):
        decode_workflow('{"name": "w"} trailing')


def test_answers_carry_the_values_or_raise_the_same_error_class() -> None:
    assert read_answer(ok(run_id="r", created=True)) == {"ok": True, "run_id": "r", "created": True}
    for exc in (
        RunNotFoundError("no run 'r'"),
        UnknownSignalError("no node"),
        StoreFullError("Redis is full"),
        PayloadTooLargeError("too big"),
        NervError("run r was already submitted"),
    ):
        with pytest.raises(type(exc), match=str(exc)) as info:
            read_answer(refusal(exc))
        assert type(info.value) is type(exc)
    with pytest.raises(CycleError) as cyc:
        read_answer(refusal(CycleError(["a", "b"])))
    assert cyc.value.cycle == ["a", "b"] and "a -> b -> a" in str(cyc.value)
    # Whatever else a malformed definition makes decoding raise is a WorkflowError.
    with pytest.raises(WorkflowError, match="KeyError"):
        read_answer(refusal(KeyError("fn")))


def test_an_answer_that_is_no_answer_is_a_nerv_error() -> None:
    for text in ("not json", "[1]", '{"ok": false}', '{"ok": false, "error": {"type": "os.system"}}', None):
        with pytest.raises(NervError):
            read_answer(text)
    # A name outside the error tree never picks a class.
    with pytest.raises(NervError) as info:
        read_answer(json.dumps({"ok": False, "error": {"type": "SystemExit", "message": "m"}}))
    assert type(info.value) is NervError


def test_folding_an_accepted_submission_equals_folding_its_event() -> None:
    from nerv_cluster import intake
    from nerv_cluster import state as st

    text = '{"name":"w","tasks":[{"id":"a","fn":"m.f"},{"id":"b","fn":"m.f","deps":["a"]}]}'
    raw = decode_workflow(text)
    ev = Event(EventType.WORKFLOW_SUBMITTED, "r1", data={"workflow": raw}, ts=3.0, source="client")
    accepted = intake.accept("r1", raw, size=len(text))
    assert accepted[2] == len(text)
    assert st.apply_submitted(st.EMPTY, ev, accepted) == st.apply(st.EMPTY, ev)
    once = st.apply_submitted(st.EMPTY, ev, accepted)
    assert st.apply_submitted(once, ev, accepted) is once, "a run already held is left as it is"
