"""Building workflows: handles, dependencies, ids, validation and its errors."""

from __future__ import annotations

import json
import math

import pytest

from nerv_cluster import constants
from nerv_cluster.errors import (
    CycleError,
    DuplicateTaskError,
    PayloadTooLargeError,
    SerializationError,
    UnknownDependencyError,
    UnknownTaskError,
    WorkflowError,
)
from nerv_cluster.model import RetryPolicy, TaskPriority, TriggerRule, WorkflowDef
from nerv_cluster.registry import Registry, task
from nerv_cluster.workflow import TaskHandle, Workflow, resolve_refs, validate_definition

REG = Registry()
REF = constants.REF_KEY


@task(name="t.add", registry=REG)
def add(x, y=0):
    return x + y


@task(name="t.combine", registry=REG)
def combine(*parts, **named):
    return [parts, named]


@task(
    name="t.fetch", queue="io", retry=RetryPolicy(max_retries=2), timeout=5.0, priority="high", registry=REG
)
def fetch(url):
    """Fetch a page."""
    return url


@task(name="t.ctx", registry=REG)
def with_ctx(ctx, x):
    return x


def undecorated(x):
    return x


def new(name: str = "wf") -> Workflow:
    return Workflow(name, registry=REG)


# -- adding tasks ---------------------------------------------------------------------------------


def test_add_with_args_keyword():
    wf = new()
    h = wf.add(add, args=(1, 2))
    assert isinstance(h, TaskHandle)
    assert h.workflow == "wf"
    (t,) = wf.tasks
    assert t.id == h.id == "add-1"
    assert t.fn == "t.add"
    assert t.args == (1, 2)
    assert t.dependencies == ()
    assert len(wf) == 1


def test_add_with_positional_args_and_kwargs():
    wf = new()
    wf.add(add, 1, 2)
    wf.add(add, kwargs={"x": 1, "y": 2})
    a, b = wf.tasks
    assert a.args == (1, 2) and dict(a.kwargs) == {}
    assert b.args == () and dict(b.kwargs) == {"x": 1, "y": 2}


def test_positional_and_args_keyword_together_is_an_error():
    with pytest.raises(WorkflowError, match="not both"):
        new().add(add, 1, args=(2,))


def test_add_by_registered_name():
    wf = new()
    wf.add("t.add", 1, 2)
    assert wf.tasks[0].fn == "t.add"


def test_handles_become_dependencies_and_ref_markers():
    wf = new()
    a = wf.add(add, 1, id="a")
    b = wf.add(add, 2, id="b")
    c = wf.add(add, a, b, id="c")
    t = wf.tasks[2]
    assert c.id == "c"
    assert t.dependencies == ("a", "b")
    assert t.args == ({REF: "a"}, {REF: "b"})


def test_nested_handles_in_lists_and_dicts():
    wf = new()
    a = wf.add(add, 1, id="a")
    b = wf.add(add, 2, id="b")
    c = wf.add(add, 3, id="c")
    wf.add(combine, [a, {"x": b, "keep": [1, "s"]}], kwargs={"deep": {"list": [[c]], "again": a}}, id="j")
    t = wf.tasks[-1]
    assert t.dependencies == ("a", "b", "c")  # in order of appearance, each once
    assert t.args == ([{REF: "a"}, {"x": {REF: "b"}, "keep": [1, "s"]}],)
    assert dict(t.kwargs) == {"deep": {"list": [[{REF: "c"}]], "again": {REF: "a"}}}
    json.dumps(t.to_dict())  # plain JSON


def test_tuples_become_lists():
    wf = new()
    wf.add(combine, (1, (2, 3)))
    assert wf.tasks[0].args == ([1, [2, 3]],)


def test_explicit_dependencies_by_handle_or_id():
    wf = new()
    a = wf.add(add, 1, id="a")
    wf.add(add, 2, id="b")
    wf.add(add, 3, id="c", dependencies=[a, "b"])
    t = wf.tasks[-1]
    assert t.dependencies == ("a", "b")
    assert t.args == (3,)  # ordering-only dependencies are not arguments


def test_explicit_and_argument_dependencies_are_merged_once():
    wf = new()
    a = wf.add(add, 1, id="a")
    b = wf.add(add, 1, id="b")
    wf.add(add, a, id="c", dependencies=["b", a, b])
    assert wf.tasks[-1].dependencies == ("a", "b")


def test_bad_explicit_dependency_type():
    wf = new()
    with pytest.raises(WorkflowError, match="dependencies must be handles or task ids"):
        wf.add(add, 1, dependencies=[42])


def test_name_and_id():
    wf = new()
    by_name = wf.add(add, 1, name="first")
    by_id = wf.add(add, 1, id="second")
    both = wf.add(add, 1, id="third", name="The third")
    t1, t2, t3 = wf.tasks
    assert (by_name.id, t1.id, t1.name) == ("first", "first", "first")
    assert (by_id.id, t2.id, t2.name) == ("second", "second", "second")
    assert (both.id, t3.id, t3.name, both.name) == ("third", "third", "The third", "The third")


def test_auto_ids_are_unique_and_skip_taken_ones():
    wf = new()
    wf.add(add, 1, id="add-2")
    ids = [wf.add(add, i).id for i in range(3)]
    assert ids == ["add-1", "add-3", "add-4"]
    assert len({t.id for t in wf.tasks}) == 4


def test_duplicate_id():
    wf = new()
    wf.add(add, 1, id="x")
    with pytest.raises(DuplicateTaskError, match="'x'"):
        wf.add(add, 2, id="x")
    with pytest.raises(DuplicateTaskError):
        wf.add(add, 2, name="x")
    assert len(wf) == 1  # nothing half-added


def test_handle_of_another_workflow_is_refused():
    other = new("other")
    h = other.add(add, 1)
    with pytest.raises(WorkflowError, match="belongs to workflow 'other'"):
        new().add(add, h)


def test_task_options_default_to_the_decorator_and_can_be_overridden():
    wf = new()
    wf.add(fetch, "u1", id="d")
    wf.add(
        fetch,
        "u2",
        id="o",
        queue="cpu",
        retry=RetryPolicy(max_retries=0),
        timeout=1.0,
        priority=TaskPriority.LOW,
        trigger="all_done",
        tags=["a", "b"],
        description="custom",
    )
    wf.add(with_ctx, 1, id="c")
    wf.add(add, 1, id="p", priority=3)
    d, o, c, p = wf.tasks
    assert (d.queue, d.retry, d.timeout, d.priority, d.description) == (
        "io",
        RetryPolicy(max_retries=2),
        5.0,
        TaskPriority.HIGH,
        "Fetch a page.",
    )
    assert (o.queue, o.retry, o.timeout, o.priority, o.trigger, o.tags, o.description) == (
        "cpu",
        RetryPolicy(max_retries=0),
        1.0,
        TaskPriority.LOW,
        TriggerRule.ALL_DONE,
        ("a", "b"),
        "custom",
    )
    assert c.context is True and d.context is False
    assert p.priority is TaskPriority.CRITICAL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"queue": "gpu"}, "unknown queue"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"priority": "urgent"}, "priority"),
        ({"trigger": "maybe"}, "trigger"),
    ],
)
def test_bad_options(kwargs, match):
    wf = new()
    with pytest.raises(WorkflowError, match=match):
        wf.add(add, 1, **kwargs)
    assert len(wf) == 0


def test_workflow_needs_a_name():
    with pytest.raises(WorkflowError):
        Workflow("", registry=REG)


# -- arguments must be JSON ---------------------------------------------------------------------------


class Thing:
    pass


@pytest.mark.parametrize(
    ("call", "where", "what"),
    [
        ({"args": ({1, 2},)}, "task 'x' args[0]", "set"),
        ({"args": (1, [2, {"deep": Thing()}])}, "task 'x' args[1][1]['deep']", "Thing"),
        ({"args": (float("nan"),)}, "task 'x' args[0]", "nan"),
        ({"args": ([math.inf],)}, "task 'x' args[0][0]", "inf"),
        ({"args": ({1: "v"},)}, "task 'x' args[0]", "not a string"),
        ({"kwargs": {"k": [b"raw"]}}, "task 'x' kwargs['k'][0]", "bytes"),
        ({"kwargs": {"f": undecorated}}, "task 'x' kwargs['f']", "function"),
    ],
)
def test_non_json_arguments_name_their_path(call, where, what):
    wf = new()
    with pytest.raises(SerializationError) as info:
        wf.add(combine, id="x", **call)
    msg = str(info.value)
    assert msg.startswith(where + ":"), msg
    assert what in msg
    assert len(wf) == 0


def test_reserved_key_is_refused():
    with pytest.raises(SerializationError, match="reserved"):
        new().add(combine, {"a": {REF: "sneaky"}}, id="x")


def test_json_scalars_pass():
    wf = new()
    wf.add(combine, None, True, 0, -1.5, "s", [], {}, kwargs={"big": 10**30})
    assert wf.tasks[0].args == (None, True, 0, -1.5, "s", [], {})


# -- validate -------------------------------------------------------------------------------------


def test_validate_returns_the_plan():
    wf = new()
    a = wf.add(add, 1, id="a")
    wf.add(add, a, id="b")
    p = wf.validate()
    assert p.levels == (("a",), ("b",))


def test_payload_limit():
    wf = new()
    wf.add(add, "x" * 200, id="big")
    size = len(json.dumps([["x" * 200], {}], separators=(",", ":")))
    wf.validate(max_payload_bytes=size)  # exactly at the limit is fine
    with pytest.raises(PayloadTooLargeError, match="'big'") as info:
        wf.validate(max_payload_bytes=size - 1)
    assert str(size) in str(info.value)


def test_unknown_dependency():
    wf = new()
    wf.add(add, 1, id="a", dependencies=["ghost"])
    with pytest.raises(UnknownDependencyError, match="'ghost'"):
        wf.validate()


def test_cycle_through_explicit_ids():
    wf = new()
    wf.add(add, 1, id="a", dependencies=["b"])
    wf.add(add, 1, id="b", dependencies=["a"])
    with pytest.raises(CycleError):
        wf.validate()


def test_plain_function_is_unknown():
    with pytest.raises(UnknownTaskError, match="undecorated"):
        new().add(undecorated, 1)


def test_not_a_function_or_name():
    with pytest.raises(WorkflowError, match="expected a @task function"):
        new().add(42)


def test_known_names():
    wf = new()
    wf.add("remote.only", 1, id="r")
    wf.validate()  # no known_names: nothing to check against
    wf.validate(known_names=["remote.only"])
    with pytest.raises(UnknownTaskError, match=r"remote\.only"):
        wf.validate(known_names=["something.else"])


def test_locally_registered_names_count_as_known():
    wf = new()
    wf.add(add, 1)
    wf.add("t.combine", 1)
    wf.validate(known_names=[])


def test_an_empty_registry_passed_in_is_used(default_reg):
    # Regression: ``registry or default_registry`` used the global registry for an empty (falsy) one.
    task(name="global.only", registry=default_reg)(undecorated)
    wf = Workflow("wf", registry=Registry())
    wf.add("global.only", 1)
    with pytest.raises(UnknownTaskError):
        wf.validate(known_names=[])


def test_too_many_tasks():
    wf = new()
    for i in range(3):
        wf.add(add, i)
    wf.validate(max_tasks=3)
    with pytest.raises(WorkflowError, match="limit is 2"):
        wf.validate(max_tasks=2)


def test_empty_workflow():
    with pytest.raises(WorkflowError, match="no tasks"):
        new().validate()


def test_validate_definition_on_the_wire_form():
    wf = new()
    a = wf.add(add, 1, id="a")
    wf.add(add, a, id="b")
    wire = WorkflowDef.from_dict(json.loads(json.dumps(wf.definition().to_dict())))
    assert validate_definition(wire).order == ("a", "b")
    with pytest.raises(UnknownTaskError):
        validate_definition(wire, known_names={"t.other"})


def test_definition():
    wf = Workflow("wf", registry=REG, description="about")
    wf.add(add, 1, id="a")
    d = wf.definition()
    assert d.name == "wf"
    assert dict(d.meta) == {"description": "about"}
    assert d.tasks == wf.tasks
    assert WorkflowDef.from_dict(json.loads(json.dumps(d.to_dict()))) == d


# -- references -----------------------------------------------------------------------------------


def test_resolve_refs_is_the_inverse_of_encoding():
    wf = new()
    a = wf.add(add, 1, id="a")
    b = wf.add(add, 2, id="b")
    original_args = [a, [1, {"x": b, "y": [a, None]}], "s"]
    original_kwargs = {"k": {"deep": [b]}, "plain": 3}
    wf.add(combine, args=original_args, kwargs=original_kwargs, id="c")
    t = wf.tasks[-1]
    results = {"a": {"value": 10}, "b": [20]}
    expected = [{"value": 10}, [1, {"x": [20], "y": [{"value": 10}, None]}], "s"]
    assert resolve_refs(list(t.args), results) == expected
    assert resolve_refs(dict(t.kwargs), results) == {"k": {"deep": [[20]]}, "plain": 3}


def test_resolve_refs_leaves_other_values_alone():
    assert resolve_refs({REF: "a", "other": 1}, {"a": 5}) == {REF: "a", "other": 1}
    assert resolve_refs([1, "a", {"b": 2}], {"a": 5}) == [1, "a", {"b": 2}]
    assert resolve_refs({REF: "a"}, {"a": None}) is None
