"""The one error tree of nerv-cluster: catch ``NervError`` to catch them all."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nerv_cluster.launcher import Service


class NervError(Exception):
    """Base of every error raised by nerv-cluster."""


class ConfigurationError(NervError):
    """A setting is missing or malformed."""


class JobSignatureError(NervError):
    """A job message (Celery or hand-off) is unsigned or its signature does not match: not run."""


class WorkflowError(NervError):
    """A workflow definition is invalid; nothing was submitted."""


class CycleError(WorkflowError):
    """The dependencies form a cycle; ``cycle`` lists the task ids in it, in order."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("dependency cycle: " + " -> ".join([*cycle, cycle[0]]))


class UnknownDependencyError(WorkflowError):
    """A task depends on a task id that is not in the workflow."""


class DuplicateTaskError(WorkflowError):
    """Two tasks in one workflow share an id."""


class InvalidIdError(WorkflowError):
    """A run id or task id uses characters outside the id alphabet or is too long."""


class UnknownTaskError(WorkflowError):
    """A task function name is registered nowhere (not locally, not by any worker)."""


class SerializationError(WorkflowError):
    """An argument or result is not JSON-serialisable."""


class PayloadTooLargeError(WorkflowError):
    """An argument payload or a result is larger than the configured limit."""


class RerunError(WorkflowError):
    """A rerun cannot be done as asked (the run was rejected, nothing to rerun, an unknown task id);
    nothing was written."""


class RunNotFinishedError(RerunError):
    """Only a finished run can be rerun: this one is still going."""


class SignalError(WorkflowError):
    """A signal cannot be delivered (issue 11, part "waits"): nothing was written."""


class UnknownSignalError(SignalError):
    """The run has no ``wait_for`` node of that signal name."""


class RunFinishedError(SignalError):
    """The run is over: no node of it can receive a signal any more."""


# idem (issue 11, parts 4 and 5): idempotent submission and schedules.
class IdempotencyKeyError(WorkflowError):
    """An idempotency key is not a non-empty string within the length limit."""


class ScheduleError(WorkflowError):
    """A schedule's definition is invalid (cron, interval, overlap, catchup, time zone, factory,
    arguments); nothing was written."""


class ScheduleNotFoundError(ScheduleError):
    """No schedule of that name exists (never added, or deleted)."""


class MalformedEventError(NervError):
    """A log entry is not a valid event (bad JSON, a missing or mistyped field); it is skipped."""


class UnknownEventTypeError(MalformedEventError):
    """A log entry has an event type this version does not know (a newer writer); it is skipped."""


class MalformedJobError(NervError):
    """A job message (a Celery message's body, a hand-off list entry) is not a valid job: the worker
    refuses it with a warning, runs nothing and records nothing."""


class MalformedCheckpointError(NervError, ValueError):
    """A stored checkpoint cannot be decoded (another format, a corrupted entry): it is ignored and the
    run's whole log is replayed."""


class RegistrationError(NervError):
    """A task function cannot be registered (bad name, name clash, bad options)."""


class RunNotFoundError(NervError):
    """No run with this id exists in the event log."""


class CursorError(NervError):
    """A time-travel position names no point of the run's log: not a stream entry id, before the
    run's submission, or an event count below one."""


class RunMovedError(NervError):
    """A run's log gained entries (or the run was rerun) after the caller read it: read it again."""


class WaitTimeoutError(NervError, TimeoutError):
    """A run did not finish within the time ``Client.wait`` was given."""


class IntakeTimeoutError(NervError, TimeoutError):
    """No scheduler answered a client's request within ``NERV_INTAKE_TIMEOUT`` seconds; the request
    stays in the intake and may still be applied when a scheduler runs."""


class MalformedRequestError(NervError):
    """An intake request is no valid request (not JSON, a missing or mistyped field, too large): the
    scheduler refuses it and applies nothing."""


class ReplicationError(NervError):
    """A write whose loss would lose work did not reach ``NERV_REDIS_MIN_REPLICAS`` replicas in time
    (a replica down, or this primary cut off from them): it was not acknowledged; retry it (nerv's
    writes are idempotent)."""

    def __init__(self, message: str, acked: int = 0, wanted: int = 0) -> None:
        self.acked = acked
        self.wanted = wanted
        super().__init__(message)


class StoreFullError(NervError):
    """Redis is at its ``maxmemory`` (``noeviction``: it refuses writes rather than drop keys): the write
    was refused and nothing of it was written; retry once memory is freed (finished runs expire after
    their retention time) or the limit raised."""


class LeaseLostError(NervError):
    """This scheduler no longer holds the lease; its writes are fenced off."""


class TaskFailedError(NervError):
    """A run finished without success; raised by ``RunResult.raise_for_status``."""


class TaskTimeoutError(NervError):
    """A task ran past its time limit."""


class NotRegisteredError(NervError):
    """A worker received a task whose name no module on it registered."""


class CircuitOpenError(NervError):
    """The task function's circuit breaker is open: the attempt failed fast without running."""


class DispatchError(NervError):
    """The broker refused a job's message (not a lost connection: it answered no); its task fails."""


class WorkerLostError(NervError):
    """The worker process running a task died before recording an outcome, too many times."""


class CacheKeyError(NervError):
    """A task's custom cache key could not be computed (its key function is not registered in the
    scheduler, raised, or returned no string): the task fails."""


class ChildRunFailedError(NervError):
    """A task's child run (the workflow its function returned) failed or was cancelled; it names the
    child run and its failed task."""


class ChildDepthError(NervError):
    """A task returned a workflow nested deeper than ``NERV_MAX_CHILD_DEPTH`` allows."""


class ChildRunIdTakenError(NervError):
    """The run id a child run derives from its parent attempt is already taken by another run."""


class MapError(NervError):
    """A map node cannot be expanded (what it maps over is not a list, or has too many elements), or
    an element of it did not complete: the map fails with this error."""


class ServiceFailed(NervError):
    """A service the launcher started exited, did not become ready, or left processes behind after
    SIGKILL; ``service`` says which."""

    def __init__(self, message: str, service: Service) -> None:
        super().__init__(message)
        self.service = service
