"""Building workflows in Python: ``Workflow.add`` returns handles; a handle in an argument is a dependency.

Validation happens here, before anything reaches Redis: ids, dependencies, cycles, JSON-safety and size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from nerv_cluster import constants, gcpause, limits, waits
from nerv_cluster.errors import (
    DuplicateTaskError,
    PayloadTooLargeError,
    SerializationError,
    UnknownTaskError,
    WorkflowError,
)
from nerv_cluster.ids import check_id, is_valid_id, slug
from nerv_cluster.jsonform import compact
from nerv_cluster.limits import Concurrency, RateLimit
from nerv_cluster.model import (
    Cache,
    CircuitBreaker,
    RetryPolicy,
    TaskDef,
    TaskPriority,
    TriggerRule,
    WorkflowDef,
    fast_init,
    make_task,
)
from nerv_cluster.planner import Plan, check_acyclic, plan
from nerv_cluster.registry import Registry, TaskFunction, check_queue, default_registry


@dataclass(frozen=True, slots=True)
class TaskHandle:
    """Stands for a task's future result inside another task's arguments. ``id`` is the task id."""

    id: str
    name: str
    workflow: str

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"


#: ``TaskHandle(...)``, faster (``Workflow.add`` makes one per task).
_make_handle = fast_init(TaskHandle)

#: Read once: enum members and methods looked up through their class cost several times a global's,
#: and ``Workflow.add`` runs once per task.
_MEDIUM = TaskPriority.MEDIUM
_parse_priority = TaskPriority.parse
_parse_trigger = TriggerRule.parse

#: Types kept as they are by :func:`_encode` (exactly these: a subclass, such as an enum, is checked).
_PLAIN = frozenset({str, int, bool})


def _encode(value: Any, where: str, refs: list[str], wf_name: str) -> Any:
    """Replace handles by reference markers, checking that everything else is plain JSON."""
    if isinstance(value, TaskHandle):
        if value.workflow != wf_name:
            raise WorkflowError(f"{where}: handle {value.id!r} belongs to workflow {value.workflow!r}")
        refs.append(value.id)
        return {constants.REF_KEY: value.id}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SerializationError(f"{where}: {value!r} is not valid JSON")
        return value
    if isinstance(value, list | tuple):
        # A plain str, int or bool element is kept as it is without a call (or its path's text).
        return [
            v if type(v) in _PLAIN or v is None else _encode(v, f"{where}[{i}]", refs, wf_name)
            for i, v in enumerate(value)
        ]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SerializationError(f"{where}: dict key {k!r} is not a string, JSON needs string keys")
            if k == constants.REF_KEY:
                raise SerializationError(f"{where}: the key {k!r} is reserved for task references")
            out[k] = _encode(v, f"{where}[{k!r}]", refs, wf_name)
        return out
    raise SerializationError(
        f"{where}: {type(value).__name__} value {value!r:.80} is not JSON-serialisable; "
        "pass plain JSON data (dict, list, str, int, float, bool, None) or a task handle"
    )


def _finite(value: Any) -> bool:
    """True for a finite int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _dependency_ids(dependencies: Iterable[TaskHandle | str], where: str) -> list[str]:
    """The task ids of explicit dependencies (handles or ids); :class:`WorkflowError` for anything else."""
    ids = []
    for d in dependencies:
        dep = d.id if isinstance(d, TaskHandle) else d
        if not isinstance(dep, str):
            raise WorkflowError(f"{where}: dependencies must be handles or task ids, got {d!r}")
        ids.append(dep)
    return ids


def resolve_refs(value: Any, results: Mapping[str, Any]) -> Any:
    """Replace reference markers by the referenced task's result (the inverse of handle encoding)."""
    if isinstance(value, list):
        return [resolve_refs(v, results) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and constants.REF_KEY in value:
            return results[value[constants.REF_KEY]]
        return {k: resolve_refs(v, results) for k, v in value.items()}
    return value


class Workflow:
    """A DAG of tasks under construction. Add tasks with :meth:`add`; submit with ``Client.submit``."""

    def __init__(self, name: str, *, registry: Registry | None = None, description: str = "") -> None:
        if not name or not isinstance(name, str):
            raise WorkflowError("a workflow needs a non-empty name")
        self.name = name
        self.description = description
        self._registry = default_registry if registry is None else registry
        self._tasks: list[TaskDef] = []
        self._ids: set[str] = set()
        self._counter = 0
        #: The task whose result is this workflow's output (``output``); None: the sink rule.
        self._output: str | None = None
        #: Durable waits: signal name -> the id of the node that waits for it.
        self._signals: dict[str, str] = {}

    def add(
        self,
        fn: TaskFunction | Callable[..., Any] | str | Workflow,
        *call_args: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        id: str | None = None,
        name: str | None = None,
        description: str = "",
        dependencies: Iterable[TaskHandle | str] = (),
        priority: TaskPriority | str | int | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        circuit: CircuitBreaker | None = None,
        queue: str | None = None,
        tags: Iterable[str] = (),
        trigger: TriggerRule | str = TriggerRule.ALL_SUCCESS,
        context: bool | None = None,
        cache: Cache | None = None,
        concurrency: Concurrency | None = None,
        rate_limit: RateLimit | None = None,
    ) -> TaskHandle:
        """Add one task and return its handle.

        ``fn`` is a ``@task`` function or a registered name. Arguments go positionally or as ``args=``
        (not both); task keyword arguments go in ``kwargs=``. Handles anywhere in the arguments, also
        nested in lists and dicts, become dependencies and are replaced by the upstream results when
        the task runs. ``dependencies`` adds ordering-only dependencies (handles or task ids). Options
        left unset take the ``@task`` defaults. ``cache=Cache(ttl=...)`` completes the task from an
        earlier result of the same function and arguments (see :class:`~nerv_cluster.model.Cache`).
        ``concurrency=Concurrency(key, limit)`` and ``rate_limit=RateLimit(name, rate, per=)`` bound
        how many attempts run, or start, at once (see :mod:`nerv_cluster.limits`); a key template is
        bound to this call's arguments here.

        ``fn`` may also be another ``Workflow``: a static sub-workflow, run as a child run once its
        dependencies are met (no worker runs the task itself); the task's result is that workflow's
        output (see :meth:`output`). It takes no arguments, and no timeout (it has no attempt of its
        own); a retry policy starts a new child run after a failed one.
        """
        if isinstance(fn, Workflow):
            if call_args or args or kwargs:
                raise WorkflowError(f"sub-workflow {fn.name!r} takes no arguments")
            if timeout is not None:
                raise WorkflowError(
                    f"sub-workflow {fn.name!r}: a timeout covers a task's own attempt, and it has none"
                )
            return self._add_subworkflow(
                fn, id, name, description, dependencies, priority, retry, tags, trigger
            )
        if call_args and args is not None:
            raise WorkflowError("give task arguments positionally or as args=..., not both")
        # Every check below runs for every task, so the common case (no arguments, or plain ones; no
        # options beyond the @task defaults) takes no call it does not need: a million-task workflow
        # is built this way. The error messages are made only when an error is raised.
        tf, fn_name = self._lookup(fn)
        task_id = id or name or self._auto_id(fn_name)
        if not is_valid_id(task_id) or task_id in self._ids:
            check_id(task_id, "task id")
            raise DuplicateTaskError(f"duplicate task id {task_id!r} in workflow {self.name!r}")
        refs: list[str] = []
        raw_args = args if args is not None else call_args
        # (An empty tuple or list needs no encoding; anything else, empty or not, is listed as before.)
        if raw_args or type(raw_args) not in (tuple, list):
            enc_args = _encode(list(raw_args), f"task {task_id!r} args", refs, self.name)
        else:
            enc_args = []
        enc_kwargs = _encode(dict(kwargs), f"task {task_id!r} kwargs", refs, self.name) if kwargs else {}
        explicit: list[str] = []
        for d in dependencies:
            if type(d) is str:
                explicit.append(d)
            else:
                explicit.extend(_dependency_ids((d,), f"task {task_id!r}"))
        deps = tuple(dict.fromkeys([*refs, *explicit] if refs else explicit))
        queue = queue or (tf.queue if tf else constants.DEFAULT_QUEUE)
        if queue not in constants.QUEUES:
            check_queue(queue)
        if timeout is not None and timeout <= 0:
            raise WorkflowError(f"task {task_id!r}: timeout must be a positive number of seconds")
        if cache is not None and not isinstance(cache, Cache):
            raise WorkflowError(f"task {task_id!r}: cache= takes a Cache(ttl=...), got {cache!r:.80}")
        ctx = context if context is not None else (tf.context if tf else False)
        conc: Concurrency | None = None
        rate: RateLimit | None = None  # what task_limits gives when no limit is given or declared
        declared = tf is not None and (tf.concurrency is not None or tf.rate_limit is not None)
        if concurrency is not None or rate_limit is not None or declared:
            where = f"task {task_id!r}"
            conc, rate = limits.task_limits(
                tf,
                concurrency,
                rate_limit,
                ctx,
                enc_args,
                enc_kwargs,
                where,
                lambda value: _encode(value, f"{where} default", [], self.name),
            )
        if priority is None:
            priority = tf.priority if tf else _MEDIUM
        # Positional, in TaskDef's field order (tests/unit/test_bulk.py holds it to the keyword form).
        td = make_task(
            task_id,
            fn_name,
            name or task_id,
            description or (tf.description if tf else ""),
            deps,
            tuple(enc_args),
            enc_kwargs,
            priority if type(priority) is TaskPriority else _parse_priority(priority),
            timeout if timeout is not None else (tf.timeout if tf else None),
            retry if retry is not None else (tf.retry if tf else None),
            queue,
            tuple(tags),
            trigger if type(trigger) is TriggerRule else _parse_trigger(trigger),
            ctx,
            circuit if circuit is not None else (tf.circuit if tf else None),
            cache if cache is not None else (tf.cache if tf else None),
            None,
            None,
            conc,
            rate,
        )
        self._tasks.append(td)
        self._ids.add(task_id)
        return _make_handle(task_id, td.name, self.name)

    def map(
        self,
        fn: TaskFunction | Callable[..., Any] | str,
        over: TaskHandle | Sequence[Any],
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        id: str | None = None,
        **options: Any,
    ) -> TaskHandle:
        """Add a map node: one task per element of ``over``, made when the list is known, and return
        its handle.

        ``over`` is a handle whose result is a JSON list, the handle of another map (then element ``i``
        of this map depends on element ``i`` of that one only), or a plain list (handles in it are
        dependencies). Element ``i`` is the task ``<id>[<i>]`` calling ``fn(element, *args,
        **kwargs)``; ``options`` are those of :meth:`add` (queue, priority, timeout, retry, trigger,
        ...) and hold for every element. The map's handle, as an argument, is the list of its
        elements' results in order (``[]`` for an empty list, at once). A list that is not one, or
        longer than ``NERV_MAX_MAP_WIDTH``, fails the map; so does any element that fails.
        """
        if not isinstance(over, TaskHandle | list | tuple):
            raise WorkflowError(
                f"map over {type(over).__name__} {over!r:.80}: expected a task handle (whose result is a "
                "list), the handle of another map, or a list"
            )
        if isinstance(args, str | bytes) or not isinstance(args, Sequence):
            raise WorkflowError("map: args= is the list of arguments after the element")
        if isinstance(fn, Workflow):  # a sub-workflow takes no element: map a task that returns one
            raise WorkflowError(
                f"map: cannot map workflow {fn.name!r} (a sub-workflow takes no arguments); map a @task "
                "that returns a Workflow instead: each element then runs as a child run"
            )
        limits.check_map(options.get("concurrency") or getattr(self._lookup(fn)[0], "concurrency", None))
        refs: list[str] = []
        where = f"map {id or getattr(fn, 'name', fn)!r} over"
        enc_over = _encode(over if isinstance(over, TaskHandle) else list(over), where, refs, self.name)
        deps = [*refs, *options.pop("dependencies", ())]
        handle = self.add(fn, args=list(args), kwargs=kwargs, id=id, dependencies=deps, **options)
        self._tasks[-1] = replace(self._tasks[-1], over=enc_over)
        return handle

    def _add_subworkflow(
        self,
        sub: Workflow,
        id: str | None,
        name: str | None,
        description: str,
        dependencies: Iterable[TaskHandle | str],
        priority: TaskPriority | str | int | None,
        retry: RetryPolicy | None,
        tags: Iterable[str],
        trigger: TriggerRule | str,
    ) -> TaskHandle:
        if sub is self:
            raise WorkflowError(f"workflow {self.name!r} cannot contain itself")
        task_id = id or name or self._auto_id(sub.name)
        check_id(task_id, "task id")
        if task_id in self._ids:
            raise DuplicateTaskError(f"duplicate task id {task_id!r} in workflow {self.name!r}")
        if not sub.tasks:
            raise WorkflowError(f"task {task_id!r}: sub-workflow {sub.name!r} has no tasks")
        deps = _dependency_ids(dependencies, f"task {task_id!r}")
        sub.plan()  # its cycles and unknown dependencies now, not when it is spawned
        td = TaskDef(
            id=task_id,
            fn=constants.SUBWORKFLOW_FN,
            name=name or task_id,
            description=description or sub.description,
            dependencies=tuple(dict.fromkeys(deps)),
            priority=TaskPriority.parse(priority if priority is not None else TaskPriority.MEDIUM),
            retry=retry,
            tags=tuple(tags),
            trigger=TriggerRule.parse(trigger),
            workflow=sub.definition().to_dict(),
        )
        self._tasks.append(td)
        self._ids.add(task_id)
        return TaskHandle(id=task_id, name=td.name, workflow=self.name)

    # -- durable waits (issue 11, part "waits"; see nerv_cluster/waits.py) ---------------------------------

    def wait_for(
        self,
        name: str,
        timeout: float | None = None,
        *,
        id: str | None = None,
        dependencies: Iterable[TaskHandle | str] = (),
        description: str = "",
        tags: Iterable[str] = (),
    ) -> TaskHandle:
        """A node that waits, in status WAITING and in no worker slot, for the signal ``name``
        (``Client.signal(run, name, payload)``, ``nerv signal RUN NAME --data JSON``), and completes
        with its payload as result. A signal sent before the node is reached (its ``dependencies`` met)
        is kept until it is. With ``timeout`` (seconds from being reached) the node fails with
        ``TaskTimeoutError`` if no signal came, so trigger rules apply (a ``one_failed`` fallback runs).
        The task id is ``id``, else the signal name; each signal name is waited for by one node."""
        check_id(name, "signal name")
        if name in self._signals:
            raise DuplicateTaskError(
                f"signal {name!r} is already waited for by node {self._signals[name]!r} of workflow "
                f"{self.name!r}"
            )
        spec: dict[str, Any] = {"signal": name}
        if timeout is not None:
            if not _finite(timeout) or timeout <= 0:
                raise WorkflowError(f"wait_for {name!r}: timeout must be a positive number of seconds")
            spec["timeout"] = float(timeout)
        handle = self._add_wait(id or name, spec, dependencies, description, tags)
        self._signals[name] = handle.id
        return handle

    def sleep(
        self,
        seconds: float,
        *,
        id: str | None = None,
        dependencies: Iterable[TaskHandle | str] = (),
        tags: Iterable[str] = (),
    ) -> TaskHandle:
        """A node that completes (result None) ``seconds`` after it is reached: a durable timer of the
        scheduler (no worker waits, and a scheduler restart keeps its deadline)."""
        if not _finite(seconds) or seconds < 0:
            raise WorkflowError(f"sleep takes 0 or more seconds, got {seconds!r:.80}")
        return self._add_wait(id or self._auto_id("sleep"), {"sleep": float(seconds)}, dependencies, "", tags)

    def sleep_until(
        self,
        timestamp: float | datetime,
        *,
        id: str | None = None,
        dependencies: Iterable[TaskHandle | str] = (),
        tags: Iterable[str] = (),
    ) -> TaskHandle:
        """A node that completes (result None) at ``timestamp`` (epoch seconds, or a timezone-aware
        ``datetime``), measured on Redis's clock; at once when reached later than that."""
        if isinstance(timestamp, datetime):
            if timestamp.tzinfo is None:
                raise WorkflowError("sleep_until: give a timezone-aware datetime (or epoch seconds)")
            timestamp = timestamp.timestamp()
        if not _finite(timestamp) or timestamp < 0:
            raise WorkflowError(f"sleep_until takes epoch seconds or a datetime, got {timestamp!r:.80}")
        return self._add_wait(
            id or self._auto_id("sleep_until"), {"until": float(timestamp)}, dependencies, "", tags
        )

    def _add_wait(
        self,
        task_id: str,
        spec: dict[str, Any],
        dependencies: Iterable[TaskHandle | str],
        description: str,
        tags: Iterable[str],
    ) -> TaskHandle:
        check_id(task_id, "task id")
        if task_id in self._ids:
            raise DuplicateTaskError(f"duplicate task id {task_id!r} in workflow {self.name!r}")
        deps = _dependency_ids(dependencies, f"task {task_id!r}")
        td = TaskDef(
            id=task_id,
            fn=constants.WAIT_FN,
            name=task_id,
            description=description,
            dependencies=tuple(dict.fromkeys(deps)),
            tags=tuple(tags),
            wait=spec,
        )
        self._tasks.append(td)
        self._ids.add(task_id)
        return TaskHandle(id=task_id, name=task_id, workflow=self.name)

    def output(self, handle: TaskHandle | str) -> TaskHandle:
        """Name the task whose result is this workflow's output: what a task that returns this
        workflow (or embeds it with ``add``) completes with, and ``RunResult.output``. Without it, the
        output is the only sink's result, or a dict sink id -> result when there are several."""
        tid = handle.id if isinstance(handle, TaskHandle) else handle
        if isinstance(handle, TaskHandle) and handle.workflow != self.name:
            raise WorkflowError(f"output: handle {tid!r} belongs to workflow {handle.workflow!r}")
        if tid not in self._ids:
            raise UnknownTaskError(f"output: workflow {self.name!r} has no task {tid!r}")
        self._output = tid
        return handle if isinstance(handle, TaskHandle) else TaskHandle(tid, tid, self.name)

    def _lookup(self, fn: TaskFunction | Callable[..., Any] | str) -> tuple[TaskFunction | None, str]:
        if isinstance(fn, TaskFunction):
            return fn, fn.name
        if isinstance(fn, str):
            return self._registry.get(fn), fn
        if callable(fn):
            raise UnknownTaskError(
                f"{getattr(fn, '__qualname__', fn)!r} is not a registered task: decorate it with @task "
                "so workers can find it by name (functions never travel)"
            )
        raise WorkflowError(f"expected a @task function or a task name, got {fn!r}")

    def _auto_id(self, fn_name: str) -> str:
        # Registered names may hold ':' or start with '_': make the short name a valid id start.
        short = slug(fn_name.rsplit(".", 1)[-1], constants.MAX_ID_LENGTH - 12, "task")
        while True:
            self._counter += 1
            candidate = f"{short}-{self._counter}"
            if candidate not in self._ids:
                return candidate

    @property
    def tasks(self) -> tuple[TaskDef, ...]:
        """The task definitions added so far, in order."""
        return tuple(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def definition(self) -> WorkflowDef:
        """The wire form of this workflow."""
        meta: dict[str, Any] = {"description": self.description} if self.description else {}
        if self._output is not None:
            meta["output"] = self._output
        if self._signals:
            meta[waits.SIGNALS_META] = dict(self._signals)
        return WorkflowDef(name=self.name, tasks=tuple(self._tasks), meta=meta)

    def plan(self) -> Plan:
        """Levels, dispatch order and critical path; raises on cycles and unknown dependencies."""
        return plan(self._tasks)

    def validate(
        self,
        *,
        max_payload_bytes: int = constants.DEFAULT_MAX_PAYLOAD_BYTES,
        max_tasks: int = constants.DEFAULT_MAX_TASKS,
        known_names: Iterable[str] | None = None,
    ) -> Plan:
        """Check everything that can be checked before submit and return the plan.

        ``known_names``, when given, are the task names some worker registered; a task whose function
        is in neither it nor the local registry raises :class:`UnknownTaskError`.
        """
        return validate_definition(
            self.definition(),
            max_payload_bytes=max_payload_bytes,
            max_tasks=max_tasks,
            known_names=None if known_names is None else {*known_names, *self._registry.names()},
        )


#: The JSON size of a task's arguments when it has none (``[args, kwargs]``).
_EMPTY_PAYLOAD_BYTES = len(compact([[], {}]))


@gcpause.pausing  # it builds the plan: millions of acyclic containers for a million tasks
def validate_definition(
    wf: WorkflowDef,
    *,
    max_payload_bytes: int = constants.DEFAULT_MAX_PAYLOAD_BYTES,
    max_tasks: int = constants.DEFAULT_MAX_TASKS,
    known_names: set[str] | None = None,
    total_bytes: int | None = None,
) -> Plan:
    """Validate a wire-form workflow (as ``Workflow.validate`` does) and return its plan.

    ``total_bytes``: the size of the whole definition's JSON, when the caller knows it: no task's
    arguments can be bigger, so within ``max_payload_bytes`` they are not measured one by one."""
    _check(wf, max_payload_bytes, max_tasks, known_names, total_bytes)
    return plan(wf.tasks)


@gcpause.pausing
def check_definition(
    wf: WorkflowDef,
    *,
    max_payload_bytes: int = constants.DEFAULT_MAX_PAYLOAD_BYTES,
    max_tasks: int = constants.DEFAULT_MAX_TASKS,
    known_names: set[str] | None = None,
    total_bytes: int | None = None,
) -> None:
    """:func:`validate_definition` without making the plan: the same checks, raising the same errors
    (a cycle included), for a caller that does not use the plan (``Client.submit``: the scheduler
    plans the run itself)."""
    _check(wf, max_payload_bytes, max_tasks, known_names, total_bytes)
    check_acyclic(wf.tasks)


def check_bounds(
    wf: WorkflowDef,
    *,
    max_payload_bytes: int = constants.DEFAULT_MAX_PAYLOAD_BYTES,
    max_tasks: int = constants.DEFAULT_MAX_TASKS,
    known_names: set[str] | None = None,
    total_bytes: int | None = None,
) -> None:
    """:func:`validate_definition` without the plan nor the graph's checks: ids, queues, waits, the
    task count, each task's arguments against ``max_payload_bytes``, static sub-workflows recursively
    (the scheduler's intake has the plan from :func:`nerv_cluster.intake.accept` already)."""
    _check(wf, max_payload_bytes, max_tasks, known_names, total_bytes)


def _check(
    wf: WorkflowDef,
    max_payload_bytes: int,
    max_tasks: int,
    known_names: set[str] | None,
    total_bytes: int | None,
) -> None:
    """Every check of :func:`validate_definition` but the graph's (the plan's)."""
    if not wf.tasks:
        raise WorkflowError(f"workflow {wf.name!r} has no tasks")
    queues = constants.QUEUES
    for t in wf.tasks:  # the errors of check_id and check_queue, raised by them; calls only for those
        if not is_valid_id(t.id):
            check_id(t.id, "task id")
        if t.queue not in queues:
            check_queue(t.queue)
        if t.workflow is not None:  # a static sub-workflow: held to the same checks, recursively
            validate_definition(
                WorkflowDef.from_dict(t.workflow),
                max_payload_bytes=max_payload_bytes,
                max_tasks=max_tasks,
                known_names=known_names,
            )
    if len(wf.tasks) > max_tasks:
        raise WorkflowError(f"workflow {wf.name!r} has {len(wf.tasks)} tasks; the limit is {max_tasks}")
    waiting = [t for t in wf.tasks if t.wait is not None or t.fn == constants.WAIT_FN]
    if waiting or wf.meta.get(waits.SIGNALS_META):
        waits.check_definition(wf, waiting)
    measure = total_bytes is None or total_bytes > max_payload_bytes
    # A task without arguments has the smallest payload there is ("[[],{}]"): measured only when even
    # that is over the limit.
    skip_empty = max_payload_bytes >= _EMPTY_PAYLOAD_BYTES
    if known_names is None and not measure:
        return
    for t in wf.tasks:
        if known_names is not None and t.workflow is None and t.wait is None and t.fn not in known_names:
            raise UnknownTaskError(
                f"task {t.id!r} calls {t.fn!r}, which no worker has registered; "
                "start a worker with the module that defines it (nerv worker --app MODULE)"
            )
        if not measure or (skip_empty and t.over is None and not t.args and not t.kwargs):
            continue
        payload = [t.args, t.kwargs] if t.over is None else [t.args, t.kwargs, t.over]
        size = len(compact(payload))
        if size > max_payload_bytes:
            raise PayloadTooLargeError(
                f"task {t.id!r}: arguments are {size} bytes of JSON; the limit is {max_payload_bytes} "
                "(store large data elsewhere and pass a reference)"
            )


def nested_tasks(wf: WorkflowDef) -> Iterator[TaskDef]:
    """Every task of ``wf`` that a worker runs: its own, and those of its static sub-workflows (and
    theirs), not the sub-workflow tasks themselves (the scheduler spawns those)."""
    for t in wf.tasks:
        if t.wait is not None:  # a durable wait: the scheduler's, no worker runs it
            continue
        if t.workflow is None:
            yield t
        else:
            yield from nested_tasks(WorkflowDef.from_dict(t.workflow))
