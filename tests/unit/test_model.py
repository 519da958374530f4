"""The data model: enums, priorities, trigger rules, retry policies, wire forms, errors, run ids."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from nerv_cluster import constants
from nerv_cluster.errors import WorkflowError
from nerv_cluster.limits import Concurrency, RateLimit
from nerv_cluster.model import (
    Cache,
    CircuitBreaker,
    Event,
    EventType,
    RetryPolicy,
    RunStatus,
    TaskDef,
    TaskError,
    TaskPriority,
    TaskResult,
    TaskStatus,
    TriggerRule,
    WorkflowDef,
    new_run_id,
)

# -- enums ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", [*TaskStatus, *RunStatus, *EventType, *TriggerRule])
def test_str_enums_serialise_as_plain_strings(member):
    assert json.dumps(member) == f'"{member.value}"'
    assert json.dumps({"s": member}) == json.dumps({"s": member.value})
    assert str(member) == member.value
    assert f"{member}" == member.value
    assert type(member.value) is str


def test_event_wire_form_holds_plain_strings():
    d = Event(EventType.TASK_COMPLETED, "r", "t", 1, ts=1.0).to_dict()
    assert d["t"] == "TASK_COMPLETED"
    assert type(d["t"]) is str
    assert json.loads(json.dumps(d))["t"] == "TASK_COMPLETED"


def test_task_status_terminal():
    assert {s for s in TaskStatus if s.terminal} == {"COMPLETED", "FAILED", "SKIPPED", "CANCELLED"}
    assert {s for s in RunStatus if s.terminal} == {"COMPLETED", "FAILED", "CANCELLED"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("high", TaskPriority.HIGH),
        ("HIGH", TaskPriority.HIGH),
        ("Critical", TaskPriority.CRITICAL),
        ("low", TaskPriority.LOW),
        (2, TaskPriority.HIGH),
        (0, TaskPriority.LOW),
        (3, TaskPriority.CRITICAL),
        (TaskPriority.MEDIUM, TaskPriority.MEDIUM),
    ],
)
def test_priority_parse(value, expected):
    got = TaskPriority.parse(value)
    assert got is expected


@pytest.mark.parametrize("bad", ["urgent", "", "2", 7, -1, None])
def test_priority_parse_rejects_bad_values(bad):
    with pytest.raises(WorkflowError, match="unknown priority"):
        TaskPriority.parse(bad)


def test_priority_parse_error_lists_the_names():
    with pytest.raises(WorkflowError) as info:
        TaskPriority.parse("urgent")
    for name in ("low", "medium", "high", "critical"):
        assert name in str(info.value)


def test_priorities_order():
    assert TaskPriority.LOW < TaskPriority.MEDIUM < TaskPriority.HIGH < TaskPriority.CRITICAL


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_trigger_rule_parse_accepts_members_and_values(rule):
    assert TriggerRule.parse(rule) is rule
    assert TriggerRule.parse(rule.value) is rule


@pytest.mark.parametrize("bad", ["sometimes", "ALL-SUCCESS", ""])
def test_trigger_rule_parse_rejects_bad_values(bad):
    with pytest.raises(WorkflowError, match="unknown trigger rule") as info:
        TriggerRule.parse(bad)
    assert "all_success" in str(info.value)


def test_event_type_parse_any_case():
    assert EventType.parse("task_completed") is EventType.TASK_COMPLETED
    assert EventType.parse(EventType.WORKFLOW_FAILED) is EventType.WORKFLOW_FAILED
    with pytest.raises(ValueError):
        EventType.parse("nope")


# -- retry policy ---------------------------------------------------------------------------------


def test_retry_delay_sequence_is_exponential():
    p = RetryPolicy(max_retries=10, backoff=0.5, factor=3.0, max_delay=1000.0)
    assert [p.delay(n) for n in range(1, 6)] == pytest.approx([0.5, 1.5, 4.5, 13.5, 40.5])


def test_retry_delay_default_factor_doubles():
    p = RetryPolicy(max_retries=5, backoff=1.0)
    assert [p.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]


def test_retry_delay_is_capped_at_max_delay():
    p = RetryPolicy(max_retries=20, backoff=1.0, factor=2.0, max_delay=10.0)
    assert [p.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_retry_delay_zero_backoff_is_zero():
    assert RetryPolicy(max_retries=3, backoff=0.0, jitter=0.5).delay(3) == 0.0


def test_retry_jitter_stays_within_bounds_and_is_seedable():
    p = RetryPolicy(max_retries=10, backoff=2.0, factor=2.0, jitter=0.25)
    rng = random.Random(1234)
    delays = [p.delay(3, rng) for _ in range(500)]  # base 8.0, spread +-2.0
    assert all(6.0 <= d <= 10.0 for d in delays)
    assert min(delays) < 6.5 and max(delays) > 9.5  # it does spread
    assert len(set(delays)) > 400
    # The same seed gives the same sequence, and each delay is base + uniform(-spread, spread).
    ref = random.Random(99)
    expected = [8.0 + ref.uniform(-2.0, 2.0) for _ in range(5)]
    seeded = random.Random(99)
    assert [p.delay(3, seeded) for _ in range(5)] == pytest.approx(expected)


def test_retry_jitter_never_negative_and_respects_cap():
    p = RetryPolicy(max_retries=50, backoff=1.0, factor=2.0, max_delay=4.0, jitter=1.0)
    rng = random.Random(5)
    for n in range(1, 30):
        d = p.delay(n, rng)
        assert 0.0 <= d <= 8.0  # cap 4.0, spread up to 100%


def test_retry_allows_counts_attempts():
    p = RetryPolicy(max_retries=2)
    assert p.allows(1, ["ValueError"])
    assert p.allows(2, ["ValueError"])
    assert not p.allows(3, ["ValueError"])
    assert not RetryPolicy().allows(1, ["ValueError"])  # max_retries=0: never


class FlakyNetwork(ConnectionError):
    pass


def test_retry_on_matches_names_classes_and_base_classes():
    by_class = RetryPolicy(max_retries=3, retry_on=(LookupError,))
    assert by_class.retry_on == ("LookupError",)
    key_error = TaskError.from_exception(KeyError("k"))
    assert by_class.allows(1, key_error.types)
    assert not by_class.allows(1, TaskError.from_exception(ValueError("v")).types)

    by_name = RetryPolicy(max_retries=3, retry_on=("OSError", "TimeoutError"))
    assert by_name.allows(1, TaskError.from_exception(FlakyNetwork("down")).types)  # OSError is a base
    assert by_name.allows(1, ["TimeoutError"])
    assert not by_name.allows(1, TaskError.from_exception(ZeroDivisionError()).types)
    # A retry_on match still respects max_retries.
    assert not by_name.allows(4, ["TimeoutError"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"backoff": -0.1},
        {"factor": 0.5},
        {"max_delay": -1},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"retry_on": (42,)},
        {"retry_on": (int,)},
    ],
)
def test_retry_policy_rejects_bad_values(kwargs):
    with pytest.raises(WorkflowError):
        RetryPolicy(**kwargs)


def test_retry_policy_round_trip():
    p = RetryPolicy(max_retries=3, backoff=0.5, factor=3.0, max_delay=9.0, jitter=0.1, retry_on=(KeyError,))
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert RetryPolicy.from_dict(json.loads(json.dumps(d))) == p
    assert d["retry_on"] == ["KeyError"]


# -- wire forms -----------------------------------------------------------------------------------


def test_task_def_defaults_are_omitted():
    t = TaskDef(id="a", fn="mod.f", name="a")
    assert t.to_dict() == {"id": "a", "fn": "mod.f"}
    back = TaskDef.from_dict({"id": "a", "fn": "mod.f"})
    assert back == t
    assert back.priority is TaskPriority.MEDIUM
    assert back.trigger is TriggerRule.ALL_SUCCESS
    assert back.queue == constants.DEFAULT_QUEUE
    assert back.retry is None and back.timeout is None and not back.context


def test_task_def_full_round_trip_through_json():
    t = TaskDef(
        id="count",
        fn="wordcount.count",
        name="Count words",
        description="counts",
        dependencies=("fetch-1", "fetch-2"),
        args=({constants.REF_KEY: "fetch-1"}, [1, 2.5, None, True]),
        kwargs={"mode": "fast", "other": {constants.REF_KEY: "fetch-2"}},
        priority=TaskPriority.CRITICAL,
        timeout=30.0,
        retry=RetryPolicy(max_retries=2, backoff=0.1),
        queue="io",
        tags=("x", "y"),
        trigger=TriggerRule.ONE_FAILED,
        context=True,
    )
    d = t.to_dict()
    assert d["priority"] == "CRITICAL"
    assert d["trigger"] == "one_failed"
    assert d["deps"] == ["fetch-1", "fetch-2"]
    wire = json.loads(json.dumps(d))
    assert TaskDef.from_dict(wire) == t


def test_task_def_from_dict_sets_every_field_in_place():
    # Each field set to a value other than its default: a field from_dict forgets, or reads into
    # another's place, cannot round-trip.
    t = TaskDef(
        id="t",
        fn="mod.f",
        name="T",
        description="d",
        dependencies=("a",),
        args=(1,),
        kwargs={"k": 2},
        priority=TaskPriority.HIGH,
        timeout=5.0,
        retry=RetryPolicy(max_retries=3),
        queue="io",
        tags=("x",),
        trigger=TriggerRule.ALL_DONE,
        context=True,
        circuit=CircuitBreaker(failures=2, cooldown=1.0),
        cache=Cache(ttl=60, version="2", key="mod.key"),
        workflow={"name": "sub", "tasks": [{"id": "s", "fn": "mod.g"}]},
        over=[1, 2],
        wait={"signal": "approval", "timeout": 5.0},
        concurrency=Concurrency("crm-api", 4),
        rate_limit=RateLimit("github", 10, per=1.0),
    )
    defaults = TaskDef(id="other", fn="other.fn")
    for f in dataclasses.fields(TaskDef):
        assert getattr(t, f.name) != getattr(defaults, f.name), f.name
    assert TaskDef.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_workflow_def_round_trip():
    wd = WorkflowDef(
        name="wf",
        tasks=(TaskDef(id="a", fn="f", name="a"), TaskDef(id="b", fn="g", name="b", dependencies=("a",))),
        meta={"description": "d"},
    )
    d = json.loads(json.dumps(wd.to_dict()))
    assert WorkflowDef.from_dict(d) == wd
    assert "meta" not in WorkflowDef(name="wf", tasks=()).to_dict()
    assert WorkflowDef.from_dict({"name": "wf", "tasks": []}) == WorkflowDef(name="wf", tasks=())


def test_event_round_trip_with_everything():
    e = Event(EventType.TASK_FAILED, "run-x", "t1", 2, {"error": {"type": "E"}}, ts=12.5, source="worker:1")
    d = e.to_dict()
    assert d == {
        "i": e.id,
        "t": "TASK_FAILED",
        "r": "run-x",
        "ts": 12.5,
        "k": "t1",
        "a": 2,
        "d": {"error": {"type": "E"}},
        "s": "worker:1",
    }
    assert Event.from_dict(d) == e
    assert Event.from_json(e.to_json()) == e
    assert Event.from_json(e.to_json().encode()) == e


def test_event_round_trip_defaults_omitted():
    e = Event(EventType.WORKFLOW_STARTED, "run-x", ts=3.0)
    d = e.to_dict()
    assert set(d) == {"i", "t", "r", "ts"}
    back = Event.from_json(e.to_json())
    assert back == e
    assert back.task_id is None and back.attempt is None and dict(back.data) == {} and back.source == ""


def test_events_get_unique_ids():
    assert len({Event(EventType.WORKFLOW_STARTED, "r").id for _ in range(200)}) == 200


def test_task_error_from_exception():
    class MyError(KeyError):
        pass

    err = TaskError.from_exception(MyError("missing"), traceback="tb")
    assert err.type == "MyError"
    assert err.message == str(MyError("missing"))
    assert err.traceback == "tb"
    assert err.types == ("MyError", "KeyError", "LookupError", "Exception")
    assert str(err) == f"MyError: {err.message}"
    assert TaskError.from_dict(json.loads(json.dumps(err.to_dict()))) == err


def test_task_error_from_base_exception_types_exclude_object():
    err = TaskError.from_exception(KeyboardInterrupt())
    assert err.types == ("KeyboardInterrupt",)


def test_task_result_execution_time():
    assert TaskResult("t", TaskStatus.COMPLETED, started_at=1.0, finished_at=3.5).execution_time == 2.5
    assert TaskResult("t", TaskStatus.RUNNING, started_at=1.0).execution_time is None


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("word-count", "word-count"),
        ("My Workflow!", "my-workflow"),
        ("ETL_job 2", "etl_job-2"),
        ("!!!", "run"),
        ("", "run"),
        ("x" * 100, "x" * 40),
    ],
)
def test_new_run_id_format(name, slug):
    rid = new_run_id(name)
    assert re.fullmatch(re.escape(slug) + r"-[0-9a-f]{12}", rid), rid


def test_new_run_ids_are_unique():
    assert len({new_run_id("wf") for _ in range(500)}) == 500
