"""Run and task ids (issue 10, point 7): one alphabet and length, refused with a clear error where they
enter, and every id nerv makes up complies."""

from __future__ import annotations

import pytest

from nerv_cluster import Client, Settings, Workflow
from nerv_cluster.errors import InvalidIdError, WorkflowError
from nerv_cluster.ids import check_id, is_valid_id
from nerv_cluster.model import WorkflowDef, new_run_id
from nerv_cluster.registry import Registry, task
from nerv_cluster.workflow import validate_definition
from tests.unit.helpers import td

BAD = ["load:users", "a\nb", "a b", "{run}", "a}b", "-a", "_a", ".a", "é", "", "a" * 129, "a/b"]
GOOD = ["a", "A9", "load-users", "load_users.v2", "9", "a" * 128]


@pytest.mark.parametrize("value", BAD)
def test_ids_outside_the_alphabet_are_refused_naming_the_id(value: str) -> None:
    assert not is_valid_id(value)
    with pytest.raises(InvalidIdError, match="invalid task id") as info:
        check_id(value, "task id")
    assert repr(value)[:50] in str(info.value)
    assert isinstance(info.value, WorkflowError)


@pytest.mark.parametrize("value", GOOD)
def test_ids_in_the_alphabet_pass(value: str) -> None:
    assert check_id(value, "run id") == value


def test_non_strings_are_no_ids() -> None:
    assert not is_valid_id(7) and not is_valid_id(None)


@pytest.mark.parametrize("value", ["load:users", "a\nb", "x{y}"])
def test_workflow_add_refuses_a_bad_task_id(value: str) -> None:
    reg = Registry()
    noop = task(name="t.noop", registry=reg)(lambda: None)
    wf = Workflow("w", registry=reg)
    with pytest.raises(InvalidIdError, match="invalid task id"):
        wf.add(noop, id=value)
    with pytest.raises(InvalidIdError):
        wf.add(noop, name=value)  # the name is the id when no id is given
    assert len(wf) == 0


def test_validate_definition_refuses_a_bad_task_id() -> None:
    with pytest.raises(InvalidIdError, match="load:users"):
        validate_definition(WorkflowDef("w", (td("load:users"),)))


@pytest.mark.parametrize(
    "fn_name", ["pkg.mod.fn", "pkg:fn", "_private", "mod.__call__", "x" * 190, "a.-", "mod.v1.2"]
)
def test_auto_generated_task_ids_always_comply(fn_name: str) -> None:
    reg = Registry()
    fn = task(name=fn_name, registry=reg)(lambda: None)
    wf = Workflow("w", registry=reg)
    ids = [wf.add(fn).id for _ in range(3)]
    assert all(is_valid_id(i) for i in ids), ids
    assert len(set(ids)) == 3


@pytest.mark.parametrize("name", ["word count", "ünïcode", "__", "-x-", "a:b{c}\n", "x" * 300, "日本"])
def test_generated_run_ids_always_comply(name: str) -> None:
    assert is_valid_id(new_run_id(name)), new_run_id(name)


def test_client_refuses_a_bad_run_id_before_writing_anything() -> None:
    # No Redis at this port: refusing must not need one (nothing is written).
    client = Client(settings=Settings(redis_url="redis://127.0.0.1:1/0"))
    reg = Registry()
    wf = Workflow("w", registry=reg)
    wf.add(task(name="t.noop", registry=reg)(lambda: None))
    for run_id in ("load:users", "a\nb"):
        with pytest.raises(InvalidIdError, match="invalid run id"):
            client.submit(wf, run_id=run_id, check_names=False)
