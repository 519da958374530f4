"""The worker's Celery app: each ``@task`` becomes a Celery task under its own registered name.

``create_worker_app`` imports the task modules and registers their functions; ``app`` (built lazily
from the environment) is what ``celery --app worker.app:app ...`` and Flower load.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Iterable
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    task_unknown,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from nerv_cluster import constants
from nerv_cluster.container import Container, container_for
from nerv_cluster.errors import ConfigurationError, MalformedJobError, NotRegisteredError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.intake import describe
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType, TaskError
from nerv_cluster.registry import TaskFunction
from nerv_cluster.settings import Settings
from worker.runner import TaskRunner

log = logging.getLogger("nerv.worker")


class ShutdownFlag:
    """Set once the worker began a warm shutdown; read by every process of the worker.

    Celery's ``worker_shutting_down`` fires in the main process only, while prefork pool children run
    the tasks: the flag is a byte of shared memory made before the pool forks, so the children see the
    parent set it (a thread pool shares the process anyway).
    """

    def __init__(self) -> None:
        self._value = multiprocessing.RawValue("b", 0)

    def set(self) -> None:
        """Shutdown began."""
        self._value.value = 1

    def is_set(self) -> bool:
        """True once shutdown began."""
        return bool(self._value.value)


class WorkerRuntime:
    """The per-process parts of a worker (Redis client, runner, heartbeat), rebuilt after a fork."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self._pid = -1
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    # A forked child must not use the parent's connections or identity.
                    self.container.reset_singletons()
                    self.container.heartbeat().start()
                    self._pid = os.getpid()

    def runner(self) -> TaskRunner:
        """This process's runner, its heartbeat beating."""
        self._ensure()
        runner: TaskRunner = self.container.runner()
        return runner

    def register(self, queues: list[str], node: str) -> None:
        """This process consumes messages from ``queues`` (it holds the prefetched ones): register it
        in the workers hash with its heartbeat, so the scheduler resends its queued jobs if it dies."""
        self._ensure()
        self.container.heartbeat().register(queues, node)

    def stop(self) -> None:
        """Stop the heartbeat of this process (if it ran tasks) and deregister it."""
        if self._pid == os.getpid():
            self.container.heartbeat().stop()


class CapacityBeacon:
    """Tells the scheduler, every few seconds, which queues this worker node serves with how many slots
    (it packs jobs into fewer messages only when there are enough slots to go round), and refreshes
    the task names it registered (names no live worker refreshes expire from the registry)."""

    def __init__(self, log_: EventLog, tasks: dict[str, str] | None = None) -> None:
        self._log = log_
        self._tasks = tasks or {}
        self._stop = threading.Event()
        self._node = ""

    def start(self, node: str, queues: list[str], concurrency: int) -> None:
        """Announce now and keep announcing from a daemon thread."""
        self._node = node

        def loop() -> None:
            while True:
                try:
                    self._log.announce_capacity(node, queues, concurrency, self._tasks)
                except Exception as exc:  # Redis away: the announcement just goes stale meanwhile
                    log.warning("capacity announcement failed: %s", exc)
                if self._stop.wait(constants.CAPACITY_INTERVAL_S):
                    return

        threading.Thread(target=loop, name="nerv-capacity", daemon=True).start()

    def stop(self) -> None:
        """Stop announcing and withdraw, so the scheduler stops counting these slots at once."""
        self._stop.set()
        if self._node:
            try:
                self._log.withdraw_capacity(self._node)
            except Exception:
                log.debug("could not withdraw capacity of %s", self._node)


class UnknownTaskLine(logging.Filter):
    """Celery's report of a message for a task this worker does not have, as one warning line.

    Celery logs it as an error with the KeyError's traceback and the whole message body (a page of text
    per message): anyone who can push into a queue can fill a worker's log with tracebacks that look
    like crashes. The message is dropped either way, and nerv's own ``task_unknown`` handler
    (:func:`_on_unknown`) logs what it did with it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Received unregistered task of type"):
            name = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = (
                "received a message for unregistered task %s: dropped",
                (str(name)[:80],),
            )
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules that define tasks (their ``@task`` decorators register them)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import task module {name!r}: {exc}") from exc


class HandoffEvents:
    """Celery task events for the jobs a process ran by hand-off, which had no Celery message of their
    own, so Flower (and anything else that follows task events) shows them like every other task.

    The three events of a job go out in one publish (Celery's "task.multi" batch), after its outcome is
    recorded, while the scheduler is busy with the next hop anyway.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._dispatcher: Any = None
        self._pid = -1

    def _for(self, hostname: str) -> Any:
        if self._dispatcher is None or self._pid != os.getpid() or self._dispatcher.hostname != hostname:
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=hostname, buffer_group=["task"], buffer_limit=1000
            )
            self._pid = os.getpid()
        return self._dispatcher

    def ran(self, hostname: str, queue: str, job: Job, outcome: Event) -> None:
        """Send task-sent (there was no message: the hand-off stands for it), task-received,
        task-started and task-succeeded (or task-failed / task-retried)."""
        try:
            d = self._for(hostname)
            started = float(outcome.data.get("started_at", outcome.ts))
            task = {
                "uuid": job.id,
                "name": job.fn,
                "args": repr(job.args),
                "kwargs": repr(job.kwargs),
                "root_id": job.id,
                "parent_id": None,
                "retries": job.attempt - 1,
                "eta": None,
                "expires": None,
                "timestamp": started,
            }
            d.send("task-sent", queue=queue, exchange="", routing_key=queue, **task)
            d.send("task-received", **task)
            d.send("task-started", uuid=job.id, timestamp=started)
            if outcome.type is EventType.TASK_COMPLETED:
                d.send(
                    "task-succeeded",
                    uuid=job.id,
                    result=repr(outcome.data.get("result")),
                    runtime=outcome.ts - started,
                )
            elif outcome.type is EventType.TASK_SPAWNED:  # the function returned a child workflow
                name = (outcome.data.get("workflow") or {}).get("name")
                d.send(
                    "task-succeeded",
                    uuid=job.id,
                    result=f"<child workflow {name!r}>",
                    runtime=outcome.ts - started,
                )
            else:
                error = outcome.data.get("error") or {}
                kind = "task-retried" if outcome.type is EventType.TASK_RETRYING else "task-failed"
                d.send(
                    kind,
                    uuid=job.id,
                    exception=f"{error.get('type', 'Error')}({error.get('message', '')!r})",
                    traceback=error.get("traceback", ""),
                )
            d.flush()
        except Exception as exc:  # monitoring must never fail a task
            log.warning("could not send task events for handed job %s: %s", job.id, exc)


def refuse(what: str, message_id: object, exc: BaseException) -> None:
    """Log, as one warning line, that a message was refused (it is acknowledged: it never comes back)."""
    log.warning("refused %s %s: %s", what, str(message_id)[:200], describe(exc))


def message_wires(name: str, message_id: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The signed jobs of a Celery message for task ``name`` (its positional arguments); none, with a
    warning, when the message has not the scheduler's form (no job, keyword arguments): nothing of it
    runs, nothing is recorded, the process goes on. The jobs' signatures are checked by the runner."""
    try:
        if kwargs:
            raise MalformedJobError(f"a job message has no keyword arguments, got {sorted(kwargs)!r:.80}")
        if not args:
            raise MalformedJobError("the message carries no job")
    except MalformedJobError as exc:
        refuse(f"a message for {name!r:.80}", message_id, exc)
        return []
    return list(args)


def _celery_task(app: Celery, tf: TaskFunction, runtime: WorkerRuntime, events: HandoffEvents | None) -> None:
    def run(self: Any, *jobs: Any, **extra: Any) -> None:
        # One job, or a batch the scheduler packed (same function, same run).
        wires = message_wires(tf.name, self.request.id, jobs, extra)
        if not wires:
            return
        on_handed = None
        if events is not None:
            # A handed job runs on the queue of the message it follows (the scheduler matches queues).
            queue = str((self.request.delivery_info or {}).get("routing_key") or "")
            on_handed = functools.partial(events.ran, str(self.request.hostname or ""), queue)
        runner = runtime.runner()
        opened = runner.open(wires)  # signed by the scheduler, or refused (README.md#security)
        if opened:
            runner.serve(opened, on_handed, str(self.request.id or ""))

    run.__name__ = run.__qualname__ = tf.name.rsplit(".", 1)[-1]
    run.__doc__ = tf.description or f"nerv task {tf.name}"
    app.task(name=tf.name, typing=False, ignore_result=True, bind=True)(run)


def _on_unknown(runtime: WorkerRuntime, message: Any, name: str) -> None:
    """Jobs for a function this worker does not have: fail the tasks clearly instead of dropping them."""
    runner = runtime.runner()
    try:
        body = message.decode() if hasattr(message, "decode") else json.loads(message.body)
        if not isinstance(body, list | tuple) or not body or not isinstance(body[0], list | tuple):
            raise MalformedJobError("the body is not a Celery message's [args, kwargs, embed]")
        wires = list(body[0])
    except Exception as exc:  # whatever the body holds: refused, the worker goes on
        log.warning(
            "refused a message for unknown task %.80r that is not a nerv job: %s", name, describe(exc)
        )
        return
    jobs = runner.open(wires)  # only the scheduler's jobs get a recorded failure
    if not jobs:
        return
    error = TaskError.from_exception(
        NotRegisteredError(
            f"no worker on queue has task {name!r} registered (worker {runner.worker_id}); "
            "start workers with the module that defines it"
        )
    )
    runner.fail(jobs, error)


def create_worker_app(settings: Settings, modules: Iterable[str] | None = None) -> Celery:
    """A Celery app with every registered task of ``modules`` (default: ``settings.worker_modules``)."""
    container = container_for(settings)
    import_modules(settings.worker_modules if modules is None else modules)
    app: Celery = container.celery()
    shutdown = ShutdownFlag()  # before any pool forks: the children share it
    container.runner.add_kwargs(stopping=shutdown.is_set)
    runtime = WorkerRuntime(container)
    registry = container.registry()
    events = HandoffEvents(app) if settings.task_events else None
    for tf in registry:
        _celery_task(app, tf, runtime, events)
    app.nerv_runtime = runtime

    def on_process_init(**_: Any) -> None:
        runtime.runner()

    def on_ready(sender: Any = None, **_: Any) -> None:
        names = {tf.name: tf.queue for tf in registry}
        if names:  # at once (the beacon refreshes them, with the capacity, from now on)
            container.eventlog().register_tasks(names)
        log.info(
            "worker %s ready with %d tasks: %s",
            getattr(sender, "hostname", "?"),
            len(names),
            ", ".join(sorted(names)),
        )
        # worker_ready's sender is the Consumer; the pool size is on its WorkController.
        controller = getattr(sender, "controller", None)
        if controller is not None:
            queues = list(app.amqp.queues.consume_from)
            beacon.start(str(controller.hostname), queues, int(controller.concurrency))
            runtime.register(queues, str(controller.hostname))

    beacon = CapacityBeacon(container.eventlog(), {tf.name: tf.queue for tf in registry})

    def on_shutdown(**_: Any) -> None:
        beacon.stop()
        runtime.stop()

    def on_shutting_down(**_: Any) -> None:
        shutdown.set()

    def on_unknown(sender: Any = None, message: Any = None, name: str = "", **_: Any) -> None:
        _on_unknown(runtime, message, name)

    def on_logging(**_: Any) -> None:
        # Celery logs two lines per task at INFO ("received", "succeeded"): at thousands of tasks a second
        # that is most of a worker's I/O, and the event log has it all anyway. DEBUG brings them back.
        if settings.log_level.upper() != "DEBUG":
            for name in ("celery.worker.strategy", "celery.app.trace", "celery.worker.request"):
                logging.getLogger(name).setLevel(logging.WARNING)
        consumer = logging.getLogger("celery.worker.consumer.consumer")
        if not any(isinstance(f, UnknownTaskLine) for f in consumer.filters):
            consumer.addFilter(UnknownTaskLine())

    # weak=False: these closures live only as long as the signal holds them.
    after_setup_logger.connect(on_logging, weak=False)
    worker_process_init.connect(on_process_init, weak=False)
    worker_ready.connect(on_ready, weak=False)
    worker_shutting_down.connect(on_shutting_down, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    task_unknown.connect(on_unknown, weak=False)
    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # ``app`` is built on first access, so importing this module has no side effects.
    global _app
    if name == "app":
        if _app is None:
            _app = create_worker_app(Settings.from_env())
        return _app
    raise AttributeError(name)
