"""What a failed attempt leads to: another attempt after a delay (TASK_RETRYING) or TASK_FAILED.

Pure functions, used by workers (the task raised) and by the scheduler (the task timed out, or its
worker was lost too often), so a retry policy means the same thing wherever the failure is seen.
"""

from __future__ import annotations

import random
from typing import Any

from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType, RetryPolicy, TaskError


def failure_outcome(
    policy: RetryPolicy | None,
    attempt: int,
    error: TaskError,
    now: float,
    rng: random.Random | None = None,
    *,
    first: int = 1,
) -> tuple[EventType, dict[str, Any]]:
    """The event type and data that record failed attempt ``attempt``.

    With a policy that allows another attempt for this error, TASK_RETRYING carries the next attempt
    number, the delay and the due time (the scheduler holds the task until then); otherwise TASK_FAILED.
    ``first``: the first attempt of the task's current round (a rerun starts the policy over there).
    """
    data: dict[str, Any] = {"error": error.to_dict()}
    tried = attempt - first + 1  # attempts of this round, the policy's count
    if policy is not None and policy.allows(tried, error.types or (error.type,)):
        delay = policy.delay(tried, rng)
        data.update(next_attempt=attempt + 1, delay=delay, due_at=now + delay)
        return EventType.TASK_RETRYING, data
    return EventType.TASK_FAILED, data


def job_failed(job: Job, error: TaskError, reason: str, now: float, source: str) -> Event:
    """TASK_FAILED for a job the scheduler gives up on before any worker ran it (it cannot be sent, or
    is over a bound), with the error and a short reason."""
    return Event(
        EventType.TASK_FAILED,
        job.run_id,
        job.task_id,
        job.attempt,
        {"error": error.to_dict(), "reason": reason},
        ts=now,
        source=source,
    )
