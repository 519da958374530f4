"""Sending jobs to the worker queues as Celery tasks, many per Redis round trip."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from celery import Celery

from nerv_cluster.jobs import Job

#: Extra seconds a task gets past its soft limit before the hard limit kills it.
HARD_LIMIT_GRACE = 2.0


class Dispatcher:
    """Sends jobs with one producer, batched into pipelined LPUSHes (kombu's ``Producer.batch``)."""

    def __init__(self, app: Celery, batch_size: int = 1000) -> None:
        self.app = app
        self.batch_size = batch_size

    def send(self, jobs: Sequence[tuple[Job, str]]) -> None:
        """Send each (job, queue). The Celery task name is the job's function name (Flower shows it)."""
        if not jobs:
            return
        app = self.app
        with app.producer_or_acquire() as producer, producer.batch(max_size=self.batch_size):
            for job, queue in jobs:
                limits = {}
                if job.timeout:
                    limits = {"soft_time_limit": job.timeout, "time_limit": job.timeout + HARD_LIMIT_GRACE}
                app.send_task(
                    job.fn,
                    args=[job.to_dict()],
                    queue=queue,
                    routing_key=queue,
                    task_id=job.id,
                    producer=producer,
                    **limits,
                )

    def revoke(self, job_ids: Iterable[str]) -> None:
        """Stop these jobs: workers drop them if not started and terminate them if running."""
        ids = list(job_ids)
        if ids:
            self.app.control.revoke(ids, terminate=True, signal="SIGTERM")
