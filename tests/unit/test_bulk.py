"""The bulk paths of big submissions (issue 14, goal 2) give exactly what the plain ones gave: TaskDef
built by its unfrozen twin, ``Workflow.add``'s fast path, the planner's one-pass levels, the plan-free
check, payload measuring, the paused GC."""

from __future__ import annotations

import dataclasses
import gc
import json
import random

import pytest

from nerv_cluster import gcpause
from nerv_cluster.errors import (
    CycleError,
    DuplicateTaskError,
    InvalidIdError,
    PayloadTooLargeError,
    UnknownDependencyError,
    WorkflowError,
)
from nerv_cluster.limits import Concurrency, RateLimit
from nerv_cluster.model import (
    Cache,
    CircuitBreaker,
    Event,
    EventType,
    RetryPolicy,
    TaskDef,
    TaskPriority,
    TriggerRule,
    WorkflowDef,
    make_task,
)
from nerv_cluster.planner import check_acyclic, plan
from nerv_cluster.registry import Registry, task
from nerv_cluster.workflow import Workflow, check_definition, validate_definition

REG = Registry()


@task(name="b.plain", registry=REG)
def plain(*args, **kwargs):
    return None


@task(name="b.limited", registry=REG, concurrency=Concurrency("k", 2))
def limited(x):
    return x


def test_make_task_is_a_taskdef_like_any_other() -> None:
    fields = {"id": "a", "fn": "f", "dependencies": ("x",), "args": (1,), "kwargs": {"k": 2}, "queue": "io"}
    made, plain_td = make_task(**fields), TaskDef(**fields)
    assert type(made) is TaskDef and made == plain_td and repr(made) == repr(plain_td)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.id = "b"  # type: ignore[misc]
    assert dataclasses.replace(made, id="b") == TaskDef(**{**fields, "id": "b"})
    assert make_task("a", "f") == TaskDef("a", "f")
    assert make_task(id="a", fn="f").kwargs == {} and make_task(id="a", fn="f").kwargs is not made.kwargs
    assert TaskDef.from_dict(made.to_dict()) == dataclasses.replace(made, name="a")


def test_add_sets_every_field_as_the_keyword_form_would() -> None:
    wf = Workflow("w", registry=REG)
    first = wf.add(plain, id="first")
    retry, circuit, cache = RetryPolicy(max_retries=2), CircuitBreaker(failures=3), Cache(ttl=5)
    rate = RateLimit("api", 10)
    wf.add(
        plain, 1, "two", first, id="full", name="Full", description="d", dependencies=["first"],
        kwargs={"k": first}, priority="high", timeout=3.0, retry=retry, circuit=circuit, queue="io",
        tags=["t"], trigger="all_done", context=True, cache=cache, concurrency=Concurrency("c", 1),
        rate_limit=rate,
    )  # fmt: skip
    expected = TaskDef(
        id="full",
        fn="b.plain",
        name="Full",
        description="d",
        dependencies=("first",),
        args=(1, "two", {"__nerv_ref__": "first"}),
        kwargs={"k": {"__nerv_ref__": "first"}},
        priority=TaskPriority.HIGH,
        timeout=3.0,
        retry=retry,
        queue="io",
        tags=("t",),
        trigger=TriggerRule.ALL_DONE,
        context=True,
        circuit=circuit,
        cache=cache,
        concurrency=Concurrency("c", 1),
        rate_limit=rate,
    )
    assert wf.tasks[1] == expected
    assert wf.tasks[0] == TaskDef(id="first", fn="b.plain", name="first")
    wf.add(limited, 7, id="lim")  # a declared limit goes through limits.task_limits
    assert wf.tasks[2].concurrency == Concurrency("k", 2)
    wf.add("b.elsewhere", id="named")  # a name registered elsewhere: medium, cpu, no limits
    assert wf.tasks[3] == TaskDef(id="named", fn="b.elsewhere", name="named")


def test_add_keeps_its_errors() -> None:
    wf = Workflow("w", registry=REG)
    wf.add(plain, id="a")
    with pytest.raises(InvalidIdError, match="invalid task id 'a b'"):
        wf.add(plain, id="a b")
    with pytest.raises(InvalidIdError):
        wf.add(plain, id=["a"])  # type: ignore[arg-type]  # unhashable: an invalid id, not a TypeError
    with pytest.raises(DuplicateTaskError, match="duplicate task id 'a' in workflow 'w'"):
        wf.add(plain, id="a")
    with pytest.raises(WorkflowError, match="task 'b': dependencies must be handles or task ids, got 3"):
        wf.add(plain, id="b", dependencies=["a", 3])
    with pytest.raises(WorkflowError, match="unknown queue 'gpu'"):
        wf.add(plain, id="b", queue="gpu")
    with pytest.raises(WorkflowError, match="unknown priority 'urgent'"):
        wf.add(plain, id="b", priority="urgent")
    with pytest.raises(WorkflowError, match="unknown trigger rule 'sometimes'"):
        wf.add(plain, id="b", trigger="sometimes")
    with pytest.raises(WorkflowError, match="task 'b': timeout must be a positive number"):
        wf.add(plain, id="b", timeout=0)
    with pytest.raises(TypeError):
        wf.add(plain, id="b", args=0)  # type: ignore[arg-type]  # as before: not silently no arguments
    assert [t.id for t in wf.tasks] == ["a"]


def _chain_tasks(n: int, seed: int = 3) -> list[TaskDef]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        parents = rng.sample(range(i), min(i, rng.randint(0, 3)))
        tasks.append(TaskDef(id=f"t{i}", fn="f", dependencies=tuple(f"t{p}" for p in parents)))
    return tasks


def test_one_pass_levels_equal_kahns() -> None:
    tasks = _chain_tasks(300)
    in_order = plan(tasks)  # every dependency comes first: the one-pass path
    backwards = plan(list(reversed(tasks)))  # every dependency comes after: Kahn's walk
    assert dict(in_order.level_of) == dict(backwards.level_of)
    assert {k: set(v) for k, v in in_order.dependents.items()} == {
        k: set(v) for k, v in backwards.dependents.items()
    }
    assert in_order.critical_path_length == backwards.critical_path_length
    assert [set(lv) for lv in in_order.levels] == [set(lv) for lv in backwards.levels]
    # Levels are longest chains: checked against their definition.
    depth: dict[str, int] = {}
    for t in tasks:
        depth[t.id] = 1 + max((depth[d] for d in t.dependencies), default=-1)
    assert dict(in_order.level_of) == depth


@pytest.mark.parametrize(
    ("tasks", "error"),
    [
        ([TaskDef("a", "f", dependencies=("b",)), TaskDef("b", "f", dependencies=("a",))], CycleError),
        ([TaskDef("a", "f", dependencies=("a",))], CycleError),
        ([TaskDef("a", "f"), TaskDef("b", "f", dependencies=("zz",))], UnknownDependencyError),
        ([TaskDef("a", "f"), TaskDef("a", "f")], DuplicateTaskError),
        ([TaskDef("a", "f", dependencies=("a",)), TaskDef("b", "f", dependencies=("zz",))], CycleError),
    ],
)
def test_check_acyclic_raises_what_plan_raises(tasks: list[TaskDef], error: type[Exception]) -> None:
    with pytest.raises(error) as planned:
        plan(tasks)
    with pytest.raises(error) as checked:
        check_acyclic(tasks)
    assert str(checked.value) == str(planned.value)


def test_check_acyclic_accepts_dags_in_any_order() -> None:
    tasks = _chain_tasks(50)
    check_acyclic(tasks)
    check_acyclic(list(reversed(tasks)))
    check_acyclic([])


def test_check_definition_is_validate_without_the_plan() -> None:
    wf = Workflow("w", registry=REG)
    a = wf.add(plain, id="a")
    wf.add(plain, a, id="b")
    definition = wf.definition()
    assert check_definition(definition) is None
    assert validate_definition(definition).order == ("a", "b")
    bad = WorkflowDef("w", (TaskDef("a", "f", dependencies=("b",)), TaskDef("b", "f", dependencies=("a",))))
    for fn in (check_definition, validate_definition):
        with pytest.raises(CycleError):
            fn(bad)


def test_payloads_are_measured_unless_they_cannot_be_over() -> None:
    empty = WorkflowDef("w", (TaskDef("a", "f"),))
    validate_definition(empty, max_payload_bytes=7, total_bytes=100)  # "[[],{}]" is 7 bytes: fits
    with pytest.raises(PayloadTooLargeError, match="task 'a': arguments are 7 bytes"):
        validate_definition(empty, max_payload_bytes=6, total_bytes=100)
    big = WorkflowDef("w", (TaskDef("a", "f"), TaskDef("b", "f", args=("x" * 50,))))
    with pytest.raises(PayloadTooLargeError, match="task 'b'"):
        check_definition(big, max_payload_bytes=40, total_bytes=200)
    check_definition(big, max_payload_bytes=40, total_bytes=40)  # the whole is within: none can be over


def test_gc_paused_only_for_the_call() -> None:
    assert gc.isenabled()
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block leaves it as it found it
    assert gc.isenabled()
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()  # a caller's own disable is kept
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError), gcpause.paused():
        _ = 1 / 0
    assert gc.isenabled()
    assert gcpause.pausing(lambda x: (x, gc.isenabled()))(1) == (1, False)


def test_a_big_event_parses_as_a_small_one() -> None:
    tasks = [{"id": f"t{i}", "fn": "f"} for i in range(5000)]
    ev = Event(EventType.WORKFLOW_SUBMITTED, "r", data={"workflow": {"name": "w", "tasks": tasks}})
    text = ev.to_json()
    assert len(text) > 1 << 16
    parsed = Event.parse(text)
    assert parsed == ev and parsed.data == json.loads(text)["d"]
    assert gc.isenabled()
