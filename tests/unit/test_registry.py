"""The ``@task`` decorator and the registry (a fresh registry per test, never the global one)."""

import pytest

from nerv_cluster import constants
from nerv_cluster.errors import NervError, RegistrationError, WorkflowError
from nerv_cluster.model import RetryPolicy, TaskPriority
from nerv_cluster.registry import Registry, TaskContext, TaskFunction, task

# Module-level functions: their default names are module.qualname, which workers can import.


def plain(x, y=1):
    """Adds things.

    More text that is not the description.
    """
    return x + y


def first_ctx(ctx, x):
    return (ctx.task_id, x)


def annotated(context: TaskContext, x):
    return x


def string_annotated(c: "TaskContext", x):
    return x


def other(x):
    return x


def no_params():
    return 1


class Box:
    def method(self, x):
        return x


def test_bare_decorator_registers_in_default_registry(default_reg):
    tf = task(plain)
    assert isinstance(tf, TaskFunction)
    assert tf.name == f"{plain.__module__}.plain"
    assert default_reg.get(tf.name) is tf
    assert tf.name in default_reg
    assert tf(2, y=3) == 5  # calling it calls the function
    assert tf.queue == constants.DEFAULT_QUEUE
    assert tf.priority is TaskPriority.MEDIUM
    assert tf.retry is None and tf.timeout is None
    assert tf.description == "Adds things."


def test_default_name_is_module_qualname(reg):
    tf = task(registry=reg)(Box.method)
    assert tf.name == f"{__name__}.Box.method"
    assert reg.names() == [tf.name]


def test_decorator_with_options(reg):
    policy = RetryPolicy(max_retries=3, backoff=0.5)
    tf = task(name="io.fetch", queue="io", retry=policy, timeout=12.5, priority="high", registry=reg)(plain)
    assert tf.name == "io.fetch"
    assert tf.queue == "io"
    assert tf.retry == policy
    assert tf.timeout == 12.5
    assert tf.priority is TaskPriority.HIGH
    assert reg.get("io.fetch") is tf
    assert reg.get(f"{__name__}.plain") is None


def test_decorating_a_task_function_again_unwraps_it(reg):
    tf = task(name="a", registry=reg)(plain)
    again = task(name="b", registry=reg)(tf)
    assert again.fn is plain
    assert set(reg.names()) == {"a", "b"}


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (first_ctx, True),
        (annotated, True),
        (string_annotated, True),
        (plain, False),
        (no_params, False),
        (Box().method, False),
    ],
)
def test_context_detection(reg, fn, expected):
    assert task(name="t", registry=reg)(fn).context is expected


def test_explicit_context_wins(reg):
    assert task(name="a", context=True, registry=reg)(plain).context is True
    assert task(name="b", context=False, registry=reg)(first_ctx).context is False


def test_builtin_without_signature_is_not_context(reg):
    assert task(name="b", registry=reg)(max).context is False


def test_name_clash_is_an_error(reg):
    task(name="shared", registry=reg)(plain)
    with pytest.raises(RegistrationError, match="shared"):
        task(name="shared", registry=reg)(other)
    assert reg.get("shared").fn is plain


def test_registering_the_same_function_twice_is_harmless(reg):
    a = task(name="same", registry=reg)(plain)
    b = task(name="same", queue="io", registry=reg)(plain)
    assert reg.get("same") is b and a.fn is b.fn
    assert len(reg) == 1


def test_registries_are_independent(reg):
    other_reg = Registry()
    task(name="only-here", registry=reg)(plain)
    assert "only-here" in reg
    assert "only-here" not in other_reg


def test_registry_iteration_and_names(reg):
    for name in ("b.two", "a.one", "c.three"):
        task(name=name, registry=reg)(plain)
    assert reg.names() == ["a.one", "b.two", "c.three"]
    assert sorted(tf.name for tf in reg) == reg.names()
    assert len(reg) == 3


@pytest.mark.parametrize("bad", ["gpu", "", "CPU"])
def test_invalid_queue(reg, bad):
    # Raised when the decorator is built, before any function is registered.
    with pytest.raises(WorkflowError, match="unknown queue") as info:
        task(queue=bad, registry=reg)
    assert "cpu" in str(info.value) and "io" in str(info.value)
    assert isinstance(info.value, NervError)
    assert len(reg) == 0


@pytest.mark.parametrize("bad", ["has space", "1starts-with-digit", "x" * 201, "a/b", "f<locals>"])
def test_invalid_name(reg, bad):
    with pytest.raises(RegistrationError, match="invalid task name"):
        task(name=bad, registry=reg)(plain)


@pytest.mark.parametrize("good", ["a", "pkg.mod.fn", "ns:fn-1", "_private", "x" * 200])
def test_valid_names(reg, good):
    assert task(name=good, registry=reg)(plain).name == good


def test_bad_options(reg):
    with pytest.raises(RegistrationError, match="timeout"):
        task(timeout=0, registry=reg)
    with pytest.raises(WorkflowError, match="priority"):
        task(priority="urgent", registry=reg)


def test_not_callable(reg):
    with pytest.raises(RegistrationError, match="needs a function"):
        task(name="x", registry=reg)(42)


def test_an_empty_registry_passed_in_is_used(default_reg):
    # Regression: ``registry or default_registry`` picked the global registry for an empty (falsy) one.
    fresh = Registry()
    assert len(fresh) == 0
    task(name="goes.here", registry=fresh)(plain)
    assert "goes.here" in fresh
    assert "goes.here" not in default_reg
