"""nerv-cluster: a distributed DAG workflow engine on Celery and Redis.

The public API::

    from nerv_cluster import Cache, Client, Concurrency, RateLimit, Workflow, task, RetryPolicy
"""

from nerv_cluster.bus import EventBus
from nerv_cluster.client import Client
from nerv_cluster.errors import (
    CursorError,
    IdempotencyKeyError,
    IntakeTimeoutError,
    MapError,
    NervError,
    RerunError,
    RunFinishedError,
    RunNotFinishedError,
    ScheduleError,
    ScheduleNotFoundError,
    SignalError,
    TaskTimeoutError,
    UnknownSignalError,
)
from nerv_cluster.limits import Concurrency, RateLimit
from nerv_cluster.model import (
    Cache,
    Event,
    EventType,
    ParentRef,
    RetryPolicy,
    RunStatus,
    TaskDef,
    TaskError,
    TaskPriority,
    TaskResult,
    TaskStatus,
    TriggerRule,
    WorkflowDef,
)
from nerv_cluster.registry import TaskContext, TaskFunction, task
from nerv_cluster.schedules import Schedule, ScheduleSpec
from nerv_cluster.settings import Settings
from nerv_cluster.state import RunResult, StateProjector
from nerv_cluster.workflow import TaskHandle, Workflow

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "Client",
    "Concurrency",
    "CursorError",
    "Event",
    "EventBus",
    "EventType",
    "IdempotencyKeyError",
    "IntakeTimeoutError",
    "MapError",
    "NervError",
    "ParentRef",
    "RateLimit",
    "RerunError",
    "RetryPolicy",
    "RunFinishedError",
    "RunNotFinishedError",
    "RunResult",
    "RunStatus",
    "Schedule",
    "ScheduleError",
    "ScheduleNotFoundError",
    "ScheduleSpec",
    "Settings",
    "SignalError",
    "StateProjector",
    "TaskContext",
    "TaskDef",
    "TaskError",
    "TaskFunction",
    "TaskHandle",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
    "TaskTimeoutError",
    "TriggerRule",
    "UnknownSignalError",
    "Workflow",
    "WorkflowDef",
    "__version__",
    "task",
]
