"""Task functions by name: the ``@task`` decorator and the registry workers look functions up in.

Functions never travel: the client sends a name, and a worker that imported the same module finds the
function under that name here.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

from nerv_cluster import constants
from nerv_cluster.errors import RegistrationError, WorkflowError
from nerv_cluster.model import Cache, CircuitBreaker, RetryPolicy, TaskPriority

_NAME_RE = re.compile(r"^[A-Za-z_][\w.:-]{0,199}$")


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a context-style task (``fn(ctx, *args)``) is given first: who it is and its upstream results."""

    run_id: str
    task_id: str
    attempt: int
    results: Mapping[str, Any] = field(default_factory=dict)
    worker: str = ""
    workflow: str = ""


@dataclass(frozen=True, slots=True)
class TaskFunction:
    """A function registered as a task, with its default options. Calling it calls the function."""

    fn: Callable[..., Any]
    name: str
    queue: str = constants.DEFAULT_QUEUE
    retry: RetryPolicy | None = None
    circuit: CircuitBreaker | None = None
    timeout: float | None = None
    priority: TaskPriority = TaskPriority.MEDIUM
    context: bool = False
    description: str = ""
    cache: Cache | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def check_queue(queue: str) -> str:
    """Return ``queue`` if it is one of the known queues, else raise a WorkflowError naming them."""
    if queue not in constants.QUEUES:
        raise WorkflowError(f"unknown queue {queue!r}; expected one of {', '.join(constants.QUEUES)}")
    return queue


def _wants_context(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params:
        return False
    first = params[0]
    return first.name == "ctx" or first.annotation in (TaskContext, "TaskContext")


class Registry:
    """Name -> TaskFunction. Thread-safe; registering the same function twice is harmless."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskFunction] = {}
        self._lock = threading.Lock()

    def register(self, tf: TaskFunction) -> TaskFunction:
        """Add ``tf``; a different function under a taken name is an error."""
        if not _NAME_RE.match(tf.name):
            raise RegistrationError(f"invalid task name {tf.name!r}: use letters, digits, '_', '.', ':', '-'")
        with self._lock:
            old = self._tasks.get(tf.name)
            # The same function imported twice (a reload, or under two module names) may re-register.
            if old is not None and old.fn.__qualname__ != tf.fn.__qualname__:
                raise RegistrationError(f"task name {tf.name!r} is already registered to {old.fn!r}")
            self._tasks[tf.name] = tf
        return tf

    def get(self, name: str) -> TaskFunction | None:
        """The task registered under ``name``, or None."""
        return self._tasks.get(name)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskFunction]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)


#: The registry ``@task`` writes to unless given another.
default_registry = Registry()


@overload
def task(fn: Callable[..., Any], /) -> TaskFunction: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str = constants.DEFAULT_QUEUE,
    retry: RetryPolicy | None = None,
    circuit: CircuitBreaker | None = None,
    timeout: float | None = None,
    priority: TaskPriority | str = TaskPriority.MEDIUM,
    context: bool | None = None,
    registry: Registry | None = None,
    cache: Cache | None = None,
) -> Callable[[Callable[..., Any]], TaskFunction]: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = constants.DEFAULT_QUEUE,
    retry: RetryPolicy | None = None,
    circuit: CircuitBreaker | None = None,
    timeout: float | None = None,
    priority: TaskPriority | str = TaskPriority.MEDIUM,
    context: bool | None = None,
    registry: Registry | None = None,
    cache: Cache | None = None,
) -> TaskFunction | Callable[[Callable[..., Any]], TaskFunction]:
    """Register a function as a task, by ``name`` (default ``module.qualname``).

    Use bare (``@task``) or with options (``@task(queue="io", retry=RetryPolicy(3))``). The options are
    defaults that ``Workflow.add`` may override per task. A function whose first parameter is named
    ``ctx`` or annotated ``TaskContext`` (or ``context=True``) is called as ``fn(ctx, *args)``.
    ``cache=Cache(ttl=...)`` lets a task complete from an earlier result (see :class:`Cache`).
    """
    check_queue(queue)
    if cache is not None and not isinstance(cache, Cache):
        raise RegistrationError(f"cache= takes a Cache(ttl=...), got {cache!r:.80}")
    prio = TaskPriority.parse(priority)
    if timeout is not None and timeout <= 0:
        raise RegistrationError("timeout must be a positive number of seconds")

    def wrap(f: Callable[..., Any]) -> TaskFunction:
        if isinstance(f, TaskFunction):
            f = f.fn
        if not callable(f):
            raise RegistrationError(f"@task needs a function, got {f!r}")
        tf = TaskFunction(
            fn=f,
            name=name or f"{f.__module__}.{f.__qualname__}",
            queue=queue,
            retry=retry,
            circuit=circuit,
            timeout=timeout,
            priority=prio,
            context=_wants_context(f) if context is None else context,
            description=(inspect.getdoc(f) or "").split("\n", 1)[0],
            cache=cache,
        )
        return (default_registry if registry is None else registry).register(tf)

    return wrap(fn) if fn is not None else wrap
